"""allocator.py: jemalloc preloaded by running the command again (same process id, LD_PRELOAD put back for its
children), the model thread's arena that keeps what it frees while other threads give theirs back, ALLOCATOR, and
what a real server runs on and says in /readyz. Page faults are counted per thread from /proc; nothing is timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import unittest

import pytest
import requests

import allocator
from config import load_config
from errors import ConfigError
from support.services import REPO_ROOT, ServerProcess, missing_service
from support.tiny_models import tiny_checkpoint
from support.webtest import new_png

BLOCK_BYTES = 64 << 20  # a block the size of one of the vision encoder's attention scores (8 images, bfloat16)
BLOCK_PAGES = BLOCK_BYTES // os.sysconf("SC_PAGE_SIZE")

# Run as `python -c`: prints its process id on every start, preloads, then says what it runs on as JSON.
PRELOAD_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    import allocator
    print("started", os.getpid(), flush=True)
    allocator.preload(sys.argv[1])
    child = subprocess.run(["sh", "-c", "printf %s \\"$LD_PRELOAD\\""], capture_output=True, text=True).stdout
    print(json.dumps({"pid": os.getpid(), "allocator": allocator.describe(), "ld_preload": os.environ.get("LD_PRELOAD"),
                      "child_ld_preload": child}))
""")

# Two threads, each: malloc a 64 MiB block, write every byte, free it, three times; for rounds 2 and 3 of each, the
# thread's page faults and how much more is resident after free than before round 1. One thread first calls
# keep_freed_memory(), as the model thread does.
FAULTS_SCRIPT = textwrap.dedent("""
    import ctypes, json, os, sys, threading
    import allocator
    allocator.preload(sys.argv[1])
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    SIZE = 64 << 20
    def faults():
        return int(open("/proc/thread-self/stat").read().rsplit(")", 1)[1].split()[7])
    def resident():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    found = {}
    def work(name, keep):
        kept = allocator.keep_freed_memory() if keep else False
        later, stayed, start = [], [], resident()
        for round in range(3):
            before = faults()
            block = libc.malloc(SIZE)
            ctypes.memset(block, 1, SIZE)
            libc.free(block)
            if round:
                later.append(faults() - before)
                stayed.append(resident() - start)
        found[name] = {"kept": kept, "faults": later, "stayed": stayed}
    for name, keep in (("model", True), ("other", False)):
        thread = threading.Thread(target=work, args=(name, keep))
        thread.start()
        thread.join()
    print(json.dumps({"allocator": allocator.describe(), **found}))
""")


def run_python(script: str, mode: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -c script mode` from the checkout, with LD_PRELOAD only as `env` gives it."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ALLOCATOR")}
    return subprocess.run([sys.executable, "-c", script, mode], cwd=REPO_ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def last_json(process: subprocess.CompletedProcess) -> dict:
    return json.loads(process.stdout.strip().splitlines()[-1])


def require_jemalloc() -> str:
    path = allocator.find_jemalloc()
    if path is None:
        missing_service(f"{allocator.LIBRARY} is not installed (apt-get install libjemalloc2)")
    return path


@pytest.mark.inprocess
class AllocatorSettingTest(unittest.TestCase):
    """ALLOCATOR: auto by default; jemalloc, system or a library path; anything else is refused at start."""

    def test_default_and_accepted_values(self) -> None:
        self.assertEqual(load_config([], environ={}, dotenv_path=os.devnull).allocator, "auto")
        for value in ("auto", "jemalloc", "system", "/opt/lib/libjemalloc.so.2"):
            with self.subTest(value):
                self.assertEqual(load_config([], environ={"ALLOCATOR": value}, dotenv_path=os.devnull).allocator,
                                 value)

    def test_unknown_value_is_refused_naming_the_setting(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config([], environ={"ALLOCATOR": "tcmalloc"}, dotenv_path=os.devnull)
        self.assertIn("ALLOCATOR", str(caught.exception))
        self.assertIn("tcmalloc", str(caught.exception))

    def test_a_library_path_that_is_not_a_file_stops_the_start(self) -> None:
        done = run_python(PRELOAD_SCRIPT, "/nonexistent/libjemalloc.so.2")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("ConfigError: ALLOCATOR=/nonexistent/libjemalloc.so.2: /nonexistent/libjemalloc.so.2 is not "
                      "a file", done.stderr)
        self.assertEqual(done.stdout.count("started"), 1)  # not run again

    def test_system_runs_on_the_system_malloc_without_running_again(self) -> None:
        done = run_python(PRELOAD_SCRIPT, "system")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.count("started"), 1)
        self.assertEqual(last_json(done)["allocator"], "system malloc (ALLOCATOR=system)")


@pytest.mark.live
class PreloadTest(unittest.TestCase):
    """preload() runs the command again with jemalloc, in the same process, and leaves children as they were."""

    def setUp(self) -> None:
        self.library = require_jemalloc()

    def test_auto_runs_the_command_again_in_the_same_process_on_jemalloc(self) -> None:
        done = run_python(PRELOAD_SCRIPT, "auto")
        self.assertEqual(done.returncode, 0, done.stderr)
        starts = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("started")]
        found = last_json(done)
        self.assertEqual(len(starts), 2, done.stdout)  # once on the system's malloc, once with jemalloc
        self.assertEqual(set(starts), {found["pid"]})  # exec: the same process, so supervisors keep their pid
        self.assertRegex(found["allocator"], r"^jemalloc \d+\.\d+")
        self.assertIsNone(found["ld_preload"])  # put back as it was (unset) ...
        self.assertEqual(found["child_ld_preload"], "")  # ... so child processes start on their own malloc

    def test_a_preload_of_the_user_is_kept_and_put_back(self) -> None:
        mine = "libm.so.6"  # harmless: already loaded by Python; found by name in the library path
        done = run_python(PRELOAD_SCRIPT, "jemalloc", env={"LD_PRELOAD": mine})
        self.assertEqual(done.returncode, 0, done.stderr)
        found = last_json(done)
        self.assertRegex(found["allocator"], r"^jemalloc ")
        self.assertEqual(found["ld_preload"], mine)
        self.assertEqual(found["child_ld_preload"], mine)

    def test_already_on_jemalloc_means_no_second_start(self) -> None:
        done = run_python(PRELOAD_SCRIPT, "auto", env={"LD_PRELOAD": self.library})
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.count("started"), 1)
        self.assertRegex(last_json(done)["allocator"], r"^jemalloc ")


@pytest.mark.live
class ModelThreadMemoryTest(unittest.TestCase):
    """The thread that called keep_freed_memory() reuses its pages; other threads still give theirs back."""

    def test_jemalloc_the_model_thread_keeps_its_pages_and_others_do_not(self) -> None:
        require_jemalloc()
        done = run_python(FAULTS_SCRIPT, "auto")
        self.assertEqual(done.returncode, 0, done.stderr)
        found = last_json(done)
        self.assertIn("the model thread keeps the memory it frees", found["allocator"])
        self.assertTrue(found["model"]["kept"])
        for faults, stayed in zip(found["model"]["faults"], found["model"]["stayed"]):
            self.assertLess(faults, BLOCK_PAGES // 100, found)  # its pages are still there: (almost) no faults
            self.assertGreater(stayed, BLOCK_BYTES // 2, found)
        self.assert_given_back(found["other"], found)

    def assert_given_back(self, thread: dict, found: dict) -> None:
        """Freed blocks left the process: resident memory did not keep them, and they fault in again. (With
        transparent huge pages always on, a fault maps 2 MiB: the count is then 512 times lower.)"""
        for stayed, faults in zip(thread["stayed"], thread["faults"]):
            self.assertLess(stayed, BLOCK_BYTES // 8, found)
            self.assertGreater(faults, BLOCK_PAGES // 1024, found)

    def test_system_malloc_gives_every_block_back(self) -> None:
        done = run_python(FAULTS_SCRIPT, "system")
        self.assertEqual(done.returncode, 0, done.stderr)
        found = last_json(done)
        self.assertFalse(found["model"]["kept"])
        for name in ("model", "other"):
            self.assert_given_back(found[name], found)


@pytest.mark.live
class ServerAllocatorTest(unittest.TestCase):
    """A real `python app.py`: on jemalloc by default (and says so), on the system's malloc with ALLOCATOR=system,
    and exit 2 before loading anything when ALLOCATOR names a library that is not there."""

    def serve(self, **env: str) -> ServerProcess:
        server = ServerProcess(["--model-path", str(tiny_checkpoint("blip"))],
                               env={"CACHE_BACKEND": "memory", **env}).start()
        self.addCleanup(server.stop)
        return server

    @staticmethod
    def mapped(pid: int) -> str:
        with open(f"/proc/{pid}/maps") as maps:
            return maps.read()

    def test_default_server_runs_on_jemalloc_with_the_model_thread_keeping_its_memory(self) -> None:
        require_jemalloc()
        server = self.serve()
        ready = requests.get(server.url + "/readyz", timeout=10).json()
        self.assertRegex(ready["allocator"], r"^jemalloc \d.*the model thread keeps the memory it frees")
        self.assertIn("/libjemalloc", self.mapped(server.process.pid))  # the process Popen started, run again
        response = server.post_images([("a.png", new_png())])
        self.assertEqual(response.status_code, 200, response.text)
        self.assertTrue(response.json()["results"][0]["caption"])
        self.assertIn("Memory: jemalloc", server.log())

    def test_allocator_system_server_stays_on_the_system_malloc(self) -> None:
        server = self.serve(ALLOCATOR="system")
        ready = requests.get(server.url + "/readyz", timeout=10).json()
        self.assertEqual(ready["allocator"], "system malloc (ALLOCATOR=system)")
        self.assertNotIn("/libjemalloc", self.mapped(server.process.pid))
        self.assertEqual(server.post_images([("a.png", new_png())]).status_code, 200)

    def test_missing_library_exits_2_with_the_reason(self) -> None:
        server = ServerProcess(["--model-path", str(tiny_checkpoint("blip"))],
                               env={"ALLOCATOR": "/nonexistent/libjemalloc.so.2"})
        server.start(wait_ready=False)
        self.addCleanup(server.stop)
        self.assertEqual(server.wait_exit(60), 2)
        self.assertIn("ALLOCATOR=/nonexistent/libjemalloc.so.2: /nonexistent/libjemalloc.so.2 is not a file",
                      server.log())
