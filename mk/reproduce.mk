# Reproduction targets, included from the Makefile. They use $(PY) and $(STAMP)
# from there and the exported ACCUMULATE_DATA_DIR.
#
# Fresh runs go to $(RUNS) (git-ignored): `make reproduce` on a fresh clone
# trains, and its report compares the new numbers with the notebook's logged
# ones and with the committed reference runs in $(REFERENCE). Runs whose
# result file exists in $(RUNS) are skipped (FORCE=--force re-runs them).
# $(REFERENCE) is only written by `make reference`, which re-trains all of it.
RUNS ?= runs
REFERENCE := results
JOBS ?= 2
FORCE ?=
# Extra `reproduce` options, e.g. ARGS='--accumulation-steps 8'.
ARGS ?=
REPRODUCE = $(PY) -m accumulate reproduce --dataset all --jobs $(JOBS)
FRESH = $(REPRODUCE) --out $(RUNS) --reference $(REFERENCE) $(FORCE) $(ARGS)
# --reference is --out here, so the reference reports compare with nothing.
REGENERATE = $(REPRODUCE) --out $(REFERENCE) --reference $(REFERENCE) --force

.PHONY: reproduce reproduce-seeds reproduce-adam reproduce-jax report reference

# The notebook's experiment: both datasets, 200 epochs, seed 42, SGD(0.01).
reproduce: $(STAMP)
	$(FRESH) --epochs 200 --seeds 42

# The same with four more seeds, for the spread across seeds (seed 42 is
# reused if `make reproduce` already ran).
reproduce-seeds: $(STAMP)
	$(FRESH) --epochs 200 --seeds 42 1 2 3 4

# The notebook's MNIST experiment on JAX (its own venv), judged against the
# TensorFlow reference's band over seeds: writes band.md and band.png.
reproduce-jax: .venv-jax/.installed
	.venv-jax/bin/python -m accumulate reproduce --backend jax --dataset mnist \
		--epochs 200 --seeds 42 --jobs 1 --out $(RUNS)/jax --reference $(REFERENCE)/jax $(FORCE)
	.venv-jax/bin/python -m accumulate.paper.backend_band $(RUNS)/jax/mnist $(REFERENCE)/mnist

# What the notebook's text says it used, Adam(0.01), for the optimizer check.
reproduce-adam: $(STAMP)
	$(FRESH) --epochs 50 --seeds 42 --optimizer adam --learning-rate 0.01

# Only rebuild the figures and report.md of $(RUNS) from the results there
# (`make report RUNS=results` for the reference's own report).
report: $(STAMP)
	$(PY) -m accumulate report --out $(RUNS) --reference $(REFERENCE)

# Re-trains every committed reference run into $(REFERENCE): the three sets
# above (12 runs). Commit the result only on purpose.
reference: $(STAMP)
	$(REGENERATE) --epochs 200 --seeds 42 1 2 3 4
	$(REGENERATE) --epochs 50 --seeds 42 --optimizer adam --learning-rate 0.01
