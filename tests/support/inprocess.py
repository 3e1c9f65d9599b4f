"""The in-process tier: the real app (`create_app`) and service on the tiny BLIP checkpoint, driven through
Flask's test client with the interface of `requests`, so that an HTTP contract test reads the same whether it
talks to this or to a live server. No server process, no Redis: an in-process cache.
"""
from __future__ import annotations

import functools
import json
import unittest
from typing import Any, ClassVar
from urllib.parse import urlencode

from urllib3 import encode_multipart_formdata
from werkzeug.datastructures import Headers

from support.tiny_models import tiny_checkpoint


@functools.cache
def tiny_blip() -> Any:
    """The tiny BLIP captioner, loaded once per test process (loading imports torch and transformers)."""
    from captioners import create_captioner

    captioner = create_captioner("blip", str(tiny_checkpoint("blip")), dtype="float32")
    captioner.load()
    return captioner


@functools.cache
def tagger() -> Any:
    """The real spaCy tagger, loaded once per test process."""
    from tagging import Tagger

    loaded = Tagger()
    loaded.load()
    return loaded


class Reply:
    """A Flask test response with the attributes of a `requests.Response` the tests use."""

    def __init__(self, response: Any) -> None:
        self.status_code = response.status_code
        self.headers = Headers(response.headers)  # case-insensitive, like requests'
        self.content = response.get_data()
        self.text = self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class AppClient:
    """`requests`-like calls on a Flask app: request(), get(), post(), post_images()."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.client = app.test_client()

    def request(self, method: str, path: str, *, files: list[tuple[str, Any]] | None = None,
                data: Any = None, headers: dict[str, str] | None = None, **options: Any) -> Reply:
        """`files`, `data` and `json` as requests takes them: files as (field, (filename, bytes)) pairs; data a
        dict of form fields (sent with the files as multipart) or raw bytes; json a value sent as a JSON body."""
        headers = dict(headers or {})
        body = data
        if options.get("json") is not None:
            body, headers["Content-Type"] = json.dumps(options["json"]), "application/json"
        elif files is not None:  # as requests: multipart with the files, else a dict is a urlencoded form
            fields = list((data or {}).items()) + [(field, value) for field, value in files]
            body, headers["Content-Type"] = encode_multipart_formdata(fields)
        elif isinstance(data, dict):
            body, headers["Content-Type"] = urlencode(data), "application/x-www-form-urlencoded"
        return Reply(self.client.open(path, method=method, data=body, headers=headers))

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Reply:
        return self.request("POST", path, **kwargs)

    def post_images(self, files: list[tuple[str, bytes]], prompt: str | None = None, **kwargs: Any) -> Reply:
        """POST /caption-images with these (filename, bytes) files under `images`."""
        return self.post("/caption-images", files=[("images", file) for file in files],
                         data={"prompt": prompt} if prompt is not None else None, **kwargs)


class InProcessTestCase(unittest.TestCase):
    """One app + started service per test class, on the tiny BLIP checkpoint and an in-process cache.

    `settings` are Config fields for the class; `start` False leaves the service unstarted (503 not_ready).
    """

    settings: ClassVar[dict[str, Any]] = {}
    start: ClassVar[bool] = True

    @classmethod
    def setUpClass(cls) -> None:
        from app import create_app
        from cache import MemoryCache
        from config import Config
        from service import CaptionService

        cls.config = Config(warmup=False, **cls.settings)
        # Unstarted, the service has no captioner yet, as while a server loads its model.
        cls.service = CaptionService(cls.config, captioner=tiny_blip() if cls.start else None, tagger=tagger(),
                                     cache=MemoryCache(cls.config.cache_prefix, cls.config.cache_ttl_seconds))
        if cls.start:
            cls.service.start()
        cls.app = create_app(cls.config, service=cls.service)
        cls.client = AppClient(cls.app)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.service.stop()

    def post(self, files: list[tuple[str, bytes]], prompt: str | None = None, **kwargs: Any) -> Reply:
        """POST the files; never a 5xx."""
        response = self.client.post_images(files, prompt, **kwargs)
        self.assertLess(response.status_code, 500, response.text[:500])
        return response

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the service's metrics (0 when it does not exist yet)."""
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return value or 0.0
