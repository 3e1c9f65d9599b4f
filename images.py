"""Turn uploaded bytes into a normalised 8-bit RGB image — the only code that sees upload bytes.

`decode_image` either returns a fully loaded, detached ``PIL.Image.Image`` in mode ``"RGB"`` or raises a
`errors.BadImageError` subclass with a message that tells the client what to do.  The format is decided
from the bytes alone (never from a filename or content type), the pixel count is checked against the
header before a single pixel is decoded, and no exception of any other type escapes.

Normalisation: first frame of animations, EXIF orientation applied, transparency composited on white,
every pixel mode (palette, 1-bit, grey, CMYK, YCbCr, LAB, 16/32-bit grey, float) scaled to 8-bit RGB.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError, features

from errors import (
    BadImageError,
    CorruptImageError,
    EmptyFileError,
    FileTooLargeError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedFormatError,
)

__all__ = ["ALLOWED_FORMATS", "ImageLimits", "PixelBudget", "check_size", "decode_image", "declared_pixels",
           "sha256_hex"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    """Per-file limits; the service builds one from its config."""

    max_file_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000


# --------------------------------------------------------------------------- formats

# Load every Pillow plugin now, once, rather than lazily inside request threads.
Image.init()

_HEIF_AVAILABLE = False
_AVIF_AVAILABLE = bool(features.check("avif")) and "AVIF" in Image.OPEN  # native since Pillow 11.3
try:  # optional: HEIF (and, in old pillow_heif releases, AVIF) support
    import pillow_heif
except ImportError:  # pragma: no cover - depends on the environment
    pillow_heif = None
else:
    try:
        pillow_heif.register_heif_opener()
        _HEIF_AVAILABLE = "HEIF" in Image.OPEN
        if not _AVIF_AVAILABLE and hasattr(pillow_heif, "register_avif_opener"):  # pillow_heif < 1.0
            pillow_heif.register_avif_opener()
            _AVIF_AVAILABLE = "AVIF" in Image.OPEN
    except Exception:  # pragma: no cover - a broken native library must not stop the service
        log.warning("pillow_heif is installed but could not be registered; HEIF uploads are refused",
                    exc_info=True)

# The order is the order Pillow tries them in.  AVIF goes before HEIF: both accept the "mif1" brand and
# the AVIF plugin cleanly declines files that are not AVIF.
_OPEN_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF") + (
    ("AVIF",) if _AVIF_AVAILABLE else ()) + (("HEIF",) if _HEIF_AVAILABLE else ())

#: Pillow format names we decode.  "MPO" is a JPEG with a multi-picture extension (what many cameras
#: and phones write); Pillow's JPEG opener reports such files as "MPO", so it is allowed with JPEG.
ALLOWED_FORMATS: frozenset[str] = frozenset(_OPEN_FORMATS) | {"MPO"}

# Formats tried only to give a refused file a better message ("PSD is not supported" rather than "not an
# image").  Never EPS (we never let Pillow near PostScript/Ghostscript), and never the plugins without a
# signature check (TGA, SPIDER, IM, ...), which "recognise" random bytes.
_NEVER_OPEN = frozenset({"EPS"})
_OTHER_FORMATS: tuple[str, ...] = tuple(
    fmt for fmt in Image.ID
    if fmt not in ALLOWED_FORMATS and fmt not in _NEVER_OPEN and Image.OPEN[fmt][1] is not None)

_FRIENDLY_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "WEBP": "WebP", "BMP": "BMP",
                   "TIFF": "TIFF", "AVIF": "AVIF", "HEIF": "HEIF/HEIC"}
_SUPPORTED_TEXT = ", ".join(_FRIENDLY_NAMES[f] for f in _OPEN_FORMATS)

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {  # the same table as PIL.ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- Pillow's global settings

# Truncated files are errors, never silently grey-filled.  Re-asserted on every call (see below).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pillow's own decompression-bomb guard warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises
# above twice that, sometimes from inside a plugin while decoding.  We make the warning an error (what
# Pillow's documentation recommends) so it can never leak to the log or be ignored, and catch both below.
_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def _enforce_pillow_settings(limits: ImageLimits) -> None:
    """Cheap per-call re-assertion of the process-wide Pillow settings this module relies on."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True; resetting it to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Our limit must be the one that decides: Pillow's guard only fires above its own limit, so raise it
    # to ours when ours is higher (never lower it; None means someone switched it off deliberately).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    # Something (a test runner, catch_warnings) may have replaced or reordered the filters since import;
    # keep ours first.  Steady state: one list index and a tuple comparison, no mutation.
    if not warnings.filters or warnings.filters[0] != _BOMB_FILTER:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


# --------------------------------------------------------------------------- public API


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of the upload bytes (used as a cache key and in logs instead of the content)."""
    return hashlib.sha256(data).hexdigest()


def check_size(data: bytes, limits: ImageLimits) -> None:
    """Raise FileTooLargeError when the upload is over MAX_FILE_BYTES (cheap: callers check before hashing)."""
    if len(data) > limits.max_file_bytes:
        raise FileTooLargeError(
            f"The file is {_bytes_text(len(data))}, over the limit of {_bytes_text(limits.max_file_bytes)} "
            "per image (MAX_FILE_BYTES). Compress or scale the image down and upload it again.")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode upload bytes into a fully loaded, detached 8-bit RGB image.

    Raises (all `BadImageError` subclasses): `EmptyFileError`, `FileTooLargeError`, `NotAnImageError`,
    `UnsupportedFormatError`, `TooManyPixelsError`, `CorruptImageError`.  Nothing else escapes.
    """
    if not data:
        raise EmptyFileError("The file is empty (0 bytes). Choose the image file again and re-upload it.")
    check_size(data, limits)
    _enforce_pillow_settings(limits)
    try:
        return _decode(data, limits)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(limits, pillow_message=str(exc)) from exc
    except MemoryError as exc:
        raise CorruptImageError(
            "The server ran out of memory decoding this image. Scale it down or save it in a simpler "
            "format (JPEG or PNG) and try again.") from exc
    except Exception as exc:  # a Pillow/plugin bug or a case we did not foresee: still the file's fault
        log.warning("unexpected %s decoding an upload (sha256=%s)", type(exc).__name__, sha256_hex(data),
                    exc_info=exc)
        raise CorruptImageError(
            f"The image could not be decoded ({_exc_text(exc)}). Re-save it as JPEG or PNG and upload it "
            "again.") from exc


def declared_pixels(data: bytes, limits: ImageLimits = ImageLimits()) -> int:
    """The pixel count an upload's header declares (width x height), without decoding; 0 when unreadable."""
    _enforce_pillow_settings(limits)
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as im:
            return im.size[0] * im.size[1]
    except Exception:  # not an image, damaged, or a bomb: decode_image says which
        return 0


class PixelBudget:
    """Bounds the pixels of the images being decoded and preprocessed at once, process-wide.

    A caller holds an image's pixel count from before decoding until its full-size pixels are dropped (after
    preprocessing); when the budget is spent, the next caller waits for room instead of growing memory. A
    single image larger than the whole budget waits until it is alone.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve `pixels` (waiting for room) for the duration of the block."""
        pixels = max(0, min(pixels, self.capacity))
        with self._cond:
            while self.in_use and self.in_use + pixels > self.capacity:
                self._cond.wait()
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


# --------------------------------------------------------------------------- decoding


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    im = _open(data)
    try:
        fmt = _FRIENDLY_NAMES.get(im.format or "", im.format or "image")
        width, height = im.size
        if width <= 0 or height <= 0:
            raise CorruptImageError(
                f"The {fmt} file declares an empty size ({width}x{height}). The file is damaged; re-save "
                "or re-export the image and upload it again.")
        _check_pixels(width, height, limits)
        try:
            im.load()  # first frame only: Pillow opens animations and multi-page files at frame 0
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise
        except Exception as exc:  # OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error...
            _log_if_unexpected(exc, data)
            raise CorruptImageError(
                f"The {fmt} file is damaged or incomplete and could not be decoded ({_exc_text(exc)}). "
                "Upload the original file again, or re-save it and retry.") from exc
        _check_pixels(*im.size, limits)  # paranoia: a plugin may change the size while loading
        orientation = _exif_orientation(im)
        try:
            out = _to_rgb(im)
            if orientation in _TRANSPOSE_FOR_ORIENTATION:
                out = out.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        except (BadImageError, MemoryError):
            raise
        except Exception as exc:
            _log_if_unexpected(exc, data)
            raise CorruptImageError(
                f"The {fmt} image (pixel mode {im.mode}) could not be converted to RGB "
                f"({_exc_text(exc)}). Re-save it as an 8-bit RGB JPEG or PNG and upload it again.") from exc
        if out is im or isinstance(out, ImageFile.ImageFile):
            # Already RGB and untouched: share the decoded pixels with a plain Image (no copy) so the
            # result holds no reference to the file object or the upload buffer.
            out = out._new(out.im)
        return out
    finally:
        try:
            im.close()
        except Exception:  # pragma: no cover
            pass


# What damaged data normally makes Pillow and its decoders raise; anything else is logged as a likely bug.
_EXPECTED_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def _log_if_unexpected(exc: Exception, data: bytes) -> None:
    if not isinstance(exc, _EXPECTED_DECODE_ERRORS):
        log.warning("unexpected %s decoding an upload (sha256=%s)", type(exc).__name__, sha256_hex(data),
                    exc_info=exc)


def _open(data: bytes) -> ImageFile.ImageFile:
    """Identify the bytes as an allowed format (header only), or raise the right error."""
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:
        # A plugin accepted the first bytes but failed on the header.  If the bytes really carry an
        # allowed format's signature the file is damaged; otherwise (e.g. text starting "BM") it is just
        # not an image and falls through to the checks below.
        name = _sniff_allowed(data)
        if name:
            raise CorruptImageError(
                f"The {name} file's header is damaged and it could not be read ({_exc_text(exc)}). "
                "Re-save or re-export the image and upload it again.") from exc
    else:
        if im.format not in ALLOWED_FORMATS:  # defensive: a plugin reported some other format
            im.close()
            raise _unsupported(im.format or "unknown")
        return im

    sniffed = _sniff_allowed(data)
    if sniffed:
        raise CorruptImageError(
            f"The file starts like a {sniffed} image but is too damaged or incomplete to read. Upload the "
            "original file again, or re-save it and retry.")
    other = _identify_other(data)
    if other:
        raise _unsupported(other)
    raise NotAnImageError(
        f"The file is not an image{_what_it_looks_like(data)}. Upload a photo or picture in one of these "
        f"formats: {_SUPPORTED_TEXT}.")


def _identify_other(data: bytes) -> str | None:
    """The name of a recognised-but-refused format, or None.  Header parsing only, never decoding."""
    head = data[:64]
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):  # PostScript / DOS EPS binary header
        return "EPS"
    try:
        with Image.open(io.BytesIO(data), formats=_OTHER_FORMATS) as other:
            return other.format or "unknown"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "an unsupported"  # recognised (it has a size) but we don't know which; refused anyway
    except Exception:
        return None


def _sniff_allowed(data: bytes) -> str | None:
    """Which allowed format the leading bytes claim to be (used to tell 'damaged' from 'not an image')."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (
            12, 16, 40, 52, 56, 64, 108, 124):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if _AVIF_AVAILABLE and brand in (b"avif", b"avis"):
            return "AVIF"
        if _HEIF_AVAILABLE and brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm",
                                         b"hevs", b"mif1", b"msf1"):
            return "HEIF"
        if _AVIF_AVAILABLE and brand in (b"mif1", b"msf1"):
            return "AVIF"
    return None


def _what_it_looks_like(data: bytes) -> str:
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head:
        return " (it looks like an SVG vector drawing; export it to PNG first)"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:512]:
        return " (it looks like an HTML web page, not the picture itself)"
    if head.startswith(b"%pdf-"):
        return " (it looks like a PDF document; export the page as PNG or JPEG)"
    if head.startswith(b"<?xml"):
        return " (it looks like an XML document)"
    try:
        text = data[:2048].decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text and sum(ch.isprintable() or ch.isspace() for ch in text) >= 0.95 * len(text):
        return " (it looks like a text file)"
    return ""


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise _too_many_pixels(limits, width=width, height=height)


def _too_many_pixels(limits: ImageLimits, *, width: int | None = None, height: int | None = None,
                     pillow_message: str | None = None) -> TooManyPixelsError:
    example = ""
    if width is not None and height is not None:
        size = f"{width}x{height} = {width * height:,} pixels"
        scale = math.sqrt(limits.max_pixels / (width * height))
        example = f" (for example to {max(1, int(width * scale))}x{max(1, int(height * scale))})"
    else:  # Pillow's own guard fired while opening: its message carries the pixel count only
        match = re.search(r"\((\d+) pixels\)", pillow_message or "")
        size = f"{int(match.group(1)):,} pixels" if match else "larger than allowed"
    return TooManyPixelsError(
        f"The image is {size}; the limit is {limits.max_pixels:,} pixels. Scale it down{example} and "
        "upload it again.")


def _unsupported(pillow_format: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"{pillow_format} images are not supported. Convert it to one of: {_SUPPORTED_TEXT}, and upload "
        "it again.")


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when absent or unreadable: bad metadata never fails an upload."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


# --------------------------------------------------------------------------- pixel modes

_DIRECT_MODES = frozenset({"1", "L", "P", "CMYK", "YCbCr", "HSV", "RGBX"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, transparency on white.  Returns `im` itself when already RGB."""
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return im
    if (mode in _ALPHA_MODES
            or (transparency is not None and mode in ("1", "L", "P", "RGB"))
            or (mode == "P" and im.palette is not None and im.palette.mode == "RGBA")):
        return _flatten_on_white(im)
    if mode in _DIRECT_MODES:
        return im.convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(im)
    if mode in ("I", "F") or mode.startswith(("I;16", "I;32", "F;")):
        return _high_depth_grey_to_rgb(im, transparency)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise UnsupportedFormatError(
            f"Images with pixel mode {mode} are not supported ({exc}). Re-save it as an 8-bit RGB JPEG or "
            "PNG and upload it again.") from exc


def _flatten_on_white(im: Image.Image) -> Image.Image:
    if im.mode == "La":  # premultiplied; Pillow converts La only to LA
        im = im.convert("LA")
    if im.mode != "RGBA":  # also un-premultiplies RGBa and applies tRNS / palette alpha
        im = im.convert("RGBA")
    out = Image.new("RGB", im.size, _WHITE)
    out.paste(im, (0, 0), im)  # alpha-blends the colour bands over white
    return out


_LAB_TO_SRGB = None


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") on LAB just relabels the bands (white comes out cyan); use LittleCMS.
    global _LAB_TO_SRGB
    if not features.check("littlecms2"):
        raise UnsupportedFormatError(
            "CIE L*a*b* images are not supported on this server. Convert the image to RGB and upload it "
            "again.")
    from PIL import ImageCms

    if _LAB_TO_SRGB is None:
        _LAB_TO_SRGB = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                               "LAB", "RGB")
    return ImageCms.applyTransform(im, _LAB_TO_SRGB)


def _high_depth_grey_to_rgb(im: Image.Image, transparency: object) -> Image.Image:
    """16/32-bit integer and float grey -> 8-bit grey -> RGB, scaled (Pillow's own convert clips)."""
    if im.mode.startswith("I;16"):
        src = np.asarray(im)  # uint16 in the image's byte order
        grey = (src >> 8).astype(np.uint8)  # exact inverse of 8->16-bit expansion (v*257); 65535->255
    else:
        if im.mode not in ("I", "F"):
            im = im.convert("F" if im.mode.startswith("F") else "I")
        src = np.asarray(im)
        grey = _scale_wide(src)
    if isinstance(transparency, int) and not isinstance(transparency, bool):
        grey[src == transparency] = 255  # a tRNS grey key: those pixels are transparent -> white
    return Image.fromarray(grey).convert("RGB")


def _scale_wide(src: np.ndarray) -> np.ndarray:
    """Map 32-bit int / float grey to uint8.

    There is no reliable bit depth for these modes, so: integer data within 0..65535 is treated as
    16-bit (what Pillow produces for 16-bit sources); float data within 0..1 as normalised, within
    0..255 as 8-bit, within 0..65535 as 16-bit; anything else is stretched from its own min..max.
    """
    if src.size == 0:
        return np.zeros(src.shape, np.uint8)
    if np.issubdtype(src.dtype, np.floating):
        src = np.nan_to_num(src.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = src.min(), src.max()
    if np.issubdtype(src.dtype, np.integer):
        if lo >= 0 and hi <= 65535:
            return (src >> 8).astype(np.uint8)
        scale, offset = 255.0 / max(float(hi) - float(lo), 1.0), float(lo)
    elif lo >= 0 and hi <= 1.0:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255.0:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535.0:
        scale, offset = 1.0 / 257.0, 0.0
    else:
        scale, offset = 255.0 / max(float(hi) - float(lo), 1e-12), float(lo)
    out = (src.astype(np.float32) - offset) * scale
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- messages


def _bytes_text(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB ({n:,} bytes)"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB ({n:,} bytes)"
    return f"{n:,} bytes"


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
