# Two commands for a fresh machine (see README): `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# A CPU build is all the default pipeline needs; on a CUDA machine use e.g. TORCH_SPEC=torch==2.14.1.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: setup run lint test check clean-outputs serve-env serve test-serve

# torch through pip, so that the machine's pip configuration (a CUDA index, a local wheel folder)
# picks the build; everything else through uv, which installs the same versions in seconds where
# pip took about a minute of a fresh machine's set-up. --system-certs: uv trusts the machine's CA store
# (as pip does), not only its bundled one.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" "uv>=0.13,<1"
	$(BIN)/uv pip install -q --system-certs --python $(BIN)/python -e ".[dev]"
	touch $@

# The whole pipeline on the embedded defaults, through `dvc repro`.
run: setup
	$(BIN)/loraline run

# Formatting and lint findings (ruff, configured in pyproject.toml) fail before any test runs.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The test suite: unit tests plus the end-to-end tests on a tiny configuration (`dvc repro`, Prefect,
# and serving through the real vLLM server, which needs the serving environment).
# Test files run TEST_WORKERS at a time (pytest-xdist): the end-to-end ones spend much of their time
# starting stage processes, so two share 2 cores well.
TEST_WORKERS ?= 2
test: setup serve-env lint
	HF_HUB_OFFLINE=1 LORALINE_SERVE_PYTHON=$(CURDIR)/.serve-venv/bin/python $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

check: setup
	$(BIN)/loraline check

# vLLM's own environment for serving (its pins conflict with the pipeline's): built once from
# src/loraline/serve/locks/<cpu|cuda>.txt into .serve-venv, reused until the lock changes.
serve-env: setup
	$(BIN)/python -m loraline.serve.environment --env .serve-venv

# Every tenant's production adapter on one vLLM server, behind the gateway (README: Serving).
serve: serve-env
	$(BIN)/loraline serve --python .serve-venv/bin/python

# The serving end-to-end tests alone: the real vLLM server and openai client on the tiny project.
test-serve: serve-env
	HF_HUB_OFFLINE=1 LORALINE_SERVE_PYTHON=$(CURDIR)/.serve-venv/bin/python $(BIN)/python -m pytest tests/e2e/test_serve.py tests/e2e/test_serve_canary.py tests/e2e/test_feedback_loop.py
