# One-command set-up: every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(abspath ../shared/data)
export ACCUMULATE_DATA_DIR ?= $(DATA_DIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test lint reproduce reproduce-seeds reproduce-adam bench notebook clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check accumulate tests benchmarks examples notebooks
	$(VENV)/bin/ruff format --check accumulate tests benchmarks examples notebooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

-include mk/*.mk

# Executes the paper's notebook in place (200 epochs: reuses results/ runs).
notebook: $(STAMP)
	$(PY) notebooks/execute.py notebooks/gradient_accumulation.ipynb
