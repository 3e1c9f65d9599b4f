"""The throughput benchmark (issue 4): the service against the per-image loop and a bare batched generate.

    make bench                          # = python bench/run.py: every comparison -> bench/RESULTS.md, results.json
    python bench/run.py --quick         # one timed run per measurement instead of three; no torch.compile
    python bench/run.py --only cache    # one comparison (batch, concurrency, cache, dtype, memory, flops, speedups)
    python bench/run.py --tiny --quick --out /tmp/b   # the tests' tiny checkpoint: the smoke run, seconds
    bench/gpu.sh                        # = python bench/run.py --device cuda: float16/bfloat16, batches 1 to 64

It builds (once, offline, cached in bench/models/) a random-weight checkpoint with the architecture of
Salesforce/blip-image-captioning-base, starts the service as real `python app.py --blip --model-path DIR`
processes, and pins every caption to exactly 20 new tokens (min_new_tokens = max_new_tokens = 20, the server
through MIN_NEW_TOKENS/MAX_NEW_TOKENS) so that both sides of every comparison do the same work. Medians of
several runs; the ratios are what count, the absolute times hold only for the machine that made them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # the service's own modules (captioners.base: what --dtype auto reads)
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.append(str(REPO_ROOT / "tests"))  # support.services: RedisServer, ServerProcess
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import allocator  # noqa: E402
import checkpoint  # noqa: E402
import clients  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
import workload  # noqa: E402
from captioners.base import GPU_BATCH_SIZE, default_batch_size  # noqa: E402
from errors import ConfigError  # noqa: E402

log = logging.getLogger("bench")

COMPARISONS = ("batch", "concurrency", "dtype", "memory", "cache", "flops", "bulk", "allocator", "speedups")
BULK_IMAGES = 64  # images in the bulk comparison (issue 12)
NEW_TOKENS = 20
CACHE_RATE = 300.0  # req/s offered in the cache-hit latency run (the throughput target)


@dataclass
class Server:
    """One `python app.py` process of the benchmark and what was measured about it."""

    name: str
    process: Any
    cache: str  # "redis" (cleared before every timed miss) or "off"
    start_to_ready_s: float | None = None
    idle_rss_kib: int | None = None
    served_batch: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def clear_cache(self) -> None:
        """Make the next requests miss (model work), on a Redis-backed server."""
        if self.cache == "redis":
            clients.reset_cache(self.url)


def median(values: list[float]) -> float:
    return statistics.median(values)


def target(name: str, value: float | None, op: str, threshold: float, judged: bool, unit: str = "") -> dict:
    """One target of the issue, with its verdict (None when not judged: tiny checkpoint, or not this device)."""
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "pass": ok,
            "judged": judged}


class Bench:
    """Shared state of one run: the checkpoint, images, server processes and in-process models (all lazy)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.device = args.device
        self.tokens = NEW_TOKENS
        self.repeats = args.repeats or (1 if args.quick else 3)
        self.cache_seconds = args.cache_seconds or (3.0 if args.quick else 5.0 if args.device == "cuda" else 10.0)
        # The one-at-a-time baselines (per-image loop, sequential requests) run at a constant rate per image, so
        # on a GPU, where 32 of them dominate the run, their rate is measured on the first few (0: all).
        self.serial_sample = args.serial_sample if args.serial_sample is not None else (
            8 if args.device == "cuda" else 0)
        if self.device == "cuda":
            self.dtypes = args.dtypes or ["float16", "bfloat16"]
            # up to the service's default batch on a GPU (what a server without MAX_BATCH_SIZE runs)
            self.batch_sizes = args.batch_sizes or sorted({1, 8, 32, GPU_BATCH_SIZE})
            self.client_counts = sorted({8, min(32, max(self.batch_sizes))})
        else:
            # both dtypes on the CPU (issue 14): the service within 5% of the bare call in each
            self.dtypes = args.dtypes or ["float32", "bfloat16"]
            self.batch_sizes = args.batch_sizes or [8]
            self.client_counts = [8]
        # comparison 4: every dtype beside float32 (on CPU: bfloat16)
        self.compare_dtypes = [d for d in (args.compare_dtypes or (["bfloat16"] if self.device == "cpu"
                                                                    else ["float16", "bfloat16"])) if d != "float32"]
        self.max_batch = max(self.batch_sizes)
        self.judged = not args.tiny and self.device == "cpu"
        started = time.perf_counter()
        if args.tiny:
            self.folder, self.checkpoint_info, built = checkpoint.tiny_checkpoint()
        else:
            self.folder, self.checkpoint_info, built = checkpoint.full_checkpoint(args.model_dir)
        self.checkpoint_info = {**self.checkpoint_info, "path": str(self.folder), "built_now": built,
                                "ready_s": round(time.perf_counter() - started, 2)}
        count = max(self.max_batch, max(self.client_counts))
        self.files = workload.photos(count)
        self.images = workload.decoded(self.files)
        self.cache_file = workload.photos(1, first_seed=1000)[0]
        self.servers: dict[str, Server] = {}
        self.direct: dict[str, Any] = {}
        self.redis: Any = None
        # With a redis-server the servers run as in production (Redis cache; cleared before each timed miss);
        # without one they run with CACHE_BACKEND=off and only the cache-hit comparison cannot run.
        self.cache_mode = "redis" if shutil.which("redis-server") else "off"
        self.torch_dtype = lambda name: getattr(torch, name)
        self.concurrent_start = False

    # ----- resources -------------------------------------------------------------------------------------------
    def server(self, dtype: str) -> Server:
        """The running server for this dtype (started on first use; start-to-ready timed). `DTYPE|ALLOCATOR`
        names a server with that ALLOCATOR setting (comparison 8), e.g. `bfloat16|system`."""
        if dtype not in self.servers:
            self.start_servers([dtype])
        return self.servers[dtype]

    def start_servers(self, dtypes: list[str]) -> None:
        """Start servers for these dtypes together, then wait for each (one at a time: accurate start times)."""
        from support.services import ServerProcess

        pending = []
        for name in dict.fromkeys(dtypes):
            if name in self.servers:
                continue
            dtype, _, allocator = name.partition("|")
            env = {"MIN_NEW_TOKENS": str(self.tokens), "MAX_NEW_TOKENS": str(self.tokens),
                   "MAX_BATCH_SIZE": str(self.max_batch), "SERVER_THREADS": str(max(8, max(self.client_counts))),
                   "MAX_FILES_PER_REQUEST": str(max(32, self.max_batch)), "CACHE_BACKEND": self.cache_mode}
            if self.cache_mode == "redis":
                env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(self.redis_server().port),
                           CACHE_PREFIX=f"bench-{os.getpid()}")
            env.update(self.args.server_env)
            if allocator:
                env["ALLOCATOR"] = allocator
            args = ["--blip", "--model-path", str(self.folder), "--device", self.device, "--dtype", dtype]
            log.info("starting server %s (cache %s)", name, self.cache_mode)
            server = Server(f"{name}, cache {self.cache_mode}", ServerProcess(args, env=env), self.cache_mode)
            server.extra = {"env": env, "args": args}
            server.process.start(wait_ready=False)
            self.servers[name] = server
            pending.append((server, time.perf_counter()))
        self.concurrent_start = self.concurrent_start or len(pending) > 1
        for server, started in pending:
            try:
                server.process.wait_ready(timeout=300)
            except BaseException:
                self.servers.pop(next(d for d, s in self.servers.items() if s is server))
                server.process.stop()
                raise
            server.start_to_ready_s = round(time.perf_counter() - started, 2)
            server.idle_rss_kib = machine.vm_kib(server.pid, "VmRSS")
            server.extra.update(_startup_breakdown(server.process.log()))
            log.info("server %s ready in %.1f s", server.name, server.start_to_ready_s)

    def redis_server(self) -> Any:
        """Our own redis-server on a free port (never the shared one on 6379)."""
        if self.redis is None:
            from support.services import RedisServer

            self.redis = RedisServer().start()
        return self.redis

    def captioner(self, dtype: str) -> Any:
        """The in-process transformers model for the baselines (loaded once per dtype)."""
        if dtype not in self.direct:
            from inprocess import DirectCaptioner

            self.direct[dtype] = DirectCaptioner(self.folder, self.device, self.torch_dtype(dtype), self.tokens)
        return self.direct[dtype]

    def body(self, count: int, first: int = 0) -> bytes:
        """The multipart body of one request with images first..first+count-1."""
        return workload.multipart(self.files[first:first + count])

    def close(self) -> None:
        for direct in self.direct.values():
            direct.close()
        for server in self.servers.values():
            server.process.stop()
        self.servers.clear()
        if self.redis is not None:
            self.redis.close()


def _startup_breakdown(server_log: str) -> dict[str, Any]:
    """Model load and warm-up seconds, as the server logged them."""
    found: dict[str, Any] = {}
    load = re.search(r"Loaded .* in ([\d.]+) s", server_log)
    warm = re.search(r"Warm-up caption took ([\d.]+) s", server_log)
    spacy = re.search(r"loaded spaCy model .* in ([\d.]+) s", server_log)
    if load:
        found["model_load_s"] = float(load.group(1))
    if warm:
        found["warmup_s"] = float(warm.group(1))
    if spacy:
        found["spacy_load_s"] = float(spacy.group(1))
    return found


def _same(a: list[str], b: list[str]) -> int:
    return sum(x == y for x, y in zip(a, b))


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3)


# ----- comparison 1: one request with N images ------------------------------------------------------------------
def compare_batch(b: Bench) -> dict[str, Any]:
    """One HTTP request with N images vs the per-image loop and a bare batched generate, in-process."""
    cases = []
    for dtype in b.dtypes:
        for size in b.batch_sizes:
            cases.append(_batch_case(b, dtype, size))
    return {"cases": cases, "targets": [t for case in cases for t in case.pop("targets")]}


def _batch_case(b: Bench, dtype: str, size: int) -> dict[str, Any]:
    log.info("comparison 1: %d images, %s", size, dtype)
    server = b.server(dtype)
    direct = b.captioner(dtype)
    images = b.images[:size]
    body = b.body(size)
    import requests

    loop_images = images[:b.serial_sample] if b.serial_sample else images
    with requests.Session() as session:
        # warm-up on every path (first calls with new shapes pay for one-off set-up)
        direct.batched(images)
        direct.loop(images[:1])
        server.clear_cache()
        clients.post(session, server.url, body, size, cached=False)
        server.served_batch = True
        runs: dict[str, list[float]] = {"loop": [], "batched": [], "http": []}
        server_side = {"generate_s": 0.0, "http_caption_s": 0.0, "batches": 0.0, "batched_images": 0.0}
        # CPU seconds per call, all threads: the bare call's from this process, the request's from the server's
        # (CPU time / wall time shows how many cores each kept busy: a model thread whose OpenMP workers sleep
        # between ops shows up here as fewer busy cores for the same work, see bench/README.md)
        cpu: dict[str, list[float]] = {"batched": [], "http": []}
        for _ in range(b.repeats):  # interleaved, so drift in the machine's load hits every path alike
            seconds, loop_captions = direct.loop(loop_images)
            runs["loop"].append(seconds)
            used = time.process_time()
            seconds, batch_captions = direct.batched(images)
            cpu["batched"].append(time.process_time() - used)
            runs["batched"].append(seconds)
            server.clear_cache()
            before = clients.scrape(server.url)
            used = machine.cpu_seconds(server.pid)
            seconds, results = clients.post(session, server.url, body, size, cached=False)
            cpu["http"].append(machine.cpu_seconds(server.pid) - used)
            runs["http"].append(seconds)
            for k, v in clients.delta(before, clients.scrape(server.url)).items():
                if k in server_side:
                    server_side[k] += v
        server_side["mean_batch_size"] = (round(server_side["batched_images"] / server_side["batches"], 2)
                                          if server_side["batches"] else None)
    med = {k: median(v) for k, v in runs.items()}
    counts = {"loop": len(loop_images), "batched": size, "http": size}
    ips = {k: round(counts[k] / v, 3) for k, v in med.items()}
    http_captions = [r["caption"] for r in results]
    per_request_generate = server_side["generate_s"] / max(1, b.repeats)
    judged = b.judged and size == 8
    case = {
        "dtype": dtype, "images": size, "loop_images": len(loop_images),
        "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()}, "images_per_s": ips,
        "ratio_http_vs_loop": _ratio(ips["http"], ips["loop"]),
        "ratio_http_vs_batched": _ratio(ips["http"], ips["batched"]),
        "ratio_batched_vs_loop": _ratio(ips["batched"], ips["loop"]),
        "server": {"generate_s_per_request": round(per_request_generate, 3),
                   "http_s_per_request_in_flask": round(server_side["http_caption_s"] / max(1, b.repeats), 3),
                   "batches": server_side["batches"], "mean_batch_size": server_side["mean_batch_size"],
                   # means on both sides (the captioner's figure is a mean over the requests)
                   "overhead_s_per_request": round(statistics.mean(runs["http"]) - per_request_generate, 3)},
        "cpu_s_per_call": {k: round(statistics.mean(v), 3) for k, v in cpu.items()},
        "busy_cores": {k: round(sum(cpu[k]) / sum(runs[k]), 2) for k in cpu},
        "captions_equal_to_batched": f"{_same(http_captions, batch_captions)}/{size}",
        "loop_captions_equal_to_batched": f"{_same(loop_captions, batch_captions)}/{len(loop_images)}",
    }
    label = f"{size} images, {dtype}"
    case["targets"] = [
        target(f"1. one request ({label}) vs per-image loop", case["ratio_http_vs_loop"], ">=", 1.4, judged, "x"),
        target(f"1. one request ({label}) vs bare batched generate", case["ratio_http_vs_batched"], ">=", 0.95,
               judged, "x"),
    ]
    return case


# ----- comparison 2: concurrent clients -------------------------------------------------------------------------
def compare_concurrency(b: Bench) -> dict[str, Any]:
    """C clients with one image each, all at once, vs the same C requests one at a time."""
    cases = []
    for dtype in b.dtypes:
        for count in b.client_counts:
            log.info("comparison 2: %d clients, %s", count, dtype)
            server = b.server(dtype)
            bodies = [b.body(1, i) for i in range(count)]  # different images: the service dedupes equal ones
            serial = bodies[:b.serial_sample] if b.serial_sample else bodies
            server.clear_cache()
            clients.sequential(server.url, bodies[:1], cached=False)  # warm-up
            conc, seq, latencies, server_side = [], [], [], []
            for _ in range(b.repeats):
                server.clear_cache()
                before = clients.scrape(server.url)
                seconds, lat = clients.concurrent(server.url, bodies, cached=False)
                server_side.append(clients.delta(before, clients.scrape(server.url)))
                conc.append(seconds)
                latencies.extend(lat)
                server.clear_cache()
                seq.append(clients.sequential(server.url, serial, cached=False))
            rates = {"concurrent": count / median(conc), "sequential": len(serial) / median(seq)}
            ratio = _ratio(rates["concurrent"], rates["sequential"])
            judged = b.judged and dtype == "float32" and count == 8
            cases.append({
                "dtype": dtype, "clients": count, "sequential_requests": len(serial),
                "runs_s": {"concurrent": [round(x, 3) for x in conc], "sequential": [round(x, 3) for x in seq]},
                "median_s": {"concurrent": round(median(conc), 3), "sequential": round(median(seq), 3)},
                "requests_per_s": {k: round(v, 3) for k, v in rates.items()},
                "ratio_concurrent_vs_sequential": ratio,
                "concurrent_latency_ms": clients.percentiles_ms(latencies),
                "server_batches_per_round": [s["batches"] for s in server_side],
                "server_mean_batch_size_per_round": [s["mean_batch_size"] for s in server_side],
                "targets": [target(f"2. {count} concurrent clients vs one at a time ({dtype})", ratio, ">=", 1.3,
                                   judged, "x")],
            })
    return {"cases": cases, "targets": [t for case in cases for t in case.pop("targets")]}


# ----- comparison 3: cache hits -----------------------------------------------------------------------------------
def compare_cache(b: Bench) -> dict[str, Any]:
    """Cache hits over HTTP with a real Redis: keep-alive clients posting a ~100 KB JPEG, after priming."""
    import requests

    if b.cache_mode != "redis":
        raise RuntimeError("redis-server is not installed (apt-get install redis-server): the cache-hit comparison "
                           "needs a real Redis")
    server = b.server(b.dtypes[0])
    name, data = b.cache_file
    body = workload.multipart([b.cache_file])
    server.clear_cache()
    with requests.Session() as session:
        prime_s, _ = clients.post(session, server.url, body, 1, cached=False)
        clients.post(session, server.url, body, 1, cached=True)
    host, port = "127.0.0.1", server.process.port
    connections = 8
    log.info("comparison 3: saturation, %d connections, %.0f s", connections, b.cache_seconds)
    before = clients.scrape(server.url)
    if clients.wrk_available():
        saturation = clients.wrk_load(server.url, body, connections, b.cache_seconds)
    else:
        saturation = clients.socket_load(host, port, body, connections, b.cache_seconds)
    in_flask = clients.delta(before, clients.scrape(server.url))
    if in_flask["http_caption_requests"]:
        saturation["mean_ms_inside_flask"] = round(1000 * in_flask["http_caption_s"] /
                                                   in_flask["http_caption_requests"], 3)
    log.info("comparison 3: paced at %.0f req/s", CACHE_RATE)
    paced = clients.socket_load(host, port, body, connections, b.cache_seconds, rate=CACHE_RATE)
    all_hits = all(run["misses"] == 0 and run["errors"] == 0 for run in (saturation, paced))
    judged = b.judged
    return {
        "file": {"name": name, "bytes": len(data)}, "prime_s": round(prime_s, 3), "all_hits": all_hits,
        "saturation": saturation, "paced": paced,
        "targets": [
            target("3. cache hits: median latency at 300 req/s (8 keep-alive clients)", paced["latency_ms"]["p50"],
                   "<=", 5.0, judged, "ms"),
            target("3. cache hits: p99 latency at 300 req/s (8 keep-alive clients)", paced["latency_ms"]["p99"],
                   "<=", 20.0, judged, "ms"),
            target("3. cache hits: throughput, 8 keep-alive clients flat out", saturation["req_per_s"], ">=", 300.0,
                   judged, "req/s"),
        ] + ([] if all_hits else [target("3. every response was a cache hit", 0.0, ">=", 1.0, judged)]),
    }


# ----- comparison 4: bfloat16 (and float16 on GPUs) vs float32 ----------------------------------------------------
def compare_dtype(b: Bench) -> dict[str, Any]:
    """The N-image request on a float32 server vs servers in the other dtypes (requests alternate)."""
    import requests

    size = 8 if 8 in b.batch_sizes else b.max_batch
    body = b.body(size)
    names = ["float32", *b.compare_dtypes, *(["auto"] if b.device == "cpu" else [])]
    b.start_servers(names)
    servers = {d: b.server(d) for d in names}
    runs: dict[str, list[float]] = {d: [] for d in names}
    with requests.Session() as session:
        for d in names:
            servers[d].clear_cache()
            clients.post(session, servers[d].url, body, size, cached=False)  # warm-up
            servers[d].served_batch = True
        for _ in range(b.repeats):
            for d in names:
                servers[d].clear_cache()
                runs[d].append(clients.post(session, servers[d].url, body, size, cached=False)[0])
    med = {d: median(v) for d, v in runs.items()}
    ratios = {d: _ratio(med["float32"], med[d]) for d in [*b.compare_dtypes, *(["auto"] if "auto" in med else [])]}
    flags = machine.machine()["flags"]
    fast = machine.fast_bf16() if b.device == "cpu" else None
    auto = None
    if "auto" in servers:
        ready = requests.get(servers["auto"].url + "/readyz", timeout=10).json()
        auto = {"dtype": ready.get("dtype"), "reason": ready.get("dtype_reason")}
    # On a CPU with fast bfloat16 the issue asks for 2.2x; without it bfloat16 is expected to be slower, and auto
    # must keep float32 (reported, not judged).
    targets = [target(f"4. {d} vs float32, one request of {size} images", r, ">=", 2.2 if fast else 1.0,
                      b.judged and d == "bfloat16" and bool(fast), "x") for d, r in ratios.items() if d != "auto"]
    if auto is not None:
        expected = "bfloat16" if fast else "float32"
        targets.append(target(f"4. --dtype auto chose {auto['dtype']} (expected {expected}: "
                              f"{fast or 'no fast bfloat16'})", 1.0 if auto["dtype"] == expected else 0.0, ">=", 1.0,
                              b.judged, ""))
        targets.append(target(f"4. --dtype auto ({auto['dtype']}) vs float32", ratios["auto"], ">=",
                              2.2 if fast else 0.95, b.judged, "x"))
    return {
        "images": size, "runs_s": {d: [round(x, 3) for x in v] for d, v in runs.items()},
        "median_s": {d: round(v, 3) for d, v in med.items()},
        "images_per_s": {d: round(size / v, 3) for d, v in med.items()},
        "ratio_vs_float32": ratios, "auto": auto, "fast_bf16": fast,
        "cpu_bf16": machine.bf16_note(flags) if b.device == "cpu" else None,
        "targets": targets,
    }


# ----- comparison 7: the bulk command over a folder -------------------------------------------------------------
def compare_bulk(b: Bench) -> dict[str, Any]:
    """`python bulk.py FOLDER` (local, then --ray) vs a bare batched generate loop over the same image files with
    reading, decoding and the processor overlapped with the model (in this process, same batch size)."""
    import tempfile

    dtype = b.dtypes[0]
    batch = default_batch_size(b.device)  # what bulk.py runs without MAX_BATCH_SIZE
    count = max(BULK_IMAGES, 4 * batch) if not b.args.tiny else 16
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for name, data in workload.photos(count, first_seed=5000):
            (folder / name).write_bytes(data)
        paths = sorted(folder.iterdir())
        direct = b.captioner(dtype)
        direct.overlapped(paths[:batch], batch)  # warm-up
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ENV_FILE": os.devnull,
               "MIN_NEW_TOKENS": str(b.tokens), "MAX_NEW_TOKENS": str(b.tokens), "MAX_BATCH_SIZE": str(batch)}
        base = [sys.executable, str(REPO_ROOT / "bulk.py"), str(folder), "--no-cache", "--blip", "--model-path",
                str(b.folder), "--device", b.device, "--dtype", dtype]

        def bulk(n: int, *extra: str) -> dict[str, Any]:
            output = Path(tmp) / f"run-{n}.jsonl"
            started = time.perf_counter()
            done = subprocess.run([*base, "--output", str(output), *extra], env={**os.environ, **env},
                                  cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"bulk.py {' '.join(extra)} exited {done.returncode}: {done.stderr[-2000:]}")
            line = next(x for x in reversed(done.stderr.splitlines()) if x.startswith("bulk: "))
            after = re.search(r"([\d.]+) img/s after the model loaded in ([\d.]+) s", line)
            rows = [json.loads(x) for x in output.read_text().splitlines()]
            return {"wall_s": wall, "summary": line, "captions": [r.get("caption") for r in rows],
                    "images_per_s_after_load": float(after.group(1)) if after else None,
                    "model_load_s": float(after.group(2)) if after else None}

        reference, local = [], []
        for n in range(b.repeats):  # interleaved, so drift in the machine's load hits both alike
            seconds, captions = direct.overlapped(paths, batch)
            reference.append(seconds)
            local.append(bulk(n))
        ray_run = bulk(99, "--ray", "--workers", "1")
    ref_ips = count / median(reference)
    local_ips = median([r["images_per_s_after_load"] for r in local])
    local_wall = median([r["wall_s"] for r in local])
    ratio = _ratio(local_ips, ref_ips)
    return {
        "dtype": dtype, "images": count, "batch_size": batch,
        "reference_runs_s": [round(x, 3) for x in reference], "reference_images_per_s": round(ref_ips, 3),
        "bulk_images_per_s_after_load": [r["images_per_s_after_load"] for r in local],
        "bulk_model_load_s": [r["model_load_s"] for r in local], "bulk_wall_s": [round(r["wall_s"], 2) for r in local],
        "bulk_summary": local[-1]["summary"], "ratio_bulk_vs_reference": ratio,
        "captions_equal_to_reference": f"{_same(local[-1]['captions'], captions)}/{count}",
        "ray": {"wall_s": round(ray_run["wall_s"], 2), "images_per_s_whole_run": round(count / ray_run["wall_s"], 3),
                "overhead_s_vs_local_wall": round(ray_run["wall_s"] - local_wall, 2),
                "captions_equal_to_local": f"{_same(ray_run['captions'], local[-1]['captions'])}/{count}",
                "summary": ray_run["summary"], "workers": 1},
        "targets": [target(f"7. bulk.py over {count} images vs overlapped batched generate loop", ratio, ">=", 0.95,
                           b.judged, "x")],
    }


# ----- comparison 8: the model thread's memory kept (jemalloc) vs the system's malloc -----------------------------
def compare_allocator(b: Bench) -> dict[str, Any]:
    """The N-image request on a default server (ALLOCATOR=auto: jemalloc where installed, the model thread keeping
    what it frees) vs one with ALLOCATOR=system, in each dtype; requests alternate, so both servers sit idle
    equally long between their requests. Page faults and CPU seconds per request from /proc/PID/stat."""
    import requests

    size = 8 if 8 in b.batch_sizes else b.max_batch
    body = b.body(size)
    cases = []
    for dtype in b.dtypes:
        names = {"system": f"{dtype}|system", "default": dtype}
        b.start_servers(list(names.values()))
        servers = {k: b.server(v) for k, v in names.items()}
        runs: dict[str, list[float]] = {k: [] for k in names}
        faults: dict[str, list[int]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        captions: dict[str, list[str]] = {}
        with requests.Session() as session:
            for server in servers.values():
                server.clear_cache()
                clients.post(session, server.url, body, size, cached=False)  # warm-up: the model's peak, once
                server.served_batch = True
            for _ in range(b.repeats):
                for k, server in servers.items():
                    server.clear_cache()
                    faulted, used = machine.minor_faults(server.pid), machine.cpu_seconds(server.pid)
                    seconds, results = clients.post(session, server.url, body, size, cached=False)
                    runs[k].append(seconds)
                    faults[k].append(machine.minor_faults(server.pid) - faulted)
                    cpu[k].append(machine.cpu_seconds(server.pid) - used)
                    captions[k] = [r["caption"] for r in results]
            described = {k: requests.get(s.url + "/readyz", timeout=10).json().get("allocator")
                         for k, s in servers.items()}
        b.servers.pop(names["system"]).process.stop()  # its memory back for the comparisons that follow
        med = {k: median(v) for k, v in runs.items()}
        cases.append({
            "dtype": dtype, "images": size, "allocator": described,
            "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "minor_faults_per_request": {k: round(statistics.median(v)) for k, v in faults.items()},
            "cpu_s_per_request": {k: round(statistics.mean(v), 3) for k, v in cpu.items()},
            "ratio_default_vs_system": _ratio(med["system"], med["default"]),
            "captions_equal": f"{_same(captions['default'], captions['system'])}/{size}",
        })
    return {"cases": cases, "targets": []}


# ----- comparison 5: memory and start-up ---------------------------------------------------------------------------
def compare_memory(b: Bench) -> dict[str, Any]:
    """Peak RSS (VmHWM) of each server after it served the N-image request, and its start-to-ready time."""
    import requests

    size = 8 if 8 in b.batch_sizes else b.max_batch
    body = b.body(size)
    rows = []
    dtypes = list(dict.fromkeys(["float32", *b.dtypes, *b.compare_dtypes]))
    b.start_servers(dtypes)
    for dtype in dtypes:
        server = b.server(dtype)
        if not server.served_batch:
            server.clear_cache()
            with requests.Session() as session:
                clients.post(session, server.url, body, size, cached=False)
            server.served_batch = True
        hwm, rss = machine.vm_kib(server.pid, "VmHWM"), machine.vm_kib(server.pid, "VmRSS")
        row = {"dtype": dtype, "start_to_ready_s": server.start_to_ready_s,
               "peak_rss_mib": round(hwm / 1024, 1) if hwm else None,
               "rss_now_mib": round(rss / 1024, 1) if rss else None,
               "rss_when_ready_mib": round(server.idle_rss_kib / 1024, 1) if server.idle_rss_kib else None,
               **{k: v for k, v in server.extra.items() if k.endswith("_s")}}
        gpu = _gpu_memory_mib(server.pid)
        if gpu is not None:
            row["gpu_memory_mib"] = gpu
        rows.append(row)
    # servers started together compete for the CPU while loading: their start times are not judged
    judged = b.judged and not b.concurrent_start
    return {"images": size, "servers": rows, "started_together": b.concurrent_start,
            "targets": [target(f"5. start to ready ({r['dtype']})", r["start_to_ready_s"], "<=", 20.0, judged, "s")
                        for r in rows]}


def _gpu_memory_mib(pid: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


# ----- comparison 6: how close to the machine's limit ------------------------------------------------------------
def compare_flops(b: Bench) -> dict[str, Any]:
    """Achieved GFLOP/s of the vision encoder and of the whole caption (batch 8, FLOPs counted analytically from
    the config) beside a large matmul of the same dtype in the same run: the fraction of the machine's limit."""
    import torch

    from inprocess import caption_flops, matmul_gflops, vision_flops

    size = 8 if 8 in b.batch_sizes else b.max_batch
    dtypes = ["float32", "bfloat16"] if b.device == "cpu" else ["float32", "float16", "bfloat16"]
    rows = []
    for dtype in dtypes:
        direct = b.captioner(dtype)
        flops = vision_flops(direct.model.config, size)
        pixels = direct.pixel_values(b.images[:size])
        direct.vision_forward(pixels)  # warm-up
        repeats = b.repeats if dtype == b.dtypes[0] or b.device == "cuda" else 1
        times = [direct.vision_forward(pixels) for _ in range(repeats)]
        direct.batched(b.images[:size])  # warm-up of the whole caption
        caption_times = [direct.batched(b.images[:size])[0] for _ in range(repeats)]
        # 4096³ on the CPU; where bf16 is emulated it is slow, so a smaller one (the rate is what counts)
        fast = dtype == "float32" or b.device == "cuda" or machine.fast_bf16()
        mm_size = 8192 if b.device == "cuda" else (4096 if fast else 2048)
        if b.args.tiny:
            mm_size //= 4  # the smoke run only checks that it works
        mm = matmul_gflops(mm_size, getattr(torch, dtype), torch.device(b.device), max(3, b.repeats))
        seconds = median(times)
        achieved = flops["batch_gflop"] / seconds
        whole = caption_flops(direct.model.config, b.tokens)
        caption_s = median(caption_times)
        caption_rate = whole["per_image_gflop"] * size / caption_s
        rows.append({"dtype": dtype, "images": size, "tokens_per_image": flops["tokens"],
                     "gflop_per_image": round(flops["per_image_gflop"], 2), "gflop": round(flops["batch_gflop"], 1),
                     "runs_s": [round(t, 4) for t in times], "median_s": round(seconds, 4),
                     "vision_gflop_per_s": round(achieved, 1), "matmul": mm,
                     "vision_vs_matmul": _ratio(achieved, mm["gflop_per_s"]),
                     "caption": {"new_tokens": b.tokens, "gflop_per_image": float(f"{whole['per_image_gflop']:.4g}"),
                                 "text_gflop_per_image": float(f"{whole['text_gflop']:.4g}"),
                                 "runs_s": [round(t, 3) for t in caption_times], "median_s": round(caption_s, 3),
                                 "images_per_s": round(size / caption_s, 3), "gflop_per_s": round(caption_rate, 1),
                                 "vs_matmul": float(f"{caption_rate / mm['gflop_per_s']:.3g}")}})
        if dtype != b.dtypes[0]:  # keep only the baselines' model in memory
            b.direct.pop(dtype).close()
    return {"rows": rows, "targets": []}


# ----- speed-ups tried ------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    what: str
    dtype: str
    base: str | None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any], None] | None = None
    slow: bool = False  # skipped with --quick (torch.compile takes minutes on 2 cores)
    opt_in: bool = False  # only with --compile-decoder: compiling the decoder took minutes even for the tiny model
    # Try it on the CPU first: an out-of-bounds index on a GPU is a device-side assert, which leaves the process's
    # CUDA context unusable for every later variant (seen with the static cache).
    cpu_probe: bool = False


def _compile_vision(direct: Any) -> None:
    import torch

    direct.model.vision_model = torch.compile(direct.model.vision_model)


def _compile_decoder(direct: Any) -> None:
    import torch

    # generate() calls the decoder module's forward once per token; dynamic shapes for the growing KV cache
    decoder = direct.model.text_decoder
    decoder.forward = torch.compile(decoder.forward, dynamic=True)


def _int8_linear(direct: Any) -> None:
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        direct.model = quantize_dynamic(direct.model, {torch.nn.Linear}, dtype=torch.qint8)


def variants(device: str) -> list[Variant]:
    """What is known to speed up generation, for this device; `base` is the row each is compared with."""
    if device == "cpu":
        return [
            Variant("fp32", "float32, eager attention, dynamic KV cache (what the service runs)", "float32", None),
            Variant("bf16", "bfloat16 weights and activations", "bfloat16", "fp32"),
            Variant("sdpa", "attn_implementation='sdpa' (float32)", "float32", "fp32",
                    load_kwargs={"attn_implementation": "sdpa"}),
            Variant("static_cache", "cache_implementation='static' (float32)", "float32", "fp32",
                    generate_kwargs={"cache_implementation": "static"}),
            Variant("compile_vision", "torch.compile(vision encoder) (float32)", "float32", "fp32",
                    prepare=_compile_vision, slow=True),
            Variant("compile_decoder", "torch.compile(text decoder forward, dynamic=True) (float32)", "float32",
                    "fp32", prepare=_compile_decoder, slow=True, opt_in=True),
            Variant("int8_dynamic", "int8 dynamic quantisation of every nn.Linear (float32 activations)", "float32",
                    "fp32", prepare=_int8_linear),
        ]
    return [
        Variant("fp32", "float32, eager attention, dynamic KV cache", "float32", None),
        Variant("fp16", "float16", "float16", "fp32"),
        Variant("bf16", "bfloat16", "bfloat16", "fp32"),
        Variant("sdpa", "attn_implementation='sdpa' (bfloat16)", "bfloat16", "bf16",
                load_kwargs={"attn_implementation": "sdpa"}),
        Variant("compile_vision", "torch.compile(vision encoder) (bfloat16)", "bfloat16", "bf16",
                prepare=_compile_vision, slow=True),
        Variant("compile_decoder", "torch.compile(text decoder forward, dynamic=True) (bfloat16)", "bfloat16", "bf16",
                prepare=_compile_decoder, slow=True, opt_in=True),
        Variant("static_cache", "cache_implementation='static' (bfloat16)", "bfloat16", "bf16",
                generate_kwargs={"cache_implementation": "static"}, cpu_probe=True),
    ]


def compare_speedups(b: Bench) -> dict[str, Any]:
    """Each variant on the same 8-image batch in-process (processor + one generate + decode), median seconds."""
    from inprocess import DirectCaptioner

    size = 8 if 8 in b.batch_sizes else b.max_batch
    images = b.images[:size]
    rows: dict[str, dict[str, Any]] = {}
    captions: dict[str, list[str]] = {}
    for v in variants(b.device):
        row: dict[str, Any] = {"name": v.name, "what": v.what, "base": v.base}
        rows[v.name] = row
        if v.opt_in and not b.args.compile_decoder:
            row.update(status="skipped", note="opt-in with --compile-decoder: its first call recompiles for every "
                                              "new cache shape (146 s on 2 cores for the tiny checkpoint)")
            continue
        if v.slow and b.args.quick:
            row.update(status="skipped", note="skipped with --quick (compiling takes minutes)")
            continue
        log.info("speed-ups: %s", v.name)
        direct = None
        reuse = not v.load_kwargs and not v.prepare and v.dtype in b.direct
        try:
            if v.cpu_probe and b.device != "cpu":
                _cpu_probe(b, v, images[:1])
            started = time.perf_counter()
            direct = b.direct[v.dtype] if reuse else DirectCaptioner(b.folder, b.device, b.torch_dtype(v.dtype),
                                                                    b.tokens, **v.load_kwargs)
            if v.prepare:
                v.prepare(direct)
            # the first call pays for compilation: timed apart as the set-up cost
            first = time.perf_counter()
            direct.batched(images, **v.generate_kwargs)
            row["first_call_s"] = round(time.perf_counter() - first, 2)
            row["setup_s"] = round(first - started, 2)
            runs = []
            for _ in range(b.repeats):
                seconds, out = direct.batched(images, **v.generate_kwargs)
                runs.append(seconds)
            captions[v.name] = out
            row.update(status="ok", runs_s=[round(x, 3) for x in runs], median_s=round(median(runs), 3),
                       images_per_s=round(size / median(runs), 3))
        except Exception as exc:  # noqa: BLE001 - an unsupported variant is a result, not a failure of the run
            row.update(status="unsupported", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        finally:
            if direct is not None and not reuse:
                direct.close()
    for row in rows.values():
        base = rows.get(row["base"] or "")
        if row.get("status") == "ok" and base and base.get("status") == "ok":
            row["speedup"] = _ratio(base["median_s"], row["median_s"])
            row["captions_equal_to_base"] = f"{_same(captions[row['name']], captions[base['name']])}/{size}"
    return {"images": size, "rows": list(rows.values()), "targets": []}


def _cpu_probe(b: Bench, v: Variant, images: list[Any]) -> None:
    """Run the variant once on the CPU (float32); raises what it raises there, with a note that it was not tried
    on the GPU."""
    from inprocess import DirectCaptioner

    probe = DirectCaptioner(b.folder, "cpu", b.torch_dtype("float32"), b.tokens, **v.load_kwargs)
    try:
        probe.caption(images, **v.generate_kwargs)
    except Exception as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc} [on the CPU; not run on {b.device}, where the same fault "
                           f"is a device-side assert that breaks the process's CUDA context]") from exc
    finally:
        probe.close()


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "batch": compare_batch, "concurrency": compare_concurrency, "cache": compare_cache, "dtype": compare_dtype,
    "memory": compare_memory, "flops": compare_flops, "bulk": compare_bulk, "allocator": compare_allocator,
    "speedups": compare_speedups,
}


# ----- the run ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def names(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in COMPARISONS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown comparison {', '.join(unknown)}; "
                                             f"choose from {', '.join(COMPARISONS)}")
        return chosen

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    def words(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    def assignment(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
        return name, value

    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed run per measurement, short cache run, no compile")
    p.add_argument("--only", type=names, default=None, metavar="NAME[,NAME]",
                   help=f"run only these comparisons ({', '.join(COMPARISONS)})")
    p.add_argument("--tiny", action="store_true",
                   help="use the tests' tiny BLIP checkpoint (seconds; targets reported, not judged)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="checkpoint folder (built there if absent; default bench/models/...)")
    p.add_argument("--out", type=Path, default=BENCH_DIR, help="where RESULTS.md and results.json go (default bench/)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; 1 with --quick)")
    p.add_argument("--cache-seconds", type=float, default=None, help="length of each cache-hit load run (default 10)")
    p.add_argument("--dtypes", type=words, default=None,
                   help="dtypes of comparisons 1-2 (default float32 on cpu, float16,bfloat16 on cuda)")
    p.add_argument("--compare-dtypes", type=words, default=None,
                   help="dtypes compared with float32 in comparison 4 (default bfloat16 on cpu, both halves on cuda)")
    p.add_argument("--batch-sizes", type=ints, default=None, help="images per request (default 8; cuda 1,8,32)")
    p.add_argument("--serial-sample", type=int, default=None,
                   help="measure the one-at-a-time baselines' rate on this many images/requests (default: all on "
                        "cpu, 8 on cuda)")
    p.add_argument("--server-env", type=assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the servers, e.g. BATCH_WAIT_MS=50 (repeatable)")
    p.add_argument("--compile-decoder", action="store_true",
                   help="also try torch.compile on the text decoder (slow to compile; off by default)")
    args = p.parse_args(argv)
    args.server_env = dict(args.server_env)
    return args


def check_device(device: str) -> None:
    """Refuse --device cuda clearly when PyTorch sees no GPU."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda needs a CUDA GPU visible to PyTorch, and there is none here "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). "
                         f"Run bench/gpu.sh on a machine with an NVIDIA GPU, or drop --device cuda.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None:
        # the servers' malloc for the bare calls too (ALLOCATOR, as the servers read it; this may start the
        # command again once): the service's overhead is then measured on equal terms (comparison 8 is the
        # allocator's own effect)
        try:
            allocator.preload(os.environ.get("ALLOCATOR", "auto"))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from inprocess import only_the_model_thread_has_a_team

    only_the_model_thread_has_a_team()  # the timed calls run on the model thread, with the only OpenMP team
    logging.basicConfig(level=logging.INFO, format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    check_device(args.device)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-gpu" if args.device == "cuda" else ""
    json_path, md_path = out_dir / f"results{suffix}.json", out_dir / f"RESULTS{suffix}.md"
    # comparison 8 is about the CPU's page faults: a GPU run (bench/gpu.sh, 5 minutes) leaves it out unless --only
    selected = args.only or [n for n in COMPARISONS if not (args.device == "cuda" and n == "allocator")]
    results: dict[str, Any] = {
        "meta": {"started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "device": args.device, "tiny": args.tiny, "quick": args.quick,
                 "load_average_start": machine.load_average()},
        "machine": machine.machine(), "versions": machine.versions(), "comparisons": {},
    }
    bench = Bench(args)
    results["checkpoint"] = bench.checkpoint_info
    results["settings"] = {
        "new_tokens": {"min": bench.tokens, "max": bench.tokens}, "greedy": True, "repeats": bench.repeats,
        "dtypes": bench.dtypes, "compare_dtypes": bench.compare_dtypes, "batch_sizes": bench.batch_sizes,
        "client_counts": bench.client_counts, "cache_seconds": bench.cache_seconds, "cache_rate": CACHE_RATE,
        "serial_sample": bench.serial_sample or "all",
        "server_env": {"MIN_NEW_TOKENS": bench.tokens, "MAX_NEW_TOKENS": bench.tokens,
                       "MAX_BATCH_SIZE": bench.max_batch, "SERVER_THREADS": max(8, max(bench.client_counts)),
                       "CACHE_BACKEND": bench.cache_mode, "BATCH_WAIT_MS": "default (5)",
                       "LOG_LEVEL": "default (INFO)", **args.server_env},
        "images": {"count": len(bench.files), "bytes": [len(d) for _, d in bench.files], "size": "640x480 JPEG"},
        "judged": bench.judged, "server_cache": bench.cache_mode,
    }

    def write() -> None:
        results["meta"]["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        results["meta"]["allocator"] = allocator.describe()
        results["meta"]["load_average_end"] = machine.load_average()
        json_path.write_text(json.dumps(results, indent=1) + "\n")
        md_path.write_text(report.render(results))

    try:
        if (args.tiny or args.device == "cuda") and set(selected) - {"flops", "bulk", "speedups"}:
            # the smoke run and the 5-minute GPU run start every server at once to save time; start-up times are
            # then not comparable (and not judged)
            bench.start_servers(["float32", *bench.dtypes, *bench.compare_dtypes])
        for name in COMPARISONS:
            if name not in selected:
                continue
            load_before = machine.load_average()
            started = time.perf_counter()
            try:
                outcome = {"status": "ok", **RUNNERS[name](bench)}
            except Exception as exc:  # noqa: BLE001 - one broken comparison must not lose the others
                log.exception("comparison %s failed", name)
                outcome = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc()[-3000:], "targets": []}
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            outcome["load_average"] = {"before": load_before, "after": machine.load_average()}
            results["comparisons"][name] = outcome
            write()
    finally:
        bench.close()
        write()
    log.info("wrote %s and %s", md_path, json_path)
    failed = [n for n, c in results["comparisons"].items() if c["status"] != "ok"]
    if failed:
        log.error("comparisons that failed to run: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
