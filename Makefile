# dpt_engine everyday targets. `make run` and `make test` set up whatever is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/default
PRESET ?= digits
PYTEST_ARGS ?=

.PHONY: setup run test lint format clean-runs help

help:
	@echo "make run    - set up, then run the whole DPT pipeline on the default dataset ($(PRESET)) -> $(OUT)/report.md"
	@echo "make test   - set up, then run the test suite"
	@echo "make setup  - create $(VENV) and install the pinned stack (constraints.txt)"
	@echo "make lint   - ruff check + format check"

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh scripts/build_native.sh CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h)
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/dpt run --preset $(PRESET) --out $(OUT)
	@echo "Report: $(OUT)/report.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dpt_engine kernels tests benchmarks
	$(BIN)/ruff format --check dpt_engine kernels tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format dpt_engine kernels tests benchmarks
	$(BIN)/ruff check --fix dpt_engine kernels tests benchmarks

clean-runs:
	rm -rf runs
