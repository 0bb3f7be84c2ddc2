# Benchmarks (included from the Makefile, which defines PY, STAMP and DATA_DIR).
#   make bench           full timing table -> results/bench.{json,png} (~10-15 min)
#   make bench-scaling   overhead vs accumulation_steps and width -> results/bench-scaling.{json,png}
#   make bench-quick     both in smoke-test mode, into /tmp/accumulate-bench
#   make profile         pyinstrument profiles of fit -> results/profile/
#   make exactness       one window against one big-batch step, ours and Keras's, per backend
# BENCH_ARGS is passed to every script, e.g. make bench BENCH_ARGS='--threads 2'.
BENCH_ARGS ?=
BENCH_ENV := TF_CPP_MIN_LOG_LEVEL=2

.PHONY: bench bench-scaling bench-quick profile exactness

bench: $(STAMP)
	$(BENCH_ENV) $(PY) benchmarks/bench.py --data-dir $(ACCUMULATE_DATA_DIR) --out results $(BENCH_ARGS)

bench-scaling: $(STAMP)
	$(BENCH_ENV) $(PY) benchmarks/scaling.py --data-dir $(ACCUMULATE_DATA_DIR) --out results $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BENCH_ENV) $(PY) benchmarks/bench.py --quick --out /tmp/accumulate-bench $(BENCH_ARGS)
	$(BENCH_ENV) $(PY) benchmarks/scaling.py --quick --out /tmp/accumulate-bench $(BENCH_ARGS)

profile: $(STAMP)
	$(PY) -m pip install --quiet pyinstrument
	$(BENCH_ENV) $(PY) benchmarks/profile_fit.py --data-dir $(ACCUMULATE_DATA_DIR) --out results/profile $(BENCH_ARGS)

# One window, ours and Keras's built-in against one big-batch step, per route
# and loss reduction, on each backend -> results/exactness-<backend>.json.
exactness: $(STAMP) .venv-jax/.installed .venv-torch/.installed
	$(PY) benchmarks/exactness.py --out results
	KERAS_BACKEND=jax .venv-jax/bin/python benchmarks/exactness.py --out results
	KERAS_BACKEND=torch .venv-torch/bin/python benchmarks/exactness.py --out results
