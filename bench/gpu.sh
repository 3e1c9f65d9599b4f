#!/usr/bin/env bash
# The benchmark's comparisons on a CUDA GPU, within 5 minutes: float16 and bfloat16 servers and in-process
# baselines, requests of 1, 8 and 32 images, 8 and 32 concurrent clients, float16/bfloat16 vs float32, peak
# memory (RSS and GPU) and start-up, the vision encoder's FLOP rate beside a large matmul, and the speed-up
# variants. Writes bench/RESULTS-gpu.md and bench/results-gpu.json (or into --out DIR).
#
#   bench/gpu.sh                 # on a machine with an NVIDIA GPU and the project's environment (make setup-dev)
#   bench/gpu.sh --quick         # extra options go to bench/run.py (e.g. --out DIR, --repeats N, --batch-sizes 1,8)
#   PYTHON=python3 bench/gpu.sh  # another interpreter than .venv/bin/python
#
# The first run builds the random-weight BLIP-base checkpoint into bench/models/ (about 20 s, 1 GB). The cache-hit
# comparison needs redis-server and uses wrk when installed (apt-get install redis-server wrk). The run is cut off
# at GPU_BENCH_SECONDS (default 300); what was measured by then is still written.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "bench/gpu.sh: nvidia-smi not found; bench/run.py --device cuda will say whether PyTorch sees a GPU" >&2
fi
# SIGINT, not SIGTERM: bench/run.py then stops its servers and writes what it has measured.
exec timeout --signal=INT --kill-after=30 "${GPU_BENCH_SECONDS:-300}" "$python" bench/run.py --device cuda "$@"
