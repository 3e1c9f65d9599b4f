"""The captioning data path, free of Flask: uploads → images → cache → batched model → tags → cache → results.

`CaptionService.start()` does the slow set-up once (tagger, cache, model, warm-up); `caption_uploads()`
answers one request. Request threads hash, look up and decode; only the batcher's thread runs the model.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from batching import Batcher, Job
from cache import Cache, cache_key, fingerprint, open_cache
from captioners.base import GenerationParams
from errors import BadImageError, FileTooLargeError, ServiceError
from images import ImageLimits, check_size, decode_image, sha256_hex
from metrics import Metrics

if TYPE_CHECKING:
    from captioners.base import Captioner
    from config import Config
    from tagging import Tagger

log = logging.getLogger(__name__)

PEER_POLL_SECONDS = 0.025  # how often a request waiting for another replica's caption looks for it
CAPTIONER_SCHEMA = 1  # bump when the way captions are produced changes (prompt handling, decoding)


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its client-given name (data only, never a path) and its bytes."""

    filename: str
    data: bytes


class NotReadyError(ServiceError):
    """The model is still loading (or failed to load)."""

    status_code = 503
    code = "not_ready"


class CaptionService:
    """Owns the captioner, tagger, cache and batcher of one process."""

    def __init__(self, config: "Config", *, captioner: "Captioner | None" = None, tagger: "Tagger | None" = None,
                 cache: Cache | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.captioner = captioner
        self.tagger = tagger
        self.cache = cache
        self.params = GenerationParams(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens)
        self.limits = ImageLimits(max_file_bytes=config.max_file_bytes, max_pixels=config.max_image_pixels)
        self.batcher: Batcher | None = None
        self._decoder = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        self.state = "starting"  # starting -> ready, or failed
        self._ready = threading.Event()

    # ----- set-up -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the tagger, open the cache, load and warm up the model, start the batcher. Raises on failure."""
        try:
            self._start()
        except BaseException:
            self.state = "failed"
            raise

    def _start(self) -> None:
        from captioners import create_captioner
        from tagging import Tagger

        if self.tagger is None:
            self.tagger = Tagger(self.config.spacy_model)
        self.tagger.load()  # before the model: a missing spaCy package should fail in a second, not a minute
        if self.cache is None:
            self.cache = open_cache(self.config, self.metrics)
        if self.captioner is None:
            c = self.config
            self.captioner = create_captioner(c.family, c.model_path, c.revision, c.device, c.dtype,
                                              c.system_prompt)
        if not self.captioner.loaded:
            self.captioner.load()
        self.metrics.model_load_seconds.set(self.captioner.load_seconds or 0.0)
        if self.config.warmup:
            self._warm_up()
        self.batcher = Batcher(self._forward, self._postprocess, max_batch_size=self.config.max_batch_size,
                               max_wait_s=self.config.batch_wait_ms / 1000, max_queue=self.config.max_queue_images,
                               metrics=self.metrics)
        self.batcher.start()
        self.state = "ready"
        self._ready.set()

    def _warm_up(self) -> None:
        """One caption of a blank image, so the first real request does not pay for lazy initialisation."""
        from PIL import Image

        started = time.perf_counter()
        self.captioner.caption([Image.new("RGB", (64, 64), "white")], self.config.caption_prompt,
                               GenerationParams(max_new_tokens=2))
        log.info("Warm-up caption took %.2f s", time.perf_counter() - started)

    def stop(self) -> None:
        """Finish queued work and close the cache."""
        if self.batcher:
            self.batcher.stop()
        self._decoder.shutdown(wait=False)
        if self.cache:
            self.cache.close()

    @property
    def ready(self) -> bool:
        """Whether requests can be captioned."""
        return self._ready.is_set()

    # ----- descriptions -------------------------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        """`{"family", "id"}` of the loaded checkpoint, as in every caption response."""
        if self.captioner is not None:
            return {"family": self.captioner.family, "id": self.captioner.model_id}
        from captioners import FAMILIES

        return {"family": self.config.family,
                "id": self.config.model_path or FAMILIES[self.config.family].default_checkpoint}

    def readiness(self) -> dict[str, Any]:
        """State for /readyz: model, device, dtype, cache backend and whether Redis answers now."""
        info: dict[str, Any] = {"status": self.state, "model": self.model_info()}
        if self.captioner is not None:
            described = self.captioner.describe()
            info.update(device=described["device"], dtype=described["dtype"], revision=described["revision"])
        backend = self.cache.backend if self.cache else None
        info["cache"] = {"backend": backend,
                         "redis_reachable": self.cache.available() if backend == "redis" else None}
        info["default_prompt"] = self.config.caption_prompt
        return info

    # ----- the data path ------------------------------------------------------------------------------------
    def config_fingerprint(self, prompt: str | None) -> str:
        """Hash of everything besides the image that changes the answer to a request with this prompt."""
        captioner = self.captioner
        return fingerprint(
            family=captioner.family, model=captioner.model_id, revision=captioner.revision,
            dtype=captioner.describe()["dtype"], prompt=captioner.effective_prompt(prompt),
            system_prompt=captioner.system_prompt, params=self.params, tagger=self.tagger.version,
            captioner_schema=CAPTIONER_SCHEMA,
        )

    def caption_uploads(self, uploads: Sequence[Upload], prompt: str | None) -> tuple[list[dict[str, Any]], int]:
        """One result per upload, in order (caption + tags + cached, or a per-file error), and the HTTP status."""
        if not self.ready:
            raise NotReadyError("the model is still loading; retry in a few seconds", headers={"Retry-After": "5"})
        prompt = prompt or self.config.caption_prompt or None
        config_fp = self.config_fingerprint(prompt)
        answer = _Answer(uploads)
        futures: dict[int, Future] = {}
        elsewhere: dict[int, tuple[str, Any]] = {}
        mine: list[str] = []
        # Announce the files before hashing and decoding them, so that a batch forming in the model thread
        # waits for them instead of leaving without them.
        with self.batcher.expecting(len(uploads)):
            keys: dict[int, str] = {}
            for index, upload in enumerate(uploads):
                try:
                    check_size(upload.data, self.limits)  # don't even hash what we will refuse
                except FileTooLargeError as exc:
                    answer.fail(index, exc)
                else:
                    keys[index] = cache_key(self.config.cache_prefix, config_fp, sha256_hex(upload.data))
            cached = self.cache.get_many(list(keys.values()))
            hits = sum(value is not None for value in cached)
            self.metrics.cache_requests.labels("hit").inc(hits)
            self.metrics.cache_requests.labels("miss").inc(len(cached) - hits)
            missing: list[int] = []
            for (index, key), value in zip(keys.items(), cached):
                if value is not None:
                    answer.succeed(index, value, cached=True)
                else:
                    missing.append(index)
            misses: dict[int, tuple[str, Any]] = {}
            for index, decoded in zip(missing, self._decode([uploads[i].data for i in missing])):
                if isinstance(decoded, BadImageError):
                    answer.fail(index, decoded)
                else:
                    misses[index] = (keys[index], decoded)
            if misses:
                futures, elsewhere, mine = self._claim_and_submit(misses, prompt, answer)
        try:
            if elsewhere:
                futures.update(self._submit(self._await_other_replicas(elsewhere, answer), prompt))
            for index, future in futures.items():
                try:
                    answer.succeed(index, future.result(), cached=False)
                except ServiceError as exc:
                    answer.fail(index, exc)
                except Exception as exc:  # noqa: BLE001 - a model fault is reported per file, never a traceback
                    answer.fail(index, ServiceError(f"captioning failed: {type(exc).__name__}",
                                                    code="captioning_failed"))
        finally:
            self.cache.unlock_many(mine)
        for outcome, count in answer.outcomes().items():
            self.metrics.images.labels(outcome).inc(count)
        return answer.results, answer.status()

    def _decode(self, blobs: list[bytes]) -> list[Any]:
        """Decoded images (or the BadImageError of each file), in parallel: Pillow decodes without the GIL."""
        def decode(data: bytes) -> Any:
            try:
                return decode_image(data, self.limits)
            except BadImageError as exc:
                return exc

        if len(blobs) <= 1:
            return [decode(data) for data in blobs]
        return list(self._decoder.map(decode, blobs))

    def _claim_and_submit(self, misses: dict[int, tuple[str, Any]], prompt: str | None, answer: "_Answer"
                          ) -> tuple[dict[int, Future], dict[int, tuple[str, Any]], list[str]]:
        """Claim the misses across replicas and queue ours; returns (futures, claimed elsewhere, our claims)."""
        in_flight = self.batcher.in_flight(key for key, _ in misses.values())
        to_claim = list(dict.fromkeys(key for key, _ in misses.values() if key not in in_flight))
        claims = dict(zip(to_claim, self.cache.try_lock_many(to_claim, self.config.cache_lock_seconds)))
        mine = [key for key, granted in claims.items() if granted]
        try:
            # Another replica may have stored the answer between our lookup and our claim (its claim already
            # released): look once more, now that we hold the claim, so that it is not captioned twice.
            stored = dict(zip(mine, self.cache.get_many(mine)))
            for index, (key, _) in list(misses.items()):
                if stored.get(key) is not None:
                    answer.succeed(index, stored[key], cached=True)
                    del misses[index]
            local = {i: m for i, m in misses.items() if claims.get(m[0], True)}
            elsewhere = {i: m for i, m in misses.items() if not claims.get(m[0], True)}
            return self._submit(local, prompt), elsewhere, mine
        except BaseException:
            self.cache.unlock_many(mine)
            raise

    def _submit(self, misses: dict[int, tuple[str, Any]], prompt: str | None) -> dict[int, Future]:
        if not misses:
            return {}
        futures = self.batcher.submit([(key, image, prompt) for key, image in misses.values()])
        return dict(zip(misses, futures))

    def _await_other_replicas(self, waiting: dict[int, tuple[str, Any]], answer: "_Answer"
                              ) -> dict[int, tuple[str, Any]]:
        """Poll the shared cache until another replica stores these keys; returns those it gave up on."""
        deadline = time.monotonic() + self.config.cache_lock_seconds
        pending = dict(waiting)
        orphaned: dict[int, tuple[str, Any]] = {}
        while pending and time.monotonic() < deadline:
            time.sleep(PEER_POLL_SECONDS)
            indexes = list(pending)
            for index, (value, held) in zip(indexes, self.cache.peek_many([pending[i][0] for i in indexes])):
                if value is not None:
                    answer.succeed(index, value, cached=True)
                    del pending[index]
                elif not held:  # the other replica failed or died: caption it here
                    orphaned[index] = pending.pop(index)
        orphaned.update(pending)
        return orphaned

    def reset_cache(self) -> int:
        """Delete this service's cache entries; returns how many."""
        return self.cache.clear()

    # ----- batcher callbacks (model thread, post-processing thread) ------------------------------------------
    def _forward(self, images: list[Any], prompt: str | None) -> list[str]:
        return self.captioner.caption(images, prompt, self.params)

    def _postprocess(self, jobs: list[Job], captions: list[str]) -> list[dict[str, Any]]:
        values = [{"caption": caption, "tags": tags} for caption, tags in zip(captions, self.tagger.tags_many(captions))]
        self.cache.set_many({job.key: value for job, value in zip(jobs, values)})
        return values


class _Answer:
    """The per-file results of one request, filled in as they become known, and its HTTP status."""

    def __init__(self, uploads: Sequence[Upload]) -> None:
        self.uploads = uploads
        self.results: list[dict[str, Any]] = [{} for _ in uploads]
        self.error_statuses: set[int] = set()

    def succeed(self, index: int, value: dict[str, Any], cached: bool) -> None:
        self.results[index] = {"filename": self.uploads[index].filename, "caption": value["caption"],
                               "tags": value["tags"], "cached": cached}

    def fail(self, index: int, error: ServiceError) -> None:
        self.error_statuses.add(error.status_code)
        self.results[index] = {"filename": self.uploads[index].filename, "error": error.to_dict()}

    def outcomes(self) -> dict[str, int]:
        """How many files were cached, captioned, or refused."""
        counts = {"cached": 0, "captioned": 0, "error": 0}
        for result in self.results:
            counts["error" if "error" in result else "cached" if result["cached"] else "captioned"] += 1
        return counts

    def status(self) -> int:
        """200 when any file was captioned; else the files' common error status (413, 415, …), or 400."""
        if any("error" not in result for result in self.results):
            return 200
        return next(iter(self.error_statuses)) if len(self.error_statuses) == 1 else 400
