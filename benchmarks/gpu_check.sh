#!/usr/bin/env bash
# The transformer's memory and speed benchmarks on an accelerator, on JAX and
# PyTorch, from token ids, and micro_batch_size="auto" searching for real;
# writes results/gpu/ (or --out DIR).
#
#   bash benchmarks/gpu_check.sh            # on the accelerator machine, < 10 min
#   bash benchmarks/gpu_check.sh --quick    # smoke test (tiny model), any machine
#
# That machine's python3 has CUDA builds of jax and torch but no TensorFlow,
# Keras or network: Keras, KerasHub and what they import travel as wheels in
# gpu-wheels/ (`make gpu-wheels`, listed in benchmarks/gpu-requirements.txt)
# and are installed into a private folder, never over the machine's own
# packages. Where keras_hub imports already (the TensorFlow-free venv of
# `make test-without-tensorflow`), nothing is installed. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT=results/gpu
QUICK=()
ROUNDS=(--rounds 12 --instances 2)
VARIANTS=(--no-curve)
while [ $# -gt 0 ]; do
    case "$1" in
        # A smoke test: tiny model, and the variants of memory.py's quick
        # settings (b = 4, N = 4) that the limit needs.
        --quick) QUICK=(--quick); ROUNDS=(--rounds 2 --instances 1)
                 VARIANTS=(--only plain-4,ours-4x4,ours-4x4-lora) ;;
        --out) OUT="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --quick, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"

if ! "$PYTHON" -c "import keras_hub" 2>/dev/null; then
    if ! ls gpu-wheels/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: keras_hub is missing and gpu-wheels/ is empty; run" \
            "'make gpu-wheels' on a machine with the package index first" >&2
        exit 1
    fi
    site="$(mktemp -d)/site-packages"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" gpu-wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    "$PYTHON" - <<'PYTHON'
import platform, jax, torch, keras, keras_hub
print("python", platform.python_version(), "| jax", jax.__version__, jax.devices(),
      "| torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "| keras", keras.__version__, "| keras_hub", keras_hub.__version__)
PYTHON
} | tee "$OUT/environment.txt"

# Speed: paired rounds in one process per backend (an epoch is milliseconds
# on a GPU, so more rounds than on CPU).
for backend in jax torch; do
    KERAS_BACKEND="$backend" timeout 150 "$PYTHON" benchmarks/bench_transformer.py \
        --out "$OUT/$backend" "${ROUNDS[@]}" "${QUICK[@]}"
done
# micro_batch_size="auto": the largest slice of a 4,096-sequence batch that
# fits, found by fit before it trains (one process per backend).
for backend in jax torch; do
    KERAS_BACKEND="$backend" timeout 240 "$PYTHON" benchmarks/auto_micro_batch.py \
        --out "$OUT/$backend" "${QUICK[@]}"
done
# Memory: one process per variant; the points between b and B are left out.
timeout 270 "$PYTHON" benchmarks/memory.py --models transformer "${VARIANTS[@]}" \
    --python jax="$PYTHON" --python torch="$PYTHON" --out "$OUT" "${QUICK[@]}"
echo "gpu_check.sh: wrote $OUT"
