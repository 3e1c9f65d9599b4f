"""Hardening end to end (issue 5): awkward and hostile uploads, limits, Redis outages, reset, concurrent
clients and the bounded queue, against `python app.py` on the tiny BLIP checkpoint and a real redis-server."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import unittest
from typing import Any

import requests
from PIL import Image

from support import corpus
from support.http import (assert_json_error, metric, new_png, post, proc_status_kb, raw_request,
                          run_concurrently)
from support.services import RedisServer, ServerProcess, unique_prefix
from support.tiny_models import image_bytes, tiny_checkpoint

ADMIN_TOKEN = "s3cret-admin-token"
MiB = 1024 * 1024
REDIS: RedisServer | None = None


def setUpModule() -> None:
    global REDIS
    REDIS = RedisServer().start()


def tearDownModule() -> None:
    if REDIS is not None:
        REDIS.close()


class ServerTestCase(unittest.TestCase):
    """One server process per class, on the tiny BLIP checkpoint and the module's redis-server."""

    env: dict[str, str] = {}
    server: ServerProcess

    @classmethod
    def setUpClass(cls) -> None:
        cls.prefix = unique_prefix("hard")
        cls.server = ServerProcess(["--model-path", str(tiny_checkpoint("blip"))],
                                   env={"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(REDIS.port),
                                        "CACHE_PREFIX": cls.prefix, **cls.env})
        cls.server.start()  # stops the process itself if it never gets ready

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def post(self, files: list[tuple[str, bytes]], prompt: str | None = None, timeout: float = 120
             ) -> requests.Response:
        response = post(self.server.url, files, prompt, timeout)
        self.assertLess(response.status_code, 500, response.text[:500])
        return response

    def assert_still_serving(self) -> None:
        """The process is alive and captions a new image."""
        self.assertIsNone(self.server.process.poll(), "the server process died")
        response = self.post([("after.png", new_png())])
        self.assertEqual(response.status_code, 200, response.text)
        self.assertTrue(response.json()["results"][0]["caption"])

    def log_count(self, text: str) -> int:
        return self.server.log().count(text)


# ----- the main server: default limits, ADMIN_TOKEN set ----------------------------------------------------------
class HardeningTest(ServerTestCase):
    env = {"ADMIN_TOKEN": ADMIN_TOKEN}

    def reset(self) -> requests.Response:
        return requests.get(self.server.url + "/reset-redis", timeout=30,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    # Must show 1: the awkward corpus ---------------------------------------------------------------------------
    def test_every_good_corpus_file_is_captioned_in_one_request(self) -> None:
        good = {**corpus.good_files(), **corpus.optional_good_files()}
        files = [(item.filename, item.data) for item in good.values()]
        response = self.post(files)
        self.assertEqual(response.status_code, 200, response.text)
        results = response.json()["results"]
        self.assertEqual([r["filename"] for r in results], [name for name, _ in files])
        for name, result in zip(good, results):
            with self.subTest(name):
                self.assertNotIn("error", result)
                self.assertIsInstance(result["caption"], str)
                self.assertTrue(result["caption"].strip())
                self.assertIsInstance(result["tags"], list)

    def test_every_good_corpus_file_is_captioned_alone(self) -> None:
        for name, item in {**corpus.good_files(), **corpus.optional_good_files()}.items():
            with self.subTest(name):
                response = self.post([(item.filename, item.data)])
                self.assertEqual(response.status_code, 200, response.text)
                [result] = response.json()["results"]
                self.assertEqual(result["filename"], item.filename)
                self.assertTrue(result["caption"].strip(), result)

    def test_every_bad_corpus_file_gets_its_own_error_code(self) -> None:
        statuses = {"empty_file": 400, "corrupt_image": 400, "not_an_image": 415, "unsupported_format": 415,
                    "too_many_pixels": 413, "file_too_large": 413}
        for name, item in corpus.bad_files().items():
            with self.subTest(name):
                response = self.post([(item.filename, item.data)])
                self.assertEqual(response.status_code, statuses[item.code], response.text)
                self.assertEqual(response.headers["Content-Type"], "application/json")
                [result] = response.json()["results"]
                self.assertEqual(result["filename"], item.filename)
                self.assertNotIn("caption", result)
                self.assertEqual(result["error"]["code"], item.code, result)
                self.assertTrue(result["error"]["message"])
                self.assertNotIn("Traceback", response.text)

    def test_mixed_request_good_files_still_captioned(self) -> None:
        bad = list(corpus.bad_files().values())
        good = list(corpus.good_files().values())[: 32 - len(bad)]
        mixed: list[Any] = []
        for i in range(max(len(bad), len(good))):  # interleaved: good, bad, good, bad, ...
            mixed += good[i:i + 1] + bad[i:i + 1]
        response = self.post([(item.filename, item.data) for item in mixed])
        self.assertEqual(response.status_code, 200, response.text)
        results = response.json()["results"]
        self.assertEqual(len(results), len(mixed))
        for item, result in zip(mixed, results):
            with self.subTest(item.filename):
                self.assertEqual(result["filename"], item.filename)
                if isinstance(item, corpus.BadFile):
                    self.assertEqual(result["error"]["code"], item.code, result)
                else:
                    self.assertTrue(result["caption"].strip(), result)

    def test_only_bad_files_with_different_errors_is_400(self) -> None:
        bad = corpus.bad_files()
        response = self.post([(bad[n].filename, bad[n].data) for n in ("text_as_jpg", "truncated_jpeg", "bomb_png")])
        self.assertEqual(response.status_code, 400)
        self.assertEqual([r["error"]["code"] for r in response.json()["results"]],
                         ["not_an_image", "corrupt_image", "too_many_pixels"])

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
        peak_rss = [rss_before]
        stop = threading.Event()

        def sample() -> None:  # also watch RSS directly, in case the peak could not be reset
            while not stop.is_set():
                peak_rss[0] = max(peak_rss[0], proc_status_kb(pid, "VmRSS"))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for i in range(3):
                started = time.monotonic()
                response = self.post([(f"bomb-{i}.png", bomb)], timeout=30)
                elapsed = time.monotonic() - started
                self.assertLess(elapsed, 1.0)
                self.assertEqual(response.status_code, 413)
                self.assertEqual(response.json()["results"][0]["error"]["code"], "too_many_pixels")
                self.assertIn("1,600,000,000 pixels", response.json()["results"][0]["error"]["message"])
        finally:
            stop.set()
            sampler.join(5)
        hwm_after = proc_status_kb(pid, "VmHWM")
        self.assertLessEqual(hwm_after - hwm_before, 50 * 1024, (hwm_before, hwm_after))
        self.assertLessEqual(peak_rss[0] - rss_before, 50 * 1024, (rss_before, peak_rss[0]))
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

        REDIS.stop()
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
            REDIS.start()  # same port, empty

        time.sleep(1.2)  # RedisCache retries a failed Redis at most once a second
        after = new_png()
        first = self.post([("after.png", after)]).json()["results"][0]
        self.assertIs(first["cached"], False)
        digest = hashlib.sha256(after).hexdigest()
        self.assertEqual(len([k for k in REDIS.client().keys(self.prefix + ":*") if k.endswith(digest)]), 1)
        self.assertIs(self.post([("after.png", after)]).json()["results"][0]["cached"], True)
        self.assertIs(self._readyz_cache()["redis_reachable"], True)
        self.assertEqual(self.log_count("is back after") - back_before, 1)
        self.assertEqual(self.log_count("is unavailable") - down_before, 1)

    def test_frozen_redis_costs_at_most_a_second(self) -> None:
        normal = self._normal_seconds()
        down_before = self.log_count("is unavailable")
        pid = REDIS.process.pid
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

    # Must show 5: reset and ADMIN_TOKEN --------------------------------------------------------------------------
    def test_reset_needs_the_admin_token(self) -> None:
        url = self.server.url + "/reset-redis"
        refused = {
            "no header": {},
            "wrong token": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
            "prefix of the token": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
            "empty token": {"Authorization": "Bearer "},
            "other scheme": {"Authorization": f"Basic {ADMIN_TOKEN}"},
            "token without scheme": {"Authorization": ADMIN_TOKEN},
        }
        for method in ("GET", "POST"):
            for name, headers in refused.items():
                with self.subTest(method=method, case=name):
                    response = requests.request(method, url, headers=headers, timeout=30)
                    assert_json_error(self, response, 401, "unauthorized")
                    self.assertNotIn(ADMIN_TOKEN, response.text)
            with self.subTest(method=method, case="right token"):
                response = requests.request(method, url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                            timeout=30)
                self.assertEqual(response.status_code, 200, response.text)
                self.assertEqual(response.json()["message"], "Redis cache cleared")
        self.assertEqual(requests.get(url, headers={"Authorization": f"bearer {ADMIN_TOKEN}"},
                                      timeout=30).status_code, 200)  # the scheme is case-insensitive (RFC 7235)

    def test_reset_leaves_other_programs_keys_alone(self) -> None:
        client = REDIS.client()
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
        again = self.post([("a.png", images[0])]).json()["results"][0]
        self.assertIs(again["cached"], False)

    # Must show 6: concurrent clients ----------------------------------------------------------------------------
    def test_32_concurrent_clients_get_exactly_their_own_results(self) -> None:
        sizes = [(40 + 8 * (i % 4), 32 + 8 * (i // 8)) for i in range(32)]
        images = [new_png(size) for size in sizes]
        names = [f"client-{i:02d}.png" for i in range(32)]
        alone = []
        for name, data in zip(names, images):  # what each image gives alone
            response = self.post([(name, data)])
            self.assertEqual(response.status_code, 200)
            alone.append(response.json()["results"][0])
        self.assertGreater(len({r["caption"] for r in alone}), 1, "the images must not all give one caption")
        self.assertEqual(self.reset().status_code, 200)

        responses = run_concurrently(32, lambda i: post(self.server.url, [(names[i], images[i])]))
        for i, response in enumerate(responses):
            with self.subTest(client=i):
                self.assertEqual(response.status_code, 200, response.text)
                [result] = response.json()["results"]
                self.assertEqual(result["filename"], names[i])
                self.assertEqual(result["caption"], alone[i]["caption"])
                self.assertEqual(result["tags"], alone[i]["tags"])
                self.assertIs(result["cached"], False)
        self.assertGreater(metric(self.server, "caption_batch_size_count"), 0)

    def test_8_concurrent_clients_with_the_same_new_image_cause_one_captioning(self) -> None:
        image = new_png((56, 56))
        images_before = metric(self.server, "caption_batch_size_sum")
        calls_before = metric(self.server, "caption_batch_size_count")
        responses = run_concurrently(8, lambda i: post(self.server.url, [(f"same-{i}.png", image)]))
        results = []
        for i, response in enumerate(responses):
            self.assertEqual(response.status_code, 200, response.text)
            [result] = response.json()["results"]
            self.assertEqual(result["filename"], f"same-{i}.png")
            results.append(result)
        self.assertEqual(len({r["caption"] for r in results}), 1, results)
        self.assertEqual(metric(self.server, "caption_batch_size_sum") - images_before, 1)
        self.assertEqual(metric(self.server, "caption_batch_size_count") - calls_before, 1)

    def test_duplicates_within_one_request_are_captioned_once(self) -> None:
        image = new_png()
        before = metric(self.server, "caption_batch_size_sum")
        response = self.post([("one.png", image), ("two.png", image), ("three.png", image)])
        self.assertEqual(response.status_code, 200)
        results = response.json()["results"]
        self.assertEqual([r["filename"] for r in results], ["one.png", "two.png", "three.png"])
        self.assertEqual(len({r["caption"] for r in results}), 1)
        self.assertEqual(metric(self.server, "caption_batch_size_sum") - before, 1)

    # Filenames and hostile HTTP ---------------------------------------------------------------------------------
    def test_filenames_are_echoed_back_as_data(self) -> None:
        names = ["../../etc/passwd", "/etc/shadow", "..", "<script>alert(1)</script>.png",
                 "<img src=x onerror=alert(1)>.jpg", "x" * 4096 + ".png", "Fotoğraf 写真 😀 ünïcödé.png",
                 "name with spaces & ampersand.png", "%2e%2e%2fencoded.png", "semi;colon=value.png", ""]
        image = new_png()
        response = self.post([(name, image) for name in names[:8]])
        response2 = self.post([(name, image) for name in names[8:]])
        for response, sent in ((response, names[:8]), (response2, names[8:])):
            self.assertEqual(response.status_code, 200, response.text[:500])
            self.assertEqual(response.headers["Content-Type"], "application/json")
            results = response.json()["results"]
            self.assertEqual([r["filename"] for r in results], sent)
            self.assertTrue(all(r["caption"] for r in results))
            self.assertNotIn("root:", response.text)  # nothing was read from the path it names

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

    def test_unexpected_field_names_and_no_files(self) -> None:
        image = new_png()
        response = requests.post(self.server.url + "/caption-images", files=[("image", ("a.png", image))],
                                 timeout=30)
        error = assert_json_error(self, response, 400, "no_images")
        self.assertIn("'image'", error["message"])
        response = requests.post(self.server.url + "/caption-images", data={"images": "not a file"}, timeout=30)
        assert_json_error(self, response, 400, "no_images")
        response = requests.post(self.server.url + "/caption-images", data=b"just bytes", timeout=30,
                                 headers={"Content-Type": "application/octet-stream"})
        assert_json_error(self, response, 400, "no_images")


# ----- a server with small limits and a small queue -----------------------------------------------------------------
class LimitsTest(ServerTestCase):
    """Small limits, so they can be reached cheaply; BATCH_WAIT_MS holds every batch in the queue for a second
    (a stand-in for a slow model), which makes the bounded queue easy to fill."""

    MAX_REQUEST = 2_000_000
    MAX_FILE = 500_000
    env = {"MAX_REQUEST_BYTES": str(MAX_REQUEST), "MAX_FILES_PER_REQUEST": "4", "MAX_FILE_BYTES": str(MAX_FILE),
           "MAX_IMAGE_PIXELS": "1000000", "MAX_QUEUE_IMAGES": "4", "BATCH_WAIT_MS": "1000"}

    def multipart(self, total_bytes: int, boundary: str = "limit-boundary") -> tuple[bytes, str]:
        """A multipart body of exactly total_bytes: one JPEG under `images`, padded to fit."""
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        body = head + corpus.padded_jpeg(total_bytes - len(head) - len(tail)) + tail
        self.assertEqual(len(body), total_bytes)
        return body, f"multipart/form-data; boundary={boundary}"

    def test_request_over_max_request_bytes_is_413_json(self) -> None:
        response = self.post([("big.jpg", corpus.padded_jpeg(self.MAX_REQUEST + 500_000))])
        error = assert_json_error(self, response, 413, "request_too_large")
        self.assertIn("MAX_REQUEST_BYTES", error["message"])
        self.assert_still_serving()

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

    def test_more_files_than_allowed_is_refused_with_json(self) -> None:
        image = new_png()
        response = self.post([(f"{i}.png", image) for i in range(5)])
        error = assert_json_error(self, response, (400, 413), "too_many_files")
        self.assertIn("MAX_FILES_PER_REQUEST", error["message"])
        many = self.post([(f"{i}.png", image) for i in range(200)])  # also more form parts than werkzeug allows
        assert_json_error(self, many, (400, 413))
        self.assertEqual(self.post([(f"{i}.png", image) for i in range(4)]).status_code, 200)
        self.assert_still_serving()

    def test_file_over_max_file_bytes_is_a_per_file_error(self) -> None:
        big = corpus.padded_jpeg(self.MAX_FILE + 1)
        alone = self.post([("big.jpg", big)])
        self.assertEqual(alone.status_code, 413, alone.text)
        [result] = alone.json()["results"]
        self.assertEqual(result["filename"], "big.jpg")
        self.assertEqual(result["error"]["code"], "file_too_large")
        self.assertIn("MAX_FILE_BYTES", result["error"]["message"])
        mixed = self.post([("ok.png", new_png()), ("big.jpg", big), ("exact.jpg", corpus.padded_jpeg(self.MAX_FILE))])
        self.assertEqual(mixed.status_code, 200, mixed.text)
        ok, too_big, exact = mixed.json()["results"]
        self.assertTrue(ok["caption"])
        self.assertEqual(too_big["error"]["code"], "file_too_large")
        self.assertTrue(exact["caption"], exact)  # exactly at the limit is allowed
        self.assert_still_serving()

    def test_max_image_pixels_is_configurable(self) -> None:
        over = self.post([("over.png", corpus.png_declaring(1001, 1000))])
        self.assertEqual(over.status_code, 413)
        self.assertEqual(over.json()["results"][0]["error"]["code"], "too_many_pixels")
        at = self.post([("at.jpg", image_bytes(Image.new("RGB", (1000, 1000), (90, 140, 200)), "JPEG"))])
        self.assertEqual(at.status_code, 200, at.text)

    def test_prompt_too_long_is_400_json(self) -> None:
        response = self.post([("a.png", new_png())], prompt="a photo of " * 300)
        assert_json_error(self, response, 400, "prompt_too_long")
        huge = requests.post(self.server.url + "/caption-images", files=[("images", ("a.png", new_png()))],
                             data={"prompt": "x" * 1_000_000}, timeout=60)  # a form field over werkzeug's limit
        assert_json_error(self, huge, (400, 413))

    def test_full_queue_answers_503_with_retry_after(self) -> None:
        batches = [[(f"burst-{i}-{j}.png", new_png()) for j in range(3)] for i in range(6)]
        responses = run_concurrently(6, lambda i: post(self.server.url, batches[i]))
        statuses = [r.status_code for r in responses]
        self.assertTrue(set(statuses) <= {200, 503}, statuses)
        self.assertIn(200, statuses)
        self.assertIn(503, statuses)
        for i, response in enumerate(responses):
            if response.status_code == 503:
                assert_json_error(self, response, 503, "overloaded")
                self.assertGreater(int(response.headers["Retry-After"]), 0)
            else:
                results = response.json()["results"]
                self.assertEqual([r["filename"] for r in results], [name for name, _ in batches[i]])
                self.assertTrue(all(r["caption"] for r in results))
        self.assertEqual(metric(self.server, "caption_queue_images"), 0)
        refused = statuses.index(503)
        retry = post(self.server.url, batches[refused])  # the queue has drained: the retry is served
        self.assertEqual(retry.status_code, 200, retry.text)


if __name__ == "__main__":
    unittest.main()
