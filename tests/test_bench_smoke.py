"""The benchmark cannot rot: `bench/run.py --tiny --quick` runs every comparison end to end on the tiny checkpoint
(real server processes, a real redis-server) and writes its JSON and Markdown; the numbers themselves are not
judged here (CI does not run the real benchmark)."""
from __future__ import annotations

import json
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

from support.services import IN_CI, REPO_ROOT, missing_service

pytestmark = pytest.mark.live

COMPARISONS = ("batch", "concurrency", "dtype", "memory", "cache", "flops", "bulk", "allocator", "speedups")


def _numbers(value: object) -> list[float]:
    """Every number inside a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, numbers.Number):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


class BenchSmokeTest(unittest.TestCase):
    """One `--tiny --quick` run into a temporary folder (never bench/RESULTS.md)."""

    @classmethod
    def setUpClass(cls) -> None:
        if not shutil.which("redis-server"):
            missing_service("redis-server is not installed (apt-get install redis-server); the benchmark's "
                            "cache-hit comparison needs it")
        cls.out = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
        cls.process = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--tiny", "--quick", "--cache-seconds", "1",
             "--out", str(cls.out)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        results = cls.out / "results.json"
        cls.results = json.loads(results.read_text()) if results.is_file() else None

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.out, ignore_errors=True)

    def setUp(self) -> None:
        self.assertIsNotNone(self.results,
                             f"no results.json; exit {self.process.returncode}:\n{self.process.stderr[-4000:]}")

    def test_run_succeeds(self) -> None:
        self.assertEqual(self.process.returncode, 0, self.process.stderr[-4000:])

    def test_every_comparison_ran_with_numbers(self) -> None:
        comparisons = self.results["comparisons"]
        self.assertEqual(set(comparisons), set(COMPARISONS))
        for name in COMPARISONS:
            with self.subTest(comparison=name):
                outcome = comparisons[name]
                self.assertEqual(outcome["status"], "ok", outcome.get("traceback") or outcome.get("error"))
                self.assertTrue(_numbers(outcome), outcome)

    def test_measurements(self) -> None:
        c = self.results["comparisons"]
        case = c["batch"]["cases"][0]
        for path in ("loop", "batched", "http"):
            self.assertGreater(case["images_per_s"][path], 0)
        self.assertEqual(case["captions_equal_to_batched"], "8/8")  # the service did the same work
        for path in ("batched", "http"):  # CPU seconds of both sides: some, and never more cores than there are
            self.assertGreater(case["cpu_s_per_call"][path], 0)
            self.assertLessEqual(case["busy_cores"][path], (os.cpu_count() or 1) * 1.25)  # 10 ms /proc ticks
        self.assertGreater(c["concurrency"]["cases"][0]["ratio_concurrent_vs_sequential"], 0)
        self.assertTrue(c["cache"]["all_hits"])
        self.assertGreater(c["cache"]["saturation"]["req_per_s"], 0)
        self.assertIsInstance(c["cache"]["paced"]["latency_ms"]["p99"], float)
        self.assertIn("bfloat16", c["dtype"]["ratio_vs_float32"])
        for server in c["memory"]["servers"]:
            self.assertGreater(server["peak_rss_mib"], 0)
            self.assertGreater(server["start_to_ready_s"], 0)
        self.assertGreater(c["flops"]["rows"][0]["matmul"]["gflop_per_s"], 0)
        for row in c["flops"]["rows"]:
            self.assertGreater(row["caption"]["text_gflop_per_image"], 0)  # the decoder's share is counted
            self.assertGreaterEqual(row["caption"]["gflop_per_image"], row["gflop_per_image"])  # vision + decoder
            self.assertGreater(row["caption"]["vs_matmul"], 0)
        self.assertEqual({case["dtype"] for case in c["batch"]["cases"]}, {"float32", "bfloat16"})
        from captioners.base import cpu_flag_set, fast_bfloat16

        self.assertEqual(c["dtype"]["auto"]["dtype"], "bfloat16" if fast_bfloat16(cpu_flag_set()) else "float32")
        self.assertTrue(c["dtype"]["auto"]["reason"].startswith("auto: "))
        bulk = c["bulk"]
        self.assertEqual(bulk["captions_equal_to_reference"], f"{bulk['images']}/{bulk['images']}")
        self.assertEqual(bulk["ray"]["captions_equal_to_local"], f"{bulk['images']}/{bulk['images']}")
        self.assertGreater(bulk["ratio_bulk_vs_reference"], 0)
        import allocator

        if allocator.find_jemalloc() or IN_CI:  # the bare calls ran on the servers' malloc, as the servers do
            self.assertRegex(self.results["meta"]["allocator"], r"^jemalloc .*the model thread keeps")
        self.assertEqual([case["dtype"] for case in c["allocator"]["cases"]], ["float32", "bfloat16"])
        for case in c["allocator"]["cases"]:  # a server on each allocator, doing the same work
            self.assertEqual(case["allocator"]["system"], "system malloc (ALLOCATOR=system)")
            if allocator.find_jemalloc() or IN_CI:  # `make test` and CI install it
                self.assertRegex(case["allocator"]["default"], r"^jemalloc .*the model thread keeps")
            self.assertEqual(case["captions_equal"], f"{case['images']}/{case['images']}")
            for k in ("system", "default"):
                self.assertGreaterEqual(case["minor_faults_per_request"][k], 0)
                self.assertGreater(case["cpu_s_per_request"][k], 0)
            self.assertGreater(case["ratio_default_vs_system"], 0)
        rows = {row["name"]: row for row in c["speedups"]["rows"]}
        self.assertEqual(rows["fp32"]["status"], "ok")
        self.assertIn(rows["sdpa"]["status"], ("ok", "unsupported"))

    def test_targets_reported_not_judged(self) -> None:
        targets = [t for c in self.results["comparisons"].values() for t in c["targets"]]
        self.assertGreaterEqual(len(targets), 8)
        for t in targets:
            self.assertIsInstance(t["value"], (int, float), t)
            self.assertFalse(t["judged"], t)

    def test_markdown_written(self) -> None:
        text = (self.out / "RESULTS.md").read_text()
        self.assertIn("# Throughput benchmark results", text)
        self.assertIn("Smoke run on the tests' tiny checkpoint", text)
        for heading in ("## Summary", "## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.",
                        "## 8.", "## Speed-ups tried"):
            self.assertIn(heading, text)


class GpuScriptShapeTest(unittest.TestCase):
    """`bench/gpu.sh` end to end, on the CPU (CI has no GPU): the script runs bench/run.py with what it is given,
    requests up to the GPU default batch (64 images in one request), the bulk command at the device's default
    batch, and writes its results even without nvidia-smi."""

    def test_gpu_script_runs_the_gpu_shape_on_cpu(self) -> None:
        if not shutil.which("redis-server"):
            missing_service("redis-server is not installed (apt-get install redis-server); the benchmark needs it")
        from captioners.base import CPU_BATCH_SIZE, GPU_BATCH_SIZE

        out = Path(tempfile.mkdtemp(prefix="bench-gpu-shape-"))
        self.addCleanup(shutil.rmtree, out, True)
        sizes = sorted({1, 8, GPU_BATCH_SIZE})
        process = subprocess.run(
            ["bash", str(REPO_ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--tiny", "--quick", "--only",
             "batch,bulk", "--dtypes", "bfloat16", "--batch-sizes", ",".join(map(str, sizes)), "--out", str(out)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHON": sys.executable, "GPU_BENCH_SECONDS": "600"})
        self.assertEqual(process.returncode, 0, process.stderr[-4000:])
        results = json.loads((out / "results.json").read_text())
        batch, bulk = results["comparisons"]["batch"], results["comparisons"]["bulk"]
        self.assertEqual(batch["status"], "ok", batch.get("traceback"))
        self.assertEqual([(c["dtype"], c["images"]) for c in batch["cases"]], [("bfloat16", n) for n in sizes])
        largest = batch["cases"][-1]
        self.assertEqual(largest["captions_equal_to_batched"], f"{GPU_BATCH_SIZE}/{GPU_BATCH_SIZE}")
        self.assertEqual(bulk["status"], "ok", bulk.get("traceback"))
        self.assertEqual(bulk["batch_size"], CPU_BATCH_SIZE)  # bulk.py's default on this device
        self.assertGreater(bulk["bulk_images_per_s_after_load"][0], 0)
        self.assertIn("## 7.", (out / "RESULTS.md").read_text())


class ProfileCaptionTest(unittest.TestCase):
    """`bench/profile_caption.py` (the per-operator split of a caption's time in two dtypes) runs on the tiny
    checkpoint and prints both tables with each dtype's time for the matrix products."""

    def test_profile_tables(self) -> None:
        process = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "profile_caption.py"), "--tiny", "--images", "2", "--top",
             "30"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(process.returncode, 0, process.stderr[-4000:])
        out = process.stdout
        for title in ("### vision encoder", "### whole caption"):
            self.assertIn(title, out)
        self.assertIn("| operator | float32 s | bfloat16 s | float32 / bfloat16 |", out)
        totals = [line.split("|")[2:4] for line in out.splitlines() if line.startswith("| **all operators**")]
        self.assertEqual(len(totals), 2, out)
        for cells in totals:  # time was measured in both dtypes
            self.assertTrue(all(float(cell) > 0 for cell in cells), cells)
        self.assertRegex(out, r"\| aten::addmm \| \d+\.\d{3} \| \d+\.\d{3} \|")  # the linear layers, both dtypes


if __name__ == "__main__":
    unittest.main()
