"""HTTP helpers for the tests that talk to a real server process: posting, raw sockets, metrics, checks."""
from __future__ import annotations

import re
import socket
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from support.tiny_models import image_bytes, sample_images

if TYPE_CHECKING:
    from support.services import ServerProcess

_SEEDS = iter(range(10_000, 1_000_000))
_SEED_LOCK = threading.Lock()


def new_png(size: tuple[int, int] = (48, 40)) -> bytes:
    """A PNG no test has posted before (so it is certainly not in any cache)."""
    with _SEED_LOCK:
        seed = next(_SEEDS)
    rng = np.random.default_rng(seed)
    return image_bytes(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB"))


def sample_uploads() -> list[tuple[str, bytes]]:
    """Two of the sample images as uploads: a.jpg (JPEG) and b.png (PNG)."""
    a, b, _ = sample_images()
    return [("a.jpg", image_bytes(a, "JPEG")), ("b.png", image_bytes(b, "PNG"))]


def proc_status_kb(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class PeakRss:
    """While the block runs, a thread samples a process's VmRSS; `peak_kb` is the highest seen (in kB)."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kb = proc_status_kb(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS"))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def metric(server: "ServerProcess", sample_name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics (0 when it does not exist yet)."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def assert_json_error(test: unittest.TestCase, response: requests.Response, status: int | tuple[int, ...],
                      code: str | None = None) -> dict[str, Any]:
    """A top-level `{"error": {"code", "message"}}` answer with this status; returns the error object."""
    statuses = (status,) if isinstance(status, int) else status
    test.assertIn(response.status_code, statuses, response.text[:500])
    test.assertEqual(response.headers.get("Content-Type", "").split(";")[0], "application/json")
    error = response.json()["error"]
    test.assertTrue(error["message"], error)
    if code is not None:
        test.assertEqual(error["code"], code, error)
    return error


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes after errors): status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in received or not _complete(received):
            if time.monotonic() > deadline:
                raise AssertionError(f"no complete answer in {timeout} s: {received[:300]!r}")
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    return bool(match) and len(body) >= int(match.group(1))


def run_concurrently(count: int, task: Callable[[int], Any]) -> list[Any]:
    """Run task(0..count-1) in `count` threads released together; returns the results in index order."""
    barrier = threading.Barrier(count)

    def run(i: int) -> Any:
        barrier.wait(30)
        return task(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def post(url: str, files: list[tuple[str, bytes]], prompt: str | None = None, timeout: float = 120
         ) -> requests.Response:
    """POST /caption-images on a fresh connection (requests.Session is not thread-safe)."""
    return requests.post(url + "/caption-images", files=[("images", f) for f in files],
                         data={"prompt": prompt} if prompt else None, timeout=timeout)


