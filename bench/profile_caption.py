"""Where a caption's time goes, by PyTorch operator, in float32 and bfloat16 side by side.

    python bench/profile_caption.py [--images 8] [--dtypes float32,bfloat16] [--top 12] [--tiny]

torch.profiler over one batched caption (processor + generate + decode, as comparison 1's bare call) on the
benchmark's full random BLIP-base checkpoint, on a model thread that keeps its memory (jemalloc preloaded, as
run.py and the servers do). For each operator: its self time (wall seconds on the model thread, its children
excluded) in each dtype and the ratio, so that a dtype's overall speed-up can be read as the mix of its parts
(matrix products gain what the matmul limit gains; softmax, copies, norms and GELU only what memory traffic
gains). The vision encoder is profiled apart.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(REPO_ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import allocator  # noqa: E402


def self_seconds(fn: Any) -> dict[str, float]:
    """Self seconds per operator of one call of `fn` on the model thread (after one untimed call)."""
    from torch.profiler import ProfilerActivity, profile

    from inprocess import on_model_thread

    on_model_thread(fn)

    def profiled() -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}

    return on_model_thread(profiled)


def table(title: str, by_dtype: dict[str, dict[str, float]], top: int) -> str:
    """Markdown: the `top` operators by self time in the first dtype, each dtype's seconds, and their ratio."""
    dtypes = list(by_dtype)
    first = by_dtype[dtypes[0]]
    names = sorted(first, key=first.get, reverse=True)[:top]
    header = ["operator", *(f"{d} s" for d in dtypes), *(f"{dtypes[0]} / {d}" for d in dtypes[1:])]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name: str, values: list[float]) -> str:
        ratios = [f"{values[0] / v:.2f}x" if v else "–" for v in values[1:]]
        return "| " + " | ".join([name, *(f"{v:.3f}" for v in values), *ratios]) + " |"

    for name in names:
        lines.append(row(name, [by_dtype[d].get(name, 0.0) for d in dtypes]))
    lines.append(row("**all operators**", [sum(by_dtype[d].values()) for d in dtypes]))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoint (seconds; a smoke run)")
    args = parser.parse_args()
    allocator.preload(os.environ.get("ALLOCATOR", "auto"))

    import torch

    import checkpoint
    import workload
    from inprocess import DirectCaptioner, on_model_thread, only_the_model_thread_has_a_team

    only_the_model_thread_has_a_team()

    folder = (checkpoint.tiny_checkpoint() if args.tiny else checkpoint.full_checkpoint())[0]
    images = workload.decoded(workload.photos(args.images))  # the benchmark's ~100 KB JPEGs, decoded
    vision: dict[str, dict[str, float]] = {}
    whole: dict[str, dict[str, float]] = {}
    for name in args.dtypes.split(","):
        direct = DirectCaptioner(folder, "cpu", getattr(torch, name), 20)
        pixel_values = direct.pixel_values(images)

        def encode(direct: DirectCaptioner = direct, pixel_values: torch.Tensor = pixel_values) -> None:
            with torch.inference_mode():
                direct.model.vision_model(pixel_values=pixel_values)

        vision[name] = self_seconds(encode)
        whole[name] = self_seconds(lambda direct=direct: direct._caption(images))
        direct.close()
    print(f"# Self time by operator (s): {args.images} images, 20 new tokens, torch threads "
          f"{on_model_thread(torch.get_num_threads)} (the model thread's); {allocator.describe()}\n")
    print(table("vision encoder (model.vision_model)", vision, args.top))
    print(table("whole caption (processor + generate + decode)", whole, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
