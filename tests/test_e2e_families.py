"""All four families served by real server processes: captions equal a direct transformers call, batching, dtype,
and start-up refusals."""
from __future__ import annotations

import unittest

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from support.families import FAMILIES, FLAGS, PROMPTS
from support.services import ServerProcess
from support.tiny_models import image_bytes, reference_captions, sample_images, tiny_checkpoint

pytestmark = pytest.mark.live



def metric_value(text: str, name: str) -> float:
    """The value of one sample (e.g. caption_batch_size_count) in Prometheus text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def start_all(servers: list[ServerProcess]) -> None:
    """Start servers concurrently (imports dominate start-up), then wait for each to be ready."""
    for server in servers:
        server.start(wait_ready=False)
    for server in servers:
        server.wait_ready()


class FamiliesServedTest(unittest.TestCase):
    """`python app.py <flag> --model-path DIR --max-new-tokens 12` for each family."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.servers = {family: ServerProcess([FLAGS[family], "--model-path", str(tiny_checkpoint(family)),
                                              "--max-new-tokens", "12", "--max-batch-size", "8"],
                                             env={"CACHE_BACKEND": "memory"}) for family in FAMILIES}
        try:
            start_all(list(cls.servers.values()))
        except BaseException:
            cls.tearDownClass()
            raise
        cls.images = sample_images()
        cls.files = [(f"img{i}.png", image_bytes(image, "PNG")) for i, image in enumerate(cls.images)]

    @classmethod
    def tearDownClass(cls) -> None:
        for server in cls.servers.values():
            server.stop()

    def test_captions_equal_direct_transformers_call(self) -> None:
        for family in FAMILIES:
            for prompt in (None, PROMPTS[family]):
                with self.subTest(family=family, prompt=prompt):
                    response = self.servers[family].post_images(self.files, prompt=prompt)
                    self.assertEqual(response.status_code, 200, response.text)
                    results = response.json()["results"]
                    self.assertEqual([r["filename"] for r in results], ["img0.png", "img1.png", "img2.png"])
                    got = [r["caption"].strip() for r in results]
                    expected = reference_captions(tiny_checkpoint(family), family, self.images, prompt=prompt,
                                                  max_new_tokens=12)
                    self.assertEqual(got, expected)
                    self.assertGreater(len(set(got)), 1, f"captions ignore the image: {got}")
                    self.assertEqual(response.json()["model"]["family"], family)

    def test_twenty_images_make_three_generate_calls(self) -> None:
        server = self.servers["blip"]
        before = metric_value(server.session.get(server.url + "/metrics").text, "caption_batch_size_count")
        rng = np.random.default_rng(7)
        files = [(f"n{i}.png", image_bytes(Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8))))
                 for i in range(20)]
        response = server.post_images(files, prompt="a picture of")
        self.assertEqual(response.status_code, 200)
        self.assertEqual([r["filename"] for r in response.json()["results"]], [name for name, _ in files])
        self.assertTrue(all(r["cached"] is False for r in response.json()["results"]))
        metrics = server.session.get(server.url + "/metrics").text
        self.assertEqual(metric_value(metrics, "caption_batch_size_count") - before, 3)
        self.assertGreaterEqual(metric_value(metrics, "caption_batch_size_sum"), 20)


    def test_every_special_token_in_a_prompt_is_400_invalid_prompt(self) -> None:
        from transformers import AutoTokenizer

        for family in FAMILIES:
            tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(family))
            tokens = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
            self.assertGreaterEqual(len(tokens), 4, tokens)
            for token in sorted(tokens):
                with self.subTest(family=family, token=token):
                    response = self.servers[family].post_images(self.files[:1], prompt=f"a photo {token} of")
                    self.assertEqual(response.status_code, 400, response.text)
                    error = response.json()["error"]
                    self.assertEqual(error["code"], "invalid_prompt")
                    self.assertIn(repr(token), error["message"])

    def test_a_prompt_over_the_token_budget_is_400_prompt_too_long(self) -> None:
        rng = np.random.default_rng(3)
        words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(400)]
        prompt = " ".join(words)[:2000]  # within the 2000 characters, but over 1000 tokens
        for family in FAMILIES:
            with self.subTest(family=family):
                response = self.servers[family].post_images(self.files[:1], prompt=prompt)
                self.assertEqual(response.status_code, 400, response.text)
                error = response.json()["error"]
                self.assertEqual(error["code"], "prompt_too_long")
                self.assertIn("tokens", error["message"])
                self.assertIsNone(self.servers[family].process.poll())
                self.assertNotIn("Traceback", self.servers[family].log())


class BFloat16ServedTest(unittest.TestCase):
    """`--dtype bfloat16` on CPU serves every family, with the captions of a direct bfloat16 transformers call."""

    def test_every_family_serves_in_bfloat16(self) -> None:
        servers = {family: ServerProcess([FLAGS[family], "--model-path", str(tiny_checkpoint(family)),
                                          "--dtype", "bfloat16", "--max-new-tokens", "12"],
                                         env={"CACHE_BACKEND": "off"}) for family in FAMILIES}
        try:
            start_all(list(servers.values()))
            images = sample_images()
            files = [(f"{i}.png", image_bytes(image)) for i, image in enumerate(images)]
            for family, server in servers.items():
                with self.subTest(family=family):
                    ready = server.session.get(server.url + "/readyz").json()
                    self.assertEqual((ready["dtype"], ready["device"]), ("bfloat16", "cpu"))
                    response = server.post_images(files)
                    self.assertEqual(response.status_code, 200, response.text)
                    got = [r["caption"].strip() for r in response.json()["results"]]
                    self.assertEqual(got, reference_captions(tiny_checkpoint(family), family, images,
                                                             max_new_tokens=12, dtype="bfloat16"))
        finally:
            for server in servers.values():
                server.stop()


class RefusesToStartTest(unittest.TestCase):
    """Configuration mistakes stop the server with exit code 2 and a message, never a bare traceback."""

    def run_server(self, args: list[str]) -> tuple[int, str]:
        server = ServerProcess(args, env={"CACHE_BACKEND": "off"})
        server.start(wait_ready=False)
        try:
            return server.wait_exit(120), server.log()
        finally:
            server.stop()

    def test_two_model_flags(self) -> None:
        code, log = self.run_server(["--blip", "--gemma"])
        self.assertEqual(code, 2, log)
        self.assertIn("not allowed with argument", log)
        self.assertNotIn("Traceback", log)

    def test_checkpoint_of_another_family(self) -> None:
        code, log = self.run_server(["--blip2", "--model-path", str(tiny_checkpoint("intern_vlm"))])
        self.assertEqual(code, 2, log)
        self.assertIn("'internvl' checkpoint, not BLIP-2", log)
        self.assertIn("--intern-vlm", log)
        self.assertNotIn("Traceback", log)

    def test_blip2_query_token_mismatch(self) -> None:
        code, log = self.run_server(["--blip2", "--model-path", str(tiny_checkpoint("blip2", "query_token_mismatch"))])
        self.assertEqual(code, 2, log)
        self.assertIn("3 query tokens but the model expects 4", log)
        self.assertNotIn("Traceback", log)


if __name__ == "__main__":
    unittest.main()
