# raymix: `make serve` serves the embedded default model, `make test` runs the tests.
# Both set up .venv first on a fresh machine (nothing needed but python3 with venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# pytest workers, a module each at a time (one Ray cluster per module, as the tests share them):
# the Ray tests wait on start-ups and health checks while the others compute (each worker one
# compute thread, OpenMP's idle threads asleep: tests/conftest.py)
PYTEST_WORKERS ?= 2

.PHONY: install serve test lint format bench clean

install: $(VENV)/.installed

# What serving needs (the package without its dev extra: no lm-eval, schemathesis or playwright on
# a serving box). Without a GPU, torch is installed first as the CPU build ("+cpu"), never the
# multi-GB CUDA one; with one, PyPI's torch, which is the CUDA build. raymix's own torch bounds are
# then already satisfied.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install "torch>=2.11,<2.14"; \
	else \
		$(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e .
	touch $@

# The tests, lint and benchmarks add the dev extra (clients, fuzzers, the browser driver).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev]"
	touch $@

serve: install
	$(BIN)/raymix serve

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
