"""BLIP (Salesforce/blip-image-captioning-*): an encoder-decoder captioner; a prompt is a prefix to continue."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from captioners.base import Captioner

if TYPE_CHECKING:
    import torch


class BlipCaptioner(Captioner):
    """BLIP: unconditional captions, or the continuation of a prefix such as "a photo of" (prefix removed)."""

    family = "blip"

    def decode(self, output_ids: "torch.Tensor", inputs: Any) -> list[str]:
        # generate() returns [bos] + the prompt tokens without their trailing [SEP] + the new tokens
        # (unconditionally just [bos] + new); slice there, never search for the prompt in the text.
        prompt_length = inputs["input_ids"].shape[1] - 1 if "input_ids" in inputs else 1
        return self.processor.batch_decode(output_ids[:, prompt_length:], skip_special_tokens=True)
