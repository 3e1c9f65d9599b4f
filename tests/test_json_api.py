"""The JSON form of /caption-images (issue 13): base64, data: URIs and image URLs, per-request options, all on the
same data path as multipart (one batcher, one cache, one set of error codes).

Live servers (tiny BLIP, real Redis) and a local image host that counts the requests it gets; the in-process
class checks what needs no process (IMAGE_URLS=off, body validation).
"""
from __future__ import annotations

import base64
import time
import unittest

import pytest
import requests

from support.collection import collection_image, encode
from support.imagehost import BIG_TOTAL, ImageHost
from support.inprocess import InProcessTestCase
from support.live import LiveServerTestCase
from support.tiny_models import reference_captions, tiny_checkpoint
from support.webtest import assert_json_error, metric, run_concurrently

MiB = 1024 * 1024
MAX_NEW_TOKENS = 12
URL_TIMEOUT = 3


def png(index: int) -> bytes:
    """A PNG no other test of this file uses (the cache must miss the first time)."""
    return encode(collection_image(70_000 + index), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def captions_direct(images: list[bytes], **kwargs) -> list[str]:
    """What a direct transformers generate gives for these PNGs (the server's checkpoint, greedy unless told)."""
    import io

    from PIL import Image

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    return reference_captions(tiny_checkpoint("blip"), "blip", decoded, **{"max_new_tokens": MAX_NEW_TOKENS, **kwargs})


class JsonServer(LiveServerTestCase):
    """A server that may fetch from the local image host only (IMAGE_URL_ALLOWED_HOSTS), and the host itself."""

    pytestmark = pytest.mark.live
    allow_host = True

    @classmethod
    def setUpClass(cls) -> None:
        cls.host = ImageHost({"/photo.png": png(0), "/secret.png": png(1)}).start()
        env = {"IMAGE_URL_TIMEOUT_SECONDS": str(URL_TIMEOUT), "MAX_FILE_BYTES": str(2 * MiB),
               "MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "MAX_NUM_BEAMS": "3"}
        if cls.allow_host:
            env["IMAGE_URL_ALLOWED_HOSTS"] = f"127.0.0.1:{cls.host.port}"
        cls.server_env = env
        try:
            super().setUpClass()
        except BaseException:
            cls.host.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        cls.host.stop()

    def post_json(self, body: dict, timeout: float = 60) -> requests.Response:
        """POST a JSON body; never a 5xx, except the documented 502 of a request whose every URL failed."""
        response = requests.post(self.server.url + "/caption-images", json=body, timeout=timeout)
        if response.status_code == 502:
            self.assertTrue(all(r["error"]["code"] == "url_fetch_failed" for r in response.json()["results"]))
        else:
            self.assertLess(response.status_code, 500, response.text[:500])
        return response

    def results(self, body: dict, status: int = 200) -> list[dict]:
        response = self.post_json(body)
        self.assertEqual(response.status_code, status, response.text)
        return response.json()["results"]


class TestOneImageFourWays(JsonServer):
    def test_multipart_base64_data_uri_and_url_agree(self) -> None:
        photo = self.host.files["/photo.png"]
        first = self.post([("photo.png", photo)]).json()["results"][0]
        self.assertIs(first["cached"], False)
        forms = {
            "base64": {"data": b64(photo), "filename": "photo.png"},
            "data URI": {"data": data_uri(photo)},
            "base64 with line breaks": {"data": "\n".join(b64(photo)[i:i + 76] for i in range(0, len(b64(photo)), 76))},
            "URL": {"url": self.host.url("/photo.png")},
        }
        for name, item in forms.items():
            with self.subTest(form=name):
                (result,) = self.results({"images": [item]})
                self.assertEqual((result["caption"], result["tags"]), (first["caption"], first["tags"]))
                self.assertIs(result["cached"], True)
        self.assertEqual(self.host.hits["/photo.png"], 1, "the URL was fetched once")
        self.assertEqual(captions_direct([photo]), [first["caption"]])

    def test_items_in_order_with_per_item_errors(self) -> None:
        good = png(2)
        results = self.results({"images": [
            {"data": b64(good), "filename": "a.png"}, {"data": "not base64 at all!"},
            {"data": "data:text/plain,hello"}, {"data": b64(b"plain text")}, {"data": ""},
            {"url": self.host.url("/missing.png")}, {"url": "ftp://example.com/x.png"}]})
        self.assertEqual(results[0]["filename"], "a.png")
        self.assertTrue(results[0]["caption"])
        self.assertEqual([r["error"]["code"] for r in results[1:]],
                         ["invalid_base64", "invalid_base64", "not_an_image", "empty_file", "url_fetch_failed",
                          "url_not_allowed"])
        self.assertEqual(results[5]["filename"], "missing.png")

    def test_redirect_to_loopback_is_refused_before_connecting(self) -> None:
        for target in (self.host.url("/secret.png", "localhost"), self.host.url("/secret.png", "[::1]"),
                       "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png"):
            with self.subTest(target=target):
                before = self.host.hits["/redirect"]
                url = self.host.url("/redirect?to=" + requests.utils.quote(target, safe=""))
                (result,) = self.results({"images": [{"url": url}]}, status=400)
                self.assertEqual(result["error"]["code"], "url_not_allowed", result)
                self.assertEqual(self.host.hits["/redirect"], before + 1)
        self.assertEqual(self.host.hits["/secret.png"], 0, "the loopback target got no request")

    def test_a_url_that_never_answers_fails_within_the_timeout(self) -> None:
        started = time.monotonic()
        (result,) = self.results({"images": [{"url": self.host.url("/slow")}]}, status=502)
        elapsed = time.monotonic() - started
        self.assertEqual(result["error"]["code"], "url_fetch_failed", result)
        self.assertLess(elapsed, URL_TIMEOUT + 4)
        self.assertGreaterEqual(elapsed, URL_TIMEOUT - 0.5)

    def test_a_body_over_the_limit_is_cut_at_the_limit(self) -> None:
        response = self.post_json({"images": [{"url": self.host.url("/big")}, {"data": b64(png(3))}]})
        self.assertEqual(response.status_code, 200, response.text)
        big, other = response.json()["results"]
        self.assertEqual(big["error"]["code"], "url_too_large", big)
        self.assertIn(str(2 * MiB), big["error"]["message"])
        self.assertTrue(other["caption"], "the other image of the request is still captioned")
        sent = self.host.wait_big_done()
        # The client stopped reading at the limit; what the host could still write went into socket buffers.
        self.assertLess(sent, 2 * MiB + 16 * MiB, f"{sent} bytes were sent")
        self.assertLess(sent, BIG_TOTAL)


class TestUrlsRefusedWithoutTheAllowList(JsonServer):
    allow_host = False

    def test_private_and_loopback_urls_are_refused_and_never_reached(self) -> None:
        port = self.host.port
        urls = [f"http://127.0.0.1:{port}/photo.png", f"http://[::1]:{port}/photo.png",
                f"http://localhost:{port}/photo.png", f"http://127.1:{port}/photo.png",
                "http://10.0.0.1/photo.png", "http://169.254.169.254/latest/meta-data/",
                f"http://[::ffff:127.0.0.1]:{port}/photo.png", "http://0.0.0.0/photo.png"]
        results = self.post_json({"images": [{"url": url} for url in urls]}).json()["results"]
        for url, result in zip(urls, results):
            with self.subTest(url=url):
                self.assertEqual(result.get("error", {}).get("code"), "url_not_allowed", result)
        self.assertEqual(sum(self.host.hits.values()), 0, f"the local host was reached: {dict(self.host.hits)}")


class TestOptions(JsonServer):
    def test_max_new_tokens_is_a_separate_cache_entry_equal_to_generate(self) -> None:
        from transformers import AutoTokenizer

        image = png(10)
        (default,) = self.results({"images": [{"data": b64(image)}]})
        (short,) = self.results({"images": [{"data": b64(image)}], "max_new_tokens": 5})
        self.assertIs(short["cached"], False, "another cache entry than the default length")
        self.assertEqual(short["caption"], captions_direct([image], max_new_tokens=5)[0])
        self.assertNotEqual(short["caption"], default["caption"])
        tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("blip"))
        self.assertLessEqual(len(tokenizer(short["caption"], add_special_tokens=False)["input_ids"]), 5)
        (again,) = self.results({"images": [{"data": b64(image)}], "max_new_tokens": 5})
        self.assertEqual((again["caption"], again["cached"]), (short["caption"], True))
        form = self.server.session.post(self.server.url + "/caption-images", files=[("images", ("x.png", image))],
                                        data={"max_new_tokens": "5"}, timeout=60)
        self.assertEqual(form.status_code, 200, form.text)
        self.assertEqual((form.json()["results"][0]["caption"], form.json()["results"][0]["cached"]),
                         (short["caption"], True), "the multipart field is the same option")

    def test_num_beams_equals_beam_search_generate(self) -> None:
        image = png(11)
        (beam,) = self.results({"images": [{"data": b64(image)}], "num_beams": 3})
        self.assertEqual(beam["caption"], captions_direct([image], num_beams=3)[0])
        (greedy,) = self.results({"images": [{"data": b64(image)}]})
        self.assertIs(greedy["cached"], False, "greedy and beam search are different entries")

    def test_out_of_range_options_name_the_bound(self) -> None:
        image = {"data": b64(png(12))}
        for options, bound in (({"max_new_tokens": 0}, MAX_NEW_TOKENS), ({"max_new_tokens": MAX_NEW_TOKENS + 1},
                                                                         MAX_NEW_TOKENS),
                               ({"num_beams": 0}, 3), ({"num_beams": 4}, 3)):
            with self.subTest(options=options):
                error = assert_json_error(self, self.post_json({"images": [image], **options}), 400, "invalid_option")
                self.assertIn(f"between 1 and {bound}", error["message"])
        form = self.server.session.post(self.server.url + "/caption-images", files=[("images", ("x.png", png(12)))],
                                        data={"num_beams": "9"}, timeout=60)
        self.assertIn("between 1 and 3", assert_json_error(self, form, 400, "invalid_option")["message"])
        bad = self.server.session.post(self.server.url + "/caption-images", files=[("images", ("x.png", png(12)))],
                                       data={"max_new_tokens": "five"}, timeout=60)
        assert_json_error(self, bad, 400, "invalid_option")
        # Whole numbers in ASCII digits only; numbers of any length are out of range, with a short message
        for text in ("１０", "1_0", "1e3", "0x10", " 5 5"):
            with self.subTest(form=text):
                bad = self.server.session.post(self.server.url + "/caption-images", timeout=60,
                                               files=[("images", ("x.png", png(12)))], data={"max_new_tokens": text})
                self.assertIn("whole number", assert_json_error(self, bad, 400, "invalid_option")["message"])
        for huge in ("9" * 5000, "-" + "9" * 30, "0" * 40 + "9" * 19):
            with self.subTest(form=huge[:12]):
                bad = self.server.session.post(self.server.url + "/caption-images", timeout=60,
                                               files=[("images", ("x.png", png(12)))], data={"max_new_tokens": huge})
                message = assert_json_error(self, bad, 400, "invalid_option")["message"]
                self.assertIn(f"between 1 and {MAX_NEW_TOKENS}", message)
                self.assertIn("number of over 18 digits", message)
        error = assert_json_error(self, self.post_json({"images": [image], "num_beams": 10 ** 40}), 400,
                                  "invalid_option")
        self.assertIn("between 1 and 3", error["message"])
        self.assertLess(len(error["message"]), 200)
        leading = self.server.session.post(self.server.url + "/caption-images", timeout=60,
                                           files=[("images", ("x.png", png(12)))], data={"max_new_tokens": "+0003"})
        self.assertEqual(leading.status_code, 200, leading.text)
        for body in ({"images": [image], "max_new_tokens": "5"}, {"images": []}, {"images": [{}]}, {"prompt": "x"},
                     {"images": [image], "colour": "red"}):
            with self.subTest(body=body):
                assert_json_error(self, self.post_json(body), 400, "invalid_body")
        garbled = requests.post(self.server.url + "/caption-images", data=b'{"images": [', timeout=30,
                                headers={"Content-Type": "application/json"})
        assert_json_error(self, garbled, 400, "invalid_body")
        many = self.post_json({"images": [image] * 33})
        assert_json_error(self, many, 413, "too_many_files")

    def test_json_and_multipart_clients_share_batches(self) -> None:
        """8 JSON clients with 4 base64 images each and 4 multipart clients with 2: fewer generate() calls than
        requests, and every answer is its own images' captions."""
        jobs = [[png(100 + 4 * i + k) for k in range(4)] for i in range(8)] + \
               [[png(200 + 2 * i + k) for k in range(2)] for i in range(4)]
        expected = dict(zip((image for job in jobs for image in job),
                            captions_direct([image for job in jobs for image in job])))
        calls = metric(self.server, "caption_batch_size_count")

        def client(i: int) -> list[dict]:
            names = [f"c{i}-{k}.png" for k in range(len(jobs[i]))]
            if i < 8:
                body = {"images": [{"data": b64(data), "filename": name} for data, name in zip(jobs[i], names)]}
                response = requests.post(self.server.url + "/caption-images", json=body, timeout=120)
            else:
                response = requests.post(self.server.url + "/caption-images", timeout=120,
                                         files=[("images", (name, data)) for name, data in zip(names, jobs[i])])
            self.assertEqual(response.status_code, 200, response.text)
            return response.json()["results"]

        answers = run_concurrently(len(jobs), client)
        for i, (job, results) in enumerate(zip(jobs, answers)):
            self.assertEqual([r["filename"] for r in results], [f"c{i}-{k}.png" for k in range(len(job))])
            self.assertEqual([r["caption"] for r in results], [expected[image] for image in job])
            self.assertTrue(all(r["cached"] is False for r in results))
        model_calls = metric(self.server, "caption_batch_size_count") - calls
        self.assertLess(model_calls, len(jobs), f"{model_calls} generate() calls for {len(jobs)} requests")


class TestInProcess(InProcessTestCase):
    """What needs no server process: IMAGE_URLS=off and the refusals that never reach the model."""

    pytestmark = pytest.mark.inprocess
    settings = {"image_urls": False}

    def test_urls_off(self) -> None:
        response = self.client.post("/caption-images", json={"images": [{"url": "http://example.com/a.png"}, {"data": b64(png(300))}]})
        self.assertEqual(response.status_code, 200, response.text)
        off, good = response.json()["results"]
        self.assertEqual(off["error"]["code"], "image_urls_disabled")
        self.assertEqual(off["filename"], "a.png")
        self.assertTrue(good["caption"])

    def test_a_body_that_is_not_json_is_refused(self) -> None:
        response = self.client.post("/caption-images", data=b"\xff\xfe", headers={"Content-Type": "application/json"})
        assert_json_error(self, response, 400, "invalid_body")


if __name__ == "__main__":
    unittest.main()
