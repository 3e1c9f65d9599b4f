"""Registry of caption model families: family id -> implementation, imported lazily.

Importing this package does not import torch or transformers, so `python app.py --help` and configuration
errors are instant; the family module is imported only when a captioner is created.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from captioners.base import Captioner


@dataclass(frozen=True)
class Family:
    """One model family: its flag, where its code lives, and which checkpoint it loads by default."""

    id: str
    flag: str
    name: str
    implementation: str  # "module:Class"
    default_checkpoint: str
    model_types: tuple[str, ...]  # config.json "model_type" values this family can load
    prompt_meaning: str  # what a prompt is to this family (help texts, docs)
    example_prompt: str
    default_revision: str | None = None


# The one list of families: the command line, the configuration, the docs and the tests all take it from here.
FAMILIES: dict[str, Family] = {
    f.id: f
    for f in (
        Family("blip", "--blip", "BLIP", "captioners.blip:BlipCaptioner", "Salesforce/blip-image-captioning-base",
               ("blip",), "a text prefix the caption continues", "a photo of"),
        Family("blip2", "--blip2", "BLIP-2", "captioners.blip2:Blip2Captioner", "Salesforce/blip2-opt-2.7b",
               ("blip-2",), "the text the language model continues", "Question: Describe the image. Answer:"),
        Family("gemma", "--gemma", "Gemma 3", "captioners.gemma:GemmaCaptioner", "google/gemma-3-4b-it",
               ("gemma3",), "the instruction in a chat turn with the image", "What animal is on the candy."),
        Family("intern_vlm", "--intern-vlm", "InternVL3", "captioners.intern_vlm:InternVLCaptioner",
               "OpenGVLab/InternVL3-1B-hf", ("internvl",), "the instruction in a chat turn with the image",
               "Please describe the image explicitly."),
    )
}
DEFAULT_FAMILY = "blip"


def family_of_model_type(model_type: str) -> Family | None:
    """The family whose checkpoints have this config.json model_type, if any."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def captioner_class(family: str) -> "type[Captioner]":
    """The Captioner subclass of a family id (imports its module, and so torch, on first use)."""
    module_name, _, class_name = FAMILIES[family].implementation.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_captioner(family: str, model_id: str | None = None, revision: str | None = None, device: str = "auto",
                     dtype: str = "auto", system_prompt: str | None = None) -> "Captioner":
    """A not-yet-loaded captioner of the family; call `.load()` to bring in the weights."""
    spec = FAMILIES[family]
    return captioner_class(family)(
        model_id=model_id or spec.default_checkpoint,
        revision=revision if revision is not None else (None if model_id else spec.default_revision),
        device=device,
        dtype=dtype,
        system_prompt=system_prompt,
    )
