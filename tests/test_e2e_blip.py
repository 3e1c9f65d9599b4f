"""End to end on BLIP: a real server process, a real redis-server, the real from_pretrained + generate path."""
from __future__ import annotations

import hashlib
import io
import re
import tempfile
import time
import unittest

from PIL import Image

from support.services import RedisServer, ServerProcess, free_port, unique_prefix
from support.tiny_models import image_bytes, reference_captions, sample_images, tiny_checkpoint


def _files() -> list[tuple[str, bytes]]:
    a, b, _ = sample_images()
    return [("a.jpg", image_bytes(a, "JPEG")), ("b.png", image_bytes(b, "PNG"))]


class BlipWithRedisTest(unittest.TestCase):
    """`python app.py --blip --model-path DIR --port P` with REDIS_HOST/REDIS_PORT pointing at a real Redis."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.redis = RedisServer().start()
        cls.prefix = unique_prefix("e2e")
        cls.folder = tiny_checkpoint("blip")
        cls.server = ServerProcess(["--blip", "--model-path", str(cls.folder)],
                                   env={"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(cls.redis.port),
                                        "CACHE_PREFIX": cls.prefix}).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls.redis.close()

    def setUp(self) -> None:
        self.redis_client = self.redis.client()
        self.server.session.get(self.server.url + "/reset-redis")

    def test_two_images_captioned_in_order_then_cached(self) -> None:
        files = _files()
        first = self.server.post_images(files)
        self.assertEqual(first.status_code, 200, first.text)
        body = first.json()
        self.assertEqual([r["filename"] for r in body["results"]], ["a.jpg", "b.png"])
        for result in body["results"]:
            self.assertIsInstance(result["caption"], str)
            self.assertTrue(result["caption"].strip(), result)
            self.assertIsInstance(result["tags"], list)
            self.assertTrue(all(isinstance(t, str) for t in result["tags"]))
            self.assertIs(result["cached"], False)
        self.assertEqual(body["model"], {"family": "blip", "id": str(self.folder)})

        second = self.server.post_images(files).json()
        self.assertEqual([r["caption"] for r in second["results"]], [r["caption"] for r in body["results"]])
        self.assertEqual([r["tags"] for r in second["results"]], [r["tags"] for r in body["results"]])
        self.assertEqual([r["cached"] for r in second["results"]], [True, True])

    def test_captions_are_what_the_checkpoint_gives(self) -> None:
        results = self.server.post_images(_files()).json()["results"]
        # the server decodes the uploaded JPEG, so the oracle must see the same decoded pixels
        decoded = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in _files()]
        expected = reference_captions(self.folder, "blip", decoded, max_new_tokens=30)
        self.assertEqual([r["caption"] for r in results], expected)

    def test_cache_keys_hold_prefix_and_sha256_with_ttl(self) -> None:
        files = _files()
        self.assertEqual(self.server.post_images(files).status_code, 200)
        keys = self.redis_client.keys(f"{self.prefix}:*")
        self.assertEqual(len(keys), 2)
        for _, data in files:
            digest = hashlib.sha256(data).hexdigest()
            matching = [k for k in keys if digest in k]
            self.assertEqual(len(matching), 1, (digest, keys))
            self.assertTrue(matching[0].startswith(self.prefix + ":"))
            ttl = self.redis_client.ttl(matching[0])
            self.assertGreater(ttl, 0)
            self.assertLessEqual(ttl, 86400)

    def test_prompt_is_a_cache_miss_and_removed_from_the_caption(self) -> None:
        files = _files()[:1]
        self.server.post_images(files)
        prompted = self.server.post_images(files, prompt="a photo of").json()["results"][0]
        self.assertIs(prompted["cached"], False)
        self.assertFalse(prompted["caption"].startswith("a photo of"), prompted["caption"])
        self.assertEqual(len(self.redis_client.keys(f"{self.prefix}:*")), 2)
        again = self.server.post_images(files, prompt="a photo of").json()["results"][0]
        self.assertIs(again["cached"], True)
        self.assertEqual(again["caption"], prompted["caption"])
        # an empty prompt means the default: the unprompted entry again
        empty = self.server.post_images(files, prompt="").json()["results"][0]
        self.assertIs(empty["cached"], True)

    def test_reset_deletes_only_this_services_keys(self) -> None:
        self.server.post_images(_files())
        self.redis_client.set("someone-else:key", "keep me")
        self.redis_client.set(self.prefix + "x:not-ours", "keep me too")  # same start, other namespace
        try:
            reset = self.server.session.get(self.server.url + "/reset-redis")
            self.assertEqual(reset.status_code, 200)
            self.assertEqual(reset.json(), {"message": "Redis cache cleared", "deleted": 2})
            self.assertEqual(self.redis_client.get("someone-else:key"), "keep me")
            self.assertEqual(self.redis_client.get(self.prefix + "x:not-ours"), "keep me too")
            self.assertEqual(self.redis_client.keys(f"{self.prefix}:*"), [])
            again = self.server.post_images(_files()).json()["results"]
            self.assertEqual([r["cached"] for r in again], [False, False])
            post = self.server.session.post(self.server.url + "/reset-redis")
            self.assertEqual(post.json(), {"message": "Redis cache cleared", "deleted": 2})
        finally:
            self.redis_client.delete("someone-else:key", self.prefix + "x:not-ours")

    def test_no_images_is_400_json(self) -> None:
        response = self.server.session.post(self.server.url + "/caption-images", data={"prompt": "x"})
        self.assertEqual(response.status_code, 400)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertEqual(response.json()["error"]["code"], "no_images")
        self.assertTrue(response.json()["error"]["message"])

    def test_text_file_gets_a_per_file_error_and_others_still_captioned(self) -> None:
        text = ("notes.jpg", b"this is not an image\n")
        alone = self.server.post_images([text])
        self.assertGreaterEqual(alone.status_code, 400)
        self.assertLess(alone.status_code, 500)
        self.assertEqual(alone.headers["Content-Type"], "application/json")
        error = alone.json()["results"][0]["error"]
        self.assertEqual(alone.json()["results"][0]["filename"], "notes.jpg")
        self.assertEqual(error["code"], "not_an_image")
        self.assertTrue(error["message"])

        mixed = self.server.post_images([_files()[0], text])
        self.assertEqual(mixed.status_code, 200)
        first, second = mixed.json()["results"]
        self.assertIn("caption", first)
        self.assertEqual(second["error"]["code"], "not_an_image")

    def test_unknown_path_and_method_are_json(self) -> None:
        missing = self.server.session.get(self.server.url + "/nope")
        self.assertEqual((missing.status_code, missing.json()["error"]["code"]), (404, "not_found"))
        wrong = self.server.session.get(self.server.url + "/caption-images")
        self.assertEqual((wrong.status_code, wrong.json()["error"]["code"]), (405, "method_not_allowed"))

    def test_log_names_url_model_device_dtype_and_cache(self) -> None:
        ready = [line for line in self.server.log().splitlines() if "Ready on" in line]
        self.assertEqual(len(ready), 1, self.server.log())
        line = ready[0]
        for part in (f"http://127.0.0.1:{self.server.port}/", "blip", str(self.folder), "cpu", "float32",
                     "cache redis"):
            self.assertIn(part, line)


class NoRedisTest(unittest.TestCase):
    """With nothing listening on the Redis port, the server runs on its in-process cache."""

    def test_in_process_cache_when_redis_is_unreachable(self) -> None:
        server = ServerProcess(["--model-path", str(tiny_checkpoint("blip"))],
                               env={"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(free_port())})
        try:
            server.start()
            files = _files()
            first = server.post_images(files).json()["results"]
            second = server.post_images(files).json()["results"]
            self.assertEqual([r["cached"] for r in first], [False, False])
            self.assertEqual([r["cached"] for r in second], [True, True])
            self.assertEqual([r["caption"] for r in first], [r["caption"] for r in second])
            self.assertRegex(server.log(), r"no Redis reachable at redis://127\.0\.0\.1:\d+/0; using an in-process "
                                           r"memory cache")
            ready = server.session.get(server.url + "/readyz").json()
            self.assertEqual(ready["cache"]["backend"], "memory")
            # It says which cache it cleared: here not Redis (issue 11).
            self.assertEqual(server.session.get(server.url + "/reset-redis").json(),
                             {"message": "In-process cache cleared (no Redis is in use)", "deleted": 2})
        finally:
            server.stop()


class OfflineStartTest(unittest.TestCase):
    """Without the weights and without network, start-up stops within seconds with a useful message."""

    def test_default_checkpoint_unavailable(self) -> None:
        with tempfile.TemporaryDirectory() as hf_home:
            env = {"HF_HOME": hf_home, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "",
                   "TRANSFORMERS_OFFLINE": "", "REDIS_PORT": str(free_port())}
            server = ServerProcess([], env=env)
            started = time.monotonic()
            server.start(wait_ready=False)
            try:
                code = server.wait_exit(60)
            finally:
                server.stop()
            elapsed = time.monotonic() - started
            log = server.log()
        self.assertEqual(code, 1, log)
        self.assertLess(elapsed, 30, log)
        self.assertIn("Salesforce/blip-image-captioning-base", log)
        self.assertIn("--model-path", log)
        self.assertIn("HF_HOME", log)
        self.assertNotIn("Traceback", log)
        self.assertTrue(re.search(r"not in the Hugging Face cache", log), log)


if __name__ == "__main__":
    unittest.main()
