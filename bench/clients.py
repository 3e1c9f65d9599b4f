"""HTTP load for the benchmark: one request, requests one at a time, concurrent clients, and keep-alive load
(wrk when installed, else an asyncio client on raw sockets), plus a reader for the server's /metrics."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import requests

from workload import CONTENT_TYPE

BENCH_DIR = Path(__file__).resolve().parent
_CACHED = re.compile(rb'"cached":\s*true')


class BadResponse(AssertionError):
    """The server answered something other than a caption for every image."""


def post(session: requests.Session, url: str, body: bytes, expect_images: int, cached: bool | None = None,
         timeout: float = 600) -> tuple[float, list[dict[str, Any]]]:
    """POST one prebuilt multipart body to /caption-images; (seconds, results).

    Raises unless every image got a caption, and (when `cached` is given) unless every one was a cache hit
    (True) or freshly captioned (False), so a stray hit can never pass for model work.
    """
    started = time.perf_counter()
    response = session.post(url + "/caption-images", data=body, headers={"Content-Type": CONTENT_TYPE},
                            timeout=timeout)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise BadResponse(f"HTTP {response.status_code}: {response.text[:500]}")
    results = response.json()["results"]
    if len(results) != expect_images or any("caption" not in r for r in results):
        raise BadResponse(f"expected {expect_images} captions, got {json.dumps(results)[:500]}")
    if cached is not None and any(r["cached"] is not cached for r in results):
        raise BadResponse(f"expected every result with cached={cached}, got {json.dumps(results)[:500]}")
    return seconds, results


def reset_cache(url: str) -> None:
    """GET /reset-redis: the next requests miss the cache (the service deletes only its own keys)."""
    response = requests.get(url + "/reset-redis", timeout=30)
    if response.status_code != 200:
        raise BadResponse(f"/reset-redis answered {response.status_code}: {response.text[:300]}")


def sequential(url: str, bodies: Sequence[bytes], cached: bool | None = None) -> float:
    """Send the requests one after another on one keep-alive connection; total seconds."""
    with requests.Session() as session:
        session.get(url + "/healthz", timeout=10)  # connect before the clock starts, as the concurrent clients do
        started = time.perf_counter()
        for body in bodies:
            post(session, url, body, 1, cached)
        return time.perf_counter() - started


def concurrent(url: str, bodies: Sequence[bytes], cached: bool | None = None) -> tuple[float, list[float]]:
    """One client thread per body, all released at once; (seconds until the last answer, each request's seconds)."""
    sessions = [requests.Session() for _ in bodies]
    for session in sessions:
        session.get(url + "/healthz", timeout=10)
    barrier = threading.Barrier(len(bodies) + 1)
    latencies: list[float | None] = [None] * len(bodies)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        barrier.wait()
        try:
            latencies[index] = post(sessions[index], url, bodies[index], 1, cached)[0]
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for session in sessions:
        session.close()
    if errors:
        raise errors[0]
    return seconds, [lat for lat in latencies if lat is not None]


def scrape(url: str) -> dict[str, float]:
    """The service's batching counters from /metrics (batches, images, generate seconds, requests)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"caption_batch_size_count": "batches", "caption_batch_size_sum": "batched_images",
              "caption_generate_duration_seconds_sum": "generate_s"}
    values = {v: 0.0 for v in wanted.values()}
    values.update(http_caption_requests=0.0, http_caption_s=0.0)
    text = requests.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[wanted[sample.name]] = sample.value
            elif sample.labels.get("endpoint") == "/caption-images":
                if sample.name == "caption_http_request_duration_seconds_count":
                    values["http_caption_requests"] = sample.value
                elif sample.name == "caption_http_request_duration_seconds_sum":
                    values["http_caption_s"] = sample.value
    return values


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What happened on the server between two scrapes."""
    d = {k: round(after[k] - before[k], 4) for k in after}
    d["mean_batch_size"] = round(d["batched_images"] / d["batches"], 2) if d["batches"] else None
    return d


# ----- keep-alive load ---------------------------------------------------------------------------------------
def wrk_available() -> bool:
    """Whether the wrk load generator is installed."""
    return shutil.which("wrk") is not None


def wrk_load(url: str, body: bytes, connections: int, seconds: float, threads: int = 2) -> dict[str, Any]:
    """Closed-loop keep-alive load with wrk (C, so the client costs little CPU beside the server)."""
    with tempfile.NamedTemporaryFile(prefix="bench-body-", delete=False) as f:
        f.write(body)
    try:
        env = {**os.environ, "BENCH_BODY": f.name, "BENCH_CONTENT_TYPE": CONTENT_TYPE}
        command = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                   "--timeout", "10s", "-s", str(BENCH_DIR / "cache_hit.lua"), url]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-800:]} {out.stderr[-800:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    lat = raw["latency_us"]
    duration = raw["duration_us"] / 1e6
    return {"client": "wrk", "connections": connections, "seconds": round(duration, 2), "requests": raw["requests"],
            "req_per_s": round(raw["requests"] / duration, 1), "hits": raw["hits"], "misses": raw["misses"],
            "errors": sum(raw["errors"].values()),
            "latency_ms": {"p50": lat["p50"] / 1000, "p90": lat["p90"] / 1000, "p99": lat["p99"] / 1000,
                           "max": lat["max"] / 1000, "mean": round(lat["mean"] / 1000, 3)}}


def socket_load(host: str, port: int, body: bytes, connections: int, seconds: float,
                rate: float | None = None) -> dict[str, Any]:
    """Keep-alive load from an asyncio client on raw sockets (the request bytes are built once).

    rate None: closed loop, each connection sends its next request when the last one is answered.
    rate R: open loop at R requests/s in all, spread evenly over the connections; a request's latency is
    counted from when it was due (so a stalled server is not hidden by the client waiting for it), and
    also from when it was sent.
    """
    return asyncio.run(_socket_load(host, port, body, connections, seconds, rate))


async def _socket_load(host: str, port: int, body: bytes, connections: int, seconds: float,
                       rate: float | None) -> dict[str, Any]:
    request = (f"POST /caption-images HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {CONTENT_TYPE}\r\n"
               f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body
    from_due: list[float] = []
    from_send: list[float] = []
    counts = {"hits": 0, "misses": 0, "errors": 0}
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    stop = start + seconds
    last_done = start

    async def connection(index: int) -> None:
        nonlocal last_done
        reader, writer = await asyncio.open_connection(host, port)
        k = 0
        try:
            while True:
                due = start + (index + k * connections) / rate if rate else max(loop.time(), start)
                if due >= stop:
                    return
                k += 1
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                sent = loop.time()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if not length:
                    raise BadResponse(f"response without Content-Length: {head[:300]!r}")
                answer = await reader.readexactly(int(length.group(1)))
                done = loop.time()
                last_done = max(last_done, done)
                from_due.append(done - due)
                from_send.append(done - sent)
                if not head.startswith(b"HTTP/1.1 200"):
                    counts["errors"] += 1
                elif _CACHED.search(answer):
                    counts["hits"] += 1
                else:
                    counts["misses"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(i) for i in range(connections)))
    elapsed = last_done - start
    result = {"client": "asyncio sockets", "connections": connections, "seconds": round(elapsed, 2),
              "requests": len(from_send), "req_per_s": round(len(from_send) / elapsed, 1) if elapsed > 0 else None,
              **counts, "latency_ms": percentiles_ms(from_due if rate else from_send)}
    if rate:
        result["offered_req_per_s"] = rate
        result["latency_from_send_ms"] = percentiles_ms(from_send)
    return result


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of latencies in seconds, as milliseconds."""
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3),
            "mean": round(float(a.mean()), 3)}
