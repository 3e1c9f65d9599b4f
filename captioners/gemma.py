"""Gemma 3 instruction-tuned (google/gemma-3-*-it): captions through its chat template."""
from __future__ import annotations

from captioners.base import ChatCaptioner


class GemmaCaptioner(ChatCaptioner):
    """Gemma 3: one user turn (image, instruction); only the model's reply is returned."""

    family = "gemma"
    float16_safe = False  # Gemma 3 activations overflow float16: bfloat16 or float32 only
