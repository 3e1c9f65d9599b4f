"""The captioning data path, free of Flask and HTTP: uploads -> cache -> images -> batched model -> tags -> cache.

`CaptionService.start()` does the slow set-up once (tagger, cache, model, warm-up); `caption_uploads()`
answers one request with one result per upload. Request threads hash, look up, decode and preprocess; only
the batcher's thread runs the model. What HTTP status and headers an answer gets is the web layer's choice.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import allocator
from batching import Batcher, Job
from cache import Cache, cache_key, fingerprint, open_cache
from captioners.base import Generated, GenerationParams, default_batch_size
from claims import Claim, Claims
from errors import CaptioningError, InvalidOptionError, InvalidPromptError, NotReadyError, ServiceError
from images import ImageLimits, PixelBudget, check_size, declared_pixels, decode_image, sha256_hex
from metrics import Metrics

if TYPE_CHECKING:
    from captioners.base import Captioner
    from config import Config
    from tagging import Tagger

log = logging.getLogger(__name__)

CAPTIONER_SCHEMA = 1  # bump when the way captions are produced changes (prompt handling, decoding)


@dataclass(frozen=True)
class Ask:
    """What a request asks of the model besides its images: the prompt, the system turn (chat families; None:
    the configured one) and the decoding options. Requests with equal asks may share one generate() call, and
    the ask is part of every cache key."""

    prompt: str | None
    system_prompt: str | None
    params: GenerationParams


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its client-given name (data only, never a path) and its bytes."""

    filename: str
    data: bytes


class CaptionService:
    """Owns the captioner, tagger, cache, claims and batcher of one process."""

    def __init__(self, config: "Config", *, captioner: "Captioner | None" = None, tagger: "Tagger | None" = None,
                 cache: Cache | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.captioner = captioner
        self.tagger = tagger
        self.cache = cache
        self.claims: Claims | None = None
        self.params = GenerationParams(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens)
        self.limits = ImageLimits(max_file_bytes=config.max_file_bytes, max_pixels=config.max_image_pixels)
        self.pixel_budget = PixelBudget(config.decode_budget_pixels or config.max_image_pixels)
        self.batcher: Batcher | None = None
        self.batch_size = config.max_batch_size  # MAX_BATCH_SIZE, or the device's default once the model is loaded
        self._decoder = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        self.state = "starting"  # starting -> ready, or failed
        self._ready = threading.Event()

    # ----- set-up -----------------------------------------------------------------------------------------
    def start(self, model: bool = True) -> None:
        """Load the tagger, open the cache, load and warm up the model, start the batcher. Raises on failure.

        `model=False` prepares only (lookup_and_prepare): the processor without the weights, no batcher.
        """
        try:
            self._start(model)
        except BaseException:
            self.state = "failed"
            raise

    def _start(self, model: bool = True) -> None:
        from captioners import create_captioner
        from errors import ConfigError
        from tagging import Tagger

        if self.tagger is None:
            self.tagger = Tagger(self.config.spacy_model)
        self.tagger.load()  # before the model: a missing spaCy package should fail in a second, not a minute
        if self.cache is None:
            self.cache = open_cache(self.config, self.metrics)
        self.claims = Claims.for_cache(self.cache, self.config.cache_lock_seconds)
        if self.captioner is None:
            c = self.config
            self.captioner = create_captioner(c.family, c.model_path, c.revision, c.device, c.dtype,
                                              c.system_prompt)
        if not self.captioner.loaded and not (self.captioner.processor is not None and not model):
            self.captioner.load(weights=model)
        try:
            self.captioner.check_prompt(self.config.caption_prompt, self.params)
        except ServiceError as exc:
            raise ConfigError(f"--caption-prompt (CAPTION_PROMPT): {exc.message}") from None
        if not model:
            return
        self.metrics.model_load_seconds.set(self.captioner.load_seconds or 0.0)
        self.batch_size = self.config.max_batch_size or default_batch_size(self.captioner.device)
        log.info("Batches of up to %d images per generate call (%s)", self.batch_size,
                 "MAX_BATCH_SIZE" if self.config.max_batch_size else f"the default on {self.captioner.device}")
        self.batcher = Batcher(self._forward, self._postprocess, max_batch_size=self.batch_size,
                               max_wait_s=self.config.batch_wait_ms / 1000, max_queue=self.config.max_queue_images,
                               metrics=self.metrics, setup=self._on_model_thread)
        self.batcher.start()  # the warm-up runs on the model thread, where every later model call runs
        log.info("Memory: %s", allocator.describe())
        self.state = "ready"
        self._ready.set()

    def _on_model_thread(self) -> None:
        """First on the model thread: an arena that keeps what the model frees (allocator.py), then, unless
        WARMUP is off, one caption of a blank image, so the first real request does not pay for lazy
        initialisation."""
        allocator.keep_freed_memory()
        if not self.config.warmup:
            return
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
        if self.cache is not None:
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
        """State for /readyz: model, device, dtype, cache backend and whether Redis answers now, the allocator."""
        info: dict[str, Any] = {"status": self.state, "model": self.model_info()}
        if self.captioner is not None:
            described = self.captioner.describe()
            info.update(device=described["device"], dtype=described["dtype"], dtype_reason=described["dtype_reason"],
                        revision=described["revision"],
                        random_weights=bool(described.get("random_weights")))
        backend = self.cache.backend if self.cache is not None else None
        info["cache"] = {"backend": backend,
                         "redis_reachable": self.cache.available() if backend == "redis" else None}
        info["default_prompt"] = self.config.caption_prompt
        info["allocator"] = allocator.describe()
        return info

    # ----- the data path ------------------------------------------------------------------------------------
    def config_fingerprint(self, ask: Ask) -> str:
        """Hash of everything besides the image that changes the answer to a request with this ask."""
        captioner = self.captioner
        return fingerprint(
            family=captioner.family, model=captioner.model_id, revision=captioner.revision,
            dtype=captioner.describe()["dtype"], prompt=captioner.effective_prompt(ask.prompt),
            system_prompt=ask.system_prompt or captioner.system_prompt, params=ask.params,
            tagger=self.tagger.version, captioner_schema=CAPTIONER_SCHEMA,
        )

    def ask(self, prompt: str | None = None, *, system_prompt: str | None = None, max_new_tokens: int | None = None,
            num_beams: int | None = None) -> Ask:
        """A request's options, checked (bounds, the tokenizer's special tokens, room for the caption), with
        the server's defaults where the request says nothing: its prompt, else CAPTION_PROMPT."""
        limit, beams = self.config.max_new_tokens, self.config.max_num_beams
        if max_new_tokens is not None and not 1 <= max_new_tokens <= limit:
            raise InvalidOptionError(f"max_new_tokens must be between 1 and {limit} (this server's "
                                     f"MAX_NEW_TOKENS), not {_shown(max_new_tokens)}", param="max_new_tokens")
        if num_beams is not None and not 1 <= num_beams <= beams:
            raise InvalidOptionError(f"num_beams must be between 1 and {beams} (this server's MAX_NUM_BEAMS), not "
                                     f"{_shown(num_beams)}", param="num_beams")
        params = self.params
        if max_new_tokens is not None or num_beams is not None:
            new = max_new_tokens if max_new_tokens is not None else params.max_new_tokens
            params = GenerationParams(max_new_tokens=new, min_new_tokens=min(params.min_new_tokens, new),
                                      num_beams=num_beams if num_beams is not None else params.num_beams)
        if system_prompt is not None and not self.captioner.takes_system_prompt:
            raise InvalidPromptError(f"{self.captioner.spec.name} has no system turn: send the text as the prompt "
                                     f"instead", param="messages")
        prompt = prompt or self.config.caption_prompt or None
        self.captioner.check_prompt(system_prompt, GenerationParams(max_new_tokens=1))
        self.captioner.check_prompt(prompt, params, system_prompt=system_prompt)
        return Ask(prompt, system_prompt or None, params)

    def caption_uploads(self, uploads: Sequence[Upload], ask: Ask | str | None,
                        refused: dict[int, ServiceError] | None = None) -> "Answer":
        """One result per upload, in order: caption, tags and whether it came from the cache, or its error.
        `ask`: the request's options (service.ask(...); a prompt or None for the defaults). `refused`: uploads
        already answered with an error by the caller (by index)."""
        if not self.ready:
            raise NotReadyError("the model is still loading; retry in a few seconds", retry_after=5)
        prompt = ask if isinstance(ask, Ask) else self.ask(ask)
        answer = Answer(uploads, refused)
        # Announce the files before hashing and decoding them, so that a batch forming in the model thread
        # waits for them instead of leaving without them.
        with self.batcher.expecting(len(uploads)):
            inputs, joined = self.lookup_and_prepare(answer, prompt)
            pending = self.submit_prepared(inputs, prompt, joined)
        answer.settle(pending.results())
        for outcome, count in answer.outcomes().items():
            self.metrics.images.labels(outcome).inc(count)
        return answer

    def lookup_and_prepare(self, answer: "Answer", prompt: Ask) -> tuple[dict[str, Any], dict[str, Future]]:
        """The first half, which needs no model: each file's key, the cache's answers, the files already being
        captioned (joined), and the decoded, preprocessed model inputs of the others (by key)."""
        self._hash(answer.uploads, self.config_fingerprint(prompt), answer)
        answer.found(dict(zip(answer.pending, self.cache.get_many(answer.pending))), cached=True)
        self._count_lookups(answer)
        joined = self.batcher.join(answer.pending) if self.batcher else {}  # no need to decode those
        return self._prepare([key for key in answer.pending if key not in joined], prompt, answer), joined

    def submit_prepared(self, inputs: dict[str, Any], prompt: Ask,
                        joined: dict[str, Future] | None = None) -> "Pending":
        """The second half: claim the keys across replicas and queue ours for the model (see Pending)."""
        claim = self.claims.acquire(list(inputs))
        try:
            futures = {**(joined or {}), **self._submit({key: inputs[key] for key in claim.ours}, prompt)}
        except BaseException:
            self.claims.release(claim.ours)
            raise
        return Pending(self, claim, futures, inputs, prompt)

    def _hash(self, uploads: Sequence[Upload], config_fp: str, answer: "Answer") -> None:
        """Each upload's cache key (uploads over MAX_FILE_BYTES are refused before hashing)."""
        for index, upload in enumerate(uploads):
            if answer.errors[index] is not None:
                continue  # refused before it got here (a bulk input that could not be read)
            try:
                check_size(upload.data, self.limits)
            except ServiceError as exc:
                answer.fail(index, exc)
            else:
                answer.digests[index] = sha256_hex(upload.data)
                answer.expect(index, cache_key(self.config.cache_prefix, config_fp, answer.digests[index]))

    def _count_lookups(self, answer: "Answer") -> None:
        hits = sum(1 for result in answer.results if result.get("cached"))
        self.metrics.cache_requests.labels("hit").inc(hits)
        self.metrics.cache_requests.labels("miss").inc(len(answer.pending))

    def _prepare(self, keys: list[str], prompt: Ask, answer: "Answer") -> dict[str, Any]:
        """The model inputs of each key's file, decoded and preprocessed in parallel; failures are answered.

        The full-size image lives only inside one worker call: it is decoded under the pixel budget (so that
        requests wait for room rather than grow memory), turned into model-sized tensors, and dropped.
        """
        def prepare(key: str) -> Any:
            data = answer.data(key)
            try:
                with self.pixel_budget.hold(declared_pixels(data, self.limits)):
                    return self.captioner.prepare(decode_image(data, self.limits), prompt.prompt, prompt.params,
                                                  system_prompt=prompt.system_prompt)
            except ServiceError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - the processor failed on this file: its error, not a 500
                log.warning("Preprocessing an upload failed (%s: %s)", type(exc).__name__, exc, exc_info=True)
                return CaptioningError(f"the image could not be prepared for the model ({type(exc).__name__})")

        prepared = map(prepare, keys) if len(keys) <= 1 else self._decoder.map(prepare, keys)
        inputs = {}
        for key, result in zip(keys, prepared):
            if isinstance(result, ServiceError):
                answer.fail_key(key, result)
            else:
                inputs[key] = result
        return inputs

    def _submit(self, inputs: dict[str, Any], prompt: Ask) -> dict[str, Future]:
        if not inputs:
            return {}
        # The ask is the batch group: only images with the same prompt and options share a generate() call.
        return dict(zip(inputs, self.batcher.submit([(key, value, prompt) for key, value in inputs.items()])))

    def reset_cache(self) -> int:
        """Delete this service's cache entries; returns how many."""
        return self.cache.clear()

    # ----- batcher callbacks (model thread, post-processing thread) ------------------------------------------
    def _forward(self, inputs: list[Any], group: Hashable) -> list[Generated]:
        assert isinstance(group, Ask)
        return self.captioner.generate(inputs, group.params)

    def _postprocess(self, jobs: list[Job], generated: list[Generated]) -> list[dict[str, Any]]:
        tag_lists = self.tagger.tags_many([done.text for done in generated])
        values = [{"caption": done.text, "tags": tags, "new_tokens": done.new_tokens, "stopped": done.stopped}
                  for done, tags in zip(generated, tag_lists)]
        self.cache.set_many({job.key: value for job, value in zip(jobs, values)})
        return values


def _shown(number: int) -> str:
    """A client's number in a message: itself, or how far out of range it is (a JSON number has no length limit)."""
    if -10**18 < number < 10**18:
        return str(number)
    return f"a {'negative ' if number < 0 else ''}number of over 18 digits"


class Pending:
    """Captions on their way: our futures in the batcher, and the keys another replica is captioning.

    `results()` waits for all of them (captioning here what another replica gave up on), releases our claims,
    and returns each key's (value, cached) or its ServiceError.
    """

    def __init__(self, service: CaptionService, claim: Claim, futures: dict[str, Future], inputs: dict[str, Any],
                 prompt: Ask) -> None:
        self.service, self.claim, self.futures, self.inputs, self.prompt = service, claim, futures, inputs, prompt

    def results(self) -> dict[str, "tuple[dict[str, Any], bool] | ServiceError"]:
        out: dict[str, tuple[dict[str, Any], bool] | ServiceError] = {
            key: (value, True) for key, value in self.claim.stored.items()}
        try:
            if self.claim.theirs:
                found, orphaned = self.service.claims.wait(self.claim.theirs)
                out.update((key, (value, True)) for key, value in found.items())
                self.futures.update(self.service._submit({key: self.inputs[key] for key in orphaned}, self.prompt))
            for key, future in self.futures.items():
                try:
                    out[key] = (future.result(), False)
                except ServiceError as exc:
                    out[key] = exc
                except Exception as exc:  # noqa: BLE001 - a model fault is reported per file, never a traceback
                    out[key] = CaptioningError(f"captioning failed: {type(exc).__name__}")
        finally:
            self.service.claims.release(self.claim.ours)
        return out


class Answer:
    """The per-file results of one request, filled in as they become known.

    Files are tracked by cache key, so that the repeats of one file in a request share its work and its
    answer. `errors[i]` is the ServiceError of file i (None when it was captioned): the web layer chooses the
    response's status from them.
    """

    def __init__(self, uploads: Sequence[Upload], refused: dict[int, ServiceError] | None = None) -> None:
        self.uploads = uploads
        self.results: list[dict[str, Any]] = [{} for _ in uploads]
        # The stored value of each captioned file: its result plus how it was generated (new_tokens, stopped)
        self.values: list[dict[str, Any] | None] = [None] * len(uploads)
        self.errors: list[ServiceError | None] = [None] * len(uploads)
        self.digests: list[str | None] = [None] * len(uploads)  # SHA-256 of each file that was hashed
        self.keys: list[str | None] = [None] * len(uploads)  # and its cache key
        self._indexes: dict[str, list[int]] = {}  # key -> the uploads with that key, not answered yet
        for index, error in (refused or {}).items():  # answered before the service saw them (by index)
            self.fail(index, error)

    @property
    def pending(self) -> list[str]:
        """Keys still without an answer, in upload order."""
        return list(self._indexes)

    def data(self, key: str) -> bytes:
        """The bytes of the file with this key."""
        return self.uploads[self._indexes[key][0]].data

    def expect(self, index: int, key: str) -> None:
        self.keys[index] = key
        self._indexes.setdefault(key, []).append(index)

    def found(self, values: dict[str, dict[str, Any] | None], cached: bool) -> None:
        """Answer every file whose key has a value here."""
        for key, value in values.items():
            if value is not None and key in self._indexes:
                for index in self._indexes.pop(key):
                    upload = self.uploads[index]
                    self.results[index] = {"filename": upload.filename, "caption": value["caption"],
                                           "tags": value["tags"], "cached": cached}
                    self.values[index] = value

    def settle(self, results: dict[str, "tuple[dict[str, Any], bool] | ServiceError"]) -> None:
        """Answer the files from Pending.results()."""
        for key, result in results.items():
            if isinstance(result, ServiceError):
                self.fail_key(key, result)
            else:
                self.found({key: result[0]}, cached=result[1])

    def fail(self, index: int, error: ServiceError) -> None:
        self.errors[index] = error
        self.results[index] = {"filename": self.uploads[index].filename, "error": error.to_dict()}

    def fail_key(self, key: str, error: ServiceError) -> None:
        for index in self._indexes.pop(key, []):
            self.fail(index, error)

    def outcomes(self) -> dict[str, int]:
        """How many files were cached, captioned, or refused."""
        counts = {"cached": 0, "captioned": 0, "error": 0}
        for result in self.results:
            counts["error" if "error" in result else "cached" if result.get("cached") else "captioned"] += 1
        return counts
