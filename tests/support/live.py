"""The live tier's fixture: a redis-server and `python app.py` as a real process, with its log captured.

    class MyTest(LiveServerTestCase):
        server_env = {"ADMIN_TOKEN": "x"}      # settings of this class's server
        own_redis = True                       # a redis-server of its own (for tests that stop or freeze it)

The class gets `server` (a ServerProcess on the tiny BLIP checkpoint), `redis` (its RedisServer, or None with
`use_redis = False`) and `prefix` (the class's own CACHE_PREFIX); the server is stopped after the class. A class
that wants to see the server while it loads overrides `while_loading()`.
"""
from __future__ import annotations

import atexit
import unittest
from typing import Any, ClassVar

from support.services import RedisServer, ServerProcess, unique_prefix
from support.tiny_models import tiny_checkpoint
from support.webtest import new_png, post

_SHARED: list[RedisServer] = []


def shared_redis() -> RedisServer:
    """One redis-server for the whole test run (each user keeps to its own key prefix)."""
    if not _SHARED:
        _SHARED.append(RedisServer().start())
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


class LiveServerTestCase(unittest.TestCase):
    """One live server process per test class (see the module docstring)."""

    family: ClassVar[str] = "blip"
    server_args: ClassVar[list[str]] = []
    server_env: ClassVar[dict[str, str]] = {}
    use_redis: ClassVar[bool] = True
    own_redis: ClassVar[bool] = False
    server: ClassVar[ServerProcess]
    redis: ClassVar[RedisServer | None]

    @classmethod
    def setUpClass(cls) -> None:
        from captioners import FAMILIES

        cls.prefix = unique_prefix(cls.__name__.lower()[:12])
        cls.redis = None
        env = {"CACHE_PREFIX": cls.prefix, **cls.server_env}
        if cls.use_redis:
            cls.redis = RedisServer().start() if cls.own_redis else shared_redis()
            env["REDIS_URL"] = cls.redis.url
        else:
            env.setdefault("CACHE_BACKEND", "memory")
        cls.server = ServerProcess([FAMILIES[cls.family].flag, "--model-path", str(tiny_checkpoint(cls.family)),
                                    *cls.server_args], env=env)
        try:
            cls.server.start(wait_ready=False)
            cls.while_loading()
            cls.server.wait_ready()  # stops the process itself if it never gets ready
        except BaseException:
            cls.server.stop()
            cls._close_redis()
            raise

    @classmethod
    def while_loading(cls) -> None:
        """Runs between the process start and its readiness (the server listens while it loads the model)."""

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls._close_redis()

    @classmethod
    def _close_redis(cls) -> None:
        if cls.own_redis and cls.redis is not None:
            cls.redis.close()

    def post(self, files: list[tuple[str, bytes]], prompt: str | None = None, timeout: float = 120) -> Any:
        """POST the files on a fresh connection; never a 5xx."""
        response = post(self.server.url, files, prompt, timeout)
        self.assertLess(response.status_code, 500, response.text[:500])
        return response

    def assert_still_serving(self) -> None:
        """The process is alive and captions a new image."""
        self.assertIsNone(self.server.process.poll(), "the server process died")
        response = self.post([("after.png", new_png())])
        self.assertEqual(response.status_code, 200, response.text)
        self.assertTrue(response.json()["results"][0]["caption"])

    def log_count(self, text: str) -> int:
        return self.server.log().count(text)
