"""Hardening end to end (issue 5): awkward and hostile uploads, limits, Redis outages, reset, concurrent
clients and the bounded queue, against `python app.py` on the tiny BLIP checkpoint and a real redis-server."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import unittest
from typing import Any

import pytest
import requests

from support import corpus
from support.live import LiveServerTestCase
from support.tiny_models import image_bytes, sample_images, tiny_checkpoint
from support.webtest import PeakRss, assert_json_error, metric, new_png, proc_status_kb, raw_request

pytestmark = pytest.mark.live

ADMIN_TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MiB = 1024 * 1024


# ----- the main server: default limits, ADMIN_TOKEN set, a Redis of its own (the outage tests stop it) ----------
class HardeningTest(LiveServerTestCase):
    server_env = {"ADMIN_TOKEN": ADMIN_TOKEN}
    own_redis = True

    def reset(self, method: str = "GET") -> requests.Response:
        return requests.request(method, self.server.url + "/reset-redis", timeout=30, headers=AUTH)

    def test_log_names_url_model_device_dtype_and_cache(self) -> None:
        ready = [line for line in self.server.log().splitlines() if "Ready on" in line]
        self.assertEqual(len(ready), 1, self.server.log())
        for part in (f"http://127.0.0.1:{self.server.port}/", "blip", str(tiny_checkpoint("blip")), "cpu",
                     "float32", "cache redis"):
            self.assertIn(part, ready[0])

    def test_cache_keys_hold_prefix_and_sha256_with_ttl(self) -> None:
        files = [(f"{i}.png", image_bytes(image, "PNG")) for i, image in enumerate(sample_images()[:2])]
        self.assertEqual(self.reset().status_code, 200)
        self.assertEqual(self.post(files).status_code, 200)
        keys = self.redis.client().keys(f"{self.prefix}:*")
        self.assertEqual(len(keys), 2)
        for _, data in files:
            digest = hashlib.sha256(data).hexdigest()
            matching = [k for k in keys if digest in k]
            self.assertEqual(len(matching), 1, (digest, keys))
            self.assertTrue(matching[0].startswith(self.prefix + ":"))
            ttl = self.redis.client().ttl(matching[0])
            self.assertGreater(ttl, 0)
            self.assertLessEqual(ttl, 86400)

    # Must show 2: the 40000 x 40000 PNG -------------------------------------------------------------------------
    def test_decompression_bomb_is_refused_fast_without_memory_growth(self) -> None:
        bomb = corpus.png_declaring(40000, 40000)
        self.assertLess(len(bomb), 1024)
        self.post([("warm.png", new_png())])  # lazy imports and allocations happen before measuring
        self.post([("warm-bomb.png", bomb)])
        pid = self.server.process.pid
        try:  # reset the peak (VmHWM) to the current RSS, so the peak below is this test's own
            with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            pass
        hwm_before = proc_status_kb(pid, "VmHWM")
        rss_before = proc_status_kb(pid, "VmRSS")
        with PeakRss(pid, interval=0.002) as peak:  # also RSS directly, in case the peak could not be reset
            for i in range(3):
                started = time.monotonic()
                response = self.post([(f"bomb-{i}.png", bomb)], timeout=30)
                elapsed = time.monotonic() - started
                self.assertLess(elapsed, 1.0)
                self.assertEqual(response.status_code, 413)
                self.assertEqual(response.json()["results"][0]["error"]["code"], "too_many_pixels")
                self.assertIn("1,600,000,000 pixels", response.json()["results"][0]["error"]["message"])
        hwm_after = proc_status_kb(pid, "VmHWM")
        self.assertLessEqual(hwm_after - hwm_before, 50 * 1024, (hwm_before, hwm_after))
        self.assertLessEqual(peak.peak_kb - rss_before, 50 * 1024, (rss_before, peak.peak_kb))
        self.assert_still_serving()

    # Must show 4: Redis outages ----------------------------------------------------------------------------------
    def _normal_seconds(self) -> float:
        """How long captioning one new image takes right now (the slowest of three, to be robust to load)."""
        times = []
        for i in range(3):
            started = time.monotonic()
            response = self.post([(f"baseline-{i}.png", new_png())])
            times.append(time.monotonic() - started)
            self.assertEqual(response.status_code, 200)
            self.assertIs(response.json()["results"][0]["cached"], False)
        return max(times)

    def _readyz_cache(self) -> dict[str, Any]:
        response = requests.get(self.server.url + "/readyz", timeout=10)
        self.assertEqual(response.status_code, 200)  # Redis is not needed to be ready
        return response.json()["cache"]

    def test_redis_stopped_costs_only_speed_and_comes_back(self) -> None:
        known = new_png()
        known_caption = self.post([("known.png", known)]).json()["results"][0]["caption"]
        self.assertIs(self.post([("known.png", known)]).json()["results"][0]["cached"], True)
        normal = self._normal_seconds()
        down_before = self.log_count("is unavailable")
        back_before = self.log_count("is back after")

        self.redis.stop()
        try:
            for i in range(4):
                started = time.monotonic()
                response = self.post([(f"outage-{i}.png", new_png())])
                elapsed = time.monotonic() - started
                self.assertEqual(response.status_code, 200, response.text)
                [result] = response.json()["results"]
                self.assertIs(result["cached"], False)
                self.assertTrue(result["caption"].strip())
                self.assertLessEqual(elapsed, normal + 1.0, f"request {i}: {elapsed:.2f} s, normal {normal:.2f} s")
            again = self.post([("known.png", known)]).json()["results"][0]
            self.assertEqual((again["caption"], again["cached"]), (known_caption, False))  # fresh, and the same
            self.assertIs(self._readyz_cache()["redis_reachable"], False)
            self.assertEqual(metric(self.server, "caption_redis_up"), 0)
            reset = self.reset()
            assert_json_error(self, reset, 503, "cache_unavailable")
            time.sleep(0.3)  # let the log catch up
            self.assertEqual(self.log_count("is unavailable") - down_before, 1, self.server.log()[-3000:])
        finally:
            self.redis.start()  # same port, empty

        time.sleep(1.2)  # RedisCache retries a failed Redis at most once a second
        after = new_png()
        first = self.post([("after.png", after)]).json()["results"][0]
        self.assertIs(first["cached"], False)
        digest = hashlib.sha256(after).hexdigest()
        self.assertEqual(len([k for k in self.redis.client().keys(self.prefix + ":*") if k.endswith(digest)]), 1)
        self.assertIs(self.post([("after.png", after)]).json()["results"][0]["cached"], True)
        self.assertIs(self._readyz_cache()["redis_reachable"], True)
        self.assertEqual(self.log_count("is back after") - back_before, 1)
        self.assertEqual(self.log_count("is unavailable") - down_before, 1)

    def test_frozen_redis_costs_at_most_a_second(self) -> None:
        normal = self._normal_seconds()
        down_before = self.log_count("is unavailable")
        pid = self.redis.process.pid
        os.kill(pid, signal.SIGSTOP)  # a Redis that accepts connections but never answers
        try:
            for i in range(4):
                started = time.monotonic()
                response = self.post([(f"frozen-{i}.png", new_png())])
                elapsed = time.monotonic() - started
                self.assertEqual(response.status_code, 200, response.text)
                self.assertIs(response.json()["results"][0]["cached"], False)
                self.assertLessEqual(elapsed, normal + 1.0, f"request {i}: {elapsed:.2f} s, normal {normal:.2f} s")
            time.sleep(0.3)
            self.assertEqual(self.log_count("is unavailable") - down_before, 1, self.server.log()[-3000:])
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(1.2)
        image = new_png()
        self.post([("thawed.png", image)])
        self.assertIs(self.post([("thawed.png", image)]).json()["results"][0]["cached"], True)

    def test_reset_leaves_other_programs_keys_alone(self) -> None:
        client = self.redis.client()
        images = [new_png(), new_png()]
        self.assertEqual(self.post([("a.png", images[0]), ("b.png", images[1])]).status_code, 200)
        others = {"someone-else:key": "keep", self.prefix + "x:key": "keep", self.prefix[:-1] + ":key": "keep",
                  self.prefix: "keep", "other:" + self.prefix + ":key": "keep", self.prefix.upper() + ":k": "keep"}
        client.mset(others)
        client.rpush(self.prefix + "-queue", "job")
        self.addCleanup(client.delete, *others, self.prefix + "-queue")
        ours = len(client.keys(self.prefix + ":*"))
        self.assertGreaterEqual(ours, 2)
        response = self.reset()
        self.assertEqual(response.status_code, 200, response.text)
        self.assertEqual(response.json(), {"message": "Redis cache cleared", "deleted": ours})
        self.assertEqual(client.keys(self.prefix + ":*"), [])
        for key, value in others.items():
            self.assertEqual(client.get(key), value, key)
        self.assertEqual(client.lrange(self.prefix + "-queue", 0, -1), ["job"])
        again = self.post([("a.png", images[0]), ("b.png", images[1])]).json()["results"]
        self.assertEqual([r["cached"] for r in again], [False, False])
        self.assertEqual(self.reset("POST").json(), {"message": "Redis cache cleared", "deleted": 2})

    # Filenames and hostile HTTP ---------------------------------------------------------------------------------
    def test_malformed_http_is_answered_with_json(self) -> None:
        cases = {  # name: (raw request, status)
            "lower-case method": (b"post /caption-images HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            "bad content-length": (b"POST /caption-images HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
            "bad chunk size": (b"POST /caption-images HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"zz\r\n", 400),
            "headers too large": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
            # waitress quotes the offending line in its message: it must still come out as valid JSON
            "continuation line with a backslash": (b"GET /healthz HTTP/1.1\r\n \\q\\ \r\nHost: x\r\n\r\n", 400),
            "continuation line with a control character": (b"GET /healthz HTTP/1.1\r\n \x01\x1b[31m\r\nHost: x\r\n\r\n",
                                                           400),
            "quote and backslash": (b'GET /healthz HTTP/1.1\r\n a\\", "code": "ok\r\nHost: x\r\n\r\n', 400),
        }
        for name, (data, expected) in cases.items():
            with self.subTest(name):
                status, headers, body = raw_request(self.server.port, data)
                self.assertEqual(status, expected, body[:300])
                self.assertEqual(headers.get("content-type"), "application/json")
                try:
                    error = json.loads(body)["error"]
                except ValueError as exc:
                    self.fail(f"not valid JSON ({exc}): {body[:300]!r}")
                self.assertIsInstance(error["code"], str)
                self.assertIsInstance(error["message"], str)
        self.assert_still_serving()


# ----- a server with small limits and a small queue -----------------------------------------------------------------
class LimitsTest(LiveServerTestCase):
    """Small limits, so they can be reached cheaply; BATCH_WAIT_MS holds every batch in the queue for a second
    (a stand-in for a slow model), which makes the bounded queue easy to fill."""

    MAX_REQUEST = 2_000_000
    MAX_FILE = 500_000
    server_env = {"MAX_REQUEST_BYTES": str(MAX_REQUEST), "MAX_FILES_PER_REQUEST": "4", "MAX_FILE_BYTES": str(MAX_FILE),
           "MAX_IMAGE_PIXELS": "1000000", "MAX_QUEUE_IMAGES": "4", "BATCH_WAIT_MS": "1000"}

    def multipart(self, total_bytes: int, boundary: str = "limit-boundary") -> tuple[bytes, str]:
        """A multipart body of exactly total_bytes: one JPEG under `images`, padded to fit."""
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        body = head + corpus.padded_jpeg(total_bytes - len(head) - len(tail)) + tail
        self.assertEqual(len(body), total_bytes)
        return body, f"multipart/form-data; boundary={boundary}"

    def test_limit_is_exact(self) -> None:
        body, content_type = self.multipart(self.MAX_REQUEST)
        at_limit = requests.post(self.server.url + "/caption-images", data=body, timeout=60,
                                 headers={"Content-Type": content_type})
        # read and parsed: the one file is over MAX_FILE_BYTES, which is a per-file answer
        self.assertEqual(at_limit.status_code, 413, at_limit.text)
        self.assertEqual(at_limit.json()["results"][0]["error"]["code"], "file_too_large")
        body, content_type = self.multipart(self.MAX_REQUEST + 1)
        over = requests.post(self.server.url + "/caption-images", data=body, timeout=60,
                             headers={"Content-Type": content_type})
        assert_json_error(self, over, 413, "request_too_large")

    def test_declared_huge_body_is_refused_before_it_is_sent(self) -> None:
        started = time.monotonic()
        status, headers, body = raw_request(self.server.port, (
            b"POST /caption-images HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 10000000000\r\n\r\n"))  # 10 GB promised, none sent
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(status, 413)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assert_still_serving()

    def test_chunked_request_over_the_limit_is_413_json(self) -> None:
        def chunks():
            for _ in range(40):  # 2.6 MB in 64 KiB chunks, no Content-Length
                yield b"\0" * 65536

        response = requests.post(self.server.url + "/caption-images", data=chunks(), timeout=60,
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert_json_error(self, response, 413, "request_too_large")
        self.assert_still_serving()

    def test_chunked_request_under_the_limit_is_captioned(self) -> None:
        body, content_type = self.multipart(300_000)
        response = requests.post(self.server.url + "/caption-images", timeout=60,
                                 data=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                                 headers={"Content-Type": content_type})
        self.assertEqual(response.status_code, 200, response.text)
        self.assertTrue(response.json()["results"][0]["caption"])


if __name__ == "__main__":
    unittest.main()
