"""The HTTP contract in process (the fast tier): the real app and service on the tiny BLIP checkpoint through
Flask's test client. Status codes, JSON shapes, headers and error codes of every endpoint; what needs a real
server process (waitress, Redis, signals, the browser) is in the live tests."""
from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
from PIL import Image

from support import corpus
from support.inprocess import InProcessTestCase
from support.tiny_models import image_bytes, reference_captions, tiny_checkpoint
from support.webtest import assert_json_error, new_png, run_concurrently, sample_uploads

pytestmark = pytest.mark.inprocess

ADMIN_TOKEN = "s3cret-admin-token"


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"contract-boundary") -> tuple[bytes, str]:
    """A multipart body from raw (Content-Disposition value, data) pairs, bytes as given."""
    body = b""
    for disposition, data in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        body += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


class CaptionContractTest(InProcessTestCase):
    """Default limits, no ADMIN_TOKEN."""

    def setUp(self) -> None:
        self.client.get("/reset-redis")

    def test_every_good_corpus_file_is_captioned_in_one_request(self) -> None:
        good = {**corpus.good_files(), **corpus.optional_good_files()}
        files = [(item.filename, item.data) for item in good.values()]
        response = self.post(files)
        self.assertEqual(response.status_code, 200, response.text)
        results = response.json()["results"]
        self.assertEqual([r["filename"] for r in results], [name for name, _ in files])
        for name, result in zip(good, results):
            with self.subTest(name):
                self.assertNotIn("error", result)
                self.assertIsInstance(result["caption"], str)
                self.assertTrue(result["caption"].strip())
                self.assertIsInstance(result["tags"], list)

    def test_every_good_corpus_file_is_captioned_alone(self) -> None:
        for name, item in {**corpus.good_files(), **corpus.optional_good_files()}.items():
            with self.subTest(name):
                response = self.post([(item.filename, item.data)])
                self.assertEqual(response.status_code, 200, response.text)
                [result] = response.json()["results"]
                self.assertEqual(result["filename"], item.filename)
                self.assertTrue(result["caption"].strip(), result)

    def test_every_bad_corpus_file_gets_its_own_error_code(self) -> None:
        statuses = {"empty_file": 400, "corrupt_image": 400, "not_an_image": 415, "unsupported_format": 415,
                    "too_many_pixels": 413, "file_too_large": 413}
        for name, item in corpus.bad_files().items():
            with self.subTest(name):
                response = self.post([(item.filename, item.data)])
                self.assertEqual(response.status_code, statuses[item.code], response.text)
                self.assertEqual(response.headers["Content-Type"], "application/json")
                [result] = response.json()["results"]
                self.assertEqual(result["filename"], item.filename)
                self.assertNotIn("caption", result)
                self.assertEqual(result["error"]["code"], item.code, result)
                self.assertTrue(result["error"]["message"])
                self.assertNotIn("Traceback", response.text)

    def test_mixed_request_good_files_still_captioned(self) -> None:
        bad = list(corpus.bad_files().values())
        good = list(corpus.good_files().values())[: 32 - len(bad)]
        mixed: list[Any] = []
        for i in range(max(len(bad), len(good))):  # interleaved: good, bad, good, bad, ...
            mixed += good[i:i + 1] + bad[i:i + 1]
        response = self.post([(item.filename, item.data) for item in mixed])
        self.assertEqual(response.status_code, 200, response.text)
        results = response.json()["results"]
        self.assertEqual(len(results), len(mixed))
        for item, result in zip(mixed, results):
            with self.subTest(item.filename):
                self.assertEqual(result["filename"], item.filename)
                if isinstance(item, corpus.BadFile):
                    self.assertEqual(result["error"]["code"], item.code, result)
                else:
                    self.assertTrue(result["caption"].strip(), result)

    def test_only_bad_files_with_different_errors_is_400(self) -> None:
        bad = corpus.bad_files()
        response = self.post([(bad[n].filename, bad[n].data) for n in ("text_as_jpg", "truncated_jpeg", "bomb_png")])
        self.assertEqual(response.status_code, 400)
        self.assertEqual([r["error"]["code"] for r in response.json()["results"]],
                         ["not_an_image", "corrupt_image", "too_many_pixels"])

    def test_32_concurrent_clients_get_exactly_their_own_results(self) -> None:
        sizes = [(40 + 8 * (i % 4), 32 + 8 * (i // 8)) for i in range(32)]
        images = [new_png(size) for size in sizes]
        names = [f"client-{i:02d}.png" for i in range(32)]
        alone = []
        for name, data in zip(names, images):  # what each image gives alone
            response = self.post([(name, data)])
            self.assertEqual(response.status_code, 200)
            alone.append(response.json()["results"][0])
        self.assertGreater(len({r["caption"] for r in alone}), 1, "the images must not all give one caption")
        self.assertEqual(self.client.get("/reset-redis").status_code, 200)

        responses = run_concurrently(32, lambda i: self.client.post_images([(names[i], images[i])]))
        for i, response in enumerate(responses):
            with self.subTest(client=i):
                self.assertEqual(response.status_code, 200, response.text)
                [result] = response.json()["results"]
                self.assertEqual(result["filename"], names[i])
                self.assertEqual(result["caption"], alone[i]["caption"])
                self.assertEqual(result["tags"], alone[i]["tags"])
                self.assertIs(result["cached"], False)
        self.assertGreater(self.metric("caption_batch_size_count"), 0)

    def test_8_concurrent_clients_with_the_same_new_image_cause_one_captioning(self) -> None:
        image = new_png((56, 56))
        images_before = self.metric("caption_batch_size_sum")
        calls_before = self.metric("caption_batch_size_count")
        responses = run_concurrently(8, lambda i: self.client.post_images([(f"same-{i}.png", image)]))
        results = []
        for i, response in enumerate(responses):
            self.assertEqual(response.status_code, 200, response.text)
            [result] = response.json()["results"]
            self.assertEqual(result["filename"], f"same-{i}.png")
            results.append(result)
        self.assertEqual(len({r["caption"] for r in results}), 1, results)
        self.assertEqual(self.metric("caption_batch_size_sum") - images_before, 1)
        self.assertEqual(self.metric("caption_batch_size_count") - calls_before, 1)

    def test_duplicates_within_one_request_are_captioned_once(self) -> None:
        image = new_png()
        before = self.metric("caption_batch_size_sum")
        response = self.post([("one.png", image), ("two.png", image), ("three.png", image)])
        self.assertEqual(response.status_code, 200)
        results = response.json()["results"]
        self.assertEqual([r["filename"] for r in results], ["one.png", "two.png", "three.png"])
        self.assertEqual(len({r["caption"] for r in results}), 1)
        self.assertEqual(self.metric("caption_batch_size_sum") - before, 1)

    def test_filenames_are_echoed_back_as_data(self) -> None:
        names = ["../../etc/passwd", "/etc/shadow", "..", "<script>alert(1)</script>.png",
                 "<img src=x onerror=alert(1)>.jpg", "x" * 4096 + ".png", "Fotoğraf 写真 😀 ünïcödé.png",
                 "name with spaces & ampersand.png", "%2e%2e%2fencoded.png", "semi;colon=value.png", ""]
        image = new_png()
        response = self.post([(name, image) for name in names[:8]])
        response2 = self.post([(name, image) for name in names[8:]])
        for response, sent in ((response, names[:8]), (response2, names[8:])):
            self.assertEqual(response.status_code, 200, response.text[:500])
            self.assertEqual(response.headers["Content-Type"], "application/json")
            results = response.json()["results"]
            self.assertEqual([r["filename"] for r in results], sent)
            self.assertTrue(all(r["caption"] for r in results))
            self.assertNotIn("root:", response.text)  # nothing was read from the path it names

    def test_unexpected_field_names_and_no_files(self) -> None:
        image = new_png()
        response = self.client.post("/caption-images", files=[("image", ("a.png", image))])
        error = assert_json_error(self, response, 400, "no_images")
        self.assertIn("'image'", error["message"])
        response = self.client.post("/caption-images", data={"images": "not a file"})
        assert_json_error(self, response, 400, "no_images")
        response = self.client.post("/caption-images", data=b"just bytes",
                                    headers={"Content-Type": "application/octet-stream"})
        assert_json_error(self, response, 400, "no_images")

    def test_two_images_captioned_in_order_then_cached(self) -> None:
        files = sample_uploads()
        first = self.client.post_images(files)
        self.assertEqual(first.status_code, 200, first.text)
        body = first.json()
        self.assertEqual([r["filename"] for r in body["results"]], ["a.jpg", "b.png"])
        for result in body["results"]:
            self.assertIsInstance(result["caption"], str)
            self.assertTrue(result["caption"].strip(), result)
            self.assertIsInstance(result["tags"], list)
            self.assertTrue(all(isinstance(t, str) for t in result["tags"]))
            self.assertIs(result["cached"], False)
        self.assertEqual(body["model"], {"family": "blip", "id": str(tiny_checkpoint("blip"))})

        second = self.client.post_images(files).json()
        self.assertEqual([r["caption"] for r in second["results"]], [r["caption"] for r in body["results"]])
        self.assertEqual([r["tags"] for r in second["results"]], [r["tags"] for r in body["results"]])
        self.assertEqual([r["cached"] for r in second["results"]], [True, True])

    def test_captions_are_what_the_checkpoint_gives(self) -> None:
        results = self.client.post_images(sample_uploads()).json()["results"]
        # the server decodes the uploaded JPEG, so the oracle must see the same decoded pixels
        decoded = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in sample_uploads()]
        expected = reference_captions(tiny_checkpoint("blip"), "blip", decoded, max_new_tokens=30)
        self.assertEqual([r["caption"] for r in results], expected)

    def test_prompt_is_a_cache_miss_and_removed_from_the_caption(self) -> None:
        files = sample_uploads()[:1]
        self.client.post_images(files)
        prompted = self.client.post_images(files, prompt="a photo of").json()["results"][0]
        self.assertIs(prompted["cached"], False)
        self.assertFalse(prompted["caption"].startswith("a photo of"), prompted["caption"])
        self.assertEqual(len(self.service.cache), 2)
        again = self.client.post_images(files, prompt="a photo of").json()["results"][0]
        self.assertIs(again["cached"], True)
        self.assertEqual(again["caption"], prompted["caption"])
        # an empty prompt means the default: the unprompted entry again
        empty = self.client.post_images(files, prompt="").json()["results"][0]
        self.assertIs(empty["cached"], True)

    def test_no_images_is_400_json(self) -> None:
        response = self.client.post("/caption-images", data={"prompt": "x"})
        self.assertEqual(response.status_code, 400)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertEqual(response.json()["error"]["code"], "no_images")
        self.assertTrue(response.json()["error"]["message"])

    def test_text_file_gets_a_per_file_error_and_others_still_captioned(self) -> None:
        text = ("notes.jpg", b"this is not an image\n")
        alone = self.client.post_images([text])
        self.assertGreaterEqual(alone.status_code, 400)
        self.assertLess(alone.status_code, 500)
        self.assertEqual(alone.headers["Content-Type"], "application/json")
        error = alone.json()["results"][0]["error"]
        self.assertEqual(alone.json()["results"][0]["filename"], "notes.jpg")
        self.assertEqual(error["code"], "not_an_image")
        self.assertTrue(error["message"])

        mixed = self.client.post_images([sample_uploads()[0], text])
        self.assertEqual(mixed.status_code, 200)
        first, second = mixed.json()["results"]
        self.assertIn("caption", first)
        self.assertEqual(second["error"]["code"], "not_an_image")

    def test_unknown_path_and_method_are_json(self) -> None:
        missing = self.client.get("/nope")
        self.assertEqual((missing.status_code, missing.json()["error"]["code"]), (404, "not_found"))
        wrong = self.client.get("/caption-images")
        self.assertEqual((wrong.status_code, wrong.json()["error"]["code"]), (405, "method_not_allowed"))

    def test_cross_site_reset_is_refused_and_deletes_nothing(self) -> None:
        self.post([("keep.png", new_png())])
        before = len(self.service.cache)
        self.assertGreater(before, 0)
        for headers in ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
                        {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Referer": "http://evil.example/page.html"}):
            for method in ("GET", "POST"):
                with self.subTest(headers=headers, method=method):
                    response = self.client.request(method, "/reset-redis", headers=headers)
                    assert_json_error(self, response, 403, "cross_site_request")
                    self.assertEqual(len(self.service.cache), before)
        same_origin = self.client.post("/reset-redis", headers={"Sec-Fetch-Site": "same-origin",
                                                                 "Origin": "http://localhost"})
        self.assertEqual(same_origin.status_code, 200, same_origin.text)
        self.post([("again.png", new_png())])
        curl_like = self.client.get("/reset-redis")  # no browser headers at all
        self.assertEqual(curl_like.status_code, 200)
        self.assertGreater(curl_like.json()["deleted"], 0)

    def test_foreign_host_is_400_json_and_loopback_names_work(self) -> None:
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example"):
            for path in ("/", "/healthz", "/caption-images", "/nope"):
                with self.subTest(host=host, path=path):
                    response = self.client.get(path, headers={"Host": host})
                    assert_json_error(self, response, 400, "host_not_allowed")
        for host in ("127.0.0.1:5001", "localhost:5001", "localhost", "[::1]:5001", "LOCALHOST", "[::1]"):
            with self.subTest(host=host):
                self.assertEqual(self.client.get("/healthz", headers={"Host": host}).status_code, 200)

    def test_every_file_part_gets_a_result_whatever_its_filename(self) -> None:
        names = [b"plain.png", b"a\rb.png", b"a\nb.png", b"a\x00b.png", "caf\u00e9.png".encode("latin-1"),
                 ("\U0001F600" * 1024 + ".png").encode(), b'quo\\"te.png', b"C:\\Users\\me\\photo.png"]
        expected = ["plain.png", "a\rb.png", "a\nb.png", "a\x00b.png", "caf\u00e9.png", "\U0001F600" * 1024 + ".png",
                    'quo"te.png', "C:\\Users\\me\\photo.png"]
        parts = [(b'form-data; name="images"; filename="' + name + b'"', new_png()) for name in names]
        parts.append((b'form-data; name="images"', b"just some text"))  # a part without a filename
        body, content_type = multipart(parts)
        response = self.client.post("/caption-images", data=body, headers={"Content-Type": content_type})
        self.assertEqual(response.status_code, 200, response.text[:500])
        results = response.json()["results"]
        self.assertEqual(len(results), len(parts))
        self.assertEqual([r["filename"] for r in results], expected + [""])
        for result in results[:-1]:
            self.assertTrue(result.get("caption"), result)
        self.assertEqual(results[-1]["error"]["code"], "not_an_image")

    def test_an_unreadable_part_is_a_400_that_says_which(self) -> None:
        body = (b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"ok.png\"\r\n\r\n" + new_png()
                + b"\r\n--b\r\nContent-Type: image/png\r\n\r\nno disposition\r\n--b--\r\n")
        response = self.client.post("/caption-images", data=body,
                                    headers={"Content-Type": "multipart/form-data; boundary=b"})
        error = assert_json_error(self, response, 400, "unreadable_part")
        self.assertIn("after part 1", error["message"])

    def post_raw(self, body: bytes, boundary: str = "b") -> Any:
        return self.client.post("/caption-images", data=body,
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def test_file_parts_without_a_name_are_not_images_and_not_an_error(self) -> None:
        png = new_png()
        nameless = b'--b\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\n' + png + b"\r\n"
        other = b'--b\r\nContent-Disposition: form-data; name="x"; filename="b.png"\r\n\r\n' + png + b"\r\n"
        error = assert_json_error(self, self.post_raw(nameless + other + b"--b--\r\n"), 400, "no_images")
        self.assertIn("'x'", error["message"])
        self.assertIn("a part with no name", error["message"])
        image = b'--b\r\nContent-Disposition: form-data; name="images"; filename="c.png"\r\n\r\n' + png + b"\r\n"
        response = self.post_raw(nameless + image + b"--b--\r\n")
        self.assertEqual(response.status_code, 200, response.text[:500])
        self.assertEqual([r["filename"] for r in response.json()["results"]], ["c.png"])

    def test_part_headers_over_256_kib_are_431_and_shorter_names_are_echoed(self) -> None:
        def part(name: bytes) -> bytes:
            return (b'--b\r\nContent-Disposition: form-data; name="images"; filename="' + name + b'"\r\n\r\n'
                    + new_png() + b"\r\n--b--\r\n")

        long_name = "n" * (200 * 1024)
        response = self.post_raw(part(long_name.encode()))
        self.assertEqual(response.status_code, 200, response.text[:500])
        self.assertEqual(response.json()["results"][0]["filename"], long_name)
        for size in (257 * 1024, 8 * 1024 * 1024):  # just over, and far over (refused at the limit, not at the end)
            with self.subTest(size=size):
                error = assert_json_error(self, self.post_raw(part(b"n" * size)), 431, "headers_too_large")
                self.assertIn("part 1", error["message"])

    def test_a_bare_cr_or_lf_in_a_file_name_is_kept_when_it_is_the_only_header(self) -> None:
        for name in ("a\rb\nc.png", "a\nContent-Type.png", "end\n.png"):
            with self.subTest(name=name):
                body = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="' + name.encode() + b'"'
                        b"\r\n\r\n" + new_png() + b"\r\n--b--\r\n")
                response = self.post_raw(body)
                self.assertEqual(response.status_code, 200, response.text[:500])
                self.assertEqual(response.json()["results"][0]["filename"], name)
        # a client that ends its header lines with a bare LF still has them read as lines
        body = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="lf.png"\nContent-Type: image/png'
                b"\r\n\r\n" + new_png() + b"\r\n--b--\r\n")
        self.assertEqual(self.post_raw(body).json()["results"][0]["filename"], "lf.png")

    def test_multipart_without_a_boundary_is_unreadable(self) -> None:
        body = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + new_png()
        for content_type in ("multipart/form-data", 'multipart/form-data; boundary=""', "multipart/form-data; x=1"):
            with self.subTest(content_type=content_type):
                response = self.client.post("/caption-images", data=body + b"\r\n--b--\r\n",
                                            headers={"Content-Type": content_type})
                self.assertIn("boundary", assert_json_error(self, response, 400, "unreadable_part")["message"])

    def test_head_on_reset_is_405_and_clears_nothing(self) -> None:
        upload = [("keep.png", new_png())]
        self.assertFalse(self.post(upload).json()["results"][0]["cached"])
        response = self.client.request("HEAD", "/reset-redis")
        self.assertEqual(response.status_code, 405)
        self.assertEqual(set(response.headers["Allow"].replace(" ", "").split(",")) & {"GET", "POST"},
                         {"GET", "POST"})
        self.assertTrue(self.post(upload).json()["results"][0]["cached"])

    def test_readyz_names_the_cache_backend_when_the_cache_is_empty(self) -> None:
        self.assertEqual(self.client.get("/reset-redis").status_code, 200)
        ready = self.client.get("/readyz").json()
        self.assertEqual(ready["cache"]["backend"], self.service.cache.backend)
        self.assertIn(ready["cache"]["backend"], ("redis", "memory", "off"))

    def test_invented_methods_and_paths_add_no_metric_series(self) -> None:
        def series() -> int:
            return sum(len(family.samples) for family in self.service.metrics.registry.collect())

        def noise(count: int) -> None:
            for i in range(count):
                self.client.request(f"X{uuid.uuid4().hex[:8].upper()}", f"/{uuid.uuid4().hex}/{i}")

        noise(20)
        before = series()
        noise(300)
        self.assertEqual(series(), before)


class AdminTokenContractTest(InProcessTestCase):
    """ADMIN_TOKEN set."""

    settings = {"admin_token": ADMIN_TOKEN}

    def test_reset_needs_the_admin_token(self) -> None:
        url = "/reset-redis"
        refused = {
            "no header": {},
            "wrong token": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
            "prefix of the token": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
            "empty token": {"Authorization": "Bearer "},
            "other scheme": {"Authorization": f"Basic {ADMIN_TOKEN}"},
            "token without scheme": {"Authorization": ADMIN_TOKEN},
        }
        for method in ("GET", "POST"):
            for name, headers in refused.items():
                with self.subTest(method=method, case=name):
                    response = self.client.request(method, url, headers=headers)
                    assert_json_error(self, response, 401, "unauthorized")
                    self.assertNotIn(ADMIN_TOKEN, response.text)
            with self.subTest(method=method, case="right token"):
                response = self.client.request(method, url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                self.assertEqual(response.status_code, 200, response.text)
                self.assertEqual(response.json()["message"], "In-process cache cleared (no Redis is in use)")
        self.assertEqual(self.client.get(url, headers={"Authorization": f"bearer {ADMIN_TOKEN}"}).status_code, 200)  # the scheme is case-insensitive (RFC 7235)


class LimitsContractTest(InProcessTestCase):
    """Small limits, so they can be reached cheaply; BATCH_WAIT_MS holds every batch in the queue for a second
    (a stand-in for a slow model), which makes the bounded queue easy to fill."""

    MAX_REQUEST = 2_000_000
    MAX_FILE = 500_000
    settings = {"max_request_bytes": MAX_REQUEST, "max_files_per_request": 4, "max_file_bytes": MAX_FILE,
                "max_image_pixels": 1_000_000, "max_queue_images": 4, "batch_wait_ms": 1000.0}

    def assert_still_serving(self) -> None:
        response = self.post([("after.png", new_png())])
        self.assertEqual(response.status_code, 200, response.text)
        self.assertTrue(response.json()["results"][0]["caption"])

    def test_request_over_max_request_bytes_is_413_json(self) -> None:
        response = self.post([("big.jpg", corpus.padded_jpeg(self.MAX_REQUEST + 500_000))])
        error = assert_json_error(self, response, 413, "request_too_large")
        self.assertIn("MAX_REQUEST_BYTES", error["message"])
        self.assert_still_serving()

    def test_more_files_than_allowed_is_refused_with_json(self) -> None:
        image = new_png()
        response = self.post([(f"{i}.png", image) for i in range(5)])
        error = assert_json_error(self, response, (400, 413), "too_many_files")
        self.assertIn("MAX_FILES_PER_REQUEST", error["message"])
        many = self.post([(f"{i}.png", image) for i in range(200)])  # also more form parts than werkzeug allows
        assert_json_error(self, many, (400, 413))
        self.assertEqual(self.post([(f"{i}.png", image) for i in range(4)]).status_code, 200)
        self.assert_still_serving()

    def test_file_over_max_file_bytes_is_a_per_file_error(self) -> None:
        big = corpus.padded_jpeg(self.MAX_FILE + 1)
        alone = self.post([("big.jpg", big)])
        self.assertEqual(alone.status_code, 413, alone.text)
        [result] = alone.json()["results"]
        self.assertEqual(result["filename"], "big.jpg")
        self.assertEqual(result["error"]["code"], "file_too_large")
        self.assertIn("MAX_FILE_BYTES", result["error"]["message"])
        mixed = self.post([("ok.png", new_png()), ("big.jpg", big), ("exact.jpg", corpus.padded_jpeg(self.MAX_FILE))])
        self.assertEqual(mixed.status_code, 200, mixed.text)
        ok, too_big, exact = mixed.json()["results"]
        self.assertTrue(ok["caption"])
        self.assertEqual(too_big["error"]["code"], "file_too_large")
        self.assertTrue(exact["caption"], exact)  # exactly at the limit is allowed
        self.assert_still_serving()

    def test_max_image_pixels_is_configurable(self) -> None:
        over = self.post([("over.png", corpus.png_declaring(1001, 1000))])
        self.assertEqual(over.status_code, 413)
        self.assertEqual(over.json()["results"][0]["error"]["code"], "too_many_pixels")
        at = self.post([("at.jpg", image_bytes(Image.new("RGB", (1000, 1000), (90, 140, 200)), "JPEG"))])
        self.assertEqual(at.status_code, 200, at.text)

    def test_prompt_too_long_is_400_json(self) -> None:
        response = self.post([("a.png", new_png())], prompt="a photo of " * 300)
        assert_json_error(self, response, 400, "prompt_too_long")
        huge = self.client.post("/caption-images", files=[("images", ("a.png", new_png()))],
                                data={"prompt": "x" * 1_000_000})  # a form field over werkzeug's limit
        assert_json_error(self, huge, (400, 413))

    def test_full_queue_answers_503_with_retry_after(self) -> None:
        batches = [[(f"burst-{i}-{j}.png", new_png()) for j in range(3)] for i in range(6)]
        responses = run_concurrently(6, lambda i: self.client.post_images(batches[i]))
        statuses = [r.status_code for r in responses]
        self.assertTrue(set(statuses) <= {200, 503}, statuses)
        self.assertIn(200, statuses)
        self.assertIn(503, statuses)
        for i, response in enumerate(responses):
            if response.status_code == 503:
                assert_json_error(self, response, 503, "overloaded")
                self.assertGreater(int(response.headers["Retry-After"]), 0)
            else:
                results = response.json()["results"]
                self.assertEqual([r["filename"] for r in results], [name for name, _ in batches[i]])
                self.assertTrue(all(r["caption"] for r in results))
        self.assertEqual(self.metric("caption_queue_images"), 0)
        refused = statuses.index(503)
        retry = self.client.post_images(batches[refused])  # the queue has drained: the retry is served
        self.assertEqual(retry.status_code, 200, retry.text)



class NotReadyContractTest(InProcessTestCase):
    """The service not started yet (the model loading)."""

    start = False

    def test_everything_but_captioning_answers_while_loading(self) -> None:
        caption = self.client.post_images(sample_uploads()[:1])
        assert_json_error(self, caption, 503, "not_ready")
        self.assertGreater(int(caption.headers["Retry-After"]), 0)
        ready = self.client.get("/readyz")
        self.assertEqual(ready.status_code, 503)
        self.assertEqual(ready.json()["status"], "starting")
        self.assertEqual(ready.json()["model"], {"family": "blip", "id": "Salesforce/blip-image-captioning-base"})
        self.assertNotIn("device", ready.json())
        self.assertEqual(self.client.get("/healthz").json(), {"status": "ok"})
        self.assertEqual(self.client.get("/openapi.json").status_code, 200)
