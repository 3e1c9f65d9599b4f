"""Operations end to end: probes, Prometheus metrics, Redis outages, JSON logs, and replicas sharing one Redis.

Real server processes (`python app.py` on the tiny BLIP checkpoint) and real redis-servers of our own.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
import unittest
import uuid
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from support.live import LiveServerTestCase
from support.services import RedisServer, ServerProcess, unique_prefix
from support.tiny_models import tiny_checkpoint

pytestmark = pytest.mark.live

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def new_image(name: str = "image") -> tuple[str, bytes]:
    """A PNG no test has uploaded before (random pixels), as an upload (filename, bytes)."""
    seed = uuid.uuid4().int % 2**32
    pixels = np.random.default_rng(seed).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return f"{name}.png", buffer.getvalue()


def scrape(server: ServerProcess) -> Samples:
    """Every sample of /metrics, parsed with prometheus_client's own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def model_args() -> list[str]:
    return ["--blip", "--model-path", str(tiny_checkpoint("blip"))]


class ProbesMetricsAndLogsTest(LiveServerTestCase):
    """One server with LOG_FORMAT=json and a Redis of its own, watched from the moment its process starts."""

    server_env = {"LOG_FORMAT": "json"}
    own_redis = True  # the readiness test stops it

    @classmethod
    def while_loading(cls) -> None:
        """Poll /readyz from process start until 200; keep what was answered while the model was loading."""
        seen: dict[str, Any] = {"readyz": [], "healthz": [], "caption": None}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if cls.server.process.poll() is not None:
                raise AssertionError(f"server exited with {cls.server.process.returncode}:\n{cls.server.log()}")
            try:
                ready = requests.get(cls.server.url + "/readyz", timeout=5)
            except requests.RequestException:
                time.sleep(0.02)  # not listening yet
                continue
            seen["readyz"].append((ready.status_code, ready.json()))
            if ready.status_code == 200:
                break
            if len(seen["healthz"]) < 3:
                seen["healthz"].append(requests.get(cls.server.url + "/healthz", timeout=5).status_code)
            if seen["caption"] is None:
                seen["caption"] = cls.server.post_images([new_image()])
            time.sleep(0.05)
        cls.loading = seen

    def get_ready(self) -> dict[str, Any]:
        response = requests.get(self.server.url + "/readyz", timeout=10)
        self.assertEqual(response.status_code, 200, response.text)
        return response.json()

    # ----- probes --------------------------------------------------------------------------------------------
    def test_readyz_is_503_until_warmed_up_then_200_with_model_device_dtype_and_cache(self) -> None:
        statuses = [status for status, _ in self.loading["readyz"]]
        self.assertEqual(statuses[-1], 200)
        self.assertIn(503, statuses, "the server listens before it loads the model, so /readyz must say 503 first")
        self.assertEqual(set(statuses[:-1]), {503})
        for status, body in self.loading["readyz"][:-1]:
            self.assertEqual(body["status"], "starting")
            self.assertEqual(body["model"]["family"], "blip")

        ready = self.get_ready()
        self.assertEqual(ready["status"], "ready")
        self.assertEqual(ready["model"], {"family": "blip", "id": str(tiny_checkpoint("blip"))})
        self.assertEqual(ready["device"], "cpu")
        self.assertEqual(ready["dtype"], "float32")
        self.assertEqual(ready["cache"], {"backend": "redis", "redis_reachable": True})
        self.assertIn("default_prompt", ready)

    def test_healthz_answers_while_loading_and_after(self) -> None:
        self.assertTrue(self.loading["healthz"], "no /healthz answer while loading")
        self.assertEqual(set(self.loading["healthz"]), {200})
        response = requests.get(self.server.url + "/healthz", timeout=10)
        self.assertEqual((response.status_code, response.json()), (200, {"status": "ok"}))

    def test_caption_request_while_loading_is_503_not_ready_with_retry_after(self) -> None:
        response = self.loading["caption"]
        self.assertIsNotNone(response)
        self.assertEqual(response.status_code, 503, response.text)
        self.assertEqual(response.json()["error"]["code"], "not_ready")
        self.assertGreater(int(response.headers["Retry-After"]), 0)

    # ----- metrics -------------------------------------------------------------------------------------------
    def test_metrics_move_by_the_right_amounts(self) -> None:
        a, b, c, d = (new_image(name) for name in "abcd")
        before = scrape(self.server)
        self.assertGreater(metric(before, "caption_model_load_seconds"), 0)
        self.assertEqual(metric(before, "caption_redis_up"), 1)

        first = self.server.post_images([a, b, c])  # 3 new images: one generate() call of 3
        self.assertEqual([r["cached"] for r in first.json()["results"]], [False, False, False])
        second = self.server.post_images([a, b, d])  # 2 cached, 1 new
        self.assertEqual([r["cached"] for r in second.json()["results"]], [True, True, False])
        after = scrape(self.server)

        def delta(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        self.assertEqual(delta("caption_images_total", outcome="captioned"), 4)
        self.assertEqual(delta("caption_images_total", outcome="cached"), 2)
        self.assertEqual(delta("caption_images_total", outcome="error"), 0)
        self.assertEqual(delta("caption_cache_requests_total", result="miss"), 4)
        self.assertEqual(delta("caption_cache_requests_total", result="hit"), 2)
        self.assertEqual(delta("caption_cache_requests_total", result="error"), 0)
        self.assertEqual(delta("caption_batch_size_count"), 2)
        self.assertEqual(delta("caption_batch_size_sum"), 4)
        self.assertEqual(delta("caption_batch_size_bucket", le="2.0"), 1)  # the batch of 1; the batch of 3 is >2
        self.assertEqual(delta("caption_batch_size_bucket", le="4.0"), 2)
        self.assertEqual(delta("caption_generate_duration_seconds_count"), 2)
        self.assertGreater(delta("caption_generate_duration_seconds_sum"), 0)
        self.assertEqual(delta("caption_http_requests_total", endpoint="/caption-images", method="POST",
                               status="200"), 2)
        self.assertEqual(delta("caption_http_request_duration_seconds_count", endpoint="/caption-images"), 2)
        self.assertGreater(delta("caption_http_request_duration_seconds_sum", endpoint="/caption-images"), 0)
        self.assertEqual(delta("caption_http_requests_total", endpoint="/metrics", method="GET", status="200"), 1)
        self.assertEqual(metric(after, "caption_queue_images"), 0)
        self.assertEqual(metric(after, "caption_redis_up"), 1)

        refused = self.server.post_images([("notes.txt", b"not an image\n")])
        self.assertEqual(refused.status_code, 415)
        last = scrape(self.server)
        self.assertEqual(metric(last, "caption_images_total", outcome="error")
                         - metric(after, "caption_images_total", outcome="error"), 1)
        self.assertEqual(metric(last, "caption_http_requests_total", endpoint="/caption-images", method="POST",
                                status="415")
                         - metric(after, "caption_http_requests_total", endpoint="/caption-images", method="POST",
                                  status="415"), 1)

    def test_metrics_content_type_is_the_prometheus_text_format(self) -> None:
        content_type = requests.get(self.server.url + "/metrics", timeout=10).headers["Content-Type"]
        media_type, *parameters = [part.strip() for part in content_type.split(";")]
        self.assertEqual(media_type, "text/plain")
        names = [parameter.split("=")[0] for parameter in parameters]
        self.assertIn("version", names)
        # Prometheus parses this header strictly (Go's mime.ParseMediaType): a parameter given twice is an error.
        self.assertEqual(len(names), len(set(names)), f"a parameter is repeated in {content_type!r}")

    # ----- Redis outage --------------------------------------------------------------------------------------
    def test_readyz_reports_redis_down_within_2_s_and_up_again(self) -> None:
        self.assertIs(self.get_ready()["cache"]["redis_reachable"], True)
        self.redis.stop()
        try:
            stopped = time.monotonic()
            while True:
                ready = self.get_ready()  # still 200: the service keeps serving without its cache
                if ready["cache"]["redis_reachable"] is False:
                    break
                self.assertLess(time.monotonic() - stopped, 2.0, "Redis down not reported within 2 s")
                time.sleep(0.05)
            self.assertLess(time.monotonic() - stopped, 2.0)
            self.assertEqual(ready["cache"]["backend"], "redis")
            self.assertEqual(metric(scrape(self.server), "caption_redis_up"), 0)
            during = self.server.post_images([new_image()])
            self.assertEqual(during.status_code, 200, during.text)
            self.assertIs(during.json()["results"][0]["cached"], False)
        finally:
            self.redis.start()  # same port
        restarted = time.monotonic()
        while self.get_ready()["cache"]["redis_reachable"] is not True:
            self.assertLess(time.monotonic() - restarted, 10.0, "Redis back not reported within 10 s")
            time.sleep(0.05)
        self.assertEqual(metric(scrape(self.server), "caption_redis_up"), 1)
        image = new_image()  # and the cache is used again
        self.server.post_images([image])
        self.assertIs(self.server.post_images([image]).json()["results"][0]["cached"], True)

    # ----- logs ----------------------------------------------------------------------------------------------
    def test_json_logs_one_object_per_line_with_request_ids(self) -> None:
        own = f"client-{uuid.uuid4().hex[:8]}"
        kept = self.server.post_images([new_image()], headers={"X-Request-ID": own})
        self.assertEqual(kept.headers["X-Request-ID"], own)
        made = self.server.post_images([new_image()])
        generated = made.headers["X-Request-ID"]
        self.assertRegex(generated, r"^[0-9a-f]{32}$")
        refused = requests.get(self.server.url + "/nope", headers={"X-Request-ID": "x" * 500}, timeout=10)
        replaced = refused.headers["X-Request-ID"]
        self.assertRegex(replaced, r"^[0-9a-f]{32}$", "an over-long client id is replaced")

        entries = self.wait_for_log_lines(lambda entries: {own, generated, replaced} <= {
            entry.get("request_id") for entry in entries})
        for entry in entries:
            self.assertTrue({"time", "level", "logger", "message"} <= set(entry), entry)
        by_id = {rid: [e for e in entries if e.get("request_id") == rid] for rid in (own, generated, replaced)}
        for rid, path, status in ((own, "/caption-images", 200), (generated, "/caption-images", 200),
                                  (replaced, "/nope", 404)):
            access = [e for e in by_id[rid] if e.get("path") == path]
            self.assertEqual(len(access), 1, by_id[rid])
            self.assertEqual(access[0]["status"], status)
            self.assertIn("method", access[0])
            self.assertGreaterEqual(access[0]["duration_ms"], 0)  # timings per request
        # lines from start-up (model load, cache, ready) are JSON too, and carry no request id
        ready = [e for e in entries if e["message"].startswith("Ready on")]
        self.assertEqual(len(ready), 1)
        self.assertNotIn("request_id", ready[0])

    def wait_for_log_lines(self, done: Any, timeout: float = 10) -> list[dict[str, Any]]:
        """Every line of the server's log (stdout and stderr) parsed as one JSON object each."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.server.log()
            complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # a line being written
            entries = []
            for number, line in enumerate(complete, 1):
                try:
                    entry = json.loads(line)
                except ValueError:
                    self.fail(f"log line {number} is not JSON: {line!r}")
                self.assertIsInstance(entry, dict, line)
                entries.append(entry)
            if done(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(0.1)


class ReplicasShareOneRedisTest(unittest.TestCase):
    """Two server processes on different ports with one Redis and the same CACHE_PREFIX."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.redis = RedisServer().start()
        cls.prefix = unique_prefix("replicas")
        env = {"REDIS_URL": cls.redis.url, "CACHE_PREFIX": cls.prefix}
        cls.servers = [ServerProcess(model_args(), env=env), ServerProcess(model_args(), env=env)]
        try:
            for server in cls.servers:  # load both models at once
                server.start(wait_ready=False)
            for server in cls.servers:
                server.wait_ready(180)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        for server in cls.servers:
            server.stop()
        cls.redis.close()

    def captioned_in_total(self) -> tuple[float, float]:
        """(images through generate(), images answered as captioned) summed over both replicas."""
        samples = [scrape(server) for server in self.servers]
        return (sum(metric(s, "caption_batch_size_sum") for s in samples),
                sum(metric(s, "caption_images_total", outcome="captioned") for s in samples))

    def test_an_image_captioned_by_one_replica_is_a_cache_hit_on_the_other(self) -> None:
        one, other = self.servers
        image = new_image()
        first = one.post_images([image]).json()["results"][0]
        second = other.post_images([image]).json()["results"][0]
        self.assertIs(first["cached"], False)
        self.assertIs(second["cached"], True)
        self.assertEqual((second["caption"], second["tags"]), (first["caption"], first["tags"]))

    def test_the_same_new_image_at_both_replicas_at_once_is_captioned_once(self) -> None:
        for round_ in range(3):
            image = new_image(f"round{round_}")
            before = self.captioned_in_total()
            barrier = threading.Barrier(len(self.servers))
            responses: list[requests.Response | BaseException | None] = [None] * len(self.servers)

            def post(index: int) -> None:
                barrier.wait(10)
                try:
                    responses[index] = self.servers[index].post_images([image])
                except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
                    responses[index] = exc

            threads = [threading.Thread(target=post, args=(i,)) for i in range(len(self.servers))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            results = []
            for response in responses:
                self.assertIsInstance(response, requests.Response, response)
                self.assertEqual(response.status_code, 200, response.text)
                results.append(response.json()["results"][0])
            after = self.captioned_in_total()
            with self.subTest(round=round_):
                self.assertEqual(after[0] - before[0], 1, "generate() saw the image more than once in total")
                self.assertEqual(after[1] - before[1], 1)
                self.assertEqual(sorted(r["cached"] for r in results), [False, True])
                self.assertEqual(results[0]["caption"], results[1]["caption"])

    def test_a_claim_left_by_a_crashed_replica_expires(self) -> None:
        """A lock whose owner died blocks the image only until the lock's expiry, then it is captioned here."""
        one = self.servers[0]
        one.post_images([new_image()])
        client = self.redis.client()
        stored = [key for key in client.keys(f"{self.prefix}:*") if not key.endswith(":lock")]
        name, data = new_image()
        key = re.sub(r"[0-9a-f]{64}$", hashlib.sha256(data).hexdigest(), stored[0])
        client.set(key + ":lock", "a-replica-that-crashed", px=2000)
        started = time.monotonic()
        response = one.post_images([(name, data)], timeout=60)
        elapsed = time.monotonic() - started
        self.assertEqual(response.status_code, 200, response.text)
        self.assertIs(response.json()["results"][0]["cached"], False)
        self.assertGreater(elapsed, 1.0, "the image was captioned while another replica's claim was held")
        self.assertLess(elapsed, 30.0)
        self.assertIsNotNone(client.get(key))


if __name__ == "__main__":
    unittest.main()
