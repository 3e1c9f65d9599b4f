"""The captioning data path, free of Flask: uploads → images → cache → batched model → tags → cache → results.

`CaptionService.start()` does the slow set-up once (tagger, cache, model, warm-up); `caption_uploads()`
answers one request. Request threads hash, look up and decode; only the batcher's thread runs the model.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from batching import Batcher, Job
from cache import Cache, cache_key, fingerprint, open_cache
from captioners.base import GenerationParams
from errors import BadImageError, FileTooLargeError, ServiceError
from images import ImageLimits, decode_image, sha256_hex
from metrics import Metrics

if TYPE_CHECKING:
    from captioners.base import Captioner
    from config import Config
    from tagging import Tagger

log = logging.getLogger(__name__)

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
        """One result per upload, in order (caption + tags + cached, or a per-file error), and the HTTP status.

        The status is 200 when at least one file was captioned; otherwise the files' common error status
        (413 all too large, 415 all unsupported), or 400 when they differ.
        """
        if not self.ready:
            raise NotReadyError("the model is still loading; retry in a few seconds", headers={"Retry-After": "5"})
        prompt = prompt or self.config.caption_prompt or None
        config_fp = self.config_fingerprint(prompt)
        results: list[dict[str, Any] | None] = [None] * len(uploads)
        error_statuses: set[int] = set()
        keys: dict[int, str] = {}
        for index, upload in enumerate(uploads):
            if len(upload.data) > self.limits.max_file_bytes:  # don't even hash what we will refuse
                results[index] = self._error_result(upload, error_statuses, FileTooLargeError(
                    f"file is {len(upload.data)} bytes; the limit is {self.limits.max_file_bytes} "
                    f"(MAX_FILE_BYTES)"))
            else:
                keys[index] = cache_key(self.config.cache_prefix, config_fp, sha256_hex(upload.data))
        cached = self.cache.get_many(list(keys.values()))
        misses: list[tuple[int, str, Any]] = []
        for (index, key), value in zip(keys.items(), cached):
            if value is not None:
                results[index] = {"filename": uploads[index].filename, "caption": value["caption"],
                                  "tags": value["tags"], "cached": True}
                continue
            try:
                misses.append((index, key, decode_image(uploads[index].data, self.limits)))
            except BadImageError as exc:
                results[index] = self._error_result(uploads[index], error_statuses, exc)
        if misses:
            futures = self.batcher.submit([(key, image, prompt) for _, key, image in misses])
            for (index, _, _), future in zip(misses, futures):
                try:
                    value = future.result()
                except ServiceError as exc:
                    results[index] = self._error_result(uploads[index], error_statuses, exc)
                except Exception as exc:  # noqa: BLE001 - a model fault is reported per file, never a traceback
                    results[index] = self._error_result(uploads[index], error_statuses, ServiceError(
                        f"captioning failed: {type(exc).__name__}", code="captioning_failed"))
                else:
                    results[index] = {"filename": uploads[index].filename, "caption": value["caption"],
                                      "tags": value["tags"], "cached": False}
        self._count(cached, results)
        if len(error_statuses) and all(r is not None and "error" in r for r in results):
            return results, error_statuses.pop() if len(error_statuses) == 1 else 400  # type: ignore[return-value]
        return results, 200  # type: ignore[return-value]

    def reset_cache(self) -> int:
        """Delete this service's cache entries; returns how many."""
        return self.cache.clear()

    def _count(self, cached: list[Any], results: list[dict[str, Any] | None]) -> None:
        hits = sum(value is not None for value in cached)
        self.metrics.cache_requests.labels("hit").inc(hits)
        self.metrics.cache_requests.labels("miss").inc(len(cached) - hits)
        for outcome in ("cached", "captioned", "error"):
            count = sum(1 for r in results if r is not None and _outcome(r) == outcome)
            if count:
                self.metrics.images.labels(outcome).inc(count)

    @staticmethod
    def _error_result(upload: Upload, statuses: set[int], error: ServiceError) -> dict[str, Any]:
        statuses.add(error.status_code)
        return {"filename": upload.filename, "error": error.to_dict()}

    # ----- batcher callbacks (model thread, post-processing thread) ------------------------------------------
    def _forward(self, images: list[Any], prompt: str | None) -> list[str]:
        return self.captioner.caption(images, prompt, self.params)

    def _postprocess(self, jobs: list[Job], captions: list[str]) -> list[dict[str, Any]]:
        values = [{"caption": caption, "tags": tags} for caption, tags in zip(captions, self.tagger.tags_many(captions))]
        self.cache.set_many({job.key: value for job, value in zip(jobs, values)})
        return values


def _outcome(result: dict[str, Any]) -> str:
    if "error" in result:
        return "error"
    return "cached" if result["cached"] else "captioned"
