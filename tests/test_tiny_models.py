"""Tests of the tiny-checkpoint fixtures and the reference-caption oracle (tests/support/tiny_models.py)."""
import hashlib
import io
import os
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from support.tiny_models import (
    DEFAULT_CHAT_INSTRUCTION,
    FAMILIES,
    _build_checkpoint,
    _cache_key,
    image_bytes,
    reference_captions,
    sample_images,
    tiny_checkpoint,
)

pytestmark = pytest.mark.inprocess

PROMPTS = {
    "blip": "a photo of",
    "blip2": "Question: Describe the image. Answer:",
    "gemma": "Describe this image in one sentence.",
    "intern_vlm": "Describe this image in one sentence.",
}
EXPECTED_CLASSES = {
    "blip": ("BlipProcessor", "BlipForConditionalGeneration"),
    "blip2": ("Blip2Processor", "Blip2ForConditionalGeneration"),
    "gemma": ("Gemma3Processor", "Gemma3ForConditionalGeneration"),
    "intern_vlm": ("InternVLProcessor", "InternVLForConditionalGeneration"),
}
CHAT_FAMILIES = ("gemma", "intern_vlm")


def _file_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


class _FamilyChecks:
    """Mixed into one TestCase per family (not a TestCase itself, so it is not collected)."""

    family = None

    @classmethod
    def setUpClass(cls):
        cls.folder = tiny_checkpoint(cls.family)
        cls.images = sample_images()
        cls.prompt = PROMPTS[cls.family]
        cls._captions = {}

    def captions(self, prompt, n=3):
        key = (prompt, n)
        if key not in self._captions:
            self._captions[key] = reference_captions(self.folder, self.family, self.images[:n], prompt=prompt)
        return self._captions[key]

    def test_folder_contents(self):
        names = {p.name for p in self.folder.iterdir()}
        expected = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                    "tokenizer.json", "tokenizer_config.json"}
        if self.family in CHAT_FAMILIES:
            expected.add("chat_template.jinja")
        self.assertTrue(expected <= names, names)

    def test_loads_with_auto_classes(self):
        processor = AutoProcessor.from_pretrained(self.folder)
        model = AutoModelForImageTextToText.from_pretrained(self.folder)
        self.assertEqual((type(processor).__name__, type(model).__name__), EXPECTED_CLASSES[self.family])
        self.assertIsNotNone(processor.tokenizer)
        self.assertIsNotNone(processor.image_processor)
        if self.family in CHAT_FAMILIES:
            self.assertTrue(processor.chat_template)
        if self.family != "blip":
            self.assertEqual(processor.tokenizer.padding_side, "left")

    def test_same_folder_from_cache(self):
        self.assertEqual(tiny_checkpoint(self.family), self.folder)
        self.assertIn(_cache_key("default"), self.folder.name)

    def _check_captions(self, prompt):
        caps = self.captions(prompt)
        self.assertEqual(len(caps), 3)
        self.assertTrue(all(isinstance(c, str) for c in caps))
        self.assertGreater(len(set(caps)), 1, f"captions do not depend on the image: {caps}")
        self.assertEqual(caps, [c.strip() for c in caps])

    def test_captions_depend_on_image_without_prompt(self):
        self._check_captions(None)

    def test_captions_depend_on_image_with_prompt(self):
        self._check_captions(self.prompt)

    def test_batch_item0_equals_single_image(self):
        for prompt in (None, self.prompt):
            with self.subTest(prompt=prompt):
                self.assertEqual(self.captions(prompt)[0], self.captions(prompt, n=1)[0])

    def test_build_is_deterministic(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            before = torch.random.get_rng_state()
            _build_checkpoint(self.family, "default", a)
            _build_checkpoint(self.family, "default", b)
            self.assertTrue(torch.equal(before, torch.random.get_rng_state()), "build changed the caller's RNG")
            digests_a, digests_b = _file_digests(a), _file_digests(b)
        self.assertIn("model.safetensors", digests_a)
        self.assertEqual(digests_a, digests_b)
        # and the cached folder was built by the same code
        self.assertEqual(_file_digests(self.folder)["model.safetensors"], digests_a["model.safetensors"])


class BlipTinyModelTest(_FamilyChecks, unittest.TestCase):
    family = "blip"

    def test_prompt_slicing_rule(self):
        """generate() returns [DEC] + prompt tokens (input_ids without [CLS] and the trailing [SEP]) + new tokens,
        so the new tokens start at input_ids.shape[1] - 1 (the rule the oracle uses)."""
        processor = AutoProcessor.from_pretrained(self.folder)
        model = AutoModelForImageTextToText.from_pretrained(self.folder)
        inputs = processor(images=self.images, text=[self.prompt] * 3, padding=True, return_tensors="pt")
        input_ids = inputs["input_ids"].clone()  # generate() overwrites column 0 in place
        self.assertTrue(torch.all(input_ids[:, -1] == processor.tokenizer.sep_token_id))
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=5)
        bos = torch.full((3, 1), model.config.text_config.bos_token_id)
        prefix_len = input_ids.shape[1] - 1
        self.assertTrue(torch.equal(out[:, :prefix_len], torch.cat([bos, input_ids[:, 1:-1]], dim=1)))
        new = processor.batch_decode(out[:, prefix_len:], skip_special_tokens=True)
        self.assertEqual([c.strip() for c in new],
                         reference_captions(self.folder, "blip", self.images, prompt=self.prompt, max_new_tokens=5))

    def test_max_new_tokens_counts_only_new_tokens(self):
        caps = reference_captions(self.folder, "blip", self.images[:1], prompt=self.prompt, max_new_tokens=2)
        self.assertLessEqual(len(caps[0].split()), 2)
        self.assertFalse(caps[0].startswith(self.prompt), caps)


class Blip2TinyModelTest(_FamilyChecks, unittest.TestCase):
    family = "blip2"

    def test_num_query_tokens_agree(self):
        processor = AutoProcessor.from_pretrained(self.folder)
        model = AutoModelForImageTextToText.from_pretrained(self.folder)
        self.assertEqual(processor.num_query_tokens, model.config.num_query_tokens)
        self.assertEqual(processor.tokenizer.convert_tokens_to_ids("<image>"), model.config.image_token_index)

    def test_unconditional_output_layout(self):
        """Without a prompt generate() returns [<image>] * nq + [bos] + new tokens."""
        processor = AutoProcessor.from_pretrained(self.folder)
        model = AutoModelForImageTextToText.from_pretrained(self.folder)
        out = model.generate(**processor(images=self.images, return_tensors="pt"), do_sample=False,
                             max_new_tokens=3)
        nq = model.config.num_query_tokens
        expected = [model.config.image_token_index] * nq + [model.config.text_config.bos_token_id]
        self.assertEqual(out[:, :nq + 1].tolist(), [expected] * 3)

    def test_query_token_mismatch_variant(self):
        folder = tiny_checkpoint("blip2", "query_token_mismatch")
        self.assertNotEqual(folder, self.folder)
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        self.assertEqual(processor.num_query_tokens, 3)
        self.assertEqual(model.config.num_query_tokens, 4)
        self.assertNotEqual(processor.num_query_tokens, model.config.num_query_tokens)


class _ChatChecks(_FamilyChecks):
    def test_system_prompt_is_used(self):
        plain = self.captions(None)
        with_system = reference_captions(self.folder, self.family, self.images,
                                         system_prompt="You are a helpful assistant.")
        self.assertEqual(len(with_system), 3)
        self.assertNotEqual(plain, with_system)

    def test_default_instruction_is_the_no_prompt_case(self):
        self.assertEqual(self.captions(None), self.captions(DEFAULT_CHAT_INSTRUCTION))

    def test_generation_config(self):
        model = AutoModelForImageTextToText.from_pretrained(self.folder)
        processor = AutoProcessor.from_pretrained(self.folder)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.assertIn(processor.tokenizer.eos_token_id, eos)
        if self.family == "gemma":
            self.assertTrue(model.generation_config.do_sample)  # like the real checkpoint
            self.assertIn(processor.tokenizer.convert_tokens_to_ids("<end_of_turn>"), eos)


class GemmaTinyModelTest(_ChatChecks, unittest.TestCase):
    family = "gemma"


class InternVLTinyModelTest(_ChatChecks, unittest.TestCase):
    family = "intern_vlm"


class SampleImagesTest(unittest.TestCase):
    def test_three_different_deterministic_rgb_images(self):
        images = sample_images()
        self.assertEqual(len(images), 3)
        self.assertTrue(all(img.mode == "RGB" for img in images))
        self.assertEqual(len({img.size for img in images}), 3)
        self.assertEqual(len({img.tobytes() for img in images}), 3)
        self.assertEqual([img.tobytes() for img in images], [img.tobytes() for img in sample_images()])

    def test_image_bytes(self):
        img = sample_images()[1]
        png = image_bytes(img)
        self.assertTrue(png.startswith(b"\x89PNG"))
        self.assertEqual(Image.open(io.BytesIO(png)).tobytes(), img.tobytes())
        jpeg = image_bytes(img, "JPEG")
        self.assertTrue(jpeg.startswith(b"\xff\xd8"))
        self.assertEqual(Image.open(io.BytesIO(jpeg)).size, img.size)


class CacheTest(unittest.TestCase):
    def test_families(self):
        self.assertEqual(FAMILIES, ("blip", "blip2", "gemma", "intern_vlm"))

    def test_bad_arguments(self):
        with self.assertRaises(ValueError):
            tiny_checkpoint("llava")
        with self.assertRaises(ValueError):
            tiny_checkpoint("gemma", "query_token_mismatch")
        with self.assertRaises(ValueError):
            tiny_checkpoint("blip", "nope")

    def test_key_depends_on_variant(self):
        self.assertNotEqual(_cache_key("default"), _cache_key("query_token_mismatch"))
        self.assertEqual(len(_cache_key("default")), 12)

    def test_tiny_models_dir_env(self):
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"TINY_MODELS_DIR": tmp}):
            folder = tiny_checkpoint("intern_vlm")
            self.assertEqual(folder.parent, Path(tmp))
            self.assertEqual(tiny_checkpoint("intern_vlm"), folder)
            leftovers = [p.name for p in Path(tmp).iterdir() if p.name.startswith(".tmp-")]
            self.assertEqual(leftovers, [])


if __name__ == "__main__":
    unittest.main()
