# Two commands for a fresh machine: `make run` (set up + serve BLIP) and `make test` (set up + whole suite).
# The environment lives in $(VENV) (default .venv); it is (re)installed only when requirements*.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
RUN_HASH := $(shell cat requirements.txt | sha256sum | cut -c1-16)
DEV_HASH := $(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)

.PHONY: run test setup setup-dev bench bench-gpu clean-venv

run: setup
	$(PY) app.py $(ARGS)

test: setup-dev
	$(PY) -m pytest $(PYTEST_ARGS)

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
