"""cache.py against a real redis-server of the tests' own: keys, TTLs, prefix-only clearing, failing open
during outages (killed or frozen Redis), recovery, cross-replica claims, the in-process twin, and open_cache."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import time
import unittest
from typing import Any

import pytest
import redis

from app import caption_status
from cache import (
    SCHEMA_VERSION,
    MemoryCache,
    NullCache,
    RedisCache,
    cache_key,
    fingerprint,
    make_redis_client,
    open_cache,
)
from captioners.base import GenerationParams
from claims import Claims
from config import Config
from metrics import Metrics
from service import Ask, CaptionService
from support.fakes import FakeCaptioner, FakeTagger
from support.services import RedisServer, free_port, unique_prefix

TIMEOUT = 0.25  # REDIS_TIMEOUT_SECONDS the service uses by default
VALUE = {"caption": "a dog on a beach", "tags": ["dog", "beach", "dog_beach"], "new_tokens": 6, "stopped": True}


def redis_config(server: RedisServer | None, **changes: Any) -> Config:
    port = server.port if server else free_port()
    return Config(redis_host="127.0.0.1", redis_port=port, redis_timeout_seconds=TIMEOUT, **changes)


class KeyTest(unittest.TestCase):
    pytestmark = pytest.mark.inprocess
    def test_key_is_prefix_schema_fingerprint_sha256(self) -> None:
        digest = hashlib.sha256(b"image bytes").hexdigest()
        self.assertEqual(cache_key("imgcap", "0123456789abcdef", digest),
                         f"imgcap:v{SCHEMA_VERSION}:0123456789abcdef:{digest}")

    def test_fingerprint_is_stable_short_and_order_independent(self) -> None:
        a = fingerprint(family="blip", model="m", prompt=None, params=GenerationParams())
        b = fingerprint(params=GenerationParams(), prompt=None, model="m", family="blip")
        self.assertEqual(a, b)
        self.assertRegex(a, r"^[0-9a-f]{16}$")

    def test_fingerprint_changes_with_each_part(self) -> None:
        base = dict(family="blip", model="Salesforce/blip-image-captioning-base", revision=None, dtype="float32",
                    prompt=None, system_prompt=None, params=GenerationParams(), tagger="tags-v1@3.8",
                    captioner_schema=1)
        changed = dict(family="blip2", model="Salesforce/blip-image-captioning-large", revision="abc123",
                       dtype="bfloat16", prompt="a photo of", system_prompt="be brief",
                       params=GenerationParams(max_new_tokens=31), tagger="tags-v2@3.8", captioner_schema=2)
        seen = {fingerprint(**base)}
        for part, value in changed.items():
            with self.subTest(part):
                other = fingerprint(**{**base, part: value})
                self.assertNotIn(other, seen)
                seen.add(other)
        self.assertNotEqual(fingerprint(**{**base, "prompt": ""}), fingerprint(**base))
        self.assertNotEqual(fingerprint(**{**base, "params": GenerationParams(min_new_tokens=5)}),
                            fingerprint(**base))


class ServiceFingerprintTest(unittest.TestCase):
    """Everything that changes an answer changes the service's cache key (SPEC §5)."""

    pytestmark = pytest.mark.inprocess

    def fp(self, prompt: str | None = None, config: Config | None = None, tagger: str = "tags-v1",
           **captioner: Any) -> str:
        service = CaptionService(config or Config(), captioner=FakeCaptioner(**captioner),
                                 tagger=FakeTagger(tagger), cache=NullCache("p", 1))
        return service.config_fingerprint(Ask(prompt, None, service.params))

    def test_each_part_of_the_configuration_changes_the_fingerprint(self) -> None:
        base = self.fp()
        variants = {
            "prompt": self.fp(prompt="a photo of"),
            "family": self.fp(family="blip2"),
            "checkpoint": self.fp(model_id="Salesforce/blip-image-captioning-large"),
            "revision": self.fp(revision="0123abc"),
            "dtype": self.fp(dtype="bfloat16"),
            "system prompt": self.fp(system_prompt="be brief"),
            "max_new_tokens": self.fp(config=Config(max_new_tokens=31)),
            "min_new_tokens": self.fp(config=Config(min_new_tokens=3)),
            "tagger": self.fp(tagger="tags-v2"),
        }
        for name, value in variants.items():
            with self.subTest(name):
                self.assertNotEqual(value, base)
        self.assertEqual(len(set(variants.values())), len(variants))
        self.assertEqual(self.fp(), base)
        # settings that do not change the answer must not split the cache
        self.assertEqual(self.fp(config=Config(max_batch_size=2, port=6000, cache_prefix="x")), base)


class _InterleavingCache(MemoryCache):
    """Runs `between` once, right after the next lookup: another request then starts and ends in that gap."""

    between: Any = None

    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        found = super().get_many(keys)
        between, self.between = self.between, None
        if between:
            between()
        return found


class ClaimRaceTest(unittest.TestCase):
    """A request that missed the cache and then won the claim looks again before captioning: the request
    that held the claim may have stored the answer and let go of it in between (single-flight, SPEC §5)."""

    pytestmark = pytest.mark.inprocess

    def test_answer_stored_between_lookup_and_claim_is_not_captioned_again(self) -> None:
        from PIL import Image

        from service import Upload

        captioner, cache = FakeCaptioner(), _InterleavingCache("p", 100)
        service = CaptionService(Config(warmup=False, batch_wait_ms=0), captioner=captioner,
                                 tagger=FakeTagger(), cache=cache)
        service.start()
        self.addCleanup(service.stop)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, "PNG")
        upload = buf.getvalue()
        first: list[Any] = []
        cache.between = lambda: first.extend(service.caption_uploads([Upload("first.png", upload)], None).results)
        answer = service.caption_uploads([Upload("second.png", upload)], None)
        results, status = answer.results, caption_status(answer.errors)
        self.assertEqual(status, 200)
        self.assertIs(first[0]["cached"], False)
        self.assertEqual(results[0]["caption"], "a red square")
        self.assertEqual(captioner.images, 1, "the image was captioned twice")
        self.assertIs(results[0]["cached"], True)


class RedisCacheTest(unittest.TestCase):
    """RedisCache on a healthy Redis."""

    pytestmark = pytest.mark.live

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = RedisServer().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.close()

    def setUp(self) -> None:
        self.prefix = unique_prefix("cache")
        self.raw = self.server.client()
        self.cache = RedisCache(make_redis_client(redis_config(self.server)), self.prefix, 100)
        self.addCleanup(self.cache.close)

    def key(self, name: str) -> str:
        return cache_key(self.prefix, "fp", hashlib.sha256(name.encode()).hexdigest())

    def test_client_has_short_timeouts_and_no_retries(self) -> None:
        kwargs = self.cache.client.connection_pool.connection_kwargs
        self.assertLessEqual(kwargs["socket_timeout"], 0.5)
        self.assertLessEqual(kwargs["socket_connect_timeout"], 0.5)

    def test_round_trip_and_misses(self) -> None:
        keys = [self.key("a"), self.key("b"), self.key("missing")]
        other = {"caption": "übergroße Größe 写真 😀", "tags": [], "new_tokens": 30, "stopped": False}
        self.cache.set_many({keys[0]: VALUE, keys[1]: other})
        self.assertEqual(self.cache.get_many(keys), [VALUE, other, None])
        self.assertEqual(self.cache.get_many([]), [])
        self.cache.set_many({})  # nothing to do, no error

    def test_ttl_is_set_on_every_write(self) -> None:
        k = self.key("ttl")
        self.raw.set(k, "{}")  # written by something that forgot the TTL
        self.assertEqual(self.raw.ttl(k), -1)
        self.cache.set_many({k: VALUE, self.key("ttl2"): VALUE})
        for key in (k, self.key("ttl2")):
            self.assertTrue(0 < self.raw.ttl(key) <= 100, self.raw.ttl(key))
        self.raw.expire(k, 5)
        self.cache.set_many({k: VALUE})  # an overwrite renews the TTL
        self.assertGreater(self.raw.ttl(k), 5)

    def test_damaged_entries_read_as_misses(self) -> None:
        self.raw.set(self.key("bad"), "not json{")
        self.raw.set(self.key("list"), "[1, 2]")
        self.assertEqual(self.cache.get_many([self.key("bad"), self.key("list")]), [None, None])

    def test_entries_without_the_generation_counts_read_as_misses(self) -> None:
        # Written by a version before new_tokens/stopped (the OpenAI API's usage needs them), or wrongly typed
        entries = ['{"caption": "x", "tags": []}', '{"caption": "x", "tags": [], "new_tokens": 3}',
                   '{"caption": "x", "tags": [], "new_tokens": true, "stopped": true}',
                   '{"caption": "x", "tags": [], "new_tokens": -1, "stopped": true}',
                   '{"caption": "x", "tags": [], "new_tokens": 3, "stopped": 1}']
        keys = [self.key(f"old{index}") for index in range(len(entries))]
        for key, entry in zip(keys, entries):
            self.raw.set(key, entry)
        self.assertEqual(self.cache.get_many(keys), [None] * len(entries))

    def test_clear_deletes_only_keys_under_the_prefix(self) -> None:
        mine = [self.key(str(i)) for i in range(5)]
        self.cache.set_many({k: VALUE for k in mine})
        self.cache.try_lock_many(mine[:1], "me", 30)
        others = ["someone-else:key", self.prefix + "x:key", self.prefix[:-1] + ":key", self.prefix,
                  "other:" + self.prefix + ":key", self.prefix.upper() + ":key"]
        for key in others:
            self.raw.set(key, "keep")
        self.raw.hset(self.prefix + "-hash", "f", "keep")
        self.addCleanup(self.raw.delete, *others, self.prefix + "-hash")
        self.assertEqual(self.cache.clear(), 6)  # five entries and one claim
        self.assertEqual(self.raw.keys(self.prefix + ":*"), [])
        for key in others:
            self.assertEqual(self.raw.get(key), "keep", key)
        self.assertEqual(self.raw.hget(self.prefix + "-hash", "f"), "keep")
        self.assertEqual(self.cache.clear(), 0)

    def test_clear_escapes_glob_characters_in_the_prefix(self) -> None:
        base = unique_prefix("glob")
        prefix = base + "*?[ab]\\"
        cache = RedisCache(make_redis_client(redis_config(self.server)), prefix, 100)
        self.addCleanup(cache.close)
        cache.set_many({prefix + ":one": VALUE, prefix + ":two": VALUE})
        # other programs' keys that the prefix's pattern matches if its glob characters are left unescaped
        lookalikes = [base + "XYa:k", base + "-?b:k", base + "***a:k", base + "0000b:k:lock"]
        for key in lookalikes:
            self.raw.set(key, "keep")
        self.addCleanup(self.raw.delete, *lookalikes)
        unescaped = set(self.raw.scan_iter(match=prefix + ":*", count=1000))
        self.assertTrue(set(lookalikes) <= unescaped, "the look-alike keys do not test the escaping")
        self.assertEqual(cache.clear(), 2)
        for key in lookalikes:
            self.assertEqual(self.raw.get(key), "keep", key)

    def test_clear_handles_many_keys(self) -> None:
        pipe = self.raw.pipeline(transaction=False)
        for i in range(2500):
            pipe.set(f"{self.prefix}:k{i}", "1")
        pipe.execute()
        self.raw.set(self.prefix + "-other:k", "keep")
        self.addCleanup(self.raw.delete, self.prefix + "-other:k")
        self.assertEqual(self.cache.clear(), 2500)
        self.assertEqual(self.raw.get(self.prefix + "-other:k"), "keep")


class RedisOutageTest(unittest.TestCase):
    """RedisCache fails open while its Redis is down, logs each outage once, and recovers by itself."""

    pytestmark = pytest.mark.live

    def setUp(self) -> None:
        self.server = RedisServer().start()
        self.addCleanup(self.server.close)
        self.metrics = Metrics()
        self.prefix = unique_prefix("outage")
        self.cache = RedisCache(make_redis_client(redis_config(self.server)), self.prefix, 100,
                                metrics=self.metrics, target=f"redis://127.0.0.1:{self.server.port}/0")
        self.addCleanup(self.cache.close)
        self.keys = [f"{self.prefix}:v1:fp:{i}" for i in range(3)]
        self.cache.set_many({self.keys[0]: VALUE})
        self.assertEqual(self.cache.get_many(self.keys[:1]), [VALUE])

    def redis_up_gauge(self) -> float:
        return self.metrics.redis_up._value.get()

    def exercise(self) -> list[float]:
        """Every operation a request makes; returns how long each took."""
        durations = []
        for operation in (lambda: self.assertEqual(self.cache.get_many(self.keys), [None] * 3),
                          lambda: self.cache.set_many({self.keys[1]: VALUE}),
                          lambda: self.assertEqual(self.cache.try_lock_many(self.keys, "me", 5), [True] * 3),
                          lambda: self.cache.unlock_many(self.keys, "me"),
                          lambda: self.assertEqual(self.cache.peek_many(self.keys), [(None, False)] * 3)):
            started = time.monotonic()
            operation()
            durations.append(time.monotonic() - started)
        return durations

    def outage_lines(self, logs: list[str]) -> list[str]:
        return [line for line in logs if "is unavailable" in line]

    def test_killed_redis_fails_open_logs_once_and_recovers(self) -> None:
        self.server.stop()
        with self.assertLogs("cache", logging.WARNING) as logs:
            for _ in range(3):
                durations = self.exercise()
                self.assertLess(max(durations), 0.5, durations)
            time.sleep(self.cache.retry_interval + 0.1)  # past the retry interval: Redis is tried again ...
            self.exercise()
            self.assertFalse(self.cache.available())
        self.assertEqual(len(self.outage_lines(logs.output)), 1, logs.output)  # ... and still logged once
        self.assertIn(str(self.server.port), self.outage_lines(logs.output)[0])
        self.assertEqual(self.redis_up_gauge(), 0)
        with self.assertRaises(redis.RedisError):
            self.cache.clear()  # the operator asked for it: say it failed rather than "0 deleted"

        self.server.start()  # same port, empty (no persistence)
        time.sleep(self.cache.retry_interval + 0.1)
        with self.assertLogs("cache", logging.WARNING) as logs:
            self.cache.set_many({self.keys[2]: VALUE})
            self.assertEqual(self.cache.get_many(self.keys[2:]), [VALUE])
        self.assertEqual(len([line for line in logs.output if "is back" in line]), 1, logs.output)
        self.assertEqual(self.server.client().ttl(self.keys[2]) > 0, True)
        self.assertEqual(self.redis_up_gauge(), 1)
        self.assertTrue(self.cache.available())

    def test_each_outage_is_logged_once(self) -> None:
        with self.assertLogs("cache", logging.WARNING) as logs:
            for _ in range(2):
                self.server.stop()
                for _ in range(3):
                    self.cache.get_many(self.keys)
                self.server.start()
                time.sleep(self.cache.retry_interval + 0.1)
                self.cache.get_many(self.keys)
        self.assertEqual(len(self.outage_lines(logs.output)), 2, logs.output)
        self.assertEqual(len([line for line in logs.output if "is back" in line]), 2, logs.output)

    def test_frozen_redis_costs_at_most_one_timeout_per_retry_interval(self) -> None:
        os.kill(self.server.process.pid, signal.SIGSTOP)
        try:
            with self.assertLogs("cache", logging.WARNING) as logs:
                started = time.monotonic()
                durations = self.exercise() + self.exercise()
                total = time.monotonic() - started
            self.assertLess(total, 3 * TIMEOUT + 0.5, durations)  # one timeout, then skipped until the retry
            self.assertLess(max(durations), TIMEOUT + 0.5, durations)
            self.assertEqual(len(self.outage_lines(logs.output)), 1, logs.output)
            self.assertIn("Timeout", self.outage_lines(logs.output)[0])
        finally:
            os.kill(self.server.process.pid, signal.SIGCONT)
        time.sleep(self.cache.retry_interval + 0.1)
        self.assertEqual(self.cache.get_many(self.keys[:1]), [VALUE])  # nothing was lost while it was frozen

    def test_within_the_retry_interval_redis_is_not_asked(self) -> None:
        self.server.stop()
        self.assertEqual(self.cache.get_many(self.keys[:1]), [None])
        self.server.start()
        self.server.client().set(self.keys[0], json.dumps(VALUE))
        self.assertEqual(self.cache.get_many(self.keys[:1]), [None])  # still inside the retry interval
        time.sleep(self.cache.retry_interval + 0.1)
        self.assertEqual(self.cache.get_many(self.keys[:1]), [VALUE])


class MemoryCacheTest(unittest.TestCase):

    pytestmark = pytest.mark.inprocess
    def test_round_trip_and_ttl(self) -> None:
        cache = MemoryCache("p", ttl_seconds=1)
        cache.set_many({"p:a": VALUE})
        self.assertEqual(cache.get_many(["p:a", "p:b"]), [VALUE, None])
        time.sleep(1.1)
        self.assertEqual(cache.get_many(["p:a"]), [None])
        self.assertEqual(cache.clear(), 0)  # expired entries are gone

    def test_least_recently_used_entry_goes_first(self) -> None:
        cache = MemoryCache("p", ttl_seconds=100, max_entries=3)
        cache.set_many({"p:a": {"n": 1}, "p:b": {"n": 2}, "p:c": {"n": 3}})
        cache.get_many(["p:a"])  # a is now the most recently used
        cache.set_many({"p:d": {"n": 4}})
        self.assertEqual(cache.get_many(["p:a", "p:b", "p:c", "p:d"]), [{"n": 1}, None, {"n": 3}, {"n": 4}])

    def test_clear_deletes_only_its_prefix(self) -> None:
        cache = MemoryCache("p", ttl_seconds=100)
        cache.set_many({"p:a": VALUE, "p:b": VALUE, "px:c": VALUE, "q:d": VALUE})
        self.assertEqual(cache.clear(), 2)
        self.assertEqual(cache.get_many(["p:a", "px:c", "q:d"]), [None, VALUE, VALUE])

    def test_claims_are_always_granted_in_process(self) -> None:
        cache = MemoryCache("p", ttl_seconds=100)
        claims = Claims.for_cache(cache, 5)
        self.assertEqual(claims.acquire(["p:a", "p:a"]).ours, ["p:a"])
        self.assertEqual(claims.acquire(["p:a"]).ours, ["p:a"])  # nothing to share a claim with
        self.assertEqual(cache.peek_many(["p:a"]), [(None, False)])
        self.assertTrue(cache.available())

    def test_null_cache_stores_nothing(self) -> None:
        cache = NullCache("p", 100)
        cache.set_many({"p:a": VALUE})
        self.assertEqual(cache.get_many(["p:a"]), [None])
        self.assertEqual(cache.clear(), 0)
        self.assertEqual(cache.backend, "off")


class OpenCacheTest(unittest.TestCase):

    pytestmark = pytest.mark.live
    def test_auto_with_redis_is_redis(self) -> None:
        server = RedisServer().start()
        self.addCleanup(server.close)
        cache = open_cache(redis_config(server, cache_prefix="x"))
        self.addCleanup(cache.close)
        self.assertIsInstance(cache, RedisCache)
        self.assertEqual((cache.backend, cache.prefix, cache.ttl_seconds), ("redis", "x", 86400))

    def test_redis_url_overrides_host_and_port(self) -> None:
        server = RedisServer().start()
        self.addCleanup(server.close)
        config = Config(redis_url=server.url, redis_port=free_port(), redis_timeout_seconds=TIMEOUT)
        cache = open_cache(config)
        self.addCleanup(cache.close)
        self.assertIsInstance(cache, RedisCache)
        self.assertTrue(cache.available())

    def test_auto_without_redis_is_memory_and_says_so(self) -> None:
        metrics = Metrics()
        config = redis_config(None)
        started = time.monotonic()
        with self.assertLogs("cache", logging.WARNING) as logs:
            cache = open_cache(config, metrics)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIsInstance(cache, MemoryCache)
        self.assertEqual(cache.backend, "memory")
        self.assertIn(config.redis_target, "\n".join(logs.output))
        self.assertEqual(metrics.redis_up._value.get(), 0)

    def test_redis_requested_but_down_is_still_redis(self) -> None:
        with self.assertLogs("cache", logging.WARNING):
            cache = open_cache(redis_config(None, cache_backend="redis"))
        self.addCleanup(cache.close)
        self.assertIsInstance(cache, RedisCache)
        self.assertFalse(cache.available())
        self.assertEqual(cache.get_many(["k"]), [None])

    def test_off_and_memory(self) -> None:
        self.assertIsInstance(open_cache(redis_config(None, cache_backend="off")), NullCache)
        memory = open_cache(redis_config(None, cache_backend="memory", memory_cache_max_entries=7))
        self.assertIsInstance(memory, MemoryCache)
        self.assertEqual(memory.max_entries, 7)

    def test_log_target_never_shows_the_password(self) -> None:
        config = Config(redis_url="redis://:s3cret@cache.internal:6380/2")
        self.assertEqual(config.redis_target, "redis://cache.internal:6380/2")
        self.assertNotIn("s3cret", Config(redis_password="s3cret").redis_target)


if __name__ == "__main__":
    unittest.main()
