"""Where a cache hit's time goes, inside one process: cProfile over sequential cache-hit requests.

    python bench/profile_hit.py [--requests 500] [--top 25] [--sort tottime]

The app is built with create_app() on the tests' tiny BLIP checkpoint (the model is not touched by a hit) and a
redis-server of its own; requests go through Flask's test client, so no sockets or waitress: what is left is
the per-request work of the service (multipart parsing, hashing, the cache key, MGET, JSON, logging, metrics).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(REPO_ROOT)]
sys.path.append(str(REPO_ROOT / "tests"))

import checkpoint  # noqa: E402
import workload  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="cumulative", help="pstats sort key, e.g. tottime")
    args = parser.parse_args()

    import logs
    from app import create_app
    from config import load_config
    from support.services import RedisServer

    folder = checkpoint.tiny_checkpoint()[0]
    redis = RedisServer().start()
    try:
        config = load_config(["--blip", "--model-path", str(folder)],
                             environ={"REDIS_PORT": str(redis.port), "CACHE_BACKEND": "redis",
                                      "MIN_NEW_TOKENS": "20", "MAX_NEW_TOKENS": "20", "ENV_FILE": "/dev/null"})
        logs.configure_logging("INFO", "text")
        logging.getLogger().handlers[0].stream = io.StringIO()  # keep the per-request log line, write it nowhere
        app = create_app(config)
        service = app.extensions["caption_service"]
        service.start()
        client = app.test_client()
        body = workload.multipart(workload.photos(1, first_seed=1000))
        headers = {"Content-Type": workload.CONTENT_TYPE}
        first = client.post("/caption-images", data=body, headers=headers).get_json()
        second = client.post("/caption-images", data=body, headers=headers).get_json()
        assert not first["results"][0]["cached"] and second["results"][0]["cached"], (first, second)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        for _ in range(args.requests):
            client.post("/caption-images", data=body, headers=headers)
        profile.disable()
        seconds = time.perf_counter() - started
        print(f"{args.requests} cache hits of a {len(body) // 1000} KB upload in {seconds:.2f} s under cProfile: "
              f"{1000 * seconds / args.requests:.2f} ms each (profiling roughly doubles it)\n")
        stats = pstats.Stats(profile)
        stats.sort_stats(args.sort).print_stats(args.top)
        service.stop()
    finally:
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
