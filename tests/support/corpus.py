"""An awkward, real-world-shaped corpus of uploads, built deterministically in memory.

Shared by the unit tests of `images.py` and by end-to-end tests against the HTTP server, so it holds no
test-framework code and does not import the service.  Every file is built from fixed inputs (no clock,
no unseeded randomness): the same bytes on every run.

    good_files()           -> {name: GoodFile}   decode to RGB with .size and the colours in .pixels
    bad_files()            -> {name: BadFile}    must be refused with error code .code
    optional_good_files()  -> {name: GoodFile}   HEIF/AVIF, only where this environment can encode them
    uploads()              -> {name: (filename, bytes)} for all of the above
    padded_jpeg(n)         -> a valid JPEG of exactly n bytes (for FileTooLargeError)
    png_declaring(w, h)    -> a tiny, well-formed PNG whose IHDR claims w x h pixels

Pixel coordinates are (x, y) in the *displayed* image, i.e. after EXIF orientation is applied.
"""
from __future__ import annotations

import functools
import hashlib
import io
import struct
import zlib
from dataclasses import dataclass

from PIL import Image

__all__ = ["BadFile", "GoodFile", "bad_files", "good_files", "optional_good_files", "padded_jpeg",
           "png_declaring", "uploads"]

Colour = tuple[int, int, int]
Point = tuple[int, int]

RED: Colour = (255, 0, 0)
GREEN: Colour = (0, 255, 0)
BLUE: Colour = (0, 0, 255)
YELLOW: Colour = (255, 255, 0)
CYAN: Colour = (0, 255, 255)
WHITE: Colour = (255, 255, 255)
BLACK: Colour = (0, 0, 0)


@dataclass(frozen=True)
class GoodFile:
    """An upload that must decode.  `pixels` are expected RGB values, each channel within `tolerance`."""

    filename: str
    data: bytes
    size: tuple[int, int]
    pixels: tuple[tuple[Point, Colour], ...]
    tolerance: int
    format: str  # the Pillow format name the bytes are (for information; the server ignores filenames)
    note: str


@dataclass(frozen=True)
class BadFile:
    """An upload that must be refused with the error whose `code` is `code` (see errors.py)."""

    filename: str
    data: bytes
    code: str
    note: str


# --------------------------------------------------------------------------- helpers


def _det_bytes(label: str, n: int) -> bytes:
    """n pseudo-random bytes, fixed forever by `label`."""
    return hashlib.shake_256(label.encode()).digest(n)


def _save(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _stripes(mode: str, size: tuple[int, int], values: list) -> Image.Image:
    """Vertical stripes of equal width, one per value, left to right."""
    im = Image.new(mode, size, values[0])
    width = size[0] // len(values)
    for i, value in enumerate(values):
        right = (i + 1) * width if i < len(values) - 1 else size[0]
        # Paste a solid image, not the bare value: Pillow's paste(int) into I;16 writes the low byte
        # into both bytes (1000 becomes 59624).
        im.paste(Image.new(mode, (right - i * width, size[1]), value), (i * width, 0))
    return im


def _stripe_centres(size: tuple[int, int], count: int) -> list[Point]:
    width = size[0] // count
    return [(i * width + width // 2, size[1] // 2) for i in range(count)]


def _quadrants(size: tuple[int, int], tl, tr, bl, br, mode: str = "RGB") -> Image.Image:
    w, h = size
    im = Image.new(mode, size, tl)
    im.paste(tr, (w // 2, 0, w, h // 2))
    im.paste(bl, (0, h // 2, w // 2, h))
    im.paste(br, (w // 2, h // 2, w, h))
    return im


def _quadrant_centres(size: tuple[int, int]) -> list[Point]:
    w, h = size
    return [(w // 4, h // 4), (3 * w // 4, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)]


def _noise_jpeg(size: tuple[int, int], label: str) -> bytes:
    """A JPEG full of detail, so most of the file is entropy-coded data (good for truncating)."""
    im = Image.frombytes("RGB", size, _det_bytes(label, size[0] * size[1] * 3))
    return _save(im, "JPEG", quality=90)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose IHDR declares width x height 8-bit grey pixels, with an IDAT
    holding only the first scanline — a few hundred bytes that would need width*height bytes to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    idat = zlib.compress(b"\x00" * (1 + min(width, 65536)), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def large_pngs(width: int, height: int, count: int) -> list[bytes]:
    """`count` different, valid RGB PNGs of width x height pixels, small on the wire (colour ramps; every row
    the same), made in about a second: the pixels are compressed once, and each file differs from the others
    by a text chunk (so each has its own SHA-256, and is decoded on its own)."""
    row = b"\x00" + bytes(value for x in range(width) for value in (x % 256, x // 256 % 256, 128))
    compressor = zlib.compressobj(6)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return [b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"tEXt", b"Comment\x00%d" % i)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"") for i in range(count)]


def padded_jpeg(total_bytes: int) -> bytes:
    """A valid (small, red) JPEG padded with a comment segment and trailing bytes to exactly total_bytes,
    so only its size can make it fail."""
    body = _save(Image.new("RGB", (16, 16), RED), "JPEG", quality=90)
    if total_bytes < len(body):
        raise ValueError(f"a valid JPEG needs at least {len(body)} bytes")
    # Data after the EOI marker is ignored by decoders.
    return body + b"\x00" * (total_bytes - len(body))


def _psd(size: tuple[int, int], colour: Colour) -> bytes:
    """A minimal, valid, uncompressed 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    w, h = size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layer/mask info
    planes = b"".join(bytes([c]) * (w * h) for c in colour)
    return header + sections + struct.pack(">H", 0) + planes


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _good(filename: str, data: bytes, size: tuple[int, int], points: list[Point], colours: list[Colour],
          tolerance: int, fmt: str, note: str) -> GoodFile:
    assert len(points) == len(colours)
    return GoodFile(filename, data, size, tuple(zip(points, colours)), tolerance, fmt, note)


# --------------------------------------------------------------------------- good files


@functools.lru_cache(maxsize=None)
def _good_files() -> tuple[tuple[str, GoodFile], ...]:
    files: dict[str, GoodFile] = {}

    size = (64, 32)
    cmyk = _stripes("CMYK", size, [(0, 255, 255, 0), (255, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255)])
    files["cmyk_jpeg"] = _good(
        "print-ready.jpg", _save(cmyk, "JPEG", quality=95, subsampling=0), size,
        _stripe_centres(size, 4), [RED, CYAN, WHITE, BLACK], 24, "JPEG",
        "CMYK JPEG (Adobe APP14, inverted ink values) - naive CMYK->RGB is good enough for captioning")

    stored = (60, 40)  # stored landscape, displayed portrait after a 90-degree clockwise turn
    rotated = _quadrants(stored, RED, GREEN, BLUE, YELLOW)
    files["exif_rotated_jpeg"] = _good(
        "phone-portrait.jpg", _save(rotated, "JPEG", quality=95, exif=_exif_orientation(6)), (40, 60),
        _quadrant_centres((40, 60)), [BLUE, RED, YELLOW, GREEN], 24, "JPEG",
        "EXIF orientation 6: stored 60x40, must come back 40x60 turned clockwise")

    size = (64, 16)
    grey16 = _stripes("I;16", size, [0, 32768, 65535, 1000])
    files["grey16_png"] = _good(
        "scan-16bit.png", _save(grey16, "PNG"), size, _stripe_centres(size, 4),
        [BLACK, (128, 128, 128), WHITE, (3, 3, 3)], 1, "PNG",
        "16-bit greyscale PNG: 65535 -> 255 and 32768 -> 128, not clipped to white")

    size = (48, 16)
    palette = _stripes("P", size, [0, 1, 2])
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    files["palette_transparent_png"] = _good(
        "logo.png", _save(palette, "PNG", transparency=bytes([0, 255, 128])), size,
        _stripe_centres(size, 3), [WHITE, GREEN, (127, 127, 255)], 2, "PNG",
        "palette PNG with tRNS: index 0 transparent (white), 1 opaque green, 2 half-transparent blue")

    size = (48, 16)
    la = _stripes("LA", size, [(0, 0), (0, 255), (0, 128)])
    files["la_png"] = _good(
        "grey-alpha.png", _save(la, "PNG"), size, _stripe_centres(size, 3),
        [WHITE, BLACK, (127, 127, 127)], 2, "PNG",
        "grey + alpha PNG: black at alpha 0 / 255 / 128 over white")

    size = (48, 16)
    rgba = _stripes("RGBA", size, [(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    files["rgba_png"] = _good(
        "sticker.png", _save(rgba, "PNG"), size, _stripe_centres(size, 3),
        [WHITE, RED, (127, 127, 127)], 2, "PNG", "RGBA PNG: transparent red is white, not red or black")

    size = (32, 32)
    frames = [Image.new("RGB", size, RED), Image.new("RGB", size, BLUE)]
    files["animated_gif"] = _good(
        "reaction.gif",
        _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), size,
        [(16, 16), (0, 0), (31, 31)], [RED] * 3, 0, "GIF", "2-frame GIF: first frame red, second blue")
    files["animated_png"] = _good(
        "animated.png",
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0), size,
        [(16, 16)], [RED], 0, "PNG", "2-frame APNG: first frame red, second blue")
    files["animated_webp"] = _good(
        "animated.webp",
        _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0,
              lossless=True), size,
        [(16, 16)], [RED], 2, "WEBP", "2-frame animated WebP: first frame red, second blue")

    size = (40, 30)
    colours = [(200, 30, 60), (20, 120, 220), (250, 250, 10), (10, 10, 10)]
    files["webp"] = _good(
        "photo.webp", _save(_quadrants(size, *colours), "WEBP", lossless=True), size,
        _quadrant_centres(size), colours, 2, "WEBP", "lossless WebP")
    files["tiff"] = _good(
        "scan.tif", _save(_quadrants(size, *colours), "TIFF", compression="tiff_lzw"), size,
        _quadrant_centres(size), colours, 0, "TIFF", "LZW-compressed RGB TIFF")

    size = (33, 17)  # odd width: BMP rows are padded to 4 bytes
    files["bmp"] = _good(
        "paint.bmp", _save(_quadrants(size, *colours), "BMP"), size, _quadrant_centres(size), colours, 0,
        "BMP", "24-bit BMP with row padding")

    files["tiny_png"] = _good(
        "pixel.png", _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1), [(0, 0)],
        [(10, 20, 30)], 0, "PNG", "1x1 PNG")

    size = (6000, 4000)
    big_colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 230)]
    files["large_jpeg"] = _good(
        "camera.jpg", _save(_quadrants(size, *big_colours), "JPEG", quality=85), size,
        _quadrant_centres(size), big_colours, 12, "JPEG", "24-megapixel JPEG (6000x4000)")

    size = (32, 16)
    files["grey_jpeg"] = _good(
        "grey.jpg", _save(_stripes("L", size, [40, 200]), "JPEG", quality=95), size,
        _stripe_centres(size, 2), [(40, 40, 40), (200, 200, 200)], 6, "JPEG", "greyscale (L) JPEG")

    size = (16, 16)
    mpo = _save(Image.new("RGB", size, GREEN), "MPO", save_all=True,
                append_images=[Image.new("RGB", size, BLUE)])
    files["mpo_jpeg"] = _good(
        "stereo.jpg", mpo, size, [(8, 8)], [GREEN], 12, "MPO",
        "multi-picture JPEG (what many cameras write): Pillow calls it MPO; first picture green")

    size = (32, 16)
    files["grey16_big_endian_tiff"] = _good(
        "scan-16bit.tif", _save(_stripes("I;16B", size, [32768, 65535]), "TIFF"), size,
        _stripe_centres(size, 2), [(128, 128, 128), WHITE], 1, "TIFF", "16-bit big-endian grey TIFF")
    files["int32_tiff"] = _good(
        "depth-int32.tif", _save(_stripes("I", size, [0, 65535]), "TIFF"), size,
        _stripe_centres(size, 2), [BLACK, WHITE], 1, "TIFF", "32-bit integer grey TIFF holding 16-bit range")
    files["float_tiff"] = _good(
        "float.tif", _save(_stripes("F", size, [0.0, 0.5]), "TIFF"), size,
        _stripe_centres(size, 2), [BLACK, (128, 128, 128)], 1, "TIFF", "32-bit float grey TIFF in 0..1")
    files["lab_tiff"] = _good(
        "lab.tif", _save(_stripes("LAB", size, [(255, 128, 128), (0, 128, 128)]), "TIFF"), size,
        _stripe_centres(size, 2), [WHITE, BLACK], 4, "TIFF",
        "CIE L*a*b* TIFF: white must stay white (Pillow's plain convert turns it cyan)")
    files["cmyk_tiff"] = _good(
        "cmyk.tif", _save(_stripes("CMYK", size, [(0, 255, 255, 0), (0, 0, 0, 0)]), "TIFF"), size,
        _stripe_centres(size, 2), [RED, WHITE], 0, "TIFF", "CMYK TIFF")
    files["bilevel_png"] = _good(
        "fax.png", _save(_stripes("1", size, [0, 255]), "PNG"), size, _stripe_centres(size, 2),
        [BLACK, WHITE], 0, "PNG", "1-bit PNG")
    return tuple(files.items())


def good_files() -> dict[str, GoodFile]:
    """Uploads that must decode: name -> GoodFile (built once, then cached)."""
    return dict(_good_files())


@functools.lru_cache(maxsize=None)
def _optional_good_files() -> tuple[tuple[str, GoodFile], ...]:
    files: dict[str, GoodFile] = {}
    stored = (60, 40)
    rotated = _quadrants(stored, RED, GREEN, BLUE, YELLOW)
    expected = [BLUE, RED, YELLOW, GREEN]
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        heif = _save(rotated, "HEIF", quality=95, exif=_exif_orientation(6))
        files["heif"] = _good("iphone.heic", heif, (40, 60), _quadrant_centres((40, 60)), expected, 40, "HEIF",
                              "HEIC with EXIF orientation 6 (libheif applies it; must not rotate twice)")
    except Exception:
        pass
    try:
        avif = _save(rotated, "AVIF", quality=95, exif=_exif_orientation(6))
        files["avif"] = _good("photo.avif", avif, (40, 60), _quadrant_centres((40, 60)), expected, 40, "AVIF",
                              "AVIF with EXIF orientation 6 (Pillow reports it; we must apply it)")
    except Exception:
        pass
    return tuple(files.items())


def optional_good_files() -> dict[str, GoodFile]:
    """HEIF/AVIF uploads, present only where this environment can encode them."""
    return dict(_optional_good_files())


# --------------------------------------------------------------------------- bad files


@functools.lru_cache(maxsize=None)
def _bad_files() -> tuple[tuple[str, BadFile], ...]:
    noise = _noise_jpeg((256, 256), "truncated-jpeg")
    png = _save(Image.frombytes("RGB", (128, 128), _det_bytes("truncated-png", 128 * 128 * 3)), "PNG")
    small = Image.new("RGB", (16, 16), RED)
    files = {
        "empty": BadFile("empty.jpg", b"", "empty_file", "zero bytes"),
        "text_as_jpg": BadFile(
            "holiday.jpg", b"These are my holiday notes, saved with the wrong extension.\n" * 4,
            "not_an_image", "a text file named .jpg"),
        "html": BadFile(
            "image.jpg",
            b"<!DOCTYPE html>\n<html><head><title>Image</title></head>\n"
            b"<body><img src=\"https://example.com/cat.jpg\"></body></html>\n",
            "not_an_image", "an HTML page saved instead of the picture"),
        "svg": BadFile(
            "drawing.svg",
            b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
            b'<circle cx="50" cy="50" r="40" fill="red"/></svg>\n',
            "not_an_image", "SVG vector drawing"),
        "pdf": BadFile("scan.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
                       "not_an_image", "a PDF document"),
        "random_bytes": BadFile("upload.bin", _det_bytes("random-bytes", 4096), "not_an_image",
                                "4 KiB of random bytes"),
        "truncated_jpeg": BadFile("cut-off.jpg", noise[: len(noise) // 2], "corrupt_image",
                                  "a detailed JPEG cut off half way through its scan data"),
        "truncated_png": BadFile("cut-off.png", png[: len(png) // 2], "corrupt_image",
                                 "a PNG cut off half way through its IDAT data"),
        "header_only_jpeg": BadFile("stub.jpg", noise[:40], "corrupt_image",
                                    "only the first 40 bytes of a JPEG"),
        "bomb_png": BadFile("huge.png", png_declaring(40000, 40000), "too_many_pixels",
                            "a few hundred bytes declaring 40000x40000 = 1.6 gigapixels"),
        "bomb_100mp_png": BadFile("big.png", png_declaring(10000, 10000), "too_many_pixels",
                                  "declares 100 Mpx: between Pillow's warning and error thresholds"),
        "over_limit_png": BadFile("panorama.png", png_declaring(10000, 5001), "too_many_pixels",
                                  "declares 50,010,000 pixels: just over the default 50 Mpx limit"),
        "ico": BadFile("favicon.ico", _save(small, "ICO"), "unsupported_format", "Windows icon"),
        "pcx": BadFile("old.pcx", _save(small, "PCX"), "unsupported_format", "PCX"),
        "psd": BadFile("layers.psd", _psd((16, 16), RED), "unsupported_format", "Photoshop document"),
        "eps": BadFile("figure.eps", _save(small, "EPS"), "unsupported_format",
                       "Encapsulated PostScript (must never reach Ghostscript)"),
    }
    return tuple(files.items())


def bad_files() -> dict[str, BadFile]:
    """Uploads that must be refused: name -> BadFile with the expected error code."""
    return dict(_bad_files())


def uploads() -> dict[str, tuple[str, bytes]]:
    """Every corpus file as name -> (filename, bytes), for posting to the server."""
    everything = {**good_files(), **optional_good_files(), **bad_files()}
    return {name: (item.filename, item.data) for name, item in everything.items()}
