# Quick start: `make demo` (a 3-peer local swarm) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, on its own: TORCH_ARGS can point pip at the CPU-only wheel index (README).
TORCH ?= torch==2.13.0
TORCH_ARGS ?=

.PHONY: demo test lint typecheck bench clean

$(BIN)/p2pfed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)" $(TORCH_ARGS)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/p2pfed

demo: $(BIN)/p2pfed
	$(BIN)/p2pfed swarm --peers 3 --config configs/tiny.yaml --max-steps 60

test: $(BIN)/p2pfed
	$(BIN)/ruff check p2pfed tests
	$(BIN)/mypy p2pfed
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10

lint: $(BIN)/p2pfed
	$(BIN)/ruff check p2pfed tests
	$(BIN)/ruff format --check p2pfed tests

typecheck: $(BIN)/p2pfed
	$(BIN)/mypy p2pfed

bench: $(BIN)/p2pfed
	$(BIN)/p2pfed bench allreduce --peers 3 --numel 25000000

clean:
	rm -rf $(VENV) runs *.egg-info
