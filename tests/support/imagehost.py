"""A local HTTP server that serves images to the URL tests, and counts every request it gets.

    host = ImageHost({"/a.png": png_bytes}).start()   # 127.0.0.1, a free port
    host.url("/a.png"); host.hits["/a.png"]          # requests seen per path
    /redirect?to=URL   302 to URL               /slow     never answers (until the host stops, 30 s at most)
    /big               an endless image-like body (streams until the client stops reading; `host.big_sent`)
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

BIG_CHUNK = 64 * 1024
BIG_TOTAL = 256 * 1024 * 1024  # what /big would send to a client that read it all


class ImageHost:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.hits: Counter[str] = Counter()
        self.big_sent = 0
        self.stopping = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                path = urlsplit(self.path).path
                host.hits[path] += 1
                if path in host.files:
                    self._send(200, host.files[path], "image/png")
                elif path == "/redirect":
                    target = parse_qs(urlsplit(self.path).query).get("to", [""])[0]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/slow":
                    host.stopping.wait(30)
                elif path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(BIG_TOTAL))
                    self.end_headers()
                    chunk = b"\x89PNG\r\n\x1a\n" + b"\0" * (BIG_CHUNK - 8)
                    try:
                        while host.big_sent < BIG_TOTAL and not host.stopping.is_set():
                            self.wfile.write(chunk)
                            host.big_sent += len(chunk)
                    except OSError:
                        pass  # the client stopped reading and closed: what the test wants
                else:
                    self._send(404, b"no such file", "text/plain")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def start(self) -> "ImageHost":
        threading.Thread(target=self.server.serve_forever, daemon=True, name="image-host").start()
        return self

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def wait_big_done(self, timeout: float = 10) -> int:
        """Bytes /big sent, once it stopped sending (the client went away)."""
        deadline, last = time.monotonic() + timeout, -1
        while time.monotonic() < deadline and last != self.big_sent:
            last = self.big_sent
            time.sleep(0.5)
        return self.big_sent

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
