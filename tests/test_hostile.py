"""Hostile and heavy clients (issue 10), against `python app.py` on the tiny BLIP checkpoint: large photos and
the memory budget, slow-header sockets, wrong-shaped cache entries, cross-site and foreign-Host requests,
awkward filenames, no HTML or redirects anywhere, bounded metric labels, one-line logs, graceful shutdown."""
from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import signal
import socket
import threading
import time
import unittest
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from support import corpus
from support.http import assert_json_error, new_png, post, proc_status_kb, run_concurrently
from support.services import RedisServer, ServerProcess, unique_prefix
from support.tiny_models import tiny_checkpoint

MiB = 1024 * 1024
REDIS: RedisServer | None = None


def setUpModule() -> None:
    global REDIS
    REDIS = RedisServer().start()


def tearDownModule() -> None:
    if REDIS is not None:
        REDIS.close()


def blip_server(**env: str) -> ServerProcess:
    return ServerProcess(["--model-path", str(tiny_checkpoint("blip"))], env=env)


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"hostile-boundary") -> tuple[bytes, str]:
    """A multipart body from raw (Content-Disposition value, data) pairs, bytes as given."""
    body = b""
    for disposition, data in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        body += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


def send(port: int, method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly this method, path and Host; (status, lower-cased headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


# ----- memory: large photos are decoded under a budget, and dropped once preprocessed --------------------------
class LargePhotosTest(unittest.TestCase):
    """8 concurrent clients x 8 PNGs of exactly MAX_IMAGE_PIXELS (10000 x 5000), default settings."""

    def test_peak_memory_stays_within_1_5_gb_and_every_client_gets_its_8_captions(self) -> None:
        pngs = corpus.large_pngs(10000, 5000, 64)
        server = blip_server(CACHE_BACKEND="memory").start()
        self.addCleanup(server.stop)
        self.assertEqual(post(server.url, [("warm.png", new_png())]).status_code, 200)
        pid = server.process.pid
        idle = proc_status_kb(pid, "VmRSS")
        peak, done = [idle], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc_status_kb(pid, "VmRSS"))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            responses = run_concurrently(8, lambda c: post(server.url, [(f"c{c}-{i}.png", pngs[c * 8 + i])
                                                                       for i in range(8)], timeout=600))
        finally:
            done.set()
            watcher.join(5)
        for c, response in enumerate(responses):
            with self.subTest(client=c):
                self.assertEqual(response.status_code, 200, response.text[:300])
                results = response.json()["results"]
                self.assertEqual([r["filename"] for r in results], [f"c{c}-{i}.png" for i in range(8)])
                self.assertTrue(all(r.get("caption") for r in results), results)
        growth_mib = (max(peak[0], proc_status_kb(pid, "VmHWM")) - idle) / 1024
        print(f"\n[large photos] idle RSS {idle / 1024:.0f} MiB, peak growth {growth_mib:.0f} MiB")
        self.assertLess(growth_mib, 1536, f"RSS grew by {growth_mib:.0f} MiB over idle")
        self.assertNotIn("Traceback", server.log())


# ----- slow clients cost a socket, not the service --------------------------------------------------------------
class SlowClientsTest(unittest.TestCase):
    """500 sockets that send request headers one byte per second (HEADER_TIMEOUT_SECONDS default, 10 s)."""

    SOCKETS = 500
    HEADER_TIMEOUT = 10.0  # the documented default

    def test_slow_header_sockets_lock_nobody_out_and_are_closed_in_time(self) -> None:
        server = blip_server(CACHE_BACKEND="memory").start()
        self.addCleanup(server.stop)
        cached = new_png()
        self.assertEqual(post(server.url, [("cached.png", cached)]).status_code, 200)
        started = time.monotonic()
        self.assertEqual(post(server.url, [("fresh.png", new_png())]).status_code, 200)
        normal = time.monotonic() - started

        head = (b"POST /caption-images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                b"boundary=x\r\nContent-Length: 100000\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n")
        sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(self.SOCKETS)]
        self.addCleanup(lambda: [s.close() for s in sockets])
        opened = time.monotonic()
        closed: dict[int, float] = {}
        stop = threading.Event()

        def trickle() -> None:  # one byte per socket per second, until the server closes it (bounded)
            for position in range(len(head)):
                if stop.is_set() or len(closed) == len(sockets) or time.monotonic() - opened > 60:
                    return
                for index, sock in enumerate(sockets):
                    if index not in closed:
                        try:
                            sock.send(head[position:position + 1])
                        except OSError:
                            closed[index] = time.monotonic()
                stop.wait(1.0)

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        self.addCleanup(stop.set)
        time.sleep(2)  # all of them connected and trickling

        started = time.monotonic()
        response = post(server.url, [("cached.png", cached)], timeout=10)
        answered_in = time.monotonic() - started
        self.assertEqual(response.status_code, 200)
        self.assertIs(response.json()["results"][0]["cached"], True)
        self.assertLess(answered_in, 1.0, "a cached answer took too long while slow sockets were open")
        started = time.monotonic()
        response = post(server.url, [("new.png", new_png())], timeout=30)
        self.assertEqual(response.status_code, 200)
        self.assertLess(time.monotonic() - started, normal + 3.0, "a new image took much longer than normal")

        # The server closes every slow socket (408 JSON) within the header timeout (+ its 1 s sweep).
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(sockets):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        answers: dict[int, bytes] = {}
        deadline = opened + self.HEADER_TIMEOUT + 5
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                answers[key.data] = answers.get(key.data, b"") + data
                if not data:
                    selector.unregister(key.fileobj)
                    closed.setdefault(key.data, time.monotonic())
        stop.set()
        self.assertEqual(len(closed), len(sockets), f"{len(sockets) - len(closed)} slow sockets are still open")
        self.assertLessEqual(max(closed.values()) - opened, self.HEADER_TIMEOUT + 3)
        self.assertGreaterEqual(min(closed.values()) - opened, self.HEADER_TIMEOUT - 1)
        timed_out = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408")]
        self.assertGreater(len(timed_out), 0.9 * len(sockets))
        self.assertIn(b'"code": "request_timeout"', timed_out[0])
        self.assertIsNone(server.process.poll())
        self.assertEqual(post(server.url, [("after.png", new_png())]).status_code, 200)


# ----- one server with Redis for the request-level checks -------------------------------------------------------
class HostileRequestsTest(unittest.TestCase):
    """Cache entries of the wrong shape, cross-site and foreign-Host requests, filenames, HTML, metrics, logs."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.prefix = unique_prefix("hostile")
        cls.server = blip_server(REDIS_HOST="127.0.0.1", REDIS_PORT=str(REDIS.port), CACHE_PREFIX=cls.prefix).start()
        cls.redis = REDIS.client()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def key_of(self, sha256: str) -> str:
        keys = [k for k in self.redis.scan_iter(match=f"{self.prefix}:*:{sha256}") if not k.endswith(":lock")]
        self.assertEqual(len(keys), 1, keys)
        return keys[0]

    def test_wrong_shaped_cache_entries_are_misses_and_are_repaired(self) -> None:
        import hashlib

        png = new_png()
        first = post(self.server.url, [("a.png", png)]).json()["results"][0]
        key = self.key_of(hashlib.sha256(png).hexdigest())
        for bad in ('{"foo": 1}', '{"caption": "x"}', '{"caption": 5, "tags": "x"}', '{"caption": "x", "tags": [1]}',
                    '[1, 2]', '"text"', "not json{"):
            with self.subTest(bad=bad):
                self.redis.set(key, bad, ex=600)
                response = post(self.server.url, [("a.png", png)])
                self.assertEqual(response.status_code, 200, response.text)
                result = response.json()["results"][0]
                self.assertEqual((result["caption"], result["tags"], result["cached"]),
                                 (first["caption"], first["tags"], False))
                self.assertEqual(json.loads(self.redis.get(key)), {"caption": first["caption"], "tags": first["tags"]})
                self.assertIs(post(self.server.url, [("a.png", png)]).json()["results"][0]["cached"], True)
        self.assertNotIn("Traceback", self.server.log())

    def test_cross_site_reset_is_refused_and_deletes_nothing(self) -> None:
        post(self.server.url, [("keep.png", new_png())])
        before = len(list(self.redis.scan_iter(match=f"{self.prefix}:*")))
        self.assertGreater(before, 0)
        origin = f"http://127.0.0.1:{self.server.port}"
        for headers in ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
                        {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Referer": "http://evil.example/page.html"}):
            for method in ("GET", "POST"):
                with self.subTest(headers=headers, method=method):
                    response = requests.request(method, self.server.url + "/reset-redis", headers=headers, timeout=10)
                    assert_json_error(self, response, 403, "cross_site_request")
                    self.assertEqual(len(list(self.redis.scan_iter(match=f"{self.prefix}:*"))), before)
        same_origin = requests.post(self.server.url + "/reset-redis", timeout=10,
                                    headers={"Sec-Fetch-Site": "same-origin", "Origin": origin})
        self.assertEqual(same_origin.status_code, 200, same_origin.text)
        post(self.server.url, [("again.png", new_png())])
        curl_like = requests.get(self.server.url + "/reset-redis", timeout=10)  # no browser headers at all
        self.assertEqual(curl_like.status_code, 200)
        self.assertGreater(curl_like.json()["deleted"], 0)

    def test_foreign_host_is_400_json_and_loopback_names_work(self) -> None:
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example"):
            for path in ("/", "/healthz", "/caption-images", "/nope"):
                with self.subTest(host=host, path=path):
                    status, headers, body = send(self.server.port, "GET", path, host)
                    self.assertEqual(status, 400, body[:200])
                    self.assertEqual(headers["content-type"].split(";")[0], "application/json")
                    self.assertEqual(json.loads(body)["error"]["code"], "host_not_allowed")
        for host in (f"127.0.0.1:{self.server.port}", f"localhost:{self.server.port}", "localhost",
                     f"[::1]:{self.server.port}", "LOCALHOST"):
            with self.subTest(host=host):
                self.assertEqual(send(self.server.port, "GET", "/healthz", host)[0], 200)

    def test_every_file_part_gets_a_result_whatever_its_filename(self) -> None:
        names = [b"plain.png", b"a\rb.png", b"a\nb.png", b"a\x00b.png", "café.png".encode("latin-1"),
                 ("😀" * 1024 + ".png").encode(), b'quo\\"te.png', b"C:\\Users\\me\\photo.png"]
        expected = ["plain.png", "a\rb.png", "a\nb.png", "a\x00b.png", "café.png", "😀" * 1024 + ".png",
                    'quo"te.png', "C:\\Users\\me\\photo.png"]
        parts = [(b'form-data; name="images"; filename="' + name + b'"', new_png()) for name in names]
        parts.append((b'form-data; name="images"', b"just some text"))  # a part without a filename
        body, content_type = multipart(parts)
        response = requests.post(self.server.url + "/caption-images", data=body, timeout=60,
                                 headers={"Content-Type": content_type})
        self.assertEqual(response.status_code, 200, response.text[:500])
        results = response.json()["results"]
        self.assertEqual(len(results), len(parts))
        self.assertEqual([r["filename"] for r in results], expected + [""])
        for result in results[:-1]:
            self.assertTrue(result.get("caption"), result)
        self.assertEqual(results[-1]["error"]["code"], "not_an_image")

    def test_an_unreadable_part_is_a_400_that_says_which(self) -> None:
        body = (b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"ok.png\"\r\n\r\n" + new_png()
                + b"\r\n--b\r\nContent-Type: image/png\r\n\r\nno disposition\r\n--b--\r\n")
        response = requests.post(self.server.url + "/caption-images", data=body, timeout=30,
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
        error = assert_json_error(self, response, 400, "unreadable_part")
        self.assertIn("after part 1", error["message"])

    def test_no_html_and_no_redirect_anywhere_and_nosniff_everywhere(self) -> None:
        allowed = f"127.0.0.1:{self.server.port}"
        paths = ["/", "/caption-images", "/healthz", "/readyz", "/metrics", "/openapi.json", "/static/app.js",
                 "/static//app.js", "/static/../app.py", "//", "/nope", "/caption-images/", "/healthz/",
                 "//healthz", "/static/%2e%2e/app.py"]
        for path in paths:
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
                for host in (allowed, "evil.example"):
                    with self.subTest(path=path, method=method, host=host):
                        status, headers, body = send(self.server.port, method, path, host)
                        self.assertLess(status, 500, body[:300])
                        self.assertFalse(300 <= status < 400, f"a redirect: {status} {headers.get('location')}")
                        self.assertEqual(headers.get("x-content-type-options"), "nosniff")
                        if headers.get("content-type", "").startswith("text/html"):
                            # Only the demo page (werkzeug's router reads "//" as "/", which is that page too).
                            self.assertEqual((path.strip("/"), host, status), ("", allowed, 200))
                            self.assertIn("frame-ancestors 'none'", headers["content-security-policy"])

    def test_invented_methods_and_paths_add_no_metric_series(self) -> None:
        def series() -> int:
            text = requests.get(self.server.url + "/metrics", timeout=10).text
            return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

        def noise(count: int) -> None:
            for i in range(count):
                send(self.server.port, f"X{uuid.uuid4().hex[:8].upper()}", f"/{uuid.uuid4().hex}/{i}",
                     f"127.0.0.1:{self.server.port}")

        noise(20)
        series()  # the first scrape adds /metrics' own series
        before = series()
        noise(300)
        self.assertEqual(series(), before)

    def test_text_log_lines_cannot_be_forged(self) -> None:
        marker = uuid.uuid4().hex[:12]
        send(self.server.port, "GET", f"/x%0D%0Aforged-{marker}%0A2026-01-01%20INFO%20app:%20fake",
             f"127.0.0.1:{self.server.port}")
        time.sleep(0.2)
        log = self.server.log()
        self.assertIn(marker, log)
        for line in log.splitlines():
            self.assertFalse(line.startswith(f"forged-{marker}"), line)
            self.assertFalse(line.startswith("2026-01-01 INFO app: fake"), line)
        self.assertRegex(log, rf"/x\\r\\nforged-{marker}\\n2026-01-01")


# ----- shutdown: every accepted request is answered ----------------------------------------------------------
class GracefulShutdownTest(unittest.TestCase):
    """SIGTERM while 8 clients wait on 8 new images each."""

    def test_sigterm_lets_every_accepted_request_finish_then_exits_0(self) -> None:
        server = blip_server(CACHE_BACKEND="memory", SHUTDOWN_GRACE_SECONDS="30").start()
        self.addCleanup(server.stop)
        pngs = corpus.large_pngs(3000, 2000, 64)

        def client(c: int) -> requests.Response:
            return post(server.url, [(f"c{c}-{i}.png", pngs[c * 8 + i]) for i in range(8)], timeout=120)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, c) for c in range(8)]
            time.sleep(1.5)  # every request sent and accepted; the model has seconds of work ahead
            self.assertFalse(all(f.done() for f in futures), "the work finished before the signal")
            signalled = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            time.sleep(0.5)
            with self.assertRaises(requests.ConnectionError):  # no new connections once draining
                requests.get(server.url + "/healthz", timeout=5)
            responses = [f.result() for f in futures]
        for c, response in enumerate(responses):
            with self.subTest(client=c):
                self.assertEqual(response.status_code, 200, response.text[:300])
                self.assertEqual(len(response.json()["results"]), 8)
                self.assertTrue(all(r.get("caption") for r in response.json()["results"]))
        self.assertEqual(server.wait_exit(40), 0)
        self.assertLess(time.monotonic() - signalled, 30)
        log = server.log()
        self.assertIn("Shutting down", log)
        self.assertNotIn("Traceback", log)
        self.assertNotRegex(log, re.compile(r"Bad file descriptor|closed file|Canceling \d+ pending"))


if __name__ == "__main__":
    unittest.main()
