"""Unit tests of batching.Batcher: a fake forward function stands in for the model (no torch needed)."""
from __future__ import annotations

import threading
import time
import unittest
from concurrent.futures import Future, wait
from typing import Any

import pytest

from batching import Batcher, Job
from errors import CaptioningError, OverloadedError
from metrics import Metrics

pytestmark = pytest.mark.inprocess

RESULT_TIMEOUT = 10  # seconds; a future that takes longer than this means the batcher hangs


class FakeModel:
    """Records every forward call; can be held at a gate, made slow, or made to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], str | None]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a forward call has started
        self.fail_with: BaseException | None = None
        self.wrong_count = False
        self._lock = threading.Lock()

    def forward(self, images: list[Any], prompt: str | None) -> list[str]:
        with self._lock:
            self.calls.append((list(images), prompt))
        self.entered.set()
        if not self.gate.wait(RESULT_TIMEOUT):
            raise AssertionError("the test never opened the gate")
        if self.fail_with is not None:
            raise self.fail_with
        captions = [f"{prompt}|{image}" for image in images]
        return captions[:-1] if self.wrong_count else captions

    @property
    def images_seen(self) -> list[Any]:
        return [image for images, _ in self.calls for image in images]


class FakePostprocess:
    """Turns captions into result dicts; can fail or return the wrong number of results."""

    def __init__(self) -> None:
        self.fail_with: BaseException | None = None
        self.wrong_count = False
        self.calls = 0

    def __call__(self, jobs: list[Job], captions: list[str]) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        results = [{"key": job.key, "caption": caption} for job, caption in zip(jobs, captions)]
        return results[:-1] if self.wrong_count else results


class BatcherTestCase(unittest.TestCase):
    """Builds a started Batcher around the fakes and stops it after the test."""

    def make(self, **options: Any) -> Batcher:
        self.model = FakeModel()
        self.post = FakePostprocess()
        self.metrics = Metrics()
        options.setdefault("max_wait_s", 0.0)
        batcher = Batcher(self.model.forward, self.post, metrics=self.metrics, **options)
        batcher.start()
        self.addCleanup(batcher.stop, 2.0)
        self.addCleanup(self.model.gate.set)  # never leave the model thread blocked
        return batcher

    def results(self, futures: list[Future]) -> list[Any]:
        return [future.result(RESULT_TIMEOUT) for future in futures]

    def hold_model(self, batcher: Batcher) -> Future:
        """Close the gate and park one job in forward(), so that the next submissions queue up behind it."""
        self.model.gate.clear()
        self.model.entered.clear()
        [future] = batcher.submit([("blocker", "blocker", None)])
        self.assertTrue(self.model.entered.wait(RESULT_TIMEOUT), "the model thread never picked up the job")
        return future


class BatchShapeTest(BatcherTestCase):
    def test_batches_never_exceed_max_batch_size(self) -> None:
        batcher = self.make(max_batch_size=4)
        blocker = self.hold_model(batcher)
        futures = batcher.submit([(f"k{i}", f"img{i}", None) for i in range(19)])
        self.model.gate.set()
        results = self.results(futures)
        blocker.result(RESULT_TIMEOUT)
        sizes = [len(images) for images, _ in self.model.calls]
        self.assertTrue(all(size <= 4 for size in sizes), sizes)
        self.assertEqual(sizes[1:], [4, 4, 4, 4, 3])  # everything queued behind the blocker is batched fully
        self.assertEqual(sorted(self.model.images_seen), sorted(["blocker"] + [f"img{i}" for i in range(19)]))
        self.assertEqual([r["caption"] for r in results], [f"None|img{i}" for i in range(19)])

    def test_one_prompt_per_batch_and_results_reach_the_right_futures(self) -> None:
        batcher = self.make(max_batch_size=8)
        blocker = self.hold_model(batcher)
        prompts = ["a photo of", None, "a painting of"]
        items = [(f"k{i}", f"img{i}", prompts[i % 3]) for i in range(12)]
        futures = batcher.submit(items[:6]) + batcher.submit(items[6:])
        self.model.gate.set()
        results = self.results(futures)
        blocker.result(RESULT_TIMEOUT)
        for images, prompt in self.model.calls[1:]:
            expected = {image for _, image, p in items if p == prompt}
            self.assertTrue(set(images) <= expected, (prompt, images))
        self.assertEqual(len(self.model.calls), 4)  # the blocker, then one batch per prompt
        for (key, image, prompt), result in zip(items, results):
            self.assertEqual(result, {"key": key, "caption": f"{prompt}|{image}"})

    def test_order_within_a_batch_is_the_submission_order(self) -> None:
        batcher = self.make(max_batch_size=8)
        blocker = self.hold_model(batcher)
        futures = []
        for i in range(8):  # eight separate submissions, as from eight requests
            futures += batcher.submit([(f"k{i}", f"img{i}", "p")])
        self.model.gate.set()
        self.assertEqual([r["key"] for r in self.results(futures)], [f"k{i}" for i in range(8)])
        blocker.result(RESULT_TIMEOUT)
        self.assertEqual(self.model.calls[1], ([f"img{i}" for i in range(8)], "p"))

    def test_wrong_number_of_captions_fails_the_batch_loudly(self) -> None:
        batcher = self.make(max_batch_size=4)
        self.model.wrong_count = True
        with self.assertLogs("batching", "ERROR") as logged:
            futures = batcher.submit([("a", "A", None), ("b", "B", None)])
            for future in futures:
                with self.assertRaises(CaptioningError) as caught:
                    future.result(RESULT_TIMEOUT)
                self.assertIn("1 captions for 2 images", str(caught.exception))
        self.assertIn("Captioning a batch of 2 images failed", logged.output[0])


class WaitingTest(BatcherTestCase):
    def test_waiting_lets_a_batch_fill_from_several_threads(self) -> None:
        # A long max_wait: the batch is closed as soon as it is full, so the test does not wait for it.
        batcher = self.make(max_batch_size=8, max_wait_s=5.0)
        barrier = threading.Barrier(8)
        futures: list[Future] = [None] * 8  # type: ignore[list-item]

        def client(i: int) -> None:
            barrier.wait()
            [futures[i]] = batcher.submit([(f"k{i}", f"img{i}", None)])

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RESULT_TIMEOUT)
        self.results(futures)
        self.assertEqual(len(self.model.calls), 1, self.model.calls)
        self.assertEqual(sorted(self.model.calls[0][0]), sorted(f"img{i}" for i in range(8)))
        self.assertLess(time.monotonic() - started, 4.0, "a full batch must not wait for max_wait_s")

    def test_a_lone_job_waits_about_max_wait_s(self) -> None:
        batcher = self.make(max_batch_size=8, max_wait_s=0.3)
        started = time.monotonic()
        [future] = batcher.submit([("k", "img", None)])
        future.result(RESULT_TIMEOUT)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertLess(elapsed, 3.0)

    def test_announced_images_hold_the_batch_until_they_arrive(self) -> None:
        batcher = self.make(max_batch_size=8, max_wait_s=0.05)
        with batcher.expecting(1):  # another request is still decoding its image
            [first] = batcher.submit([("a", "img-a", None)])
            time.sleep(0.2)  # longer than max_wait_s, shorter than the hard cap (10 x max_wait_s)
            self.assertEqual(self.model.calls, [])
            [second] = batcher.submit([("b", "img-b", None)])
        self.results([first, second])
        self.assertEqual([images for images, _ in self.model.calls], [["img-a", "img-b"]])

    def test_announcements_never_hold_a_batch_past_the_hard_cap(self) -> None:
        batcher = self.make(max_batch_size=8, max_wait_s=0.02)
        with batcher.expecting(5):
            started = time.monotonic()
            [future] = batcher.submit([("a", "img-a", None)])
            future.result(RESULT_TIMEOUT)
            elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.19)  # 10 x max_wait_s
        self.assertLess(elapsed, 3.0)

    def test_without_announcements_a_batch_leaves_after_max_wait_s(self) -> None:
        batcher = self.make(max_batch_size=8, max_wait_s=0.05)
        [first] = batcher.submit([("a", "img-a", None)])
        time.sleep(0.3)
        [second] = batcher.submit([("b", "img-b", None)])
        self.results([first, second])
        self.assertEqual([images for images, _ in self.model.calls], [["img-a"], ["img-b"]])

    def test_zero_wait_runs_at_once(self) -> None:
        batcher = self.make(max_batch_size=8, max_wait_s=0.0)
        started = time.monotonic()
        self.results(batcher.submit([("k", "img", None)]))
        self.assertLess(time.monotonic() - started, 2.0)


class SingleFlightTest(BatcherTestCase):
    def test_same_key_twice_in_one_submission_is_captioned_once(self) -> None:
        batcher = self.make(max_batch_size=8)
        futures = batcher.submit([("same", "img", None), ("other", "img2", None), ("same", "img", None)])
        self.assertIs(futures[0], futures[2])
        results = self.results(futures)
        self.assertEqual(results[0], results[2])
        self.assertEqual(sorted(self.model.images_seen), ["img", "img2"])

    def test_same_key_from_concurrent_threads_is_captioned_once(self) -> None:
        batcher = self.make(max_batch_size=8)
        blocker = self.hold_model(batcher)
        barrier = threading.Barrier(8)
        futures: list[Future] = [None] * 8  # type: ignore[list-item]

        def client(i: int) -> None:
            barrier.wait()
            [futures[i]] = batcher.submit([("shared", "img", None)])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RESULT_TIMEOUT)
        self.assertEqual(len({id(f) for f in futures}), 1)
        self.assertEqual(batcher.in_flight(["shared", "nope"]), {"shared"})
        self.model.gate.set()
        results = self.results(futures)
        blocker.result(RESULT_TIMEOUT)
        self.assertEqual(self.model.images_seen.count("img"), 1)
        self.assertEqual({r["caption"] for r in results}, {"None|img"})

    def test_key_being_captioned_is_shared_not_captioned_again(self) -> None:
        batcher = self.make(max_batch_size=8)
        self.model.gate.clear()
        [first] = batcher.submit([("k", "img", None)])
        self.assertTrue(self.model.entered.wait(RESULT_TIMEOUT))
        [second] = batcher.submit([("k", "img", None)])  # while forward() runs on it
        self.assertIs(first, second)
        self.model.gate.set()
        self.assertEqual(first.result(RESULT_TIMEOUT), second.result(RESULT_TIMEOUT))
        self.assertEqual(len(self.model.calls), 1)

    def test_after_publishing_the_key_is_free_again(self) -> None:
        batcher = self.make()
        self.results(batcher.submit([("k", "img", None)]))
        self.assertEqual(batcher.in_flight(["k"]), set())
        self.assertEqual(batcher.pending, 0)
        self.results(batcher.submit([("k", "img", None)]))
        self.assertEqual(len(self.model.calls), 2)  # the batcher is no cache: the service's cache is


class OverloadTest(BatcherTestCase):
    def test_overload_raises_with_retry_after_and_queues_nothing(self) -> None:
        batcher = self.make(max_batch_size=8, max_queue=4)
        blocker = self.hold_model(batcher)  # 1 in flight
        accepted = batcher.submit([("a", "A", None), ("b", "B", None)])  # 3 in flight
        with self.assertRaises(OverloadedError) as caught:
            batcher.submit([("c", "C", None), ("d", "D", None)])  # 5 > 4
        error = caught.exception
        self.assertEqual(error.status_code, 503)
        self.assertEqual(error.code, "overloaded")
        self.assertIsNotNone(error.retry_after)
        self.assertGreater(error.retry_after, 0)
        self.assertIn("MAX_QUEUE_IMAGES", error.message)
        self.assertEqual(batcher.pending, 3)
        self.assertEqual(batcher.in_flight(["c", "d"]), set())  # nothing of the refused request was queued
        self.assertEqual(self.metrics.queue_images._value.get(), 3)

        # Images already in flight cost nothing: a request for them is still served while full.
        shared = batcher.submit([("a", "A", None)])
        self.assertIs(shared[0], accepted[0])
        fits = batcher.submit([("c", "C", None)])  # exactly at the limit
        self.assertEqual(batcher.pending, 4)

        self.model.gate.set()
        self.results([blocker, *accepted, *fits])
        self.assertNotIn("D", self.model.images_seen)
        self.assertEqual(batcher.pending, 0)
        self.assertEqual(self.metrics.queue_images._value.get(), 0)
        self.results(batcher.submit([("c", "C", None), ("d", "D", None)]))  # room again


class FailureTest(BatcherTestCase):
    def test_forward_exception_reaches_every_waiting_future_and_batcher_goes_on(self) -> None:
        batcher = self.make(max_batch_size=8)
        blocker = self.hold_model(batcher)
        self.model.fail_with = RuntimeError("CUDA out of memory")
        futures = batcher.submit([(f"k{i}", f"img{i}", None) for i in range(5)])
        with self.assertLogs("batching", "ERROR"):
            self.model.gate.set()
            for future in [blocker, *futures]:
                with self.assertRaisesRegex(RuntimeError, "out of memory"):
                    future.result(RESULT_TIMEOUT)
        self.assertEqual(batcher.pending, 0)
        self.model.fail_with = None
        self.assertEqual(self.results(batcher.submit([("k0", "img0", None)]))[0]["caption"], "None|img0")

    def test_postprocess_exception_reaches_every_waiting_future_and_batcher_goes_on(self) -> None:
        batcher = self.make(max_batch_size=8)
        self.post.fail_with = ConnectionError("cache write failed")
        futures = batcher.submit([("a", "A", None), ("b", "B", None)])
        with self.assertLogs("batching", "ERROR"):
            for future in futures:
                with self.assertRaises(ConnectionError):
                    future.result(RESULT_TIMEOUT)
        self.post.fail_with = None
        self.assertEqual(self.results(batcher.submit([("a", "A", None)]))[0]["key"], "a")

    def test_postprocess_returning_too_few_results_fails_the_batch_not_the_batcher(self) -> None:
        # A post-processing fault of any kind must reach the waiting requests; it must not kill the
        # post-processing thread (which would leave this and every later request waiting forever).
        batcher = self.make(max_batch_size=8)
        self.post.wrong_count = True
        with self.assertLogs("batching", "ERROR") as logged:
            futures = batcher.submit([("a", "A", None), ("b", "B", None)])
            done, not_done = wait(futures, 3)
        self.assertIn("Post-processing a batch of 2 captions failed", logged.output[0])
        self.assertFalse(not_done, "futures never completed: the post-processing thread died")
        self.assertTrue(any(f.exception() is not None for f in futures))
        self.post.wrong_count = False
        later = batcher.submit([("c", "C", None)])
        done, not_done = wait(later, 3)
        self.assertFalse(not_done, "the batcher stopped working after a post-processing fault")
        self.assertEqual(later[0].result()["key"], "c")


class WarmUpTest(unittest.TestCase):
    """The warm-up runs on the model thread (where every model call runs) before start() returns."""

    def test_warm_up_runs_on_the_model_thread_first(self) -> None:
        model, seen = FakeModel(), []

        def forward(images: list[Any], group: Any) -> list[str]:
            seen.append(threading.current_thread())
            return model.forward(images, group)

        batcher = Batcher(forward, FakePostprocess(), max_wait_s=0.0,
                          setup=lambda: seen.append(("warm-up", threading.current_thread())))
        batcher.start()
        self.addCleanup(batcher.stop, 2.0)
        self.assertEqual(len(seen), 1)  # start() returned after the warm-up, before any job
        self.assertEqual(batcher.submit([("k", "img", None)])[0].result(RESULT_TIMEOUT)["caption"], "None|img")
        (label, warm_thread), job_thread = seen
        self.assertEqual((label, warm_thread), ("warm-up", job_thread))
        self.assertEqual(job_thread.name, "model")
        self.assertIsNot(job_thread, threading.current_thread())

    def test_a_failing_warm_up_fails_start_and_stops_the_threads(self) -> None:
        def broken() -> None:
            raise RuntimeError("no weights")

        batcher = Batcher(FakeModel().forward, FakePostprocess(), max_wait_s=0.0, setup=broken)
        with self.assertRaisesRegex(RuntimeError, "no weights"):
            batcher.start()
        for thread in batcher._threads:
            thread.join(2.0)
            self.assertFalse(thread.is_alive(), thread.name)


class StopTest(unittest.TestCase):
    def test_stop_finishes_queued_work_and_ends_the_threads(self) -> None:
        model = FakeModel()
        batcher = Batcher(model.forward, FakePostprocess(), max_batch_size=2, max_wait_s=0.05)
        batcher.start()
        futures = batcher.submit([(f"k{i}", f"img{i}", None) for i in range(5)])
        started = time.monotonic()
        batcher.stop(timeout=5.0)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertTrue(all(f.done() for f in futures))
        self.assertEqual([f.result()["key"] for f in futures], [f"k{i}" for i in range(5)])
        self.assertFalse(any(thread.is_alive() for thread in batcher._threads))

    def test_stop_of_an_idle_batcher_is_prompt(self) -> None:
        batcher = Batcher(FakeModel().forward, FakePostprocess())
        batcher.start()
        started = time.monotonic()
        batcher.stop(timeout=5.0)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertFalse(any(thread.is_alive() for thread in batcher._threads))


if __name__ == "__main__":
    unittest.main()
