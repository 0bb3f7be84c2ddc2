# One-command set-up: every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(abspath ../shared/data)
export ACCUMULATE_DATA_DIR ?= $(DATA_DIR)
PYTEST_ARGS ?= -q --timeout=900 --durations=15

.PHONY: install test test-floor test-newest test-matrix lint notebook clean

# A virtualenv with the package and its dev extra, pinned by a constraints
# file: $(call virtualenv,<dir>,<constraints>) defines <dir>/.installed.
define virtualenv
$(1)/.installed: pyproject.toml $(2)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -c $(2) -e '.[dev]'
	touch $$@
endef

# .venv is the everyday one: the newest versions, as is .venv-newest, which
# exists so that the matrix never depends on what .venv happens to hold.
$(eval $(call virtualenv,$(VENV),constraints/newest.txt))
$(eval $(call virtualenv,.venv-newest,constraints/newest.txt))
$(eval $(call virtualenv,.venv-floor,constraints/floor.txt))

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite at the oldest tensorflow / keras pyproject.toml allows.
test-floor: .venv-floor/.installed
	.venv-floor/bin/python -m pytest $(PYTEST_ARGS)

test-newest: .venv-newest/.installed
	.venv-newest/bin/python -m pytest $(PYTEST_ARGS)

# Both ends of the supported range, one after the other (2 cores).
test-matrix: test-floor test-newest

lint: $(STAMP)
	$(VENV)/bin/ruff check accumulate tests benchmarks examples notebooks
	$(VENV)/bin/ruff format --check accumulate tests benchmarks examples notebooks

clean:
	rm -rf $(VENV) .venv-floor .venv-newest .pytest_cache .ruff_cache .hypothesis

-include mk/*.mk

# Executes the paper's notebook in place (200 epochs: reuses the reference
# runs in results/).
notebook: $(STAMP)
	$(PY) notebooks/execute.py notebooks/gradient_accumulation.ipynb
