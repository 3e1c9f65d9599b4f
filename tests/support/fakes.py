"""Test doubles shared by the unit tests: a captioner and a tagger that need no model.

They implement just the interface CaptionService uses (captioners.base.Captioner, tagging.Tagger), so that a
unit test can drive the real service, batcher, cache and claims without torch. Behaviour tests of the model
path use the tiny checkpoints (support.tiny_models), never these.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

from captioners.base import Generated
from errors import InvalidPromptError


class FakeCaptioner:
    """Captions an image as "a <mean colour> square"; counts the images and generate calls it sees.

    `check_prompt` refuses prompts holding "<image>", as the real captioners refuse their special tokens.
    """

    family = "blip"
    device = "cpu"  # what the service reads for its default batch size (a torch.device on real captioners)
    takes_system_prompt = False
    loaded = True
    load_seconds = 0.0
    max_positions = 512

    def __init__(self, **overrides: Any) -> None:
        self.model_id = "Salesforce/blip-image-captioning-base"
        self.revision = None
        self.system_prompt = None
        self.dtype = "float32"
        self.images = 0
        self.calls: list[tuple[int, Any]] = []
        self._lock = threading.Lock()
        self.__dict__.update(overrides)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "id": self.model_id, "device": self.device, "dtype": self.dtype,
                "revision": self.revision}

    def effective_prompt(self, prompt: str | None) -> str | None:
        return prompt

    def check_prompt(self, prompt: str | None, params: Any, system_prompt: str | None = None) -> None:
        if prompt and "<image>" in prompt:
            raise InvalidPromptError("the prompt contains '<image>'")

    def prepare(self, image: Any, prompt: str | None, params: Any, system_prompt: str | None = None) -> dict[str, Any]:
        colour = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
        return {"colour": colour, "prompt": prompt}

    def generate(self, items: Sequence[dict[str, Any]], params: Any) -> list[Generated]:
        with self._lock:
            self.images += len(items)
            self.calls.append((len(items), params))
        texts = ["a red square" if item["colour"][0] > 128 else "a dark square" for item in items]
        return [Generated(text, len(text.split()) + 1, True) for text in texts]

    def caption(self, images: Sequence[Any], prompt: str | None, params: Any) -> list[str]:
        return [done.text for done in self.generate([self.prepare(image, prompt, params) for image in images], params)]


class FakeTagger:
    """Tags every caption with its last word; `version` is part of the cache fingerprint."""

    def __init__(self, version: str = "tags-v1") -> None:
        self.version = version

    def load(self) -> None:
        pass

    def tags_many(self, captions: Sequence[str]) -> list[list[str]]:
        return [[caption.split()[-1]] if caption.split() else [] for caption in captions]
