"""The Captioner interface and the transformers plumbing every family shares.

A family module supplies only what differs: how a batch of images and a prompt become model inputs
(`build_inputs`), and where the new tokens start in generate's output (`new_tokens_start`). Loading, device and
dtype placement, the `generate` call and decoding live here, once.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence
from urllib.parse import urlsplit

from captioners import FAMILIES, Family, family_of_model_type
from errors import CaptioningError, ConfigError, InvalidPromptError, ModelLoadError, PromptTooLongError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    Prepared = dict[str, "torch.Tensor"]  # one image's model inputs, from Captioner.prepare

log = logging.getLogger(__name__)

# A file of this name in a checkpoint folder says its weights are random (tiny test checkpoints, `make demo`,
# the benchmark's): the service then says so in its log, in /readyz and on the demo page.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"

# The instruction the chat families get when neither the server nor the request gives a prompt (SPEC §2).
DEFAULT_CHAT_INSTRUCTION = "Write one concise caption for this image. Reply with the caption only."


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings; greedy and deterministic, so a cached caption equals a fresh one."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`; sampling is always off (Gemma 3's checkpoint samples)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False,
                                  "num_beams": self.num_beams}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        return kwargs


@dataclass(frozen=True)
class Generated:
    """One caption of a generate call, with what the model did to produce it (the OpenAI API's usage)."""

    text: str
    new_tokens: int  # tokens the model generated for it, its end-of-text token included
    stopped: bool  # it ended on an end-of-text token; False: it ran into max_new_tokens


class Captioner(ABC):
    """Batch in, batch out: `caption(images, prompt, params)` returns one caption per image, in order."""

    family: ClassVar[str]
    # Gemma 3's activations overflow float16; families that cannot run in it say so here.
    float16_safe: ClassVar[bool] = True
    # Whether the family's prompt has a system turn (the chat families); BLIP and BLIP-2 continue plain text.
    takes_system_prompt: ClassVar[bool] = False

    def __init__(self, model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                 system_prompt: str | None = None) -> None:
        self.model_id = model_id
        self.revision = revision
        self.requested_device = device
        self.requested_dtype = dtype
        self.system_prompt = system_prompt
        self.random_weights = False  # a checkpoint folder marked RANDOM_WEIGHTS (tests, benchmark, `make demo`)
        self.processor: Any = None
        self.model: Any = None
        self.model_config: Any = None
        self.device: "torch.device | None" = None
        self.torch_dtype: "torch.dtype | None" = None
        self.dtype_reason: str | None = None  # why this dtype (what `auto` chose, or that it was asked for)
        self.load_seconds: float | None = None
        self._threadpools: Any = None  # threadpoolctl's view of the OpenMP runtime PyTorch loaded

    @property
    def spec(self) -> Family:
        """This family's registry entry (flag, name, default checkpoint)."""
        return FAMILIES[self.family]

    @property
    def loaded(self) -> bool:
        """Whether load() has completed."""
        return self.model is not None

    def describe(self) -> dict[str, Any]:
        """What is loaded, for responses, logs and /readyz."""
        return {"family": self.family, "id": self.model_id, "revision": self.revision,
                "random_weights": self.random_weights,
                "device": str(self.device) if self.device else self.requested_device,
                "dtype": str(self.torch_dtype).removeprefix("torch.") if self.torch_dtype else self.requested_dtype,
                "dtype_reason": self.dtype_reason}

    def effective_prompt(self, prompt: str | None) -> str | None:
        """The prompt the model really sees for a request prompt (None means unconditional)."""
        return prompt or None

    def load(self, weights: bool = True) -> None:
        """Bring in processor and weights once, check they belong together, and log where they run.

        `weights=False` loads the configuration and processor only: enough to `prepare` inputs and check
        prompts in a worker that never runs the model (the bulk command's Ray read tasks)."""
        started = time.perf_counter()
        import torch  # noqa: F401  (imported here so that --help and config errors need no torch)
        from threadpoolctl import ThreadpoolController
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self._threadpools = ThreadpoolController()
        self.device = resolve_device(self.requested_device)
        self.torch_dtype, self.dtype_reason = choose_dtype(self.requested_dtype, self.device, self.float16_safe,
                                                           self.spec.name)
        source = WeightSource(self.model_id, self.revision, self.spec)
        self.random_weights = source.is_local and (Path(self.model_id).expanduser() / RANDOM_WEIGHTS_MARKER).is_file()
        self.model_config = source.load(AutoConfig.from_pretrained)
        self._check_architecture(self.model_config)
        self.processor = source.load(AutoProcessor.from_pretrained)
        if weights:
            model = source.load(AutoModelForImageTextToText.from_pretrained, dtype=self.torch_dtype)
            self.model = model.to(self.device).eval()
        self._after_load()
        self._collect_control_tokens()
        for name, text in (("--system-prompt", self.system_prompt),):
            try:
                self.check_prompt(text, GenerationParams(max_new_tokens=1))
            except (InvalidPromptError, PromptTooLongError) as exc:
                raise ConfigError(f"{name}: {exc.message}") from None
        self.load_seconds = time.perf_counter() - started
        if not weights:
            return
        log.info("Loaded %s checkpoint %s%s on %s as %s (%s) in %.1f s", self.spec.name, self.model_id,
                 f" (revision {self.revision})" if self.revision else "", self.device,
                 self.describe()["dtype"], self.dtype_reason, self.load_seconds)
        if self.random_weights:
            log.warning("This checkpoint has RANDOM weights (it holds a %s file): its captions are noise. It is "
                        "for trying the service out; serve a real checkpoint for real captions.", RANDOM_WEIGHTS_MARKER)

    # ----- the data path: prepare (request threads) -> generate (model thread) ---------------------------
    def prepare(self, image: "Image.Image", prompt: str | None, params: GenerationParams,
                system_prompt: str | None = None) -> "Prepared":
        """The model inputs of one image with one prompt (resized, normalised, templated, tokenised), on the CPU.
        `system_prompt`: a request's own system turn (chat families); None for the configured one.

        Runs in the request's worker right after decoding, so that the full-size image can be dropped at once
        and the model thread only stacks small tensors. `generate` on a list of these gives exactly what the
        processor's own batched call would (same tensors, same padding).
        """
        with self._one_torch_thread():
            inputs = dict(self.build_inputs([image], self.effective_prompt(prompt), system_prompt))
        length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        if length + params.max_new_tokens > self.max_positions:
            raise PromptTooLongError(self._too_long_message(length, params.max_new_tokens))
        return inputs

    @contextmanager
    def _one_torch_thread(self) -> Iterator[None]:
        """PyTorch single-threaded on this thread for the duration (other threads keep their own setting).

        GNU OpenMP gives every thread that runs a parallel PyTorch op its own team of worker threads, kept for
        the thread's life. Preprocessing on the request threads would leave idle teams beside the model thread's;
        with more OpenMP threads than cores, OpenMP stops spinning between parallel regions, and every generate
        ran about 12% slower (2-core Intel Xeon, BLIP-base; bench/README.md). So preprocessing, which runs on
        many threads at once anyway, runs one thread each, and only the model thread has a team.
        """
        import torch

        torch.get_num_threads()  # PyTorch sets a thread's OpenMP count on its first op there: now, not inside
        with self._threadpools.limit(limits=1, user_api="openmp"):
            yield

    def generate(self, items: Sequence["Prepared"], params: GenerationParams) -> list[Generated]:
        """Caption prepared items (all with the same prompt) in ONE generate call; one caption each, in order."""
        import torch

        if not items:
            return []
        inputs = to_device(self.collate(items), self.device, self.torch_dtype)
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **params.generate_kwargs())
        new_ids = output_ids[:, self.new_tokens_start(inputs):]
        texts = self.processor.batch_decode(new_ids, skip_special_tokens=True)
        if len(texts) != len(items):
            raise CaptioningError(f"{self.spec.name} returned {len(texts)} captions for {len(items)} images")
        return [Generated(text.strip(), length, stopped)
                for text, (length, stopped) in zip(texts, generated_lengths(new_ids, self.stop_token_ids))]

    def caption(self, images: Sequence["Image.Image"], prompt: str | None, params: GenerationParams) -> list[str]:
        """Caption all `images` in ONE generate call with the same prompt; one caption per image, in order."""
        return [done.text for done in self.generate([self.prepare(image, prompt, params) for image in images],
                                                    params)]

    def collate(self, items: Sequence["Prepared"]) -> Any:
        """One batch from per-image inputs: token rows padded as the tokenizer pads, image rows concatenated.

        Tensors with one row per token (input_ids, attention_mask, token_type_ids) are padded to the longest
        item on the tokenizer's padding side (input_ids with the pad token, the others with 0); everything
        else (pixel_values, one row per image or per tile) is concatenated in order.
        """
        import torch
        from transformers import BatchFeature

        tokenizer = self.processor.tokenizer
        longest = max((item["input_ids"].shape[1] for item in items if "input_ids" in item), default=0)
        batch: dict[str, Any] = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if not self._is_token_row(key, items[0]):
                batch[key] = torch.cat(values)
                continue
            pad_value = tokenizer.pad_token_id if key == "input_ids" else 0
            rows = []
            for value in values:
                pad = torch.full((value.shape[0], longest - value.shape[1]), pad_value, dtype=value.dtype)
                rows.append(torch.cat([pad, value] if tokenizer.padding_side == "left" else [value, pad], dim=1))
            batch[key] = torch.cat(rows)
        return BatchFeature(batch)

    @staticmethod
    def _is_token_row(key: str, item: "Prepared") -> bool:
        value, ids = item[key], item.get("input_ids")
        return ids is not None and value.dim() == 2 and value.shape == ids.shape

    def build_inputs(self, images: list["Image.Image"], prompt: str | None, system_prompt: str | None = None) -> Any:
        """Processor outputs (a BatchFeature) for images that share one prompt: here the prompt is plain text
        the model continues (BLIP, BLIP-2; no system turn); the chat families override this with their
        template."""
        if prompt is None:
            return self.processor(images=images, return_tensors="pt")
        # One prompt per batch: BLIP drops the last column assuming it is [SEP], which breaks with padding.
        return self.processor(images=images, text=[prompt] * len(images), return_tensors="pt",
                              padding=_padding(images))

    @abstractmethod
    def new_tokens_start(self, inputs: Any) -> int:
        """The column of generate's output where the new tokens start (what comes before is the prompt, as
        the family's generate returns it); the caption is those tokens decoded, special tokens skipped."""

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """The end-of-text tokens generate stops on (the checkpoint's generation config)."""
        eos = self.model.generation_config.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else eos or [])

    # ----- prompts ---------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str | None, params: GenerationParams, system_prompt: str | None = None) -> None:
        """Refuse a prompt that holds the tokenizer's special or control tokens, or that leaves the model no
        room for `params.max_new_tokens` (InvalidPromptError, PromptTooLongError); one rule for every family.
        `system_prompt` (a request's own system turn) counts towards the length."""
        if not prompt:
            return
        tokenizer = self.processor.tokenizer
        if self._control_pattern is not None and (found := self._control_pattern.search(prompt)):
            raise InvalidPromptError(self._control_token_message(found.group()))
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for token_id in ids:  # a token the tokenizer reaches from other text (case folding, normalisation)
            if token_id in self._control_ids:
                raise InvalidPromptError(self._control_token_message(tokenizer.convert_ids_to_tokens(token_id)))
        length = self.input_tokens(prompt, system_prompt)
        if length + params.max_new_tokens > self.max_positions:
            raise PromptTooLongError(self._too_long_message(length, params.max_new_tokens))

    @property
    def max_positions(self) -> int:
        """How many tokens (input and generated) the language model can take."""
        return int(getattr(self.model_config.get_text_config(), "max_position_embeddings", None) or 1 << 30)

    def input_tokens(self, prompt: str | None, system_prompt: str | None = None) -> int:
        """Input tokens of a prompt with the smallest image (images that expand to more are checked in prepare);
        for BLIP and BLIP-2 without a prompt, the tokens generate() starts from."""
        from PIL import Image

        inputs = self.build_inputs([Image.new("RGB", (32, 32))], self.effective_prompt(prompt), system_prompt)
        return inputs["input_ids"].shape[1] if "input_ids" in inputs else 1

    def _too_long_message(self, input_tokens: int, max_new_tokens: int) -> str:
        room = max(0, self.max_positions - max_new_tokens)
        return (f"the prompt makes {input_tokens} input tokens for {self.spec.name}, and with {max_new_tokens} new "
                f"tokens that is over the {self.max_positions} the model can take; the input may be at most "
                f"{room} tokens: shorten the prompt")

    def _control_token_message(self, token: str) -> str:
        return (f"the prompt contains {token!r}, a special token of the {self.spec.name} tokenizer; prompts are "
                f"plain text: remove it")

    def _collect_control_tokens(self) -> None:
        """The tokenizer's special and added tokens (image placeholders, chat-turn markers, padding, ...)."""
        tokenizer = self.processor.tokenizer
        added = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()}
        special = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
        tokens = {text: token_id for text, token_id in {**special, **added}.items() if text}
        self.control_tokens = sorted(tokens)
        # One pass over the prompt however many tokens there are (real Gemma 3 has thousands); longest first,
        # so that a message names "<start_of_image>" rather than a shorter token inside it.
        alternatives = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))
        self._control_pattern = re.compile(alternatives) if alternatives else None
        # An unknown character maps to the unknown token; that is ordinary text, not a forged token.
        self._control_ids = frozenset(tokens.values()) - {tokenizer.unk_token_id}

    def _after_load(self) -> None:
        """Family hook run once after loading: consistency checks, padding side, generation defaults."""
        generation_config = self.model.generation_config if self.model is not None else None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if (generation_config is not None and generation_config.pad_token_id is None and tokenizer is not None
                and tokenizer.pad_token_id is not None):
            # Without it generate() warns on every call and guesses the eos token.
            generation_config.pad_token_id = tokenizer.pad_token_id

    def _check_architecture(self, config: Any) -> None:
        """Refuse a checkpoint of another family: its outputs would be garbage, or an obscure crash later."""
        model_type = getattr(config, "model_type", None)
        if model_type in self.spec.model_types:
            return
        other = family_of_model_type(model_type or "")
        hint = (f"start with {other.flag} to serve it" if other
                else "it is not one of the families this service runs")
        raise ConfigError(f"{self.model_id} is a {model_type!r} checkpoint, not {self.spec.name} "
                          f"(expected model_type {', '.join(self.spec.model_types)}); {hint}, "
                          f"or give {self.spec.flag} a {self.spec.name} checkpoint with --model-path.")


class ChatCaptioner(Captioner):
    """Families prompted through a chat template: one user turn holding the image, then the prompt text."""

    takes_system_prompt = True

    def effective_prompt(self, prompt: str | None) -> str | None:
        return prompt or DEFAULT_CHAT_INSTRUCTION

    def _after_load(self) -> None:
        super()._after_load()
        # Decoder-only models must be padded on the left so every row's new tokens start at the same column.
        self.processor.tokenizer.padding_side = "left"

    def conversation(self, image: "Image.Image", prompt: str | None, system_prompt: str | None = None
                     ) -> list[dict[str, Any]]:
        """Exactly one user turn (image, then text), preceded by a system turn only if the request or the
        configuration gives one (the request's wins)."""
        turns: list[dict[str, Any]] = []
        system = system_prompt or self.system_prompt
        if system:
            turns.append({"role": "system", "content": [{"type": "text", "text": system}]})
        turns.append({"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": prompt}]})
        return turns

    def build_inputs(self, images: list["Image.Image"], prompt: str | None, system_prompt: str | None = None) -> Any:
        return self.processor.apply_chat_template(
            [self.conversation(image, prompt, system_prompt) for image in images],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": _padding(images)},
        )

    def new_tokens_start(self, inputs: Any) -> int:
        return inputs["input_ids"].shape[1]  # the output repeats the (left-padded) input ids


def _padding(images: Sequence[Any]) -> bool:
    """Pad only batches. One image (what `prepare` sends) needs none, and never switching the tokenizer's
    padding state back and forth keeps its Rust object free of writes while request threads share it."""
    return len(images) > 1


# Images per generate call when MAX_BATCH_SIZE is not set. On a CPU a batch of 8 already keeps the cores busy
# (larger ones only add latency); on a GPU a batch costs little more than one image, so it takes many more.
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 64


def generated_lengths(new_ids: "torch.Tensor", stop_token_ids: frozenset[int]) -> list[tuple[int, bool]]:
    """(tokens generated, whether it stopped on an end-of-text token) of each row of generate's new tokens.

    A row that stopped is padded after its end-of-text token up to the longest row; a row without one ran
    until generate stopped it at max_new_tokens, and all its tokens are its own.
    """
    lengths = []
    for row in new_ids.tolist():
        end = next((column for column, token in enumerate(row) if token in stop_token_ids), None)
        lengths.append((len(row), False) if end is None else (end + 1, True))
    return lengths


def default_batch_size(device: "torch.device | str | None") -> int:
    """MAX_BATCH_SIZE's default on a device (a torch.device or its type: cpu, cuda, mps)."""
    kind = getattr(device, "type", device)
    return GPU_BATCH_SIZE if kind == "cuda" else CPU_BATCH_SIZE


def to_device(inputs: Any, device: "torch.device", dtype: "torch.dtype") -> Any:
    """A collated batch on the model's device, its pixel values in the model's dtype.

    The pixels are cast on the host first (half the bytes to copy in float16/bfloat16); on CUDA every tensor goes
    through pinned memory, so the copies are asynchronous DMA instead of staged through a pageable buffer.
    """
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    if device.type != "cuda":
        return inputs.to(device)
    for key, value in list(inputs.items()):
        if hasattr(value, "pin_memory"):
            inputs[key] = value.pin_memory().to(device, non_blocking=True)
    return inputs


def resolve_device(requested: str) -> "torch.device":
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is not there is a ConfigError."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {requested}: Apple MPS is not available here; use --device cpu or auto")
    return device


def choose_dtype(requested: str, device: "torch.device", float16_safe: bool, family_name: str,
                 cpu_flags: frozenset[str] | None = None) -> "tuple[torch.dtype, str]":
    """The dtype to load in, and why. `auto`: on a GPU bfloat16 where it has it (else float16, or float32 for a
    family that overflows in float16); on a CPU bfloat16 where the CPU multiplies bfloat16 in hardware (AMX-BF16
    or AVX512-BF16: 2-5x the float32 rate), else float32 (bfloat16 is emulated there and 2x slower); float16 on
    MPS. Every family here is safe in bfloat16 (Gemma 3 is trained in it). An explicit dtype is used as given."""
    import torch

    if requested != "auto":
        if requested == "float16" and not float16_safe:
            raise ConfigError(f"{family_name} overflows in float16 and produces garbage; "
                              f"use --dtype bfloat16 or --dtype float32")
        return getattr(torch, requested), f"--dtype {requested}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU has bfloat16"
        if float16_safe:
            return torch.float16, "auto: this GPU has no bfloat16; float16"
        return torch.float32, f"auto: this GPU has no bfloat16 and {family_name} overflows in float16"
    if device.type == "mps":
        return (torch.float16, "auto: float16 on MPS") if float16_safe else \
            (torch.float32, f"auto: {family_name} overflows in float16")
    fast = fast_bfloat16(cpu_flags if cpu_flags is not None else cpu_flag_set())
    if fast:
        return torch.bfloat16, f"auto: this CPU has {fast} (bfloat16 matrix products in hardware)"
    return torch.float32, ("auto: this CPU has neither AMX-BF16 nor AVX512-BF16, so bfloat16 would be emulated "
                           "(slower than float32)")


def cpu_flag_set() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere, which means float32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def fast_bfloat16(flags: frozenset[str]) -> str | None:
    """The instructions that make bfloat16 fast on this CPU ("AMX-BF16", "AVX512-BF16"), or None."""
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


class WeightSource:
    """Where a checkpoint comes from: a local folder, the Hugging Face cache, or the Hub when reachable.

    The cache is tried first, with no network; the Hub only when it answers, because huggingface_hub
    retries an unreachable Hub for minutes before giving up, and start-up must fail in seconds.
    """

    def __init__(self, model_id: str, revision: str | None, family: Family) -> None:
        self.model_id = model_id
        self.revision = revision
        self.family = family
        self.is_local = os.path.isdir(os.path.expanduser(model_id))
        self._online: bool | None = None
        if not self.is_local and model_id.startswith(("/", ".", "~")):
            raise ConfigError(f"--model-path {model_id}: no such folder")

    def load(self, loader: Callable[..., Any], **kwargs: Any) -> Any:
        """Call a `from_pretrained` loader on this checkpoint, turning failures into one clear error."""
        if self.is_local:
            return self._call(loader, os.path.expanduser(self.model_id), **kwargs)
        if not self._online:
            try:
                return loader(self.model_id, revision=self.revision, local_files_only=True, **kwargs)
            except OSError:
                pass  # not (completely) in the cache: try the Hub if it can be reached
            if self._online is None:
                self._online = hub_reachable()
            if not self._online:
                raise ModelLoadError(self._unavailable_message())
        return self._call(loader, self.model_id, revision=self.revision, **kwargs)

    def _call(self, loader: Callable[..., Any], target: str, **kwargs: Any) -> Any:
        try:
            return loader(target, **kwargs)
        except (ConfigError, ModelLoadError):
            raise
        except Exception as exc:  # any loader failure becomes a one-line message, not a traceback
            raise ModelLoadError(f"Cannot load {self.family.name} checkpoint {self.model_id}: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc

    def _unavailable_message(self) -> str:
        from huggingface_hub import constants

        revision = f" at revision {self.revision}" if self.revision else ""
        return (
            f"Cannot load the {self.family.name} checkpoint {self.model_id}{revision}: it is not in the "
            f"Hugging Face cache (HF_HOME={constants.HF_HOME}) and the Hub ({constants.ENDPOINT}) cannot be "
            f"reached{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}.\n"
            f"Provide the weights in one of these ways:\n"
            f"  - start once on a machine with network access (they are then cached under HF_HOME), or point "
            f"HF_HOME at a cache that holds them;\n"
            f"  - download the checkpoint into a folder (e.g. `hf download {self.model_id} --local-dir DIR` "
            f"elsewhere, then copy DIR here) and start with --model-path DIR.\n"
            f"To see the service answer without any download, run `make demo`: it builds a tiny checkpoint "
            f"with random weights offline and serves it (its captions are noise)."
        )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (False in offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
