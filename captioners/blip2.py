"""BLIP-2 with an OPT language model (Salesforce/blip2-opt-*): a prompt is text the LM continues."""
from __future__ import annotations

from typing import Any

from captioners.base import Captioner
from errors import ConfigError


class Blip2Captioner(Captioner):
    """BLIP-2: unconditional captions, or the continuation of "Question: … Answer:" (new text only)."""

    family = "blip2"

    def _after_load(self) -> None:
        super()._after_load()
        processor_tokens = getattr(self.processor, "num_query_tokens", None)
        model_tokens = self.model_config.num_query_tokens
        # A processor that expands <image> to the wrong number of query tokens raises nothing at all:
        # generate() silently ignores the image. Refuse to start instead.
        if processor_tokens != model_tokens:
            raise ConfigError(
                f"{self.model_id}: the processor expands each image to {processor_tokens} query tokens but the "
                f"model expects {model_tokens}; the checkpoint's processor_config.json must set "
                f"num_query_tokens={model_tokens} (re-save the processor with a current transformers)."
            )
        self.processor.tokenizer.padding_side = "left"  # OPT is decoder-only: new tokens must line up

    def new_tokens_start(self, inputs: Any) -> int:
        # With a prompt the output repeats the input ids; without one, generate() builds and returns
        # [<image>] * num_query_tokens + [bos] itself. Either way only what follows is the caption.
        if "input_ids" in inputs:
            return inputs["input_ids"].shape[1]
        return self.model_config.num_query_tokens + 1
