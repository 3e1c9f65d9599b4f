"""allocator.py: after keep_freed_memory(), memory a thread frees is reused without page faults; the operator's
malloc settings win; Ray workers get the same settings. Each behaviour check runs in a child process of its own,
so the test process's allocator is never changed."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import unittest
from unittest import mock

import allocator
from support.services import REPO_ROOT

# A child: optionally keep_freed_memory(), then a new thread fills and frees a 256 MiB block (bigger than the
# 64 MiB heaps of a second arena) four times; the page faults of each round after the first.
CHILD = r"""
import json, resource, sys, threading
sys.path.insert(0, sys.argv[1])
import allocator
said = allocator.keep_freed_memory() if sys.argv[2] == "keep" else "not called"
faults = []

def rounds():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = bytearray(256 * 1024 * 1024)  # calloc'd, then every page written
        block[::4096] = b"x" * len(block[::4096])
        del block
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps({"said": said, "faults": faults[1:]}))
"""
PAGES = 256 * 1024 * 1024 // 4096  # 65,536 faults for a block that comes fresh from the kernel each round


def child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO_ROOT), mode], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return json.loads(out.stdout)


@unittest.skipUnless(platform.libc_ver()[0] == "glibc", "glibc's malloc is what allocator.py sets")
class KeepFreedMemoryTest(unittest.TestCase):
    def test_without_it_every_round_faults_the_block_in_again(self) -> None:
        # the control: shows that the check below could fail
        result = child("plain")
        for faults in result["faults"]:
            self.assertGreater(faults, PAGES // 2, result)

    def test_with_it_a_new_thread_reuses_the_freed_block(self) -> None:
        result = child("keep")
        self.assertIn("keeps freed memory", result["said"])
        for faults in result["faults"]:
            self.assertLess(faults, PAGES // 50, result)

    def test_an_operator_setting_is_left_alone(self) -> None:
        for env in ({"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}):
            with self.subTest(env=env):
                result = child("keep", **env)
                self.assertEqual(result["said"], "malloc left as the environment sets it")
                for faults in result["faults"]:
                    self.assertGreater(faults, PAGES // 2, result)


class WorkerEnvironmentTest(unittest.TestCase):
    def test_ray_workers_get_the_tunables(self) -> None:
        from bulk_ray import _runtime_env

        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("GLIBC_TUNABLES", None)
            for name in [k for k in os.environ if k.startswith("MALLOC_")]:
                os.environ.pop(name)
            self.assertEqual(_runtime_env("auto")["env_vars"]["GLIBC_TUNABLES"], allocator.TUNABLES)
            self.assertEqual(_runtime_env("ray://head:10001")["env_vars"]["GLIBC_TUNABLES"], allocator.TUNABLES)
            os.environ["GLIBC_TUNABLES"] = "glibc.cpu.hwcaps=-AVX512F"  # another part of glibc: kept beside ours
            self.assertEqual(allocator.worker_environment(),
                             {"GLIBC_TUNABLES": f"glibc.cpu.hwcaps=-AVX512F:{allocator.TUNABLES}"})
            os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"  # the operator's malloc choice: workers inherit it, not ours
            self.assertEqual(allocator.worker_environment(), {})
            self.assertNotIn("GLIBC_TUNABLES", _runtime_env("auto")["env_vars"])

    def test_the_tunables_say_what_mallopt_sets(self) -> None:
        names = {allocator.M_MMAP_MAX: "mmap_max", allocator.M_TRIM_THRESHOLD: "trim_threshold",
                 allocator.M_ARENA_MAX: "arena_max"}
        self.assertEqual(allocator.TUNABLES,
                         ":".join(f"glibc.malloc.{names[p]}={v}" for p, v in allocator.SETTINGS))
