"""The process's memory allocator: jemalloc where it is installed, so that the model thread keeps what it frees.

Why: one caption of 8 images on a CPU frees about 2.3 GB in blocks over 32 MiB (the vision encoder's attention
scores, 8 x 12 x 577 x 577 each), and glibc's malloc hands every such block back to the kernel at once, so the
next batch faults it all in again: ~570,000 page faults and 1-2.5 s of kernel time per 8-image bfloat16 call of
BLIP-base on a 2-core VM, and more after an idle pause on VMs that return free memory to their host. jemalloc
lets one thread allocate from an arena of its own: the model thread's arena never gives its pages back (its
memory stays at the model's peak, as PyTorch's CUDA allocator keeps GPU memory), while every other thread
(decoding a 50-megapixel upload, parsing a request) returns what it frees as before. Measured in bench/README.md.

jemalloc has to replace malloc before the process starts, so `preload()` runs the same command again once with
LD_PRELOAD (as `python -m torch.backends.xeon.run_cpu --enable-jemalloc` does); the new process sets LD_PRELOAD
back as it was, so the processes it starts (Ray, redis-server in tests) start as usual. Without the library
(`apt-get install libjemalloc2`) or with ALLOCATOR=system, everything runs on the system's malloc.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import sysconfig
from pathlib import Path

from errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "jemalloc", "system")
LIBRARY = "libjemalloc.so.2"
# Set in the environment of the re-executed process: LD_PRELOAD as it was before (often empty).
_MARKER = "IMGCAP_PRELOAD_WAS"
_state: dict[str, str | None] = {"reason": None}  # why this process runs without jemalloc, when it does
_kept: list[int] = []  # the arenas of threads that keep their freed memory


def preload(mode: str) -> None:
    """Make jemalloc this process's malloc: return if it already is or cannot be, else re-execute the command
    (same interpreter, arguments and process id) with it preloaded. Raises ConfigError when ALLOCATOR asks for
    jemalloc and it cannot be had."""
    rerun = os.environ.pop(_MARKER, None)
    if rerun is not None:  # this is the re-executed process: its children get LD_PRELOAD as it was
        if rerun:
            os.environ["LD_PRELOAD"] = rerun
        else:
            os.environ.pop("LD_PRELOAD", None)
    if mode == "system":
        _state["reason"] = "ALLOCATOR=system"
        return
    if _jemalloc() is not None:
        return
    if rerun is not None:
        _state["reason"] = "LD_PRELOAD of jemalloc did not take effect"
    else:
        path = find_jemalloc() if mode in ("auto", "jemalloc") else mode
        if path is not None and Path(path).is_file():
            env = {**os.environ, _MARKER: os.environ.get("LD_PRELOAD", ""),
                   "LD_PRELOAD": ":".join(p for p in (path, os.environ.get("LD_PRELOAD")) if p)}
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        _state["reason"] = (f"{path} is not a file" if path is not None
                            else f"{LIBRARY} not found; apt-get install libjemalloc2 to use it")
    if mode != "auto":
        raise ConfigError(f"ALLOCATOR={mode}: {_state['reason']} (ALLOCATOR=system runs on the system's malloc)")


def find_jemalloc() -> str | None:
    """The path of libjemalloc.so.2 in this environment (venv/conda first) or the system's library folders."""
    multiarch = sysconfig.get_config_var("MULTIARCH")  # e.g. x86_64-linux-gnu: Debian's folder for this CPU
    for folder in (Path(sys.prefix) / "lib", Path("/usr/local/lib"), *([Path("/usr/lib") / multiarch] if multiarch
                   else sorted(Path("/usr/lib").glob("*-linux-gnu"))), Path("/usr/lib64"), Path("/usr/lib")):
        if (folder / LIBRARY).is_file():
            return str(folder / LIBRARY)
    return None


def keep_freed_memory() -> bool:
    """Give the calling thread an arena of its own that never returns pages to the kernel (jemalloc only; with
    the system's malloc nothing changes). The model thread calls this before its first model call."""
    lib = _jemalloc()
    if lib is None:
        return False
    arena = ctypes.c_uint()
    size = ctypes.c_size_t(ctypes.sizeof(arena))
    if lib.mallctl(b"arenas.create", ctypes.byref(arena), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        log.warning("jemalloc could not create an arena for the model thread; it frees memory as others do")
        return False
    never = ctypes.c_ssize_t(-1)  # decay time -1: freed pages stay with the arena, never purged
    for name in ("dirty_decay_ms", "muzzy_decay_ms"):
        lib.mallctl(f"arena.{arena.value}.{name}".encode(), None, None, ctypes.byref(never),
                    ctypes.c_size_t(ctypes.sizeof(never)))
    if lib.mallctl(b"thread.arena", None, None, ctypes.byref(arena), ctypes.c_size_t(ctypes.sizeof(arena))) != 0:
        return False
    _kept.append(arena.value)
    return True


def describe() -> str:
    """Which malloc this process runs on and what it does for the model thread (logs, /readyz)."""
    lib = _jemalloc()
    if lib is None:
        return f"system malloc ({_state['reason'] or 'jemalloc not preloaded'})"
    version = ctypes.c_char_p()
    size = ctypes.c_size_t(ctypes.sizeof(version))
    lib.mallctl(b"version", ctypes.byref(version), ctypes.byref(size), None, ctypes.c_size_t(0))
    name = f"jemalloc {(version.value or b'?').decode().split('-')[0]}"
    if _kept:
        return f"{name}; the model thread keeps the memory it frees for the next batch"
    return name


def preload_env() -> dict[str, str]:
    """Environment that gives a new process this one's jemalloc (Ray workers): {} on the system's malloc."""
    if _jemalloc() is None:
        return {}
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return {}
    paths = [line.split()[-1] for line in maps.splitlines() if "/libjemalloc" in line]
    return {"LD_PRELOAD": paths[0]} if paths else {}


@functools.cache
def _jemalloc() -> ctypes.CDLL | None:
    """This process's malloc as a library handle when it is jemalloc (its mallctl answers and the memory that
    malloc hands out is counted by it), else None."""
    process = ctypes.CDLL(None)
    if hasattr(process, "mallctl"):
        counter = ctypes.c_uint64()
        size = ctypes.c_size_t(ctypes.sizeof(counter))

        def allocated() -> int | None:
            ok = process.mallctl(b"thread.allocated", ctypes.byref(counter), ctypes.byref(size), None,
                                 ctypes.c_size_t(0)) == 0
            return counter.value if ok else None

        process.malloc.restype = ctypes.c_void_p
        process.free.argtypes = [ctypes.c_void_p]
        before = allocated()
        block = process.malloc(1 << 20)
        after = allocated()
        process.free(block)
        if before is not None and after is not None and after - before >= 1 << 20:
            return process
    return None
