"""Result cache: Redis in production, an in-process twin with the same interface, and the key function.

Keys are `<CACHE_PREFIX>:v<schema>:<fingerprint>:<sha256 of the image bytes>`. The fingerprint covers
everything that changes the answer (model, revision, prompt, generation settings, tagger), so switching
any of them never returns another configuration's caption. Every write sets the TTL. Values are results,
`{"caption": str, "tags": [str, ...], "new_tokens": int, "stopped": bool}` (the last two: how many tokens the
model generated, and whether it stopped on its own, for the OpenAI API's usage and finish_reason); an entry read
from Redis that is not one (written by something else, an older version, or damaged) reads as a miss, and the
fresh answer overwrites it.

Each backend also keeps short claims (`<key>:lock`), the primitives of the cross-replica single-flight
protocol in claims.py: only a cache shared between processes (`shared`) needs them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import redis

    from config import Config
    from metrics import Metrics

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # bump when the stored value's shape changes


def fingerprint(**parts: Any) -> str:
    """A short stable hash of everything that changes a caption (order-independent, JSON-canonical)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cache_key(prefix: str, config_fingerprint: str, image_sha256: str) -> str:
    """The cache key of one image under one configuration."""
    return f"{prefix}:v{SCHEMA_VERSION}:{config_fingerprint}:{image_sha256}"


class Cache:
    """Interface of every backend. Values are JSON-able dicts; misses and failures read as None."""

    backend = "off"
    shared = False  # whether other processes read and write the same entries (then claims matter)

    def __init__(self, prefix: str, ttl_seconds: int) -> None:
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """The stored value of each key, or None (missing, expired, or the backend is down)."""
        return [None] * len(keys)

    def set_many(self, items: Mapping[str, dict[str, Any]]) -> None:
        """Store values with this cache's TTL; a failure is logged, never raised."""

    def clear(self) -> int:
        """Delete this service's entries (keys under the prefix) and nothing else; returns how many."""
        return 0

    def try_lock_many(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> list[bool]:
        """Claim each key for `owner` for `ttl_seconds`; True where the claim was free (now `owner`'s).

        A backend that cannot answer (a Redis that is down) grants every claim, so that work goes on.
        """
        return [True] * len(keys)

    def unlock_many(self, keys: Sequence[str], owner: str) -> None:
        """Give up `owner`'s claims on these keys (another owner's claim stays)."""

    def peek_many(self, keys: Sequence[str]) -> list[tuple[dict[str, Any] | None, bool]]:
        """For keys claimed by another replica: (value if stored, whether the claim is still held)."""
        return [(value, False) for value in self.get_many(keys)]

    def available(self, *, quiet: bool = False) -> bool:
        """Whether the backend answers right now."""
        return True

    def close(self) -> None:
        """Release connections."""


class NullCache(Cache):
    """No caching at all (CACHE_BACKEND=off)."""


class MemoryCache(Cache):
    """In-process LRU with TTL: used when no Redis is reachable at start-up, or by choice."""

    backend = "memory"

    def __init__(self, prefix: str, ttl_seconds: int, max_entries: int = 10000) -> None:
        super().__init__(prefix, ttl_seconds)
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._claims: dict[str, tuple[str, float]] = {}  # key -> (owner, expiry), as Redis holds `<key>:lock`
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many entries it holds (expired ones included until they are next looked up)."""
        return len(self._items)

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        now = time.monotonic()
        found: list[dict[str, Any] | None] = []
        with self._lock:
            for key in keys:
                entry = self._items.get(key)
                if entry is None or entry[0] <= now:
                    self._items.pop(key, None)
                    found.append(None)
                else:
                    self._items.move_to_end(key)
                    found.append(entry[1])
        return found

    def set_many(self, items: Mapping[str, dict[str, Any]]) -> None:
        expires = time.monotonic() + self.ttl_seconds
        with self._lock:
            for key, value in items.items():
                self._items[key] = (expires, value)
                self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> int:
        with self._lock:
            mine = [k for k in self._items if k.startswith(self.prefix + ":")]
            for key in mine:
                del self._items[key]
        return len(mine)

    def try_lock_many(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> list[bool]:
        now = time.monotonic()
        granted = []
        with self._lock:
            for key in keys:
                holder = self._claims.get(key)
                free = holder is None or holder[1] <= now
                if free:
                    self._claims[key] = (owner, now + ttl_seconds)
                granted.append(free)
        return granted

    def unlock_many(self, keys: Sequence[str], owner: str) -> None:
        with self._lock:
            for key in keys:
                if self._claims.get(key, ("",))[0] == owner:
                    del self._claims[key]

    def peek_many(self, keys: Sequence[str]) -> list[tuple[dict[str, Any] | None, bool]]:
        now = time.monotonic()
        values = self.get_many(keys)
        with self._lock:
            return [(value, key in self._claims and self._claims[key][1] > now) for key, value in zip(keys, values)]


class RedisCache(Cache):
    """Redis-backed cache that fails open: while Redis is down, lookups miss and writes are skipped.

    An outage is logged once when it starts and once when it ends; during it, Redis is retried at most
    every `retry_interval` seconds so that requests do not each wait for a timeout.
    """

    backend = "redis"
    shared = True

    def __init__(self, client: "redis.Redis", prefix: str, ttl_seconds: int, *, retry_interval: float = 1.0,
                 metrics: "Metrics | None" = None, target: str = "redis") -> None:
        super().__init__(prefix, ttl_seconds)
        self.client = client
        self._unlock = client.register_script(_UNLOCK_SCRIPT)
        self.retry_interval = retry_interval
        self.metrics = metrics
        self.target = target
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._state_lock = threading.Lock()
        self._set_up_gauge(1)

    @classmethod
    def from_config(cls, config: "Config", metrics: "Metrics | None" = None) -> "RedisCache":
        """A cache on a client built from REDIS_URL or REDIS_HOST/PORT/DB/PASSWORD, with short timeouts."""
        return cls(make_redis_client(config), config.cache_prefix, config.cache_ttl_seconds, metrics=metrics,
                   target=config.redis_target)

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        raw = self._guard(lambda: self.client.mget(keys), None)
        if raw is None:
            return [None] * len(keys)
        return [_loads(value) for value in raw]

    def set_many(self, items: Mapping[str, dict[str, Any]]) -> None:
        if not items:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, json.dumps(value, separators=(",", ":")), ex=self.ttl_seconds)
            pipe.execute()

        self._guard(write, None)

    def clear(self) -> int:
        """SCAN + UNLINK over `<prefix>:*` only; never FLUSHDB. Raises if Redis is down (the caller says so)."""
        import redis

        deleted = 0
        try:
            batch: list[str] = []
            for key in self.client.scan_iter(match=_glob_escape(self.prefix) + ":*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)
        except redis.RedisError as exc:
            self._mark_down(exc)
            raise
        self._mark_up()
        return deleted

    def try_lock_many(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> list[bool]:
        def claim() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.set(_lock_key(key), owner, nx=True, px=int(ttl_seconds * 1000))
            return [bool(ok) for ok in pipe.execute()]

        if not keys:
            return []
        granted = self._guard(claim, None)
        return granted if granted is not None else [True] * len(keys)  # Redis down: caption locally

    def unlock_many(self, keys: Sequence[str], owner: str) -> None:
        def release() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                self._unlock(keys=[_lock_key(key)], args=[owner], client=pipe)
            pipe.execute()

        if keys:
            self._guard(release, None)

    def peek_many(self, keys: Sequence[str]) -> list[tuple[dict[str, Any] | None, bool]]:
        def peek() -> list[tuple[dict[str, Any] | None, bool]]:
            pipe = self.client.pipeline(transaction=False)
            pipe.mget(keys)
            for key in keys:
                pipe.exists(_lock_key(key))
            values, *held = pipe.execute()
            return [(_loads(value), bool(h)) for value, h in zip(values, held)]

        if not keys:
            return []
        found = self._guard(peek, None)
        return found if found is not None else [(None, False)] * len(keys)

    def available(self, *, quiet: bool = False) -> bool:
        """Ping Redis now (short timeout), whatever the retry schedule says. `quiet`: an outage found now is
        not logged (the caller says what it does about it)."""
        import redis

        try:
            self.client.ping()
        except redis.RedisError as exc:
            self._mark_down(exc, quiet=quiet)
            return False
        self._mark_up()
        return True

    def close(self) -> None:
        self.client.close()

    def _guard(self, operation: Any, default: Any) -> Any:
        """Run a Redis operation; on failure mark the outage and return `default`."""
        import redis

        if self._down_since is not None and time.monotonic() < self._retry_at:
            return default
        try:
            result = operation()
        except redis.RedisError as exc:
            self._mark_down(exc)
            return default
        self._mark_up()
        return result

    def _mark_down(self, exc: Exception, quiet: bool = False) -> None:
        with self._state_lock:
            self._retry_at = time.monotonic() + self.retry_interval
            if self._down_since is None:
                self._down_since = time.monotonic()
                if not quiet:
                        log.warning("Redis at %s is unavailable (%s: %s); serving without the cache until it returns",
                                self.target, type(exc).__name__, exc)
        if self.metrics:
            self.metrics.cache_requests.labels("error").inc()
        self._set_up_gauge(0)

    def _mark_up(self) -> None:
        if self._down_since is None:
            return
        with self._state_lock:
            if self._down_since is None:
                return
            log.warning("Redis at %s is back after %.1f s; using the cache again", self.target,
                        time.monotonic() - self._down_since)
            self._down_since = None
        self._set_up_gauge(1)

    def _set_up_gauge(self, value: int) -> None:
        if self.metrics:
            self.metrics.redis_up.set(value)


def _lock_key(key: str) -> str:
    return key + ":lock"


# Delete a lock only if this process still owns it (it may have expired and been taken by another replica).
_UNLOCK_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def make_redis_client(config: "Config") -> "redis.Redis":
    """A redis-py client with timeouts well under a second and no hidden retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = dict(socket_timeout=config.redis_timeout_seconds,
                                   socket_connect_timeout=config.redis_timeout_seconds,
                                   retry=Retry(NoBackoff(), 0), decode_responses=True,
                                   client_name="imgcap", health_check_interval=0)
    if config.redis_url:
        return redis.Redis.from_url(config.redis_url, **options)
    return redis.Redis(host=config.redis_host, port=config.redis_port, db=config.redis_db,
                       password=config.redis_password, **options)


def open_cache(config: "Config", metrics: "Metrics | None" = None) -> Cache:
    """The cache CACHE_BACKEND asks for; `auto` is Redis when it answers at start-up, else in-process."""
    if config.cache_backend == "off":
        log.info("Cache: off (CACHE_BACKEND=off)")
        return NullCache(config.cache_prefix, config.cache_ttl_seconds)
    if config.cache_backend == "memory":
        log.info("Cache: in-process memory (CACHE_BACKEND=memory), TTL %d s", config.cache_ttl_seconds)
        return MemoryCache(config.cache_prefix, config.cache_ttl_seconds, config.memory_cache_max_entries)
    cache = RedisCache.from_config(config, metrics)
    if cache.available(quiet=True):  # what happens without it is said once, below
        log.info("Cache: Redis at %s, prefix %r, TTL %d s", config.redis_target, config.cache_prefix,
                 config.cache_ttl_seconds)
        return cache
    if config.cache_backend == "redis":
        log.warning("Cache: Redis at %s does not answer yet; serving without the cache until it does",
                    config.redis_target)
        return cache
    cache.close()
    if metrics:
        metrics.redis_up.set(0)
    log.warning("Cache: no Redis reachable at %s; using an in-process memory cache instead "
                "(results are not shared between processes and are lost on restart)", config.redis_target)
    return MemoryCache(config.cache_prefix, config.cache_ttl_seconds, config.memory_cache_max_entries)


def _loads(value: str | None) -> dict[str, Any] | None:
    """A stored result, or None: a missing, damaged or wrong-shaped entry is a miss (and is overwritten)."""
    if value is None:
        return None
    try:
        loaded = json.loads(value)
    except ValueError:
        return None
    return loaded if is_result(loaded) else None


def is_result(value: Any) -> bool:
    """Whether a value has the shape of a stored result: a caption string, a list of tag strings, the count of
    tokens generated and whether generation stopped on its own (an entry of an older version lacks the last
    two: it reads as a miss and is captioned again)."""
    return (isinstance(value, dict) and isinstance(value.get("caption"), str)
            and isinstance(value.get("tags"), list) and all(isinstance(tag, str) for tag in value["tags"])
            and type(value.get("new_tokens")) is int and value["new_tokens"] >= 0
            and isinstance(value.get("stopped"), bool))


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters so a prefix matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

