"""Cross-replica single flight: replicas sharing one cache caption each new image once.

Before captioning a miss, a replica claims its key (`<key>:lock`, with an expiry) in the shared cache. The
replica that gets the claim captions the image and stores the answer; the others wait for the answer to
appear, and caption the image themselves only if the claim goes away without an answer (the owner failed or
died) or their patience (the claim's lifetime) runs out.

    claim = claims.acquire(keys)        # ours (caption them), theirs (wait), stored (answered meanwhile)
    found, orphaned = claims.wait(claim.theirs)
    claims.release(claim.ours)          # after our answers are stored

A cache that is not shared between processes needs no locks (the batcher already makes identical images of one
process wait for one another): `Claims.for_cache` gives `LocalClaims` then, which grants every claim.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from cache import Cache

POLL_SECONDS = 0.025  # how often a replica waiting for another one's caption looks for it


@dataclass
class Claim:
    """The outcome of `acquire`: which keys this process captions, which another replica does, and which
    were answered between the caller's cache lookup and the claim."""

    ours: list[str] = field(default_factory=list)
    theirs: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)


class Claims:
    """The claim protocol over a cache shared between replicas; one owner id per instance (per process)."""

    def __init__(self, cache: "Cache", lock_seconds: float, poll_seconds: float = POLL_SECONDS) -> None:
        self.cache = cache
        self.lock_seconds = lock_seconds
        self.poll_seconds = poll_seconds
        self.owner = uuid.uuid4().hex

    @staticmethod
    def for_cache(cache: "Cache", lock_seconds: float) -> "Claims":
        """Real claims for a shared cache (Redis), none for a process-local one."""
        return Claims(cache, lock_seconds) if cache.shared else LocalClaims(cache, lock_seconds)

    def acquire(self, keys: Sequence[str]) -> Claim:
        """Claim `keys` (duplicates allowed); keys answered meanwhile come back in `stored`, unclaimed."""
        keys = list(dict.fromkeys(keys))
        granted = dict(zip(keys, self._try_lock(keys)))
        ours = [key for key in keys if granted[key]]
        # Another replica may have stored the answer between the caller's lookup and our claim (and let go of
        # its claim): look once more, now that we hold the claim, so that the image is not captioned twice.
        claim = Claim(theirs=[key for key in keys if not granted[key]])
        for key, value in zip(ours, self.cache.get_many(ours)):
            if value is not None:
                claim.stored[key] = value
            else:
                claim.ours.append(key)
        self.release(list(claim.stored))
        return claim

    def _try_lock(self, keys: list[str]) -> list[bool]:
        return self.cache.try_lock_many(keys, self.owner, self.lock_seconds)

    def wait(self, keys: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Wait for other replicas to store `keys`: (the answers found, the keys to caption here after all,
        because their claim went away without an answer or it outlived `lock_seconds`)."""
        deadline = time.monotonic() + self.lock_seconds
        pending = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        orphaned: list[str] = []
        while pending and time.monotonic() < deadline:
            time.sleep(self.poll_seconds)
            still = []
            for key, (value, held) in zip(pending, self.cache.peek_many(pending)):
                if value is not None:
                    found[key] = value
                elif held:
                    still.append(key)
                else:  # the other replica failed or died
                    orphaned.append(key)
            pending = still
        return found, orphaned + pending

    def release(self, keys: Sequence[str]) -> None:
        """Give up our claims on `keys` (call once their answers are stored, or when giving up)."""
        if keys:
            self.cache.unlock_many(list(keys), self.owner)


class LocalClaims(Claims):
    """Claims for a cache no other process shares: every key is ours and nothing is locked; `acquire` still
    looks for answers stored since the caller's lookup (another request of this process may have finished)."""

    def _try_lock(self, keys: list[str]) -> list[bool]:
        return [True] * len(keys)

    def release(self, keys: Sequence[str]) -> None:
        pass
