# Two commands do all set-up: `make demo` and `make test`. Both create/refresh .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR := cpu

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a CPU wheel; a bare `torch` would pull a multi-GB CUDA build (ENV.md)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

RAY_STAMP := $(VENV)/.installed-ray

# Ray (~1 GB) only for the tests and users of --executor ray, never on the demo's path
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,ray]"
	touch $(RAY_STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# two xdist workers; the grouping and the longest-first order are in tests/conftest.py
TEST_WORKERS ?= 2

test: lint $(RAY_STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15

demo: venv
	$(BIN)/kalm demo

bench: venv
	$(BIN)/python -m pip install -q -e ".[dev,ray,bench]"
	for b in ingest scale mining cache train pipeline; do $(BIN)/python bench/bench_$$b.py || exit 1; done

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
