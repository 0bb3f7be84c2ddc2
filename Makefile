# One-command set-up: every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(abspath ../shared/data)
export ACCUMULATE_DATA_DIR ?= $(DATA_DIR)
PYTEST_ARGS ?= -q --timeout=900 --durations=15

.PHONY: install test test-floor test-newest test-matrix test-jax test-torch \
	test-without-tensorflow lint notebook clean

# A virtualenv with the package and its dev extra, pinned by a constraints
# file: $(call virtualenv,<dir>,<constraints>) defines <dir>/.installed.
# $(3) names extras besides dev (a variable: make splits call arguments at
# commas).
define virtualenv
$(1)/.installed: pyproject.toml $(2)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -c $(2) -e '.[dev$(3)]'
	touch $$@
endef
JAX_EXTRA := ,jax
TORCH_EXTRA := ,torch

# .venv is the everyday one: the newest versions, as is .venv-newest, which
# exists so that the matrix never depends on what .venv happens to hold.
$(eval $(call virtualenv,$(VENV),constraints/newest.txt))
$(eval $(call virtualenv,.venv-newest,constraints/newest.txt))
$(eval $(call virtualenv,.venv-floor,constraints/floor.txt))
# One venv per other Keras backend: each suite runs in its own process with
# KERAS_BACKEND fixed (TensorFlow stays installed there: it is a dependency,
# and tf.data feeds every backend).
$(eval $(call virtualenv,.venv-jax,constraints/newest.txt,$(JAX_EXTRA)))
$(eval $(call virtualenv,.venv-torch,constraints/newest.txt,$(TORCH_EXTRA)))

# JAX and PyTorch with no TensorFlow at all, as on an accelerator machine:
# Keras, KerasHub and what they import are benchmarks/gpu-requirements.txt,
# installed without their declared dependencies (keras-hub's declare
# tensorflow-text, which pulls TensorFlow), and so is this package.
.venv-notf/.installed: pyproject.toml constraints/newest.txt benchmarks/gpu-requirements.txt
	$(PYTHON) -m venv .venv-notf
	.venv-notf/bin/python -m pip install --quiet --upgrade pip
	.venv-notf/bin/python -m pip install --quiet -c constraints/newest.txt \
		jax torch numpy pytest pytest-timeout hypothesis
	.venv-notf/bin/python -m pip install --quiet --no-deps -r benchmarks/gpu-requirements.txt
	.venv-notf/bin/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite at the oldest tensorflow / keras pyproject.toml allows, but for
# the smoke tests of the benchmarks and the fine-tuning example (marked
# `tools`): those run in the newest suites.
test-floor: .venv-floor/.installed
	.venv-floor/bin/python -m pytest $(PYTEST_ARGS) -m "not tools"

test-newest: .venv-newest/.installed
	.venv-newest/bin/python -m pytest $(PYTEST_ARGS)

# The suite on JAX and on PyTorch; TensorFlow-only tests skip themselves.
test-jax: .venv-jax/.installed
	KERAS_BACKEND=jax .venv-jax/bin/python -m pytest $(PYTEST_ARGS)

test-torch: .venv-torch/.installed
	KERAS_BACKEND=torch .venv-torch/bin/python -m pytest $(PYTEST_ARGS)

# The library, a KerasHub model and the GPU check, where TensorFlow is absent.
test-without-tensorflow: .venv-notf/.installed
	KERAS_BACKEND=jax .venv-notf/bin/python -m pytest $(PYTEST_ARGS) tests/test_without_tensorflow.py
	KERAS_BACKEND=torch .venv-notf/bin/python -m pytest $(PYTEST_ARGS) tests/test_without_tensorflow.py

# Both ends of the supported range, one after the other (2 cores).
test-matrix: test-floor test-newest

lint: $(STAMP)
	$(VENV)/bin/ruff check accumulate tests benchmarks examples notebooks conftest.py
	$(VENV)/bin/ruff format --check accumulate tests benchmarks examples notebooks conftest.py

clean:
	rm -rf $(VENV) .venv-floor .venv-newest .venv-jax .venv-torch .venv-notf .pytest_cache \
		.ruff_cache .hypothesis

-include mk/*.mk

# Executes the paper's notebook in place (200 epochs: reuses the reference
# runs in results/).
notebook: $(STAMP)
	$(PY) notebooks/execute.py notebooks/gradient_accumulation.ipynb
