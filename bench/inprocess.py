"""The baselines without the service: transformers called directly in this process, the speed-up variants,
and the vision encoder's achieved FLOP rate beside a large matmul."""
from __future__ import annotations

import gc
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from PIL import Image

import allocator

T = TypeVar("T")
# Every timed model call runs on this one thread, as the service's model runs on its batcher thread. On a busy
# 2-core machine PyTorch's two OpenMP threads ran small ops 3-6x slower when the calls came from the main thread
# than from another thread, which would make a main-thread baseline look slower than the service for no reason.
# Like the service's model thread, it keeps the memory it frees when this process runs on jemalloc (run.py
# preloads it as the server does), so that the bare calls and the service pay the same for their memory.
_MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model",
                                   initializer=allocator.keep_freed_memory)


def only_the_model_thread_has_a_team() -> None:
    """Run PyTorch single-threaded on the calling thread (the benchmark's main thread) from now on.

    GNU OpenMP gives each thread that runs a parallel op its own team for the thread's life, and with more OpenMP
    threads than cores it stops spinning between parallel regions. The main thread builds and loads checkpoints
    and counts FLOPs; with its team beside the model thread's, every bare call on the model thread ran 20-30%
    slower on a 2-core AMX Xeon (bfloat16, 8 images: 2.5-2.8 s against 1.9-2.0 s; bench/README.md), and the
    service, whose other threads run single-threaded (Captioner.prepare), looked faster than the bare call.
    Call it first thing, before the thread's first parallel op.
    """
    from threadpoolctl import ThreadpoolController

    torch.get_num_threads()  # PyTorch sets a thread's OpenMP count on its first op there: now, not after the limit
    ThreadpoolController().limit(limits=1, user_api="openmp")  # not undone: for the thread's life


def on_model_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on the benchmark's model thread and wait for it."""
    return _MODEL_THREAD.submit(fn, *args, **kwargs).result()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DirectCaptioner:
    """processor → generate → batch_decode, as a plain captioning script does it (no service code)."""

    def __init__(self, folder: str | Path, device: str, dtype: torch.dtype, new_tokens: int, **load_kwargs: Any
                 ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        started = time.perf_counter()
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, **load_kwargs)
        self.model = self.model.to(self.device).eval()
        self.load_s = time.perf_counter() - started
        self.new_tokens = new_tokens
        # min == max: every caption is exactly `new_tokens` long, on both sides of every comparison
        self.generate_kwargs: dict[str, Any] = dict(min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                                                    do_sample=False, num_beams=1)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's pixel_values for `images`, on the model's device and dtype."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def caption(self, images: Sequence[Image.Image], **extra: Any) -> list[str]:
        """One processor call, ONE generate for all `images`, one batch_decode (on the model thread)."""
        return on_model_thread(self._caption, images, **extra)

    def _caption(self, images: Sequence[Image.Image], **extra: Any) -> list[str]:
        pixel_values = self.pixel_values(images)
        with torch.inference_mode():
            output = self.model.generate(pixel_values=pixel_values, **self.generate_kwargs, **extra)
        if output.shape[1] != 1 + self.new_tokens:  # [DEC] + exactly new_tokens: the same work as the server
            raise AssertionError(f"generate returned {output.shape[1] - 1} new tokens, not {self.new_tokens}")
        return [t.strip() for t in self.processor.batch_decode(output[:, 1:], skip_special_tokens=True)]

    def batched(self, images: Sequence[Image.Image], **extra: Any) -> tuple[float, list[str]]:
        """Seconds for one batched call over all images, and the captions."""
        sync(self.device)
        started = time.perf_counter()
        captions = self.caption(images, **extra)
        sync(self.device)
        return time.perf_counter() - started, captions

    def loop(self, images: Sequence[Image.Image]) -> tuple[float, list[str]]:
        """Seconds for the per-image loop: one processor + generate + decode per image, one at a time."""
        sync(self.device)
        started = time.perf_counter()
        captions = [self.caption([image])[0] for image in images]
        sync(self.device)
        return time.perf_counter() - started, captions

    def overlapped(self, paths: Sequence[Path], batch_size: int, readers: int = 2) -> tuple[float, list[str]]:
        """Seconds for a bare batched generate loop over image files: `readers` threads read, decode and run the
        processor for the next batches while the model thread runs one (what a careful captioning script does).
        The readers run PyTorch single-threaded, as the service's preprocessing does: an OpenMP team on each reader
        made the model thread's generate about 12% slower on a 2-core Intel Xeon (captioners.base, prepare)."""
        from threadpoolctl import ThreadpoolController

        threadpools = ThreadpoolController()

        def prepare(chunk: Sequence[Path]) -> torch.Tensor:
            torch.get_num_threads()  # PyTorch's per-thread OpenMP set-up first, so that the limit holds
            with threadpools.limit(limits=1, user_api="openmp"):
                images = [Image.open(path).convert("RGB") for path in chunk]
                return self.pixel_values(images)

        def generate(pixel_values: torch.Tensor) -> list[str]:
            with torch.inference_mode():
                output = self.model.generate(pixel_values=pixel_values, **self.generate_kwargs)
            return [t.strip() for t in self.processor.batch_decode(output[:, 1:], skip_special_tokens=True)]

        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        sync(self.device)
        started = time.perf_counter()
        captions: list[str] = []
        with ThreadPoolExecutor(readers, thread_name_prefix="bench-reader") as pool:
            prepared = [pool.submit(prepare, chunk) for chunk in chunks]  # the pool runs `readers` ahead
            for future in prepared:
                captions += on_model_thread(generate, future.result())
        sync(self.device)
        return time.perf_counter() - started, captions

    def vision_forward(self, pixel_values: torch.Tensor) -> float:
        """Seconds for one forward pass of the vision encoder."""
        def forward() -> float:
            sync(self.device)
            started = time.perf_counter()
            with torch.inference_mode():
                self.model.vision_model(pixel_values=pixel_values)
            sync(self.device)
            return time.perf_counter() - started

        return on_model_thread(forward)

    def close(self) -> None:
        """Free the weights now (several variants are loaded one after another)."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def vision_flops(config: Any, batch: int) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one ViT forward: patch embedding + every layer's attention and MLP.

    Per layer with N tokens of width D and MLP width M: QKV 6ND², scores QKᵀ 2N²D, attention × V 2N²D,
    output projection 2ND², MLP 4NDM. LayerNorm, softmax, GELU and biases are left out (under 1%).
    """
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    n, d, m = patches + 1, v.hidden_size, v.intermediate_size
    patch_embed = 2 * patches * (3 * v.patch_size ** 2) * d
    layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
    per_image = patch_embed + v.num_hidden_layers * layer
    return {"tokens": n, "per_image_gflop": per_image / 1e9, "batch_gflop": batch * per_image / 1e9}


def caption_flops(config: Any, new_tokens: int, prompt_tokens: int = 1) -> dict[str, float]:
    """Multiply-add FLOPs of one whole caption of `new_tokens` greedy tokens: the vision encoder (vision_flops) and
    the text decoder with its KV cache, counted from the config.

    The decoder runs one step per new token (the first step also reads the `prompt_tokens` input). Per step and
    layer, for a context of L tokens and N image tokens of width E: self-attention projections 8D², scores and
    values 4LD, cross-attention query and output 4D², scores and values 4ND, MLP 4DM; the LM head 2DV per step;
    and once per caption the cross-attention keys and values of the image tokens, 4NED per layer.
    """
    t = config.text_config
    vision = vision_flops(config, 1)
    n, e = vision["tokens"], config.vision_config.hidden_size
    d, m, layers, vocab = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    steps = [prompt_tokens] + [1] * (new_tokens - 1)  # tokens fed per step
    decoder = 0.0
    context = 0
    for fed in steps:
        context += fed
        per_token = layers * (8 * d * d + 4 * context * d + 4 * d * d + 4 * n * d + 4 * d * m) + 2 * d * vocab
        decoder += fed * per_token
    cross_kv = layers * 4 * n * e * d
    text = (decoder + cross_kv) / 1e9
    return {"vision_gflop": vision["per_image_gflop"], "text_gflop": text,
            "per_image_gflop": vision["per_image_gflop"] + text}


def matmul_gflops(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, float]:
    """Achieved GFLOP/s of a square matmul (median of `repeats` after one warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def one() -> float:
        sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            torch.mm(a, b)
        sync(device)
        return time.perf_counter() - started

    times = [on_model_thread(one) for _ in range(repeats + 1)][1:]  # the first is a warm-up
    seconds = statistics.median(times)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": round(seconds, 4),
            "gflop_per_s": round(2 * size ** 3 / seconds / 1e9, 1)}
