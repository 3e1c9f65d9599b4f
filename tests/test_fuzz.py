"""Property-based tests (hypothesis) against a live server process: random and mutated multipart bodies,
random bytes and mutated real images as uploads, and malformed HTTP. Whatever arrives, the server answers
in time, never with a 5xx, always with JSON (an error code when the status is 400 or more), and goes on
serving normal requests.

The runs are derandomized (the same examples every time, so CI is stable) and sized to about a minute.
"""
from __future__ import annotations

import http.client
import io
import json
import string
import unittest
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from support import corpus
from support.services import ServerProcess
from support.tiny_models import tiny_checkpoint

pytestmark = pytest.mark.live

settings.register_profile(
    "imgcap-fuzz", derandomize=True, database=None, deadline=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
PROFILE = settings.get_profile("imgcap-fuzz")

REQUEST_TIMEOUT = 30  # seconds: longer than any answer should take, even on a loaded CI machine
FILE_ERROR_CODES = {"empty_file", "not_an_image", "unsupported_format", "corrupt_image", "too_many_pixels",
                    "file_too_large"}


# ----- seeds: small valid images in every accepted format --------------------------------------------------------
def _encode(fmt: str, **options: Any) -> bytes:
    im = Image.new("RGB", (24, 16), (200, 40, 40))
    im.paste((40, 40, 200), (12, 0, 24, 16))
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


SEEDS = {
    "png": _encode("PNG"),
    "jpeg": _encode("JPEG", quality=90),
    "gif": _encode("GIF"),
    "webp": _encode("WEBP", lossless=True),
    "bmp": _encode("BMP"),
    "tiff": _encode("TIFF", compression="tiff_lzw"),
    "cmyk_jpeg": corpus.good_files()["cmyk_jpeg"].data,
    "exif_jpeg": corpus.good_files()["exif_rotated_jpeg"].data,
    "animated_gif": corpus.good_files()["animated_gif"].data,
    "palette_png": corpus.good_files()["palette_transparent_png"].data,
}
NORMAL_IMAGE = ("normal.png", SEEDS["png"])


# ----- strategies -------------------------------------------------------------------------------------------------
@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    """A real image with a few random truncations, bit flips, insertions, deletions or duplications."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate", "overwrite"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
        else:  # overwrite with values that make parsers pick extreme sizes and offsets
            value = draw(st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00",
                                          b"\xff\xff\xff\xff", b"\x80\x00\x00\x00"]))
            data[at:at + len(value)] = value
    return bytes(data)


def declared_png() -> st.SearchStrategy[bytes]:
    """Well-formed PNG headers (valid CRCs) declaring arbitrary sizes, with almost no pixel data."""
    return st.builds(corpus.png_declaring, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))


def upload_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(mutated_image(), st.binary(max_size=4096), declared_png(),
                     st.sampled_from(list(SEEDS.values())),
                     st.sampled_from([item.data for item in corpus.bad_files().values()]))


def filenames() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=60), st.sampled_from(["a.png", "../../etc/passwd", "<b>x</b>.jpg", ""]))


# Characters a sender may put in a header without the HTTP client refusing it.
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
# Boundaries that need no quoting in the Content-Type header (RFC 2046 bchars that are also token chars) ...
BOUNDARY = st.text(st.sampled_from(string.ascii_letters + string.digits + "'+_-."), min_size=1, max_size=70)
# ... and ones that do, or are not allowed at all.
ODD_BOUNDARY = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=80)


CORRUPTIONS = ("odd_boundary", "newline", "garbage_header", "no_disposition", "garbage_disposition", "field_name",
               "no_filename", "content_type", "no_closing", "truncate", "preamble", "epilogue", "boundary_in_payload",
               "lone_boundary", "no_parts")


@st.composite
def multipart_request(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A multipart body and the Content-Type to send with it: well-formed, then broken in 0-3 random ways
    (so that the parser sees both valid requests full of hostile uploads and every kind of broken framing)."""
    broken = set(draw(st.lists(st.sampled_from(CORRUPTIONS), max_size=3, unique=True)))
    boundary = draw(ODD_BOUNDARY if "odd_boundary" in broken else BOUNDARY).encode()
    newline = draw(st.sampled_from([b"\n", b"\r", b"", b"\r\r\n"])) if "newline" in broken else b"\r\n"
    body = draw(st.binary(max_size=64)) if "preamble" in broken else b""
    for _ in range(0 if "no_parts" in broken else draw(st.integers(1, 4))):
        body += b"--" + boundary + newline
        headers: list[bytes] = []
        if "no_disposition" not in broken:
            name = draw(st.text(max_size=20)) if "field_name" in broken else draw(st.sampled_from(["images"] * 4
                                                                                                  + ["prompt"]))
            disposition = f'form-data; name="{name}"'
            if "no_filename" not in broken:
                disposition += f'; filename="{draw(filenames())}"'
            if "garbage_disposition" in broken:
                disposition = draw(HEADER_TEXT)
            headers.append(b"Content-Disposition: " + disposition.encode())
        if draw(st.booleans()):
            headers.append(b"Content-Type: " + draw(st.sampled_from(
                [b"image/png", b"image/jpeg", b"text/plain", b"application/octet-stream", b"", b"image/svg+xml"])))
        if "garbage_header" in broken:
            headers.insert(draw(st.integers(0, len(headers))), draw(st.binary(max_size=80)))
        payload = draw(upload_bytes())
        if "boundary_in_payload" in broken:
            at = draw(st.integers(0, len(payload)))
            payload = payload[:at] + b"\r\n--" + boundary + payload[at:]
        body += newline.join(headers) + newline + newline + payload + newline
    if "lone_boundary" in broken:
        body += b"--" + boundary + newline
    if "no_closing" not in broken:
        body += b"--" + boundary + b"--" + newline
    if "epilogue" in broken:
        body += draw(st.binary(max_size=64))
    if "truncate" in broken:
        body = body[: draw(st.integers(0, len(body)))]

    content_type: str | None = f"multipart/form-data; boundary={boundary.decode()}"
    if "content_type" in broken:
        content_type = draw(st.one_of(
            st.just(f'multipart/form-data; boundary="{boundary.decode()}"'),
            st.just(f"multipart/form-data; charset=utf-8; boundary={boundary.decode()}; x=y"),
            st.builds(lambda b: f"multipart/form-data; boundary={b}", BOUNDARY),
            st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=", "multipart/mixed; boundary=x",
                             "application/x-www-form-urlencoded", "application/json", "image/png", "text/plain"]),
            HEADER_TEXT, st.none()))
    return body, content_type


@st.composite
def raw_http_request(draw: st.DrawFn) -> bytes:
    """An HTTP/1.1 request to /caption-images with a random mix of odd request lines and header lines."""
    fragments = st.sampled_from([
        b" ", b"\t", b"\r", b"\n", b"\\", b'"', b"\x00", b"\x01", b"\x7f", b"\xff", b":", b";", b",", b"=", b"/", b"%",
        b"\xc3\xa9", b"Host", b"Content-Length", b"Transfer-Encoding", b"chunked", b"Content-Type",
        b"multipart/form-data", b"boundary", b"0", b"1", b"-1", b"99999999999999999999", b"x"])
    line = st.lists(fragments, max_size=8).map(b"".join)
    method = draw(st.sampled_from([b"POST", b"post", b"GET", b"PUT", b"BREW", b"P\x00ST", b""]))
    target = draw(st.sampled_from([b"/caption-images", b"/reset-redis", b"/", b"*", b"//..%2f..", b"/\xff",
                                   b"http://x/caption-images", b""]))
    version = draw(st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1.1 extra", b""]))
    headers = draw(st.lists(st.one_of(line, st.tuples(line, line).map(lambda kv: kv[0] + b": " + kv[1])),
                            max_size=5))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), b"Host: localhost")
    lines = [method + b" " + target + version, *headers]
    body = draw(st.one_of(st.just(b""), st.binary(max_size=256), st.just(b"5\r\nhello\r\n0\r\n\r\n")))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ----- the tests --------------------------------------------------------------------------------------------------
class FuzzTest(unittest.TestCase):
    """One server (in-process cache, short captions: the parsers are under test, not the model)."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = ServerProcess(["--model-path", str(tiny_checkpoint("blip")), "--max-new-tokens", "5"],
                                   env={"CACHE_BACKEND": "memory"})
        cls.server.start()  # stops the process itself if it never gets ready

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def tearDown(self) -> None:
        self.assert_serves_normally()

    # --- checks ---
    def send(self, body: bytes, content_type: str | None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=REQUEST_TIMEOUT)
        try:
            headers = {"Content-Type": content_type} if content_type is not None else {}
            conn.request("POST", "/caption-images", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        except TimeoutError:
            self.fail(f"no answer within {REQUEST_TIMEOUT} s")
        finally:
            conn.close()

    def check_answer(self, status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        """Never a 5xx; always JSON; an error code on every failure; per-file results that make sense."""
        self.assertLess(status, 500, body[:500])
        self.assertEqual(headers.get("content-type", "").split(";")[0], "application/json", body[:300])
        try:
            answer = json.loads(body)
        except ValueError as exc:
            self.fail(f"answer is not JSON ({exc}): {body[:300]!r}")
        if "results" in answer:
            results = answer["results"]
            self.assertIsInstance(results, list)
            self.assertGreater(len(results), 0)
            for result in results:
                self.assertIsInstance(result["filename"], str)
                if "error" in result:
                    self.assertIn(result["error"]["code"], FILE_ERROR_CODES, result)
                    self.assertTrue(result["error"]["message"])
                else:
                    self.assertIsInstance(result["caption"], str)
                    self.assertIsInstance(result["tags"], list)
            captioned = any("error" not in r for r in results)
            self.assertEqual(status == 200, captioned, answer)
            if status != 200:
                self.assertIn(status, (400, 413, 415))
        else:
            self.assertGreaterEqual(status, 400, answer)
            self.assertIsInstance(answer["error"]["code"], str)
            self.assertTrue(answer["error"]["code"])
            self.assertIsInstance(answer["error"]["message"], str)
        return answer

    def assert_serves_normally(self) -> None:
        self.assertIsNone(self.server.process.poll(), "the server process died")
        status, headers, body = self.send(*_valid_multipart([NORMAL_IMAGE]))
        self.assertEqual(status, 200, body[:500])
        self.assertTrue(json.loads(body)["results"][0]["caption"])
        self.assertNotIn("Unexpected error while answering", self.server.log())
        self.assertNotIn("Traceback", self.server.log())

    # --- properties ---
    def test_mutated_and_random_images_in_valid_requests(self) -> None:
        @settings(PROFILE, max_examples=250)
        @given(files=st.lists(st.tuples(filenames(), upload_bytes()), min_size=1, max_size=4),
               prompt=st.one_of(st.none(), st.text(max_size=40)))
        def run(files: list[tuple[str, bytes]], prompt: str | None) -> None:
            status, headers, body = self.send(*_valid_multipart(files, prompt))
            answer = self.check_answer(status, headers, body)
            if "results" in answer:
                # werkzeug turns the browsers' %22 back into '"' but leaves %0D/%0A as they are
                sent = [name for name, _ in files]
                echoed = [r["filename"] for r in answer["results"]]
                self.assertEqual(len(echoed), len(sent))
                for name, back in zip(sent, echoed):
                    if not any(c in name for c in "\r\n%"):
                        self.assertEqual(back, name)

        run()

    def test_random_and_broken_multipart_bodies(self) -> None:
        @settings(PROFILE, max_examples=400)
        @given(request=multipart_request())
        def run(request: tuple[bytes, str | None]) -> None:
            self.check_answer(*self.send(*request))

        run()

    def test_malformed_http_requests(self) -> None:
        @settings(PROFILE, max_examples=300)
        @given(request=raw_http_request())
        def run(request: bytes) -> None:
            status, headers, body = _send_raw(self.server.port, request)
            if status is None:
                return  # the server closed the connection without answering: allowed for garbage
            # RFC 9112 §6.1: an unknown transfer coding is answered 501; anything else must be < 500.
            self.assertTrue(status < 500 or status == 501, (status, body[:300]))
            if status >= 400:
                self.assertEqual(headers.get("content-type"), "application/json", body[:300])
                try:
                    error = json.loads(body)["error"]
                except ValueError as exc:
                    self.fail(f"not JSON ({exc}): {body[:300]!r} for {request[:300]!r}")
                self.assertIsInstance(error["code"], str)

        run()


def _valid_multipart(files: list[tuple[str, bytes]], prompt: str | None = None) -> tuple[bytes, str]:
    """A correct multipart/form-data body."""
    boundary = "fuzz-0123456789abcdef"
    body = b""
    if prompt is not None:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n').encode()
        body += prompt.encode() + b"\r\n"
    for name, data in files:
        # Browsers escape only CR, LF and '"'; a raw backslash would start a quoted-pair for werkzeug (a
        # filename ending in one swallows the closing quote and the part is lost), so escape it too.
        escaped = name.replace("\\", "\\\\").replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{escaped}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _send_raw(port: int, data: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes; parse the first answer, if any, with http.client."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # no more is coming: an incomplete request must not wait for us
        except OSError:
            pass
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, {}, b""
        except TimeoutError:
            raise AssertionError(f"no answer within {REQUEST_TIMEOUT} s to {data[:300]!r}") from None
        try:
            body = response.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


if __name__ == "__main__":
    unittest.main()
