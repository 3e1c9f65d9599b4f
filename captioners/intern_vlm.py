"""InternVL3 in the native transformers format (OpenGVLab/InternVL3-*-hf): captions through its chat template."""
from __future__ import annotations

from captioners.base import ChatCaptioner


class InternVLCaptioner(ChatCaptioner):
    """InternVL3: one user turn (image, instruction); only the model's reply is returned.

    Its processor tiles each image (pixel_values has one row per tile, not per image); the processor and
    model handle that, so nothing here depends on it.
    """

    family = "intern_vlm"
