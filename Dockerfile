# The captioning service as a container: the same `python app.py` (waitress) that the README and the tests run.
#
#   docker build -t imgcap .
#   docker run -p 5001:5001 -v imgcap-hf:/data/huggingface -e REDIS_URL=redis://redis:6379/0 imgcap
#
# Settings come from the environment (see .env.example): MODEL_FAMILY, MODEL_PATH, DEVICE, SERVER_THREADS, …
# The weights are downloaded on the first start into HF_HOME; keep it on a volume so restarts reuse them.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    PORT=5001

WORKDIR /app

# jemalloc: the model thread keeps the memory it frees between batches (allocator.py; ALLOCATOR=system opts out).
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 && rm -rf /var/lib/apt/lists/*

# Dependencies first, so that changing the code does not reinstall PyTorch.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

RUN useradd --create-home --uid 10001 imgcap \
    && mkdir -p /data/huggingface \
    && chown imgcap /data/huggingface
USER imgcap
VOLUME ["/data/huggingface"]
EXPOSE 5001

# Liveness only (the process answers); readiness is GET /readyz, for the load balancer or orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5001'), timeout=4)"

CMD ["python", "app.py", "--host", "0.0.0.0"]
