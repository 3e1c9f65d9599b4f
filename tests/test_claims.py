"""The cross-replica claim protocol (claims.py) and the lock primitives under it: one contract, run against a
real redis-server (two clients: two replicas) and against the in-process twin (one MemoryCache that two Claims
objects share, as two replicas share one Redis)."""
from __future__ import annotations

import hashlib
import threading
import time
import unittest
from typing import Any

import pytest

from cache import Cache, MemoryCache, RedisCache, cache_key, make_redis_client
from claims import Claims
from config import Config
from support.live import shared_redis
from support.services import unique_prefix

VALUE = {"caption": "a dog on a beach", "tags": ["dog", "beach", "dog_beach"], "new_tokens": 6, "stopped": True}


class ClaimsContract:
    """The behaviour both backends must have; a subclass gives `pair()`, two replicas' views of one store."""

    prefix: str

    def pair(self) -> tuple[Cache, Cache]:
        raise NotImplementedError

    def locks_left(self) -> int:
        raise NotImplementedError

    def key(self, name: str) -> str:
        return cache_key(self.prefix, "fp", hashlib.sha256(name.encode()).hexdigest())

    # ----- the primitives --------------------------------------------------------------------------------
    def test_lock_primitives_between_two_replicas(self: Any) -> None:
        a, b = self.pair()
        k1, k2, k3 = self.key("1"), self.key("2"), self.key("3")
        self.assertEqual(a.try_lock_many([k1, k2], "a", 30), [True, True])
        self.assertEqual(b.try_lock_many([k1, k3], "b", 30), [False, True])
        self.assertEqual(a.try_lock_many([k1], "a", 30), [False])  # a claim is not re-entrant
        self.assertEqual(b.peek_many([k1, k2]), [(None, True), (None, True)])

        b.unlock_many([k1], "b")  # not b's claim: stays
        self.assertEqual(b.peek_many([k1]), [(None, True)])
        a.set_many({k1: VALUE})
        self.assertEqual(b.peek_many([k1]), [(VALUE, True)])
        a.unlock_many([k1, k2], "a")
        self.assertEqual(b.peek_many([k1, k2]), [(VALUE, False), (None, False)])
        self.assertEqual(b.try_lock_many([k2], "b", 30), [True])
        self.assertEqual(a.try_lock_many([], "a", 30), [])
        self.assertEqual(a.peek_many([]), [])
        b.unlock_many([k2, k3], "b")
        self.assertEqual(self.locks_left(), 0)

    def test_lock_primitives_expire(self: Any) -> None:
        a, b = self.pair()
        k = self.key("expiring")
        self.assertEqual(a.try_lock_many([k], "a", 0.2), [True])
        self.assertEqual(b.try_lock_many([k], "b", 30), [False])
        time.sleep(0.4)
        self.assertEqual(b.peek_many([k]), [(None, False)])
        self.assertEqual(b.try_lock_many([k], "b", 30), [True])  # a's claim ran out: b may take it
        a.unlock_many([k], "a")  # a must not remove b's claim
        self.assertEqual(a.peek_many([k]), [(None, True)])
        b.unlock_many([k], "b")
        self.assertEqual(a.peek_many([k]), [(None, False)])

    # ----- the protocol ----------------------------------------------------------------------------------
    def test_acquire_says_ours_theirs_and_stored(self: Any) -> None:
        cache_a, cache_b = self.pair()
        a, b = Claims(cache_a, 30), Claims(cache_b, 30)
        k1, k2, k3 = self.key("p1"), self.key("p2"), self.key("p3")
        first = a.acquire([k1, k2, k1])
        self.assertEqual((first.ours, first.theirs, first.stored), ([k1, k2], [], {}))
        second = b.acquire([k1, k3])
        self.assertEqual((second.ours, second.theirs, second.stored), ([k3], [k1], {}))
        # a stores k2 and lets go; a replica that looked before that and claims now gets the answer, not work
        cache_a.set_many({k2: VALUE})
        a.release([k2])
        late = b.acquire([k2])
        self.assertEqual((late.ours, late.theirs, late.stored), ([], [], {k2: VALUE}))
        self.assertEqual(cache_a.peek_many([k2]), [(VALUE, False)])  # the claim it took to look is released
        a.release([k1])
        b.release([k3])
        self.assertEqual(self.locks_left(), 0)

    def test_wait_returns_the_answer_the_owner_stores(self: Any) -> None:
        cache_a, cache_b = self.pair()
        a, b = Claims(cache_a, 30), Claims(cache_b, 30)
        k = self.key("answered")
        self.assertEqual(a.acquire([k]).ours, [k])

        def answer() -> None:
            time.sleep(0.2)
            cache_a.set_many({k: VALUE})
            a.release([k])

        threading.Thread(target=answer).start()
        started = time.monotonic()
        self.assertEqual(b.wait([k]), ({k: VALUE}, []))
        self.assertLess(time.monotonic() - started, 5)

    def test_wait_hands_back_keys_whose_owner_gave_up_or_outlived_the_claim(self: Any) -> None:
        cache_a, cache_b = self.pair()
        a = Claims(cache_a, 30)
        gave_up, stuck = self.key("gave-up"), self.key("stuck")
        a.acquire([gave_up, stuck])
        a.release([gave_up])  # failed without an answer
        impatient = Claims(cache_b, lock_seconds=0.3)
        started = time.monotonic()
        self.assertEqual(impatient.wait([gave_up, stuck]), ({}, [gave_up, stuck]))
        self.assertLess(time.monotonic() - started, 3)
        a.release([stuck])


class RedisClaimsTest(ClaimsContract, unittest.TestCase):
    """Two replicas = two clients of one real redis-server."""

    pytestmark = pytest.mark.live

    def setUp(self) -> None:
        self.server = shared_redis()
        self.prefix = unique_prefix("claims")
        config = Config(redis_url=self.server.url)
        self.caches = [RedisCache(make_redis_client(config), self.prefix, 100) for _ in range(2)]
        for cache in self.caches:
            self.addCleanup(cache.close)

    def pair(self) -> tuple[Cache, Cache]:
        return self.caches[0], self.caches[1]

    def locks_left(self) -> int:
        return len(self.server.client().keys(self.prefix + ":*:lock"))


class MemoryClaimsTest(ClaimsContract, unittest.TestCase):
    """Two replicas = two views of one in-process MemoryCache."""

    pytestmark = pytest.mark.inprocess

    def setUp(self) -> None:
        self.prefix = unique_prefix("claims")
        self.cache = MemoryCache(self.prefix, 100)

    def pair(self) -> tuple[Cache, Cache]:
        return self.cache, self.cache

    def locks_left(self) -> int:
        return sum(1 for key in list(self.cache._claims) if self.cache.peek_many([key])[0][1])


if __name__ == "__main__":
    unittest.main()
