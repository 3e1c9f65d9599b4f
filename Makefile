# Two commands for a fresh machine: `make run` (set up + serve BLIP) and `make test` (set up + whole suite).
# `make demo` serves a tiny random checkpoint built offline; `make test-fast` runs the in-process tier.
# The environment lives in $(VENV) (default .venv); it is (re)installed only when requirements*.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
RUN_HASH := $(shell cat requirements.txt | sha256sum | cut -c1-16)
DEV_HASH := $(shell cat requirements.txt requirements-ray.txt requirements-dev.txt | sha256sum | cut -c1-16)

.PHONY: run demo test test-fast check-services setup setup-dev bench bench-gpu clean-venv

run: setup
	$(PY) app.py $(ARGS)

# No download: a tiny BLIP checkpoint with random weights, built offline (seconds); its captions are noise.
demo: setup
	@folder=$$($(PY) tests/support/tiny_models.py blip) && echo "Serving the tiny random checkpoint $$folder" && \
	  $(PY) app.py --model-path "$$folder" $(ARGS)

test: setup-dev check-services
	$(PY) -m pytest $(PYTEST_ARGS)

# The in-process tier (unit tests and the HTTP contract through Flask's test client): no services needed.
test-fast: setup-dev
	$(PY) -m pytest -m "not live" $(PYTEST_ARGS)

# The live tier needs a redis-server and Chromium; say how to get them rather than skip their tests.
check-services:
	@command -v redis-server >/dev/null 2>&1 || { echo "make test: redis-server is missing; install it (apt-get install -y redis-server), or run make test-fast" >&2; exit 1; }
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { echo "make test: Chromium is missing (the demo-page tests need it); install it (apt-get install -y chromium), or run make test-fast" >&2; exit 1; }
	@$(PY) -c "import allocator, sys; sys.exit(allocator.find_jemalloc() is None)" || { echo "make test: jemalloc is missing (the service runs on it where installed; tests/test_allocator.py); install it (apt-get install -y libjemalloc2), or run make test-fast" >&2; exit 1; }

setup: $(VENV)/.installed-run-$(RUN_HASH)

setup-dev: $(VENV)/.installed-dev-$(DEV_HASH)

$(VENV)/.installed-run-$(RUN_HASH):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-run-*
	@touch $@

$(VENV)/.installed-dev-$(DEV_HASH):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@rm -f $(VENV)/.installed-dev-* $(VENV)/.installed-run-*
	@touch $@ $(VENV)/.installed-run-$(RUN_HASH)

bench: setup-dev
	$(PY) bench/run.py $(BENCH_ARGS)

bench-gpu: setup-dev
	bench/gpu.sh $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
