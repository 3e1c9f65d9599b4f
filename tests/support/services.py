"""Real services for tests: a throwaway redis-server, the service as a real HTTP server process.

A test that cannot find a service it needs skips on a developer's machine and FAILS in CI (CI=true).
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import uuid
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_LOG_DIR = tempfile.mkdtemp(prefix="imgcap-test-logs-")
atexit.register(shutil.rmtree, _LOG_DIR, True)


def missing_service(reason: str) -> None:
    """Skip the current test (developer machine) or fail it (CI) because a service is missing."""
    if IN_CI:
        raise AssertionError(f"required service missing in CI: {reason}")
    raise unittest.SkipTest(reason)


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_prefix(name: str = "test") -> str:
    """A cache prefix no other test (or program) uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


class RedisServer:
    """A redis-server of our own on a free port, with no persistence; can be stopped and started again."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if not self.binary:
            missing_service("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="test-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        """Start (or restart, on the same port) and wait until it answers PING."""
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Kill the server (as an outage would)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, decode_responses=True)


class ServerProcess:
    """`python app.py ARGS` as a child process on a free port, with its log captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = [sys.executable, str(REPO_ROOT / "app.py"), *args, "--port", str(self.port)]
        self.log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=_LOG_DIR)[1])
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    # a .env in the developer's checkout must not change what the tests run; float32 as the
                    # oracle computes (--dtype auto picks bfloat16 on some CPUs: tests/test_dtype.py)
                    "ENV_FILE": os.devnull, "DTYPE": "float32", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 120) -> "ServerProcess":
        """Start the server; by default wait until /readyz says 200."""
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.args, env=self.env, cwd=REPO_ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait for /readyz 200; if the server exits or is not ready in time, stop it and fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the process to end by itself; returns its exit code."""
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post_images(self, files: list[tuple[str, bytes]], prompt: str | None = None, **kwargs: Any
                    ) -> requests.Response:
        """POST /caption-images with these (filename, bytes) files under `images`."""
        data = {"prompt": prompt} if prompt is not None else None
        return self.session.post(self.url + "/caption-images",
                                 files=[("images", (name, body)) for name, body in files], data=data,
                                 timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        self.session.close()
