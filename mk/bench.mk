# Benchmarks (included from the Makefile, which defines PY, STAMP and DATA_DIR).
#   make bench           full timing table -> results/bench.{json,png} (~10-15 min)
#   make bench-scaling   overhead vs accumulation_steps and width -> results/bench-scaling.{json,png}
#   make bench-quick     both in smoke-test mode, into /tmp/accumulate-bench
#   make profile         pyinstrument profiles of fit -> results/profile/
#   make exactness       one window against one big-batch step, ours and Keras's, per backend
#   make bench-memory    peak memory and epoch time, one process per variant, three
#                        backends -> results/bench-memory.{json,png} (~45 min)
#   make bench-transformer  the GPT-2's epoch time, ours against plain fit and Keras's
#                        built-in, three backends -> results/{,jax/,torch/}bench-transformer.json
#   make bench-jax-scale data parallelism on 4 virtual devices: time and bytes reduced
#                        per window, ours, plain and Keras's -> results/jax/bench-scale.json
#   make gpu-wheels      what benchmarks/gpu_check.sh needs on the accelerator machine
# BENCH_ARGS is passed to every script, e.g. make bench BENCH_ARGS='--threads 2'.
BENCH_ARGS ?=
BENCH_ENV := TF_CPP_MIN_LOG_LEVEL=2

.PHONY: bench bench-scaling bench-quick profile exactness bench-memory \
	bench-transformer bench-jax-scale gpu-wheels

bench: $(STAMP) bench-transformer bench-jax-scale
	$(BENCH_ENV) $(PY) benchmarks/bench.py --data-dir $(ACCUMULATE_DATA_DIR) --out results $(BENCH_ARGS)

# A compute-bound model: each backend in its own process (~5 min each).
bench-transformer: $(STAMP) .venv-jax/.installed .venv-torch/.installed
	$(BENCH_ENV) $(PY) benchmarks/bench_transformer.py --out results
	$(BENCH_ENV) KERAS_BACKEND=jax .venv-jax/bin/python benchmarks/bench_transformer.py --out results/jax
	$(BENCH_ENV) KERAS_BACKEND=torch .venv-torch/bin/python benchmarks/bench_transformer.py --out results/torch

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

# Peak memory against effective batch: plain fit, ours, Keras's built-in, on
# a KerasHub GPT-2 and the paper's MLP, each variant in a fresh process.
bench-memory: $(STAMP) .venv-jax/.installed .venv-torch/.installed
	$(BENCH_ENV) $(PY) benchmarks/memory.py --data-dir $(ACCUMULATE_DATA_DIR)/mnist \
		--python tensorflow=$(PY) --python jax=.venv-jax/bin/python \
		--python torch=.venv-torch/bin/python --out results $(BENCH_ARGS)

# Wheels for the accelerator machine's Python 3.12 (binary ones built for
# it), into the ignored gpu-wheels/ that travels with the working tree.
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform any
gpu-wheels:
	mkdir -p gpu-wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --abi cp312 $(GPU_PLATFORMS) -d gpu-wheels \
		-r benchmarks/gpu-requirements.txt
	du -sh gpu-wheels

# Data parallelism on 4 virtual CPU devices: each train step's time, and the
# bytes it reduces across devices, read from its compiled HLO (~2 min).
bench-jax-scale: .venv-jax/.installed
	$(BENCH_ENV) .venv-jax/bin/python benchmarks/jax_scale.py --out results/jax $(BENCH_ARGS)
