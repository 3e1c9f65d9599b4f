"""Start-up on BLIP as a real server process: without a Redis (the in-process cache), and without the weights."""
from __future__ import annotations

import re
import tempfile
import time
import unittest

import pytest

from support.services import ServerProcess, free_port
from support.tiny_models import tiny_checkpoint
from support.webtest import sample_uploads

pytestmark = pytest.mark.live


class NoRedisTest(unittest.TestCase):
    """With nothing listening on the Redis port, the server runs on its in-process cache."""

    def test_in_process_cache_when_redis_is_unreachable(self) -> None:
        server = ServerProcess(["--model-path", str(tiny_checkpoint("blip"))],
                               env={"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(free_port())})
        try:
            server.start()
            files = sample_uploads()
            first = server.post_images(files).json()["results"]
            second = server.post_images(files).json()["results"]
            self.assertEqual([r["cached"] for r in first], [False, False])
            self.assertEqual([r["cached"] for r in second], [True, True])
            self.assertEqual([r["caption"] for r in first], [r["caption"] for r in second])
            self.assertRegex(server.log(), r"no Redis reachable at redis://127\.0\.0\.1:\d+/0; using an in-process "
                                           r"memory cache")
            ready = server.session.get(server.url + "/readyz").json()
            self.assertEqual(ready["cache"]["backend"], "memory")
            # It says which cache it cleared: here not Redis (issue 11).
            self.assertEqual(server.session.get(server.url + "/reset-redis").json(),
                             {"message": "In-process cache cleared (no Redis is in use)", "deleted": 2})
        finally:
            server.stop()


class OfflineStartTest(unittest.TestCase):
    """Without the weights and without network, start-up stops within seconds with a useful message."""

    def test_default_checkpoint_unavailable(self) -> None:
        with tempfile.TemporaryDirectory() as hf_home:
            env = {"HF_HOME": hf_home, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "",
                   "TRANSFORMERS_OFFLINE": "", "REDIS_PORT": str(free_port())}
            server = ServerProcess([], env=env)
            started = time.monotonic()
            server.start(wait_ready=False)
            try:
                code = server.wait_exit(60)
            finally:
                server.stop()
            elapsed = time.monotonic() - started
            log = server.log()
        self.assertEqual(code, 1, log)
        self.assertLess(elapsed, 30, log)
        self.assertIn("Salesforce/blip-image-captioning-base", log)
        self.assertIn("--model-path", log)
        self.assertIn("HF_HOME", log)
        self.assertNotIn("Traceback", log)
        self.assertTrue(re.search(r"not in the Hugging Face cache", log), log)


if __name__ == "__main__":
    unittest.main()
