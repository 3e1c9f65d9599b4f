"""Tests for images.py: decoding and normalising upload bytes, against the shared awkward corpus."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import unittest
import warnings
import zlib
from unittest import mock

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps

import errors
import images
from images import ALLOWED_FORMATS, ImageLimits, decode_image, sha256_hex
from support import corpus
from support.corpus import bad_files, good_files, optional_good_files, padded_jpeg, png_declaring, uploads

pytestmark = pytest.mark.inprocess

ERROR_BY_CODE = {cls.code: cls for cls in (
    errors.EmptyFileError, errors.FileTooLargeError, errors.NotAnImageError, errors.UnsupportedFormatError,
    errors.CorruptImageError, errors.TooManyPixelsError)}


def png_bytes(im: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **options)
    return buf.getvalue()


class PillowGlobalsMixin:
    """Restore the Pillow globals images.py (or a test) may change."""

    def setUp(self):
        super().setUp()
        saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)

        def restore():
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved

        self.addCleanup(restore)


class GoodFileTests(unittest.TestCase):
    def assert_decodes_like(self, name, case):
        im = decode_image(case.data, ImageLimits())
        self.assertIs(type(im), Image.Image, f"{name}: result must be a plain, detached Image")
        self.assertEqual(im.mode, "RGB", name)
        self.assertEqual(im.size, case.size, name)
        for point, expected in case.pixels:
            actual = im.getpixel(point)
            diff = max(abs(a - e) for a, e in zip(actual, expected))
            self.assertLessEqual(diff, case.tolerance,
                                 f"{name} at {point}: got {actual}, expected {expected} ±{case.tolerance}")

    def test_every_good_file_decodes_to_expected_rgb(self):
        for name, case in good_files().items():
            with self.subTest(name):
                self.assert_decodes_like(name, case)

    def test_optional_heif_and_avif(self):
        cases = optional_good_files()
        if not cases:
            self.skipTest("no HEIF/AVIF encoder in this environment")
        for name, case in cases.items():
            with self.subTest(name):
                self.assertIn(case.format, ALLOWED_FORMATS)
                self.assert_decodes_like(name, case)

    def test_good_files_are_detected_as_their_format(self):
        for name, case in good_files().items():
            with self.subTest(name), Image.open(io.BytesIO(case.data)) as im:
                self.assertEqual(im.format, case.format)
                self.assertIn(im.format, ALLOWED_FORMATS)

    def test_exif_rotation_is_applied_like_pillows_exif_transpose(self):
        case = good_files()["exif_rotated_jpeg"]
        with Image.open(io.BytesIO(case.data)) as raw:
            self.assertEqual(raw.size, (60, 40))  # stored landscape
            self.assertEqual(raw.getexif()[0x0112], 6)
            reference = ImageOps.exif_transpose(raw).convert("RGB")
        im = decode_image(case.data, ImageLimits())
        self.assertEqual(im.size, (40, 60))
        self.assertEqual(im.tobytes(), reference.tobytes())

    def test_sixteen_bit_is_scaled_not_clipped(self):
        im = decode_image(good_files()["grey16_png"].data, ImageLimits())
        self.assertEqual(im.getpixel((40, 8)), (255, 255, 255))  # 65535
        self.assertEqual(im.getpixel((24, 8)), (128, 128, 128))  # 32768 (Pillow's convert() gives 255)
        self.assertEqual(im.getpixel((8, 8)), (0, 0, 0))

    def test_gif_first_frame_not_last(self):
        im = decode_image(good_files()["animated_gif"].data, ImageLimits())
        self.assertEqual(np.unique(np.asarray(im).reshape(-1, 3), axis=0).tolist(), [[255, 0, 0]])

    def test_result_is_fully_loaded_and_independent_of_the_input(self):
        data = bytearray(good_files()["tiff"].data)
        im = decode_image(bytes(data), ImageLimits())
        self.assertIsNone(getattr(im, "fp", None))
        self.assertFalse(im.readonly)
        before = im.tobytes()
        data[:] = b"\x00" * len(data)
        im.putpixel((0, 0), (1, 2, 3))  # writable, no file behind it
        self.assertEqual(im.tobytes()[3:], before[3:])

    def test_large_photo_is_decoded_at_full_size(self):
        case = good_files()["large_jpeg"]
        started = time.perf_counter()
        im = decode_image(case.data, ImageLimits())
        elapsed = time.perf_counter() - started
        self.assertEqual(im.size, (6000, 4000))  # no draft()/reduce shortcut
        self.assertLess(elapsed, 5.0)


class BadFileTests(unittest.TestCase):
    def test_every_bad_file_gets_exactly_its_error(self):
        for name, case in bad_files().items():
            with self.subTest(name):
                expected = ERROR_BY_CODE[case.code]
                with self.assertRaises(errors.BadImageError) as caught:
                    decode_image(case.data, ImageLimits())
                self.assertIs(type(caught.exception), expected, f"{name}: {caught.exception}")
                self.assertEqual(caught.exception.code, case.code)
                self.assertGreater(len(caught.exception.message), 20)

    def test_format_comes_from_the_bytes_not_the_name(self):
        # A PNG called .jpg is fine; a text file called .jpg is not an image.
        self.assertEqual(decode_image(good_files()["tiny_png"].data).size, (1, 1))
        with self.assertRaises(errors.NotAnImageError):
            decode_image(bad_files()["text_as_jpg"].data)

    def test_messages_say_what_to_do(self):
        with self.assertRaises(errors.NotAnImageError) as caught:
            decode_image(bad_files()["svg"].data)
        self.assertIn("SVG", caught.exception.message)
        self.assertIn("PNG", caught.exception.message)
        with self.assertRaises(errors.UnsupportedFormatError) as caught:
            decode_image(bad_files()["psd"].data)
        self.assertIn("PSD", caught.exception.message)
        with self.assertRaises(errors.CorruptImageError) as caught:
            decode_image(bad_files()["truncated_jpeg"].data)
        self.assertIn("JPEG", caught.exception.message)

    def test_damaged_header_of_an_allowed_format_is_corrupt_not_unknown(self):
        png = good_files()["tiny_png"].data
        for data in (png[:12], png[:8] + b"\x00" * 40, b"GIF89a" + b"\xff" * 4):
            with self.subTest(data=data[:12]):
                with self.assertRaises(errors.CorruptImageError):
                    decode_image(data)

    def test_text_that_starts_like_a_bmp_is_not_an_image(self):
        with self.assertRaises(errors.NotAnImageError):
            decode_image(b"BMW service history, 2019-2024: oil, tyres, brakes.\n" * 3)

    def test_eps_never_reaches_pillow_or_ghostscript(self):
        with mock.patch.object(EpsImagePlugin.EpsImageFile, "_open", side_effect=AssertionError) as opened, \
                mock.patch.object(EpsImagePlugin, "Ghostscript", side_effect=AssertionError) as gs:
            with self.assertRaises(errors.UnsupportedFormatError):
                decode_image(bad_files()["eps"].data)
            with self.assertRaises(errors.UnsupportedFormatError):  # DOS EPS binary header
                decode_image(b"\xc5\xd0\xd3\xc6" + b"\x00" * 60)
        opened.assert_not_called()
        gs.assert_not_called()


class PixelLimitTests(PillowGlobalsMixin, unittest.TestCase):
    def test_40000_square_png_is_refused_fast_without_allocating(self):
        data = bad_files()["bomb_png"].data
        self.assertLess(len(data), 1024)
        with mock.patch.object(ImageFile.ImageFile, "load", side_effect=AssertionError("decoded!")) as load:
            tracemalloc.start()
            try:
                started = time.perf_counter()
                with self.assertRaises(errors.TooManyPixelsError) as caught:
                    decode_image(data, ImageLimits())
                elapsed = time.perf_counter() - started
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        load.assert_not_called()
        self.assertLess(elapsed, 0.25)
        self.assertLess(peak, 2 * 1024 * 1024)
        self.assertIn("1,600,000,000", caught.exception.message)
        self.assertIn("50,000,000", caught.exception.message)

    def test_our_header_check_runs_before_decoding(self):
        data = png_bytes(Image.new("RGB", (30, 20), "red"))
        with mock.patch.object(ImageFile.ImageFile, "load", side_effect=AssertionError("decoded!")) as load:
            with self.assertRaises(errors.TooManyPixelsError) as caught:
                decode_image(data, ImageLimits(max_pixels=599))
        load.assert_not_called()
        self.assertIn("30x20 = 600 pixels", caught.exception.message)
        self.assertIn("599", caught.exception.message)
        self.assertEqual(decode_image(data, ImageLimits(max_pixels=600)).size, (30, 20))

    def test_just_over_the_default_limit(self):
        with self.assertRaises(errors.TooManyPixelsError) as caught:
            decode_image(png_declaring(10000, 5001))
        self.assertIn("10000x5001", caught.exception.message)

    def test_pillow_bomb_warning_becomes_our_error_and_never_leaks(self):
        data = png_bytes(Image.new("RGB", (40, 40), "red"))  # 1600 pixels
        for pillow_max, our_max in ((1000, 1200), (500, 400), (500, 1200)):
            with self.subTest(pillow_max=pillow_max, our_max=our_max):
                Image.MAX_IMAGE_PIXELS = pillow_max
                with warnings.catch_warnings(record=True) as caught_warnings:
                    warnings.simplefilter("always")
                    with self.assertRaises(errors.TooManyPixelsError):
                        decode_image(data, ImageLimits(max_pixels=our_max))
                self.assertEqual([str(w.message) for w in caught_warnings], [])

    def test_pillow_limit_below_ours_does_not_refuse_or_warn(self):
        Image.MAX_IMAGE_PIXELS = 1000
        data = png_bytes(Image.new("RGB", (40, 40), "red"))
        with warnings.catch_warnings(record=True) as caught_warnings:
            warnings.simplefilter("always")
            self.assertEqual(decode_image(data, ImageLimits(max_pixels=10_000)).size, (40, 40))
        self.assertEqual(caught_warnings, [])

    def test_bomb_error_raised_while_decoding_becomes_too_many_pixels(self):
        data = png_bytes(Image.new("RGB", (4, 4), "red"))
        for exc in (Image.DecompressionBombError("Image size (999999999 pixels) exceeds limit"),
                    Image.DecompressionBombWarning("Image size (99 pixels) exceeds limit")):
            with self.subTest(type(exc).__name__), mock.patch.object(ImageFile.ImageFile, "load",
                                                                     side_effect=exc):
                with self.assertRaises(errors.TooManyPixelsError):
                    decode_image(data)


class FileSizeTests(unittest.TestCase):
    def test_over_size_file(self):
        limits = ImageLimits(max_file_bytes=2000)
        self.assertEqual(decode_image(padded_jpeg(2000), limits).size, (16, 16))
        with self.assertRaises(errors.FileTooLargeError) as caught:
            decode_image(padded_jpeg(2001), limits)
        self.assertIn("2,001 bytes", caught.exception.message)
        self.assertIn("2,000 bytes", caught.exception.message)

    def test_default_limit_is_20_mib(self):
        self.assertEqual(ImageLimits().max_file_bytes, 20 * 1024 * 1024)
        self.assertEqual(ImageLimits().max_pixels, 50_000_000)
        with self.assertRaises(errors.FileTooLargeError) as caught:
            decode_image(padded_jpeg(20 * 1024 * 1024 + 1))
        self.assertIn("20.0 MiB", caught.exception.message)

    def test_empty(self):
        with self.assertRaises(errors.EmptyFileError):
            decode_image(b"")


class RobustnessTests(PillowGlobalsMixin, unittest.TestCase):
    def test_no_warnings_from_the_whole_corpus(self):
        with warnings.catch_warnings(record=True) as caught_warnings:
            warnings.simplefilter("always")
            for name, (_, data) in uploads().items():
                try:
                    decode_image(data)
                except errors.BadImageError:
                    pass
        self.assertEqual([f"{w.category.__name__}: {w.message}" for w in caught_warnings], [])

    def test_load_truncated_images_is_forced_off(self):
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        with self.assertLogs("images", "WARNING"):
            with self.assertRaises(errors.CorruptImageError):
                decode_image(bad_files()["truncated_jpeg"].data)
        self.assertFalse(ImageFile.LOAD_TRUNCATED_IMAGES)

    def test_any_exception_while_decoding_is_corrupt_image(self):
        data = png_bytes(Image.new("RGB", (4, 4), "red"))
        for exc in (OSError("x"), SyntaxError("x"), ValueError("x"), struct.error("x"), EOFError(),
                    zlib.error("x"), IndexError("x"), KeyError("x"), TypeError("x"), MemoryError()):
            with self.subTest(type(exc).__name__), \
                    mock.patch.object(ImageFile.ImageFile, "load", side_effect=exc) as load:
                with self.assertRaises(errors.CorruptImageError):
                    decode_image(data)
                load.assert_called()

    def test_unexpected_bug_still_a_bad_image_error(self):
        data = png_bytes(Image.new("RGB", (4, 4), "red"))
        for target in ("_to_rgb", "_open"):
            with self.subTest(target), mock.patch.object(images, target, side_effect=RuntimeError("bug")):
                with self.assertLogs("images", "WARNING"):
                    with self.assertRaises(errors.CorruptImageError):
                        decode_image(data)

    def test_broken_exif_does_not_fail_the_upload(self):
        buf = io.BytesIO()
        Image.new("RGB", (8, 4), "red").save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.assertEqual(decode_image(buf.getvalue()).size, (8, 4))

    def test_mutated_corpus_never_escapes_as_another_exception(self):
        # Flip bytes all over a few real files: every outcome is an image or a BadImageError.
        cases = [good_files()[n].data for n in ("tiny_png", "bmp", "animated_gif", "tiff", "webp",
                                                "cmyk_jpeg", "grey16_png")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index, original in enumerate(cases):
                for step in range(0, len(original), max(1, len(original) // 40)):
                    data = bytearray(original)
                    data[step] ^= 0xA5
                    data[(step * 7) % len(data)] ^= 0x3C
                    with self.subTest(case=index, step=step):
                        try:
                            im = decode_image(bytes(data))
                        except errors.BadImageError:
                            continue
                        self.assertEqual(im.mode, "RGB")


class ModeConversionTests(unittest.TestCase):
    """Modes the corpus does not reach through a file format, converted directly."""

    def test_every_mode_becomes_rgb_of_the_same_size(self):
        for mode in ("1", "L", "P", "PA", "LA", "La", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV",
                     "LAB", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"):
            with self.subTest(mode):
                out = images._to_rgb(Image.new(mode, (5, 3)))
                self.assertEqual((out.mode, out.size), ("RGB", (5, 3)))

    def test_premultiplied_and_palette_alpha_on_white(self):
        self.assertEqual(images._to_rgb(Image.new("RGBa", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)),
                         (255, 255, 255))
        self.assertEqual(images._to_rgb(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)), (255, 255, 255))
        pa = Image.new("PA", (2, 2), (0, 0))
        pa.putpalette([255, 0, 0])
        self.assertEqual(images._to_rgb(pa).getpixel((0, 0)), (255, 255, 255))

    def test_colour_key_transparency_on_white(self):
        rgb = Image.new("RGB", (2, 1), (10, 20, 30))
        rgb.putpixel((1, 0), (1, 2, 3))
        rgb.info["transparency"] = (10, 20, 30)
        out = images._to_rgb(rgb)
        self.assertEqual([out.getpixel((0, 0)), out.getpixel((1, 0))], [(255, 255, 255), (1, 2, 3)])
        grey = Image.new("L", (2, 1), 7)
        grey.info["transparency"] = 7
        self.assertEqual(images._to_rgb(grey).getpixel((0, 0)), (255, 255, 255))
        grey16 = Image.fromarray(np.array([[4000, 300]], dtype=np.uint16))
        grey16.info["transparency"] = 4000
        out = images._to_rgb(grey16)
        self.assertEqual([out.getpixel((0, 0)), out.getpixel((1, 0))], [(255, 255, 255), (1, 1, 1)])

    def test_wide_grey_scaling(self):
        def grey(arr):
            return images._to_rgb(Image.fromarray(np.array(arr))).getpixel((0, 0))[0]

        self.assertEqual(grey(np.array([[65535]], dtype=np.uint16)), 255)
        self.assertEqual(grey(np.array([[32768]], dtype=np.uint16)), 128)
        self.assertEqual(grey(np.array([[1.0, 0.0]], dtype=np.float32)), 255)
        self.assertEqual(grey(np.array([[200.0, 0.0]], dtype=np.float32)), 200)
        self.assertEqual(grey(np.array([[np.nan, 1.0]], dtype=np.float32)), 0)
        self.assertEqual(grey(np.array([[-5.0, 5.0]], dtype=np.float32)), 0)  # stretched min..max
        self.assertEqual(grey(np.array([[70000, -70000]], dtype=np.int32)), 255)
        self.assertEqual(grey(np.array([[40000]], dtype=np.int32)), 156)

    def test_lab_white_stays_white(self):
        self.assertEqual(images._to_rgb(Image.new("LAB", (1, 1), (255, 128, 128))).getpixel((0, 0)),
                         (254, 255, 254))


class ApiTests(unittest.TestCase):
    def test_allowed_formats(self):
        self.assertTrue({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"} <= ALLOWED_FORMATS)
        self.assertFalse({"EPS", "ICO", "PCX", "PSD", "PDF"} & ALLOWED_FORMATS)
        try:
            import pillow_heif  # noqa: F401
        except ImportError:
            self.assertNotIn("HEIF", ALLOWED_FORMATS)
        else:
            self.assertIn("HEIF", ALLOWED_FORMATS)

    def test_limits_are_frozen(self):
        with self.assertRaises(AttributeError):
            ImageLimits().max_pixels = 1  # type: ignore[misc]

    def test_sha256_hex(self):
        self.assertEqual(sha256_hex(b"abc"),
                         "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")

    def test_corpus_is_deterministic(self):
        first = {k: sha256_hex(v) for k, (_, v) in uploads().items()}
        for builder in (corpus._good_files, corpus._bad_files, corpus._optional_good_files):
            builder.cache_clear()
        self.assertEqual({k: sha256_hex(v) for k, (_, v) in uploads().items()}, first)


if __name__ == "__main__":
    unittest.main()
