"""The C allocator of a process that runs the model: freed memory stays in the process for the next batch.

glibc's malloc hands blocks over 32 MiB out as their own mappings and unmaps them on free(), and gives the top of
its heaps back to the kernel. A model call frees most of what it allocated (BLIP-base's vision encoder alone: its
8x12x577x577 attention scores, three times per layer, about 2.3 GB for 8 images in bfloat16), so every batch
faulted about 570,000 fresh pages in again: 1.2-1.6 s of kernel time per 8-image caption on a 2-core machine, and
more in a VM that reports freed pages to its host (virtio-balloon free page reporting), where the first batch
after a few idle seconds also waits for the host to hand the memory back (measured: bench/README.md).

`keep_freed_memory()` asks glibc to keep it: no separate mappings (M_MMAP_MAX 0), no trimming below 2 GiB of free
heap top (M_TRIM_THRESHOLD), one arena for every thread created afterwards (M_ARENA_MAX 1: other arenas' heaps
are limited to 64 MiB, and bigger blocks there would be mappings again). The process's resident memory then stays
near its peak (which does not change) instead of falling back between batches. It is called first thing in the
commands that load the model (`python app.py`, `python bulk.py`); Ray workers get the same settings as
`GLIBC_TUNABLES` (`TUNABLES`). A malloc setting in the environment (GLIBC_TUNABLES glibc.malloc.*, MALLOC_*_)
is the operator's choice and is left alone; on another C library nothing changes.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt() parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1))
# the same as glibc tunables, for processes started with it in their environment (Ray workers)
TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}:glibc.malloc.arena_max=1"
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
               "MALLOC_TOP_PAD_")


def set_in_environment(environ: os._Environ | dict[str, str] | None = None) -> bool:
    """Whether the environment already sets glibc's malloc (then it is the operator's choice)."""
    environ = os.environ if environ is None else environ
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(name in environ for name in _MALLOC_ENV)


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory in this process; call before other threads start. Says what it did."""
    if set_in_environment():
        return "malloc left as the environment sets it"
    if platform.libc_ver()[0] != "glibc":
        return "malloc unchanged (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "malloc unchanged (no mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS):
        return "malloc unchanged (mallopt refused)"
    return "malloc keeps freed memory for the next batch (glibc: mmap_max 0, trim_threshold 2 GiB, arena_max 1)"


def worker_environment() -> dict[str, str]:
    """The environment variables a worker process needs for the same settings (none if the operator set any)."""
    if set_in_environment():
        return {}
    other = os.environ.get("GLIBC_TUNABLES")  # tunables of other glibc parts are kept beside ours
    return {"GLIBC_TUNABLES": f"{other}:{TUNABLES}" if other else TUNABLES}
