# Reproduction targets, included from the Makefile. They use $(PY) and $(STAMP)
# from there and the exported ACCUMULATE_DATA_DIR. Every target writes into
# $(RESULTS), skips runs whose result file already exists (FORCE=--force to
# re-run them) and rebuilds $(RESULTS)/<dataset>/report.md and its figures.
RESULTS ?= results
JOBS ?= 2
FORCE ?=
REPRODUCE = $(PY) -m accumulate reproduce --dataset all --out $(RESULTS) --jobs $(JOBS) $(FORCE)

.PHONY: reproduce reproduce-seeds reproduce-adam report

# The notebook's experiment: both datasets, 200 epochs, seed 42, SGD(0.01).
reproduce: $(STAMP)
	$(REPRODUCE) --epochs 200 --seeds 42

# The same with four more seeds, for the spread across seeds (seed 42 is
# reused if `make reproduce` already ran).
reproduce-seeds: $(STAMP)
	$(REPRODUCE) --epochs 200 --seeds 42 1 2 3 4

# What the notebook's text says it used, Adam(0.01), for the optimizer check.
reproduce-adam: $(STAMP)
	$(REPRODUCE) --epochs 50 --seeds 42 --optimizer adam --learning-rate 0.01

# Only rebuild the figures and report.md from the results already there.
report: $(STAMP)
	$(PY) -m accumulate report --out $(RESULTS)
