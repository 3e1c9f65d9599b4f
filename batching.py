"""Dynamic batching in front of the model: one model thread, fed from every request thread.

Request threads submit (key, inputs, group) jobs and wait on futures: `inputs` are one image's preprocessed
model inputs, `group` says what may share a generate call (the prompt and generation options). The model
thread takes the oldest job's group and runs up to `max_batch_size` queued jobs of that group in one call,
after waiting at most `max_wait_s` for a batch to fill. Results go through a post-processing thread (tags, cache writes) so the
model thread goes straight on to the next batch. Jobs with the same key share one future (single-flight):
identical images arriving together are captioned once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Hashable, Iterable, Iterator, Sequence, TypeVar

from errors import CaptioningError, OverloadedError

if TYPE_CHECKING:
    from metrics import Metrics

log = logging.getLogger(__name__)

R = TypeVar("R")
EXPECT_WAIT_FACTOR = 10  # a batch waits at most this many times max_wait_s for announced images
ForwardFn = Callable[[list[Any], Hashable], list[str]]


@dataclass
class Job:
    """One image waiting for the model: its cache key, its model inputs, and what it may be batched with."""

    key: str
    inputs: Any
    group: Hashable
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[R]):
    """Queue + model thread + post-processing thread; `submit` is safe to call from any thread."""

    def __init__(self, forward: ForwardFn, postprocess: Callable[[list[Job], list[str]], list[R]], *,
                 max_batch_size: int = 8, max_wait_s: float = 0.005, max_queue: int = 256,
                 metrics: "Metrics | None" = None, setup: Callable[[], None] | None = None) -> None:
        self.forward = forward
        self.setup = setup
        self.postprocess = postprocess
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._inflight: dict[str, Job] = {}  # key -> job, from submit until its result is published
        self._done: deque[tuple[list[Job], list[str] | BaseException]] = deque()
        self._cond = threading.Condition()
        self._done_cond = threading.Condition()
        self._expected = 0  # images announced by requests that are still hashing/decoding them
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the model and post-processing threads; returns once the model thread has run `setup` (the
        service's: the model thread's memory arena, then the warm-up caption), and raises what it raised.

        The warm-up runs on the model thread because PyTorch's OpenMP worker threads belong to the thread that
        calls the model. A model call from any other thread leaves a second team of idle workers behind; with more
        OpenMP threads than cores, GNU OpenMP stops spinning between parallel regions, and every later generate
        ran about 12% slower (2-core Intel Xeon, BLIP-base; see bench/README.md)."""
        warmed: Future = Future()
        for target, name in ((lambda: self._model_loop(warmed), "model"), (self._post_loop, "postprocess")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            warmed.result()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Finish queued work, then stop the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        with self._done_cond:
            self._done_cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def pending(self) -> int:
        """Images submitted and not yet answered."""
        return len(self._inflight)

    @contextmanager
    def expecting(self, count: int) -> Iterator[None]:
        """Announce `count` images about to be submitted (being hashed and decoded): a forming batch waits
        for them, up to `max_wait_s * EXPECT_WAIT_FACTOR`, instead of leaving without them."""
        with self._cond:
            self._expected += count
        try:
            yield
        finally:
            with self._cond:
                self._expected -= count
                self._cond.notify_all()

    def in_flight(self, keys: Iterable[str]) -> set[str]:
        """Which of these keys are queued or being captioned right now."""
        with self._cond:
            return {key for key in keys if key in self._inflight}

    def join(self, keys: Iterable[str]) -> dict[str, Future]:
        """The futures of those keys that are queued or being captioned now (their images need no decoding)."""
        with self._cond:
            return {key: self._inflight[key].future for key in keys if key in self._inflight}

    def submit(self, items: Sequence[tuple[str, Any, Hashable]]) -> list[Future]:
        """Queue (key, inputs, group) items; returns one future per item (shared for equal keys).

        Raises OverloadedError, and queues nothing, when the new images would exceed `max_queue`.
        """
        futures: list[Future] = []
        with self._cond:
            new_keys = {key for key, _, _ in items if key not in self._inflight}
            if new_keys and len(self._inflight) + len(new_keys) > self.max_queue:
                raise OverloadedError(
                    f"{len(self._inflight)} images are already waiting for the model (limit MAX_QUEUE_IMAGES="
                    f"{self.max_queue}); retry in a few seconds", retry_after=5)
            for key, inputs, group in items:
                job = self._inflight.get(key)
                if job is None:
                    job = self._inflight[key] = Job(key, inputs, group)
                    self._queue.append(job)
                futures.append(job.future)
            self._cond.notify_all()
            self._update_gauge()
        return futures

    def _model_loop(self, warmed: Future) -> None:
        try:
            if self.setup is not None:
                self.setup()
        except BaseException as exc:  # noqa: BLE001 - start() raises it
            warmed.set_exception(exc)
            return
        warmed.set_result(None)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            outcome: list[str] | BaseException
            started = time.perf_counter()
            try:
                outcome = self.forward([job.inputs for job in batch], batch[0].group)
                if len(outcome) != len(batch):
                    raise CaptioningError(f"model returned {len(outcome)} captions for {len(batch)} images")
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting requests
                log.exception("Captioning a batch of %d images failed", len(batch))
                outcome = exc
            if self.metrics:
                self.metrics.batch_size.observe(len(batch))
                self.metrics.generate_seconds.observe(time.perf_counter() - started)
            for job in batch:
                job.inputs = None  # free the tensors now; the job itself lives until its result is published
            with self._done_cond:
                self._done.append((batch, outcome))
                self._done_cond.notify()

    def _next_batch(self) -> list[Job] | None:
        """Wait for work, let a batch fill for at most max_wait_s, and take it (one group per batch)."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            group = self._queue[0].group
            deadline = self._queue[0].enqueued + self.max_wait_s
            hard_deadline = self._queue[0].enqueued + self.max_wait_s * EXPECT_WAIT_FACTOR
            while not self._stopping:
                same = sum(1 for job in self._queue if job.group == group)
                now = time.monotonic()
                # Leave when full; after max_wait_s unless more images are announced; never after the hard cap.
                if same >= self.max_batch_size or now >= hard_deadline or (now >= deadline and not self._expected):
                    break
                self._cond.wait((deadline if now < deadline else hard_deadline) - now)
            batch: list[Job] = []
            rest: deque[Job] = deque()
            for job in self._queue:
                if job.group == group and len(batch) < self.max_batch_size:
                    batch.append(job)
                else:
                    rest.append(job)
            self._queue = rest
            return batch

    def _post_loop(self) -> None:
        while True:
            with self._done_cond:
                while not self._done:
                    if self._stopping and not any(t.is_alive() for t in self._threads[:1]):
                        return
                    self._done_cond.wait(0.5)
                batch, outcome = self._done.popleft()
            if not isinstance(outcome, BaseException):
                try:
                    results: list[Any] | BaseException = self.postprocess(batch, outcome)
                    if len(results) != len(batch):  # else results[index] below kills this thread: every later
                        raise CaptioningError(  # request would wait forever
                            f"post-processing returned {len(results)} results for {len(batch)} images")
                except BaseException as exc:  # noqa: BLE001
                    log.exception("Post-processing a batch of %d captions failed", len(batch))
                    results = exc
            else:
                results = outcome
            with self._cond:
                for index, job in enumerate(batch):
                    self._inflight.pop(job.key, None)
                self._update_gauge()
            for index, job in enumerate(batch):
                if isinstance(results, BaseException):
                    job.future.set_exception(results)
                else:
                    job.future.set_result(results[index])

    def _update_gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_images.set(len(self._inflight))
