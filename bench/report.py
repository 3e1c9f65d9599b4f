"""RESULTS.md from the results dict of bench/run.py (the JSON holds the same numbers and every run)."""
from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _verdict(t: dict[str, Any]) -> str:
    if t["pass"] is None:
        return "–"
    word = "PASS" if t["pass"] else "FAIL"
    return f"**{word}**" if t["judged"] else f"({word.lower()}, not judged)"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def render(r: dict[str, Any]) -> str:
    """The whole RESULTS.md."""
    meta, m, comps = r["meta"], r["machine"], r["comparisons"]
    gpu = meta["device"] == "cuda"
    out = [f"# Throughput benchmark results{' (CUDA)' if gpu else ''}", ""]
    out += [f"Written by `{meta['command']}` ({meta['started']} to {meta.get('finished', '…')}). "
            f"Do not edit by hand: rerun the benchmark (`make bench`{', `bench/gpu.sh`' if gpu else ''}).", ""]
    if meta.get("note"):
        out += [f"Note: {meta['note']}", ""]
    if meta["tiny"]:
        out += ["**Smoke run on the tests' tiny checkpoint: the figures mean nothing and the targets are not "
                "judged.**", ""]
    elif gpu:
        out += ["The issue's targets are for the 2-core CPU machine; on a GPU they are shown for reference only.", ""]
    out += [f"Load average (1, 5, 15 min) at the start: {meta['load_average_start']}, at the end: "
            f"{meta.get('load_average_end')}. On a {m.get('cores_usable')}-core machine a 1-minute load above "
            f"about {max(1, (m.get('cores_usable') or 2) // 2)} means other processes competed for the CPU and the "
            f"absolute times are noisy; each comparison's own load is in its section.", ""]
    out += ["Every caption is exactly 20 new tokens on both sides of every comparison (`min_new_tokens = "
            "max_new_tokens = 20`; the servers get `MIN_NEW_TOKENS=20 MAX_NEW_TOKENS=20`), greedy. Medians of "
            f"{r['settings']['repeats']} timed runs after a warm-up. Ratios are what count; absolute times hold "
            "only for this machine.", ""]

    out += ["## Summary", ""]
    rows = []
    for name, c in comps.items():
        if c["status"] != "ok":
            rows.append([name, f"did not run: {c.get('error', c['status'])[:200]}", "–", "**ERROR**"])
    targets = sorted((t for c in comps.values() for t in c.get("targets", [])), key=lambda t: t["name"][:2])
    for t in targets:  # in the order (the comparisons run in another)
        rows.append([t["name"], f"{_fmt(t['value'])} {t['unit']}".strip(),
                     f"{t['op']} {_fmt(t['threshold'])} {t['unit']}".strip(), _verdict(t)])
    if comps.get("memory", {}).get("status") == "ok":
        for srv in comps["memory"]["servers"]:
            rows.append([f"5. peak RSS of the server ({srv['dtype']}), {comps['memory']['images']}-image request",
                         f"{_fmt(srv['peak_rss_mib'])} MiB", "(reported)", "–"])
    if comps.get("flops", {}).get("status") == "ok":
        for row in comps["flops"]["rows"]:
            rows.append([f"6. vision encoder GFLOP/s vs {row['matmul']['size']}³ matmul ({row['dtype']})",
                         f"{_fmt(row['vision_gflop_per_s'])} vs {_fmt(row['matmul']['gflop_per_s'])} "
                         f"({row['vision_vs_matmul']:.0%})", "(reported)", "–"])
            if "caption" in row:
                rows.append([f"6. whole caption GFLOP/s vs the same matmul ({row['dtype']})",
                             f"{_fmt(row['caption']['gflop_per_s'])} ({row['caption']['vs_matmul']:.0%}; "
                             f"{_fmt(row['caption']['images_per_s'])} images/s)", "(reported)", "–"])
    if comps.get("allocator", {}).get("status") == "ok":
        for case in comps["allocator"]["cases"]:
            rows.append([f"8. default server (jemalloc) vs ALLOCATOR=system, {case['images']}-image request "
                         f"({case['dtype']})", f"{_fmt(case['ratio_default_vs_system'])} x", "(reported)", "–"])
    out += _table(["comparison", "measured", "target", "result"], rows)

    out += ["## Machine", ""]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items())
    out += [f"- CPU: {m['cpu_model']} (family/model/stepping {m['cpu_family_model_stepping']}), "
            f"{m['cores_usable']} usable cores of {m['cores_online']}, "
            f"{'virtual machine' if m['hypervisor'] else 'bare metal'}; torch threads {m['torch_threads']}, "
            f"torch CPU capability {m.get('torch_cpu_capability')}",
            f"- Flags: {flags}", f"- bfloat16: {m['bf16']}", f"- RAM: {m['ram_gib']} GiB; kernel {m['kernel']}"]
    if meta.get("allocator"):
        out.append(f"- malloc of the benchmark's own process (its bare calls, on its model thread): "
                   f"{meta['allocator']}")
    if m.get("gpu"):
        g = m["gpu"]
        out.append(f"- GPU: {g['name']} ×{g['count']}, {g['memory_gib']} GiB, compute capability {g['capability']}, "
                   f"CUDA {g['cuda']}, driver {g['driver']}")
    out += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v), ""]
    ck, s = r["checkpoint"], r["settings"]
    out += ["## Settings", "",
            f"- Checkpoint: {ck.get('architecture')} at `{ck['path']}`"
            + (f", {ck['params']:,} parameters" if ck.get("params") else "")
            + (" (built in this run)" if ck.get("built_now") else " (cached)"),
            f"- Images: {s['images']['count']} distinct {s['images']['size']} files of "
            f"{min(s['images']['bytes']) // 1000}–{max(s['images']['bytes']) // 1000} KB",
            "- Server environment: " + ", ".join(f"{k}={v}" for k, v in s["server_env"].items()),
            f"- dtypes {s['dtypes']}, compared with float32: {s['compare_dtypes']}; images per request "
            f"{s['batch_sizes']}; concurrent clients {s['client_counts']}; cache runs {s['cache_seconds']} s each", ""]

    for name, title, fn in (("batch", "1. One request with N images vs the per-image loop and a bare batched generate",
                             _batch),
                            ("concurrency", "2. Concurrent clients vs the same requests one at a time", _concurrency),
                            ("cache", "3. Cache hits over HTTP with a real Redis", _cache),
                            ("dtype", "4. Lower precision vs float32 (one request of 8 images)", _dtype),
                            ("memory", "5. Peak memory and start-up time of the server", _memory),
                            ("flops", "6. How close to the machine's limit: vision encoder vs a large matmul", _flops),
                            ("bulk", "7. The bulk command over a folder vs an overlapped batched generate loop",
                             _bulk),
                            ("allocator", "8. The model thread's memory: jemalloc keeping it vs the system's malloc",
                             _allocator),
                            ("speedups", "Speed-ups tried (in-process, one batch of 8 images)", _speedups)):
        if name not in comps:
            continue
        c = comps[name]
        out += [f"## {title}", ""]
        out += [f"_{c['seconds']} s; load average before {c['load_average']['before']}, "
                f"after {c['load_average']['after']}._", ""]
        if c["status"] != "ok":
            out += ["**Did not run:**", "", "```", c.get("traceback") or c.get("error", ""), "```", ""]
            continue
        out += fn(c)
    out += _method(gpu)
    return "\n".join(out).rstrip() + "\n"


def _batch(c: dict[str, Any]) -> list[str]:
    out = []
    for case in c["cases"]:
        med, ips, runs = case["median_s"], case["images_per_s"], case["runs_s"]
        out += [f"### {case['images']} images, {case['dtype']}", ""]
        sample = case.get("loop_images", case["images"])
        of = f", on {sample} of the {case['images']} images" if sample != case["images"] else ""
        out += _table(["path", "median s", "images/s", "runs (s)"], [
            [f"per-image loop (processor + generate + decode per image, in-process{of})", med["loop"], ips["loop"],
             _runs(runs["loop"])],
            ["bare batched generate (processor + one generate + decode, in-process)", med["batched"],
             ips["batched"], _runs(runs["batched"])],
            ["the service: one HTTP request with all images", med["http"], ips["http"], _runs(runs["http"])],
        ])
        sv = case["server"]
        out += [f"Ratios: service vs loop **{case['ratio_http_vs_loop']}×**, service vs bare batched "
                f"**{case['ratio_http_vs_batched']}×** (batched vs loop {case['ratio_batched_vs_loop']}×).", "",
                f"Inside the server, per request: {sv['generate_s_per_request']} s in the captioner (processor + "
                f"generate + decode, from /metrics), {sv['http_s_per_request_in_flask']} s in the Flask view; "
                f"{sv['batches']} model calls for {len(runs['http'])} requests (mean batch "
                f"{sv['mean_batch_size']}). Client-seen time minus captioner time: {sv['overhead_s_per_request']} s "
                f"per request (HTTP, JPEG decoding, tags, JSON; means of both).", "",
                *_cpu_line(case),
                f"Captions of the service equal to the in-process batched ones: {case['captions_equal_to_batched']}; "
                f"per-image loop vs batched: {case['loop_captions_equal_to_batched']} (batching changes the float "
                f"arithmetic slightly, which can flip a greedy choice of random weights).", ""]
    return out


def _cpu_line(case: dict[str, Any]) -> list[str]:
    """CPU seconds per call and cores kept busy, bare call vs the server process (absent in older results)."""
    cpu, busy = case.get("cpu_s_per_call"), case.get("busy_cores")
    if not cpu:
        return []
    return [f"CPU seconds per call (all threads): bare batched {cpu['batched']} s ({busy['batched']} cores busy), "
            f"the server process per request {cpu['http']} s ({busy['http']} cores busy; it also decodes the JPEGs "
            f"and makes the tags, on one core). The same model work with fewer cores busy means threads waited "
            f"(OpenMP workers sleeping between ops: bench/README.md).", ""]


def _concurrency(c: dict[str, Any]) -> list[str]:
    out = []
    for case in c["cases"]:
        med, runs = case["median_s"], case["runs_s"]
        out += [f"### {case['clients']} clients, one image each, {case['dtype']}", ""]
        serial = case.get("sequential_requests", case["clients"])
        one_at_a_time = ("the same requests one at a time" if serial == case["clients"]
                         else f"{serial} of the same requests one at a time")
        out += _table(["how", "median s", "requests/s", "runs (s)"], [
            [f"{case['clients']} clients at once", med["concurrent"], case["requests_per_s"]["concurrent"],
             _runs(runs["concurrent"])],
            [one_at_a_time, med["sequential"], case["requests_per_s"]["sequential"], _runs(runs["sequential"])],
        ])
        out += [f"Throughput ratio **{case['ratio_concurrent_vs_sequential']}×**. Model calls per concurrent round: "
                f"{case['server_batches_per_round']} (mean batch sizes {case['server_mean_batch_size_per_round']}). "
                f"Latency of the concurrent requests (ms): {case['concurrent_latency_ms']}.", ""]
    return out


def _cache(c: dict[str, Any]) -> list[str]:
    sat, paced = c["saturation"], c["paced"]
    out = [f"One {c['file']['bytes'] // 1000} KB JPEG, primed with one miss ({c['prime_s']} s); every response "
           f"checked for `\"cached\": true` (all hits: {c['all_hits']}).", ""]
    out += _table(["run", "client", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests", "misses/errors"], [
        [f"flat out, {sat['connections']} keep-alive connections", sat["client"], sat["req_per_s"],
         sat["latency_ms"]["p50"], sat["latency_ms"]["p90"], sat["latency_ms"]["p99"], sat["latency_ms"]["max"],
         sat["requests"], f"{sat['misses']}/{sat['errors']}"],
        [f"paced at {paced['offered_req_per_s']:.0f} req/s over {paced['connections']} keep-alive connections",
         paced["client"], paced["req_per_s"], paced["latency_ms"]["p50"], paced["latency_ms"]["p90"],
         paced["latency_ms"]["p99"], paced["latency_ms"]["max"], paced["requests"],
         f"{paced['misses']}/{paced['errors']}"],
    ])
    if sat.get("mean_ms_inside_flask") is not None:
        out += [f"Flat out, a request spent {sat['mean_ms_inside_flask']} ms on average inside the Flask view "
                f"(from /metrics; with 8 requests in flight on one GIL that includes waiting for the other 7); "
                f"the rest of the latency is waitress's queue and the socket.", ""]
    out += [f"Paced-run latency counted from when each request was due (from when it was sent: "
            f"{paced.get('latency_from_send_ms')}).", "",
            "Why two runs: with 8 clients that each wait for their answer, latency = 8 / throughput (Little's law), "
            "so a flat-out run at 300 req/s has a mean latency of 27 ms by arithmetic. The latency targets are "
            "therefore judged at the target rate (300 req/s offered, open loop, 8 keep-alive connections), and "
            "the throughput target on the flat-out run.", ""]
    return out


def _dtype(c: dict[str, Any]) -> list[str]:
    rows = [[d, c["median_s"][d], c["images_per_s"][d], _runs(c["runs_s"][d]),
             f"{c['ratio_vs_float32'][d]}×" if d in c["ratio_vs_float32"] else "1×"] for d in c["median_s"]]
    out = _table(["server dtype", "median s", "images/s", "runs (s)", "vs float32"], rows)
    if c.get("cpu_bf16"):
        out += [f"This CPU: {c['cpu_bf16']}.", ""]
    if c.get("auto"):
        out += [f"`--dtype auto` chose **{c['auto']['dtype']}** here ({c['auto']['reason']}).", ""]
    return out


def _bulk(c: dict[str, Any]) -> list[str]:
    ray = c["ray"]
    rows = [["bare batched generate, reading/decoding/processor overlapped (in-process)", c["reference_images_per_s"],
             _runs(c["reference_runs_s"]), "–"],
            ["`python bulk.py FOLDER --no-cache` (after the model loaded)",
             median_of(c["bulk_images_per_s_after_load"]), ", ".join(map(str, c["bulk_images_per_s_after_load"])),
             f"{c['ratio_bulk_vs_reference']}×"],
            [f"`bulk.py --ray --workers {ray['workers']}` (whole run, local Ray started for it)",
             ray["images_per_s_whole_run"], f"{ray['wall_s']} s", "–"]]
    out = _table(["path", "images/s", "runs", "vs reference"], rows)
    out += [f"{c['images']} distinct 640×480 JPEGs, {c['dtype']}, batches of {c['batch_size']}. The bulk command's "
            f"rate is its own, from the moment its model was loaded (load {c['bulk_model_load_s']} s; whole runs "
            f"{c['bulk_wall_s']} s); it tags and writes every row too. Captions equal to the reference: "
            f"{c['captions_equal_to_reference']}. The Ray run took {ray['overhead_s_vs_local_wall']} s longer than "
            f"the local run's whole wall time (Ray start-up, an actor loading its own model, moving the prepared "
            f"batches between processes); its captions equal the local run's: {ray['captions_equal_to_local']}.",
            "", f"Last summary line: `{c['bulk_summary']}`", ""]
    return out


def _allocator(c: dict[str, Any]) -> list[str]:
    rows = []
    for case in c["cases"]:
        for k, label in (("system", "ALLOCATOR=system"), ("default", "default (ALLOCATOR=auto)")):
            rows.append([case["dtype"], label, case["allocator"][k], case["median_s"][k], _runs(case["runs_s"][k]),
                         f"{case['minor_faults_per_request'][k]:,}", case["cpu_s_per_request"][k],
                         f"{case['ratio_default_vs_system']}×" if k == "default" else "1×"])
    out = _table(["dtype", "server", "allocator (/readyz)", "median s", "runs (s)", "page faults per request",
                  "CPU s per request", "vs system"], rows)
    out += [f"One request of {c['cases'][0]['images'] if c['cases'] else '?'} images to each server in turn, so "
            "both sit idle equally long between their requests. Page faults are the server process's minor faults "
            "during the request (/proc/PID/stat, all threads). Captions equal between the two: "
            + ", ".join(f"{case['dtype']} {case['captions_equal']}" for case in c["cases"]) + ".", ""]
    return out


def median_of(values: list[float]) -> float:
    import statistics

    return round(statistics.median(values), 3)


def _memory(c: dict[str, Any]) -> list[str]:
    rows = [[s["dtype"], s["start_to_ready_s"], s.get("model_load_s"), s.get("warmup_s"), s.get("spacy_load_s"),
             s["rss_when_ready_mib"], s["peak_rss_mib"], s.get("gpu_memory_mib")] for s in c["servers"]]
    out = _table(["server dtype", "start to /readyz 200 (s)", "model load (s)", "warm-up (s)", "spaCy load (s)",
                  "RSS when ready (MiB)", f"peak RSS after the {c['images']}-image request (MiB)", "GPU MiB"], rows)
    if c.get("started_together"):
        out += ["The servers were started together (the smoke run does that to save time), so they competed for "
                "the CPU while loading: these start-up times are not comparable and not judged.", ""]
    return out + ["Peak RSS is the kernel's high-water mark (VmHWM in /proc/PID/status) of the server process; "
                  "start to ready is from process start to the first 200 of /readyz (model loaded and warmed up).", ""]


def _flops(c: dict[str, Any]) -> list[str]:
    rows = [[r["dtype"], r["images"], r["gflop"], r["median_s"], r["vision_gflop_per_s"],
             f"{r['matmul']['size']}³ {r['matmul']['dtype']}", r["matmul"]["gflop_per_s"],
             f"{r['vision_vs_matmul']:.0%}"] for r in c["rows"]]
    out = _table(["dtype", "images", "vision GFLOP", "median s", "vision GFLOP/s", "matmul", "matmul GFLOP/s",
                  "vision / matmul"], rows)
    first = c["rows"][0]
    out += [f"FLOPs counted analytically: {first['tokens_per_image']} tokens per image, "
            f"{first['gflop_per_image']} GFLOP per image (patch embedding + per layer QKV 6ND², QKᵀ 2N²D, "
            f"attention·V 2N²D, output 2ND², MLP 4NDM; norms, softmax and GELU left out).", ""]
    if "caption" in first:
        rows = [[r["dtype"], r["caption"]["gflop_per_image"], r["caption"]["median_s"], r["caption"]["images_per_s"],
                 r["caption"]["gflop_per_s"], r["matmul"]["gflop_per_s"], f"{r['caption']['vs_matmul']:.0%}"]
                for r in c["rows"]]
        out += ["The whole caption (one batched `generate` of the 8 images, "
                f"{first['caption']['new_tokens']} new tokens each), against the same matmul:", ""]
        out += _table(["dtype", "GFLOP per caption", "median s", "images/s", "GFLOP/s", "matmul GFLOP/s",
                       "caption / matmul"], rows)
        out += [f"Per caption: the vision encoder plus {first['caption']['text_gflop_per_image']} GFLOP of text "
                "decoder (one step per new token with the KV cache: self-attention projections 8D², scores and "
                "values 4LD, cross-attention 4D² + 4ND, MLP 4DM, LM head 2DV; the image's cross-attention keys "
                "and values 4NED per layer once).", ""]
    by_dtype = {r["dtype"]: r for r in c["rows"]}
    base = by_dtype.get("float32")
    for name, r in by_dtype.items():
        if base is None or name == "float32":
            continue
        parts = [f"matmul {_ratio_text(r['matmul']['gflop_per_s'], base['matmul']['gflop_per_s'])}",
                 f"vision encoder {_ratio_text(r['vision_gflop_per_s'], base['vision_gflop_per_s'])}"]
        if "caption" in r and "caption" in base:
            parts.append(f"whole caption {_ratio_text(r['caption']['gflop_per_s'], base['caption']['gflop_per_s'])}")
        out += [f"{name} vs float32 in this run: {', '.join(parts)}. A dtype's gain on the whole caption is bounded "
                "by its gain on matrix products, which do most of the work (`bench/profile_caption.py` splits "
                "the time by operator).", ""]
    return out


def _ratio_text(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "–"


VERDICTS = ((1.05, "helps"), (0.95, "no measurable gain"), (0.0, "slower"))


def _speedups(c: dict[str, Any]) -> list[str]:
    rows = []
    for row in c["rows"]:
        if row["status"] != "ok":
            rows.append([row["name"], row["what"], "–", "–", "–", "–", "–",
                         f"{row['status']}: {row.get('error') or row.get('note')}"])
            continue
        speedup = row.get("speedup")
        verdict = next(v for limit, v in VERDICTS if speedup is None or speedup >= limit) if speedup else "baseline"
        rows.append([row["name"], row["what"], row["median_s"], row["images_per_s"],
                     f"{speedup}× vs {row['base']}" if speedup else "–", row.get("setup_s"),
                     row.get("first_call_s"), verdict + (f"; captions equal to {row['base']}: "
                                                         f"{row['captions_equal_to_base']}" if speedup else "")])
    return _table(["variant", "what", "median s", "images/s", "speed-up", "load + prepare s", "first call s",
                   "verdict"], rows)


def _method(gpu: bool) -> list[str]:
    return [
        "## How each comparison is measured", "",
        "Servers are real `python app.py --blip --model-path DIR --device D --dtype T` processes with a Redis cache "
        "on a redis-server of the benchmark's own (free port, no persistence) as in production; before every timed "
        "request that must caption, the cache is cleared with /reset-redis and every answer is checked for "
        "`\"cached\": false` (without redis-server: CACHE_BACKEND=off).", "",
        "1. **One request with N images**: the service gets one multipart POST /caption-images with N distinct "
        "~100 KB JPEGs; timed by the client from send to the whole JSON answer. Beside it, in this process with "
        "the same checkpoint, device and dtype: the per-image loop (for each image: processor, `generate`, "
        "`batch_decode`, one after another) and the bare batched call (processor over all N, one `generate`, "
        "one `batch_decode`). The in-process paths get the images already decoded to RGB; the service decodes "
        "the JPEGs itself. The in-process calls run on one worker thread, as the service's model runs on its "
        "batcher thread (on a busy 2-core machine, 2-thread PyTorch ops issued from the main thread ran several "
        "times slower than from another thread, which would flatter the service), and that thread alone has an "
        "OpenMP team: this process's main thread, which builds and loads the checkpoints, runs PyTorch "
        "single-threaded, as the service's other threads do (a second team made every bare call 20-30% slower "
        "on a 2-core AMX Xeon, bench/README.md). The three are interleaved "
        "run by run so that changes in the machine's load hit all alike. This process runs on the servers' "
        "malloc (ALLOCATOR, default jemalloc where installed, preloaded as the server does) and its model "
        "thread keeps the memory it frees as theirs does, so both sides pay the same for memory (Machine above "
        "says which malloc ran). CPU seconds: this process's "
        "`time.process_time()` around the bare call, the server's utime + stime (/proc/PID/stat) around the "
        "request.",
        "2. **Concurrent clients**: C threads, each with its own keep-alive connection and its own image, "
        "released together by a barrier; timed until the last answer. Against the same C requests sent one "
        "after another. (With --serial-sample K, the default K=8 on a GPU, the one-at-a-time baselines here "
        "and in 1 are timed on the first K images or requests: their rate does not depend on how many there are.)",
        "3. **Cache hits**: after one priming request (a miss) and a check that the next is a hit, keep-alive "
        "load on the same ~100 KB JPEG: flat out with wrk (`bench/cache_hit.lua`; an asyncio client when wrk "
        "is not installed), then paced at 300 req/s open loop with the asyncio client.",
        "4. **Lower precision**: servers started with `--dtype` float32 and the other dtype(s), the same N-image "
        "request alternating between them.",
        "5. **Memory and start-up**: VmHWM of each server process after it served the N-image request; start to "
        "ready from `Popen` to the first 200 of /readyz.",
        "6. **FLOP rate**: `model.vision_model(pixel_values)` on the batch in this process, FLOPs counted from the "
        "config; beside a square `torch.mm` of the same dtype in the same run.",
        "7. **Bulk**: a folder of distinct ~100 KB JPEGs captioned by `python bulk.py FOLDER --no-cache` (a real "
        "process; its rate from its own summary line, counted from the moment its model was loaded), against a "
        "bare loop in this process: batches of the same size, two threads reading, decoding and running the "
        "processor ahead while the model thread runs `generate` (interleaved run by run). Then one run with "
        "`--ray --workers 1` on a local Ray started by the command, timed whole. The bare loop and the bulk "
        "command run on the same malloc (as in 1).",
        "8. **Allocator**: in each dtype, a default server (`ALLOCATOR=auto`: jemalloc where installed, with the "
        "model thread keeping the memory it frees) and one with `ALLOCATOR=system`, the same N-image request "
        "alternating between them; the servers' minor page faults (/proc/PID/stat) during each request. "
        "`ALLOCATOR=system make bench` runs the benchmark's own process on the system's malloc too.",
        "- **Speed-ups**: each variant loads the checkpoint afresh (or modifies it), then one batched call of the "
        "8 images as in comparison 1; the first call is timed apart (it includes compilation), then the median of "
        "the timed runs. 'Unsupported' rows show the error transformers or torch gave.", "",
    ]
