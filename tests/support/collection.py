"""Collections for the bulk tests: a folder of small, distinct images in nested sub-folders (some with the wrong
extension) plus bad files, and the same images as WebDataset shards and as a Parquet file.

    images, bad = write_collection(folder, count=200)   # {id: bytes}, {id: expected error code}
    write_webdataset(images, folder / "shards", shards=2)  # shard-00000.tar, ... (key = id without extension)
    write_parquet(images, folder / "images.parquet")        # Hugging Face layout: image.bytes / image.path
"""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from PIL import Image

from support.corpus import bad_files, png_declaring

# (format, extension on disk): every 7th image is saved under an extension that is not its format.
_FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("PNG", ".jpg"), ("JPEG", ".png"),
            ("PNG", ""), ("JPEG", ".jpeg"))


def collection_image(index: int) -> Image.Image:
    """A small image that differs from every other index (blocks of seeded colours)."""
    rng = random.Random(index)
    size = (32 + index % 5 * 8, 24 + index % 3 * 8)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + rng.randrange(4, 16),
                                                                    y + rng.randrange(4, 16)))
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_collection(folder: Path, count: int = 200, start: int = 0) -> tuple[dict[str, bytes], dict[str, str]]:
    """`count` good images under `folder` in nested sub-folders, and 10 bad files; (good {id: bytes}, bad {id:
    code}). Ids are paths relative to `folder`. Hidden files are added too (they are not part of the
    collection). `start` offsets the images, so that two collections share none."""
    images: dict[str, bytes] = {}
    for index in range(start, start + count):
        fmt, extension = _FORMATS[index % len(_FORMATS)]
        relative = f"set{index % 3}/part{index % 4}/img{index:04d}{extension}"
        if index % 10 == 0:
            relative = f"img{index:04d}{extension}"  # some at the top level
        images[relative] = encode(collection_image(index), fmt)
    corpus = bad_files()
    bad = {
        "bad/notes.jpg": (corpus["text_as_jpg"].data, "not_an_image"),
        "bad/readme.txt": (b"plain text, no image here\n", "not_an_image"),
        "bad/page.png": (corpus["html"].data, "not_an_image"),
        "bad/noise.bin": (corpus["random_bytes"].data, "not_an_image"),
        "bad/deep/cut-off.jpg": (corpus["truncated_jpeg"].data, "corrupt_image"),
        "bad/deep/cut-off.png": (corpus["truncated_png"].data, "corrupt_image"),
        "bad/empty.jpg": (b"", "empty_file"),
        "bad/empty.png": (b"", "empty_file"),
        "bad/bomb.png": (png_declaring(40000, 40000), "too_many_pixels"),
        "set1/bomb.jpg": (png_declaring(20000, 20000), "too_many_pixels"),
    }
    for relative, data in {**images, **{k: v[0] for k, v in bad.items()}}.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "set0" / ".hidden").mkdir(parents=True, exist_ok=True)
    (folder / "set0" / ".hidden" / "x.png").write_bytes(encode(collection_image(99999), "PNG"))
    return images, {relative: code for relative, (_, code) in bad.items()}


def webdataset_key(relative: str) -> str:
    """A WebDataset key: the id without its extension and with no dots (the field starts at the first dot)."""
    stem = relative.rsplit("/", 1)
    name = stem[-1].split(".", 1)[0]
    return "/".join([*stem[:-1], name]) if len(stem) > 1 else name


def write_webdataset(images: dict[str, bytes], folder: Path, shards: int = 2) -> list[Path]:
    """The images as WebDataset shards (`<key>.png` or `.jpg` members, plus a `<key>.json`); the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard-{n:05d}.tar" for n in range(shards)]
    items = sorted(images.items())
    for n, path in enumerate(paths):
        with tarfile.open(path, "w") as archive:
            for relative, data in items[n::shards]:
                key = webdataset_key(relative)
                field = "png" if data.startswith(b"\x89PNG") else "jpg"
                for name, payload in ((f"{key}.{field}", data), (f"{key}.json", b'{"source": "test"}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return paths


def write_parquet(images: dict[str, bytes], path: Path, row_group_size: int = 64) -> Path:
    """The images as a Parquet file in the Hugging Face datasets layout: a struct column image{bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": data, "path": relative}, "label": i} for i, (relative, data) in
            enumerate(sorted(images.items()))]
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path
