"""What the benchmark sends: distinct photo-like JPEGs of about 100 KB, and multipart bodies built from them."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

BOUNDARY = "imgcap-bench-boundary-7f3a9c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A deterministic photo-like RGB image: smooth colour regions, edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):  # a few hard-edged shapes, so the JPEG has edges to encode as a photo does
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, size=3)
    base += rng.normal(0, 6, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(0.6))


def jpeg(image: Image.Image, target_bytes: int = 100_000) -> bytes:
    """Encode as JPEG at the quality whose size comes closest to `target_bytes`."""
    best: bytes | None = None
    low, high = 30, 98
    while low <= high:
        quality = (low + high) // 2
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        if best is None or abs(len(data) - target_bytes) < abs(len(best) - target_bytes):
            best = data
        if len(data) < target_bytes:
            low = quality + 1
        else:
            high = quality - 1
    assert best is not None
    return best


def photos(count: int, first_seed: int = 1, target_bytes: int = 100_000) -> list[tuple[str, bytes]]:
    """`count` distinct JPEG files as (filename, bytes); different seeds give different images."""
    return [(f"photo-{seed}.jpg", jpeg(photo(seed), target_bytes)) for seed in range(first_seed, first_seed + count)]


def decoded(files: Sequence[tuple[str, bytes]]) -> list[Image.Image]:
    """The RGB pixels the service decodes from these JPEGs, for the in-process baselines."""
    return [Image.open(io.BytesIO(data)).convert("RGB") for _, data in files]


def multipart(files: Sequence[tuple[str, bytes]], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body with every file under the field `images` (built once, sent many times)."""
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()
