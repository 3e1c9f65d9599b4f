"""BLIP (Salesforce/blip-image-captioning-*): an encoder-decoder captioner; a prompt is a prefix to continue."""
from __future__ import annotations

from typing import Any

from captioners.base import Captioner


class BlipCaptioner(Captioner):
    """BLIP: unconditional captions, or the continuation of a prefix such as "a photo of" (prefix removed)."""

    family = "blip"

    def new_tokens_start(self, inputs: Any) -> int:
        # generate() returns [bos] + the prompt tokens without their trailing [SEP] + the new tokens
        # (unconditionally just [bos] + new); slice there, never search for the prompt in the text.
        return inputs["input_ids"].shape[1] - 1 if "input_ids" in inputs else 1

    @property
    def stop_token_ids(self) -> frozenset[int]:
        # BLIP's generate() stops on [SEP] whatever the generation config says.
        return frozenset([self.model_config.text_config.sep_token_id])
