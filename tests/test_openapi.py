"""The OpenAPI document at /openapi.json: what it lists, and live responses of a real server checked against it.

The fuzzing test drives schemathesis (property-based requests generated from the document) against a real server
process on the tiny BLIP checkpoint with a real redis-server: no 5xx, and every response's status code, content
type, headers and body as documented.
"""
from __future__ import annotations

import copy
import re
import time
import unittest
from typing import Any

import pytest
import requests

from support.live import LiveServerTestCase
from support.tiny_models import image_bytes, sample_images

PATHS = ("/caption-images", "/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/reset-redis", "/healthz",
         "/readyz", "/metrics", "/openapi.json", "/")
OPERATIONS = {"POST /caption-images", "GET /v1/models", "GET /v1/models/{model_id}", "POST /v1/chat/completions",
              "GET /reset-redis", "POST /reset-redis", "GET /healthz", "GET /readyz", "GET /metrics", "GET /"}
ADMIN_TOKEN = "test-admin-token"
MAX_REQUEST_BYTES = 4_000_000  # small enough that a test can send a larger body quickly
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXAMPLES_PER_OPERATION = {"POST /caption-images": 75, "POST /v1/chat/completions": 50}  # operations with a body
DEFAULT_EXAMPLES = 10


def _schemathesis() -> Any:
    try:
        import schemathesis
    except ImportError:  # a dev requirement; without it the fuzzing test cannot run
        raise unittest.SkipTest("schemathesis is not installed (pip install -r requirements-dev.txt)") from None
    return schemathesis


def _checks() -> list[Any]:
    """The response checks: no 5xx; status code, content type, headers and body as documented."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
            response_schema_conformance]


def _json_schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    """components/schemas/<name> as plain JSON Schema (OpenAPI 3.0 `nullable` turned into a null type)."""

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: convert(value) for key, value in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        return node

    return {"$ref": f"#/components/schemas/{name}", "components": convert(copy.deepcopy(document["components"]))}


class OpenApiDocumentTest(unittest.TestCase):
    """The document itself, built from a configuration without a server."""

    pytestmark = pytest.mark.inprocess

    def setUp(self) -> None:
        from config import Config
        from openapi import openapi_document

        self.config = Config()
        self.document = openapi_document(self.config)

    def test_lists_every_endpoint_and_method(self) -> None:
        self.assertTrue(self.document["openapi"].startswith("3.0."))
        self.assertEqual(set(self.document["paths"]), set(PATHS))
        methods = {path: set(item) for path, item in self.document["paths"].items()}
        self.assertEqual(methods["/caption-images"], {"post"})
        self.assertEqual(methods["/v1/chat/completions"], {"post"})
        self.assertEqual(methods["/reset-redis"], {"get", "post"})
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/"):
            self.assertEqual(methods[path], {"get"}, path)

    def test_matches_the_flask_routes(self) -> None:
        from app import create_app

        app = create_app(self.config)
        routes = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
                  for rule in app.url_map.iter_rules() if rule.endpoint != "static"
                  for method in rule.methods - {"HEAD", "OPTIONS"}}
        documented = {(path, method) for path, item in self.document["paths"].items() for method in item}
        self.assertEqual(documented, routes)

    def test_every_error_code_of_the_code_is_documented(self) -> None:
        import app
        import errors
        from openapi import ERROR_CODES, FILE_ERROR_CODES, REQUEST_ERROR_CODES

        def subclasses(cls: type) -> list[type]:
            return [cls] + [s for sub in cls.__subclasses__() for s in subclasses(sub)]

        for cls in subclasses(errors.ServiceError)[1:]:  # every concrete error (the base has no code)
            self.assertIn(cls.code, ERROR_CODES, cls.__name__)
            if cls is not errors.HttpError:
                self.assertEqual(ERROR_CODES[cls.code][0], cls.status_code, cls.__name__)
        for status, cls in app.HTTP_ERRORS.items():
            self.assertEqual(REQUEST_ERROR_CODES[cls.code][0], status, cls.code)
        for cls in subclasses(errors.BadImageError):
            self.assertIn(cls.code, FILE_ERROR_CODES, cls.__name__)
        for code in ("prompt_too_long", "cache_unavailable", "not_ready", "overloaded"):
            self.assertIn(code, REQUEST_ERROR_CODES)
        schemas = self.document["components"]["schemas"]
        self.assertEqual(schemas["Error"]["properties"]["code"]["enum"], list(REQUEST_ERROR_CODES))
        self.assertEqual(schemas["FileError"]["properties"]["code"]["enum"], list(FILE_ERROR_CODES))

    def test_every_error_class_is_described_and_in_the_readme(self) -> None:
        import errors
        from support.services import REPO_ROOT

        readme = (REPO_ROOT / "README.md").read_text()
        classes = errors.error_classes()
        self.assertGreaterEqual(len(classes), 30)
        for code, cls in classes.items():
            with self.subTest(code=code):
                self.assertRegex(code, r"^[a-z]+(_[a-z0-9]+)*$")
                self.assertGreater(len(errors.description(cls)), 15, f"{cls.__name__} needs a docstring")
                self.assertIn(f"`{code}`", readme, f"{code} is not in the README's error tables")
                self.assertIn(f"`{code}`", self.document["info"]["description"])

    def test_limits_and_security_follow_the_configuration(self) -> None:
        from openapi import openapi_document

        def images_field(document: dict[str, Any]) -> dict[str, Any]:
            body = document["paths"]["/caption-images"]["post"]["requestBody"]["content"]["multipart/form-data"]
            return body["schema"]["properties"]["images"]

        self.assertEqual(images_field(self.document)["maxItems"], self.config.max_files_per_request)
        self.assertEqual(self.document["paths"]["/reset-redis"]["get"]["security"], [])
        self.assertNotIn("401", self.document["paths"]["/reset-redis"]["get"]["responses"])

        guarded = openapi_document(self.config.replace(admin_token="x", max_files_per_request=5))
        self.assertEqual(images_field(guarded)["maxItems"], 5)
        for method in ("get", "post"):
            operation = guarded["paths"]["/reset-redis"][method]
            self.assertEqual(operation["security"], [{"adminToken": []}])
            self.assertIn("401", operation["responses"])
        self.assertEqual(guarded["components"]["securitySchemes"]["adminToken"],
                         {"type": "http", "scheme": "bearer", "description": "The server's ADMIN_TOKEN."})

    def test_schemathesis_loads_every_operation(self) -> None:
        schemathesis = _schemathesis()
        schema = schemathesis.openapi.from_dict(self.document)
        labels = {result.ok().label for result in schema.get_all_operations()}
        self.assertEqual(labels, OPERATIONS | {"GET /openapi.json"})


class LiveServerSchemaTest(LiveServerTestCase):
    """A real server (tiny BLIP, real Redis, ADMIN_TOKEN set) checked against the document it serves."""

    pytestmark = pytest.mark.live
    # IMAGE_URLS=off: generated requests hold URLs of anywhere, and tests send traffic to their own servers only.
    server_env = {"ADMIN_TOKEN": ADMIN_TOKEN, "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES), "IMAGE_URLS": "off"}
    own_redis = True  # test_redis_down_reset_is_documented_503 stops it

    @classmethod
    def setUpClass(cls) -> None:
        cls.schemathesis = _schemathesis()
        super().setUpClass()
        try:
            response = requests.get(cls.server.url + "/openapi.json", timeout=10)
            assert response.status_code == 200, f"/openapi.json answered {response.status_code}: {response.text}"
            cls.document = response.json()
            cls.schema = cls.schemathesis.openapi.from_url(cls.server.url + "/openapi.json")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def while_loading(cls) -> None:
        cls.answered_while_loading = cls._requests_while_loading()

    @classmethod
    def _requests_while_loading(cls) -> dict[str, requests.Response]:
        """/readyz and a caption request answered before the model is ready (the server listens first)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ready = requests.get(cls.server.url + "/readyz", timeout=5)
            except requests.ConnectionError:
                time.sleep(0.02)
                continue
            if ready.status_code != 503:
                return {}  # already warmed up: nothing to check
            caption = cls.server.post_images([("a.png", image_bytes(sample_images()[0]))])
            return {"readyz": ready, "caption": caption} if caption.status_code == 503 else {}
        return {}

    def conforms(self, method: str, path: str, response: requests.Response) -> None:
        """Assert that `response` to METHOD PATH is documented (status, content type, headers, body)."""
        case = self.schema[path][method].Case()
        case.validate_response(response, checks=_checks()[1:])  # 5xx are checked by the callers where they matter

    def test_served_document_is_openapi_document_of_the_config(self) -> None:
        self.assertEqual(set(self.document["paths"]), set(PATHS))
        self.assertEqual(self.document["paths"]["/reset-redis"]["get"]["security"], [{"adminToken": []}])

    def test_fuzz_every_operation(self) -> None:
        """schemathesis: positive and negative requests; no 5xx, every response as documented."""
        from hypothesis import HealthCheck, given, settings

        GenerationMode = self.schemathesis.GenerationMode
        checks = _checks()
        session = requests.Session()
        self.addCleanup(session.close)
        counts: dict[str, int] = {}
        for result in self.schema.get_all_operations():
            operation = result.ok()
            # Only a request body can be made invalid (the other operations take a free-form header only).
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
            for mode in modes:
                examples = EXAMPLES_PER_OPERATION.get(operation.label, DEFAULT_EXAMPLES)

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), print_blob=True)
                @given(case=operation.as_strategy(mode, headers=AUTH))
                def run(case: Any) -> None:
                    counts[operation.label] = counts.get(operation.label, 0) + 1
                    case.call_and_validate(session=session, checks=checks, timeout=30)

                with self.subTest(operation=operation.label, mode=str(mode)):
                    run()
        # schemathesis leaves out the operation it loaded the document from (/openapi.json): the hand-made test
        # below checks that one.
        self.assertEqual(set(counts), OPERATIONS)

    def test_hand_made_requests_conform(self) -> None:
        """Success, per-file error, all files refused, request errors, auth: each as the document says."""
        images = [image_bytes(image) for image in sample_images()]
        text = ("notes.txt", b"not an image\n")

        ok = self.server.post_images([("a.png", images[0]), ("b.png", images[1])])
        self.assertEqual(ok.status_code, 200, ok.text)
        self.conforms("POST", "/caption-images", ok)
        mixed = self.server.post_images([("c.png", images[2]), text], prompt="a photo of")
        self.assertEqual(mixed.status_code, 200, mixed.text)
        self.assertIn("error", mixed.json()["results"][1])
        self.conforms("POST", "/caption-images", mixed)
        cached = self.server.post_images([("a.png", images[0])])
        self.assertIs(cached.json()["results"][0]["cached"], True)
        self.conforms("POST", "/caption-images", cached)

        for files, data, status, code in (
                ([text], None, 415, None),
                ([("empty.png", b"")], None, 400, None),
                ([], {"prompt": "x"}, 400, "no_images"),
                ([("a.png", images[0])], {"prompt": "x" * 2001}, 400, "prompt_too_long"),
                ([("a.png", images[0])] * 33, None, 413, "too_many_files"),
                ([("big.png", b"\0" * MAX_REQUEST_BYTES)], None, 413, "request_too_large")):
            with self.subTest(status=status, code=code):
                response = requests.post(self.server.url + "/caption-images", data=data, timeout=60,
                                         files=[("images", file) for file in files] or None)
                self.assertEqual(response.status_code, status, response.text)
                if code:
                    self.assertEqual(response.json()["error"]["code"], code)
                else:
                    self.assertIn("error", response.json()["results"][0])
                self.conforms("POST", "/caption-images", response)

        for method in ("GET", "POST"):
            denied = requests.request(method, self.server.url + "/reset-redis", timeout=10)
            self.assertEqual((denied.status_code, denied.json()["error"]["code"]), (401, "unauthorized"))
            self.conforms(method, "/reset-redis", denied)
            wrong = requests.request(method, self.server.url + "/reset-redis", timeout=10,
                                     headers={"Authorization": "Bearer nope"})
            self.assertEqual(wrong.status_code, 401)
            reset = requests.request(method, self.server.url + "/reset-redis", headers=AUTH, timeout=10)
            self.assertEqual(reset.status_code, 200, reset.text)
            self.conforms(method, "/reset-redis", reset)

        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/"):
            with self.subTest(path=path):
                response = requests.get(self.server.url + path, timeout=10)
                self.assertEqual(response.status_code, 200)
                self.conforms("GET", path, response)

    def test_json_and_openai_requests_conform(self) -> None:
        """The JSON form and the OpenAI-compatible routes answer as the document says, errors included."""
        import base64

        image = base64.b64encode(image_bytes(sample_images()[0])).decode()
        caption = self.server.url + "/caption-images"
        for body, status, code in (
                ({"images": [{"data": image}, {"data": "@@"}, {"url": "http://example.com/a.png"}]}, 200, None),
                ({"images": [{"url": "http://example.com/a.png"}]}, 400, None),
                ({"images": [{"data": image}], "max_new_tokens": 10_000}, 400, "invalid_option"),
                ({"images": [{"data": image, "url": "http://x"}]}, 400, "invalid_body")):
            with self.subTest(body=str(body)[:80]):
                response = requests.post(caption, json=body, timeout=60)
                self.assertEqual(response.status_code, status, response.text)
                if code:
                    self.assertEqual(response.json()["error"]["code"], code)
                self.conforms("POST", "/caption-images", response)
        results = requests.post(caption, json={"images": [{"url": "http://example.com/a.png"}]}, timeout=60).json()
        self.assertEqual(results["results"][0]["error"]["code"], "image_urls_disabled")

        models = requests.get(self.server.url + "/v1/models", timeout=10)
        self.assertEqual(models.status_code, 200)
        self.conforms("GET", "/v1/models", models)
        model_id = models.json()["data"][0]["id"]
        for name, status in ((model_id, 200), ("gpt-4o", 404)):
            response = requests.get(f"{self.server.url}/v1/models/{name}", timeout=10)
            self.assertEqual(response.status_code, status, response.text)
            self.conforms("GET", "/v1/models/{model_id}", response)
        user = [{"role": "user", "content": [{"type": "text", "text": "a photo of"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]
        chat = self.server.url + "/v1/chat/completions"
        for body, status in (({"model": model_id, "messages": user}, 200),
                             ({"model": model_id, "messages": user, "stream": True}, 200),
                             ({"model": model_id, "messages": user, "temperature": 1}, 400),
                             ({"messages": []}, 400), ({"model": model_id, "messages": [{"role": "user"}]}, 400)):
            with self.subTest(body=str(body)[:80]):
                response = requests.post(chat, json=body, timeout=60)
                self.assertEqual(response.status_code, status, response.text)
                if status != 200:
                    self.assertEqual(set(response.json()["error"]), {"message", "type", "code", "param"})
                self.conforms("POST", "/v1/chat/completions", response)
        unknown = requests.get(self.server.url + "/v1/nope", timeout=10)
        self.assertEqual((unknown.status_code, unknown.json()["error"]["type"]), (404, "not_found_error"))

    def test_responses_while_loading_conform(self) -> None:
        if not self.answered_while_loading:
            self.skipTest("the server was ready before its first answer")  # never seen so far: loading takes s
        ready, caption = self.answered_while_loading["readyz"], self.answered_while_loading["caption"]
        self.assertEqual(ready.json()["status"], "starting")
        self.conforms("GET", "/readyz", ready)
        self.assertEqual(caption.json()["error"]["code"], "not_ready")
        self.assertGreater(int(caption.headers["Retry-After"]), 0)
        self.conforms("POST", "/caption-images", caption)

    def test_redis_down_reset_is_documented_503(self) -> None:
        self.redis.stop()
        try:
            response = requests.get(self.server.url + "/reset-redis", headers=AUTH, timeout=10)
            self.assertEqual((response.status_code, response.json()["error"]["code"]), (503, "cache_unavailable"))
            self.conforms("GET", "/reset-redis", response)
        finally:
            self.redis.start()

    def test_errors_outside_the_operations_are_error_bodies(self) -> None:
        """404, 405 and the HTTP server's own refusals (431) carry the documented ErrorBody and an X-Request-ID."""
        import jsonschema_rs

        validator = jsonschema_rs.Draft4Validator(_json_schema(self.document, "ErrorBody"))
        for method, path, status, headers in (
                ("GET", "/nope", 404, {}), ("GET", "/caption-images", 405, {}), ("DELETE", "/reset-redis", 405, {}),
                ("PUT", "/healthz", 405, {}), ("GET", "/healthz", 431, {"X-Big": "x" * 300_000})):
            with self.subTest(method=method, path=path, status=status):
                response = requests.request(method, self.server.url + path, headers=headers, timeout=10)
                self.assertEqual(response.status_code, status)
                self.assertEqual(response.headers["Content-Type"], "application/json")
                self.assertTrue(response.headers.get("X-Request-ID"))
                errors = [error.message for error in validator.iter_errors(response.json())]
                self.assertEqual(errors, [], response.text)


if __name__ == "__main__":
    unittest.main()
