"""Every family through the real from_pretrained + generate path on tiny checkpoints, against a direct call."""
from __future__ import annotations

import unittest
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from captioners import FAMILIES as REGISTRY
from captioners import create_captioner
from captioners.base import (
    CPU_BATCH_SIZE,
    DEFAULT_CHAT_INSTRUCTION,
    GPU_BATCH_SIZE,
    GenerationParams,
    choose_dtype,
    cpu_flag_set,
    default_batch_size,
    fast_bfloat16,
    generated_lengths,
    resolve_device,
    to_device,
)
from errors import ConfigError, InvalidPromptError, PromptTooLongError
from support import tiny_models
from support.families import FAMILIES, PROMPTS
from support.tiny_models import reference_captions, reference_generation, sample_images, tiny_checkpoint

pytestmark = pytest.mark.inprocess

PARAMS = GenerationParams(max_new_tokens=12)


class FamilyAgreementTest(unittest.TestCase):
    """The service's captioner gives exactly the captions of a direct batched transformers call (float32; the
    class below runs every check again in bfloat16)."""

    dtype = "float32"

    @classmethod
    def setUpClass(cls) -> None:
        cls.images = sample_images()
        cls.captioners = {}
        for family in FAMILIES:
            captioner = create_captioner(family, str(tiny_checkpoint(family)), dtype=cls.dtype)
            captioner.load()
            cls.captioners[family] = captioner

    def test_every_family_of_the_registry_has_a_tiny_checkpoint(self) -> None:
        self.assertEqual(set(REGISTRY), set(tiny_models.FAMILIES))
        self.assertEqual(DEFAULT_CHAT_INSTRUCTION, tiny_models.DEFAULT_CHAT_INSTRUCTION)

    def test_captions_equal_direct_generate(self) -> None:
        for family in FAMILIES:
            for prompt in (None, PROMPTS[family]):
                with self.subTest(family=family, prompt=prompt):
                    got = self.captioners[family].caption(self.images, prompt, PARAMS)
                    expected = reference_captions(tiny_checkpoint(family), family, self.images, prompt=prompt,
                                                  max_new_tokens=12, dtype=self.dtype)
                    self.assertEqual(got, expected)
                    self.assertEqual(len(set(got)), 3, f"tiny {family} ignores its image: {got}")

    def test_generated_token_counts_equal_direct_generate(self) -> None:
        # max_new_tokens 4 and 12: captions that run into the limit and (where the tiny model ends one) stop
        for family in FAMILIES:
            for limit in (4, 12):
                with self.subTest(family=family, max_new_tokens=limit):
                    params = GenerationParams(max_new_tokens=limit)
                    captioner = self.captioners[family]
                    got = captioner.generate([captioner.prepare(image, PROMPTS[family], params)
                                              for image in self.images], params)
                    expected = [reference_generation(tiny_checkpoint(family), family, image, prompt=PROMPTS[family],
                                                     max_new_tokens=limit, dtype=self.dtype)
                                for image in self.images]
                    self.assertEqual([(done.text, done.new_tokens, done.stopped) for done in got], expected)

    def test_batch_item_equals_single_image(self) -> None:
        for family in FAMILIES:
            with self.subTest(family=family):
                captioner = self.captioners[family]
                batch = captioner.caption(self.images, PROMPTS[family], PARAMS)
                singles = [captioner.caption([image], PROMPTS[family], PARAMS)[0] for image in self.images]
                self.assertEqual(batch, singles)

    def test_images_larger_than_the_model_input_agree(self) -> None:
        rng = np.random.default_rng(11)
        large = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
                 ((3000, 2000), (1200, 4000), (64, 2000))]
        for family in FAMILIES:
            with self.subTest(family=family):
                self.assertEqual(self.captioners[family].caption(large, PROMPTS[family], PARAMS),
                                 reference_captions(tiny_checkpoint(family), family, large, prompt=PROMPTS[family],
                                                    max_new_tokens=12, dtype=self.dtype))

    def test_prepared_in_many_threads_equals_one_batched_call(self) -> None:
        images = self.images * 6
        for family in FAMILIES:
            with self.subTest(family=family):
                captioner = self.captioners[family]
                with ThreadPoolExecutor(6) as pool:
                    prepared = list(pool.map(lambda im: captioner.prepare(im, PROMPTS[family], PARAMS), images))
                self.assertEqual([done.text for done in captioner.generate(prepared, PARAMS)],
                                 reference_captions(tiny_checkpoint(family), family, images, prompt=PROMPTS[family],
                                                    max_new_tokens=12, dtype=self.dtype))

    def test_control_tokens_are_refused_and_ordinary_text_is_not(self) -> None:
        for family in FAMILIES:
            captioner = self.captioners[family]
            for token in captioner.control_tokens:
                with self.subTest(family=family, token=token):
                    with self.assertRaises(InvalidPromptError) as caught:
                        captioner.check_prompt(f"describe {token} it", PARAMS)
                    self.assertIn(repr(token), caught.exception.message)
            with self.subTest(family=family, prompt="ordinary"):
                captioner.check_prompt(PROMPTS[family] + " [sep] <b>bold</b> émoji 😀 <|im_end", PARAMS)
        with self.assertRaises(PromptTooLongError):
            self.captioners["blip"].check_prompt("a photo of", GenerationParams(max_new_tokens=60))
        self.captioners["blip"].check_prompt("a photo of", GenerationParams(max_new_tokens=50))

    def test_deterministic(self) -> None:
        for family in FAMILIES:
            with self.subTest(family=family):
                captioner = self.captioners[family]
                self.assertEqual(captioner.caption(self.images, None, PARAMS),
                                 captioner.caption(self.images, None, PARAMS))

    def test_blip_prefix_is_removed_by_token_slicing(self) -> None:
        captioner = self.captioners["blip"]
        inputs = captioner.build_inputs(self.images[:1], "a photo of")
        output = captioner.model.generate(**inputs, max_new_tokens=5, do_sample=False)
        full = captioner.processor.batch_decode(output, skip_special_tokens=True)[0]
        new = captioner.caption(self.images[:1], "a photo of", GenerationParams(max_new_tokens=5))[0]
        self.assertTrue(full.startswith("a photo of"), full)
        self.assertEqual(full, ("a photo of " + new).strip())

    def test_chat_system_prompt_is_a_system_turn(self) -> None:
        for family in ("gemma", "intern_vlm"):
            with self.subTest(family=family):
                folder = tiny_checkpoint(family)
                captioner = create_captioner(family, str(folder), system_prompt="You write alt text.",
                                             dtype=self.dtype)
                captioner.load()
                turns = captioner.conversation(self.images[0], "hi")
                self.assertEqual([t["role"] for t in turns], ["system", "user"])
                self.assertEqual([c["type"] for c in turns[1]["content"]], ["image", "text"])
                self.assertEqual(captioner.caption(self.images, None, PARAMS),
                                 reference_captions(folder, family, self.images, max_new_tokens=12,
                                                    system_prompt="You write alt text.", dtype=self.dtype))
                without = self.captioners[family].conversation(self.images[0], "hi")
                self.assertEqual([t["role"] for t in without], ["user"])

    def test_max_new_tokens_is_honoured(self) -> None:
        short = GenerationParams(max_new_tokens=3)
        for family in FAMILIES:
            with self.subTest(family=family):
                got = self.captioners[family].caption(self.images, None, short)
                self.assertEqual(got, reference_captions(tiny_checkpoint(family), family, self.images,
                                                         max_new_tokens=3, dtype=self.dtype))
                longer = self.captioners[family].caption(self.images, None, PARAMS)
                self.assertTrue(all(b.startswith(a.rstrip("�")) or not a for a, b in zip(got, longer)),
                                (got, longer))


class FamilyAgreementBFloat16Test(FamilyAgreementTest):
    """Every agreement check again in bfloat16 (what `--dtype auto` picks on CPUs with fast bfloat16): the
    service's captions equal a direct generate in bfloat16."""

    dtype = "bfloat16"

    def test_loaded_in_bfloat16(self) -> None:
        import torch

        for family, captioner in self.captioners.items():
            with self.subTest(family=family):
                self.assertEqual(captioner.model.dtype, torch.bfloat16)
                self.assertEqual((captioner.describe()["dtype"], captioner.describe()["dtype_reason"]),
                                 ("bfloat16", "--dtype bfloat16"))


class StartupChecksTest(unittest.TestCase):
    """Silent failures become clear errors before serving."""

    def test_wrong_family_checkpoint(self) -> None:
        captioner = create_captioner("blip", str(tiny_checkpoint("gemma")))
        with self.assertRaises(ConfigError) as caught:
            captioner.load()
        message = str(caught.exception)
        self.assertIn("'gemma3'", message)
        self.assertIn("--gemma", message)

    def test_blip2_query_token_mismatch(self) -> None:
        captioner = create_captioner("blip2", str(tiny_checkpoint("blip2", "query_token_mismatch")))
        with self.assertRaises(ConfigError) as caught:
            captioner.load()
        self.assertIn("query tokens", str(caught.exception))
        self.assertIn("num_query_tokens=4", str(caught.exception))

    def test_missing_folder(self) -> None:
        with self.assertRaises(ConfigError):
            create_captioner("blip", "/nonexistent/checkpoint").load()

    def test_device_and_dtype_resolution(self) -> None:
        import torch

        cpu = torch.device("cpu")
        self.assertEqual(choose_dtype("auto", cpu, True, "BLIP", frozenset({"avx2", "avx512f"}))[0], torch.float32)
        for flags, name in (({"avx512_bf16"}, "AVX512-BF16"), ({"amx_bf16", "avx512_bf16"}, "AMX-BF16")):
            dtype, reason = choose_dtype("auto", cpu, False, "Gemma 3", frozenset(flags))
            self.assertEqual(dtype, torch.bfloat16)
            self.assertIn(name, reason)
        dtype, reason = choose_dtype("auto", cpu, True, "BLIP", frozenset())
        self.assertEqual(dtype, torch.float32)
        self.assertIn("emulated", reason)
        self.assertEqual(choose_dtype("float32", cpu, True, "BLIP", frozenset({"amx_bf16"})),
                         (torch.float32, "--dtype float32"))
        # what this machine's CPU gets
        expected = torch.bfloat16 if fast_bfloat16(cpu_flag_set()) else torch.float32
        self.assertEqual(choose_dtype("auto", cpu, True, "BLIP")[0], expected)
        self.assertEqual(choose_dtype("bfloat16", cpu, False, "Gemma 3")[0], torch.bfloat16)
        with self.assertRaises(ConfigError):
            choose_dtype("float16", cpu, False, "Gemma 3")
        self.assertEqual(resolve_device("cpu"), cpu)
        if not torch.cuda.is_available():
            self.assertEqual(resolve_device("auto").type, "mps" if torch.backends.mps.is_available() else "cpu")
            with self.assertRaises(ConfigError):
                resolve_device("cuda")

    def test_default_batch_size_by_device(self) -> None:
        import torch

        self.assertEqual(default_batch_size(torch.device("cpu")), CPU_BATCH_SIZE)
        self.assertEqual(default_batch_size("mps"), CPU_BATCH_SIZE)
        self.assertEqual(default_batch_size(torch.device("cuda", 1)), GPU_BATCH_SIZE)
        self.assertGreater(GPU_BATCH_SIZE, CPU_BATCH_SIZE)

    def test_generated_lengths_end_at_the_first_stop_token(self) -> None:
        import torch

        # A batch's rows: stopped at once, stopped mid-way then padded (pad 0), ran to the limit, a stop token
        # (of two) at the last column, and an ordinary token equal to the pad id before the stop.
        new_ids = torch.tensor([[102, 0, 0, 0], [5, 6, 102, 0], [5, 6, 7, 8], [5, 6, 7, 9], [0, 5, 102, 0]])
        self.assertEqual(generated_lengths(new_ids, frozenset({102, 9})),
                         [(1, True), (3, True), (4, False), (4, True), (3, True)])
        self.assertEqual(generated_lengths(new_ids[:, :0], frozenset({102})), [(0, False)] * 5)

    def test_to_device_casts_pixels_only(self) -> None:
        import torch
        from transformers import BatchFeature

        batch = BatchFeature({"pixel_values": torch.rand(2, 3, 4, 4), "input_ids": torch.tensor([[1, 2], [3, 4]])})
        moved = to_device(batch, torch.device("cpu"), torch.bfloat16)
        self.assertEqual(moved["pixel_values"].dtype, torch.bfloat16)
        self.assertEqual(moved["input_ids"].dtype, torch.int64)
        self.assertTrue(torch.equal(moved["input_ids"], torch.tensor([[1, 2], [3, 4]])))


if __name__ == "__main__":
    unittest.main()
