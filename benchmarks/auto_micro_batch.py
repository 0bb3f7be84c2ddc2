"""``micro_batch_size="auto"`` for real: the largest slice that fits on a GPU.

The transformer of `transformer` (8.5M parameters, 256 tokens) is asked
for one `fit` step on a batch far bigger than fits (4,096 sequences: the
logits alone are 34 GB in float32, and the whole plain step several times
that), with ``micro_batch_size="auto"``. `fit` halves from the batch until a
slice's forward and backward pass fits, then trains the batch in slices of
that size. Recorded: the slices tried, the one chosen, the step's peak
device memory, and that the update happened. Run by `gpu_check.sh` on JAX
and PyTorch; on a CPU the search is refused (there is no out-of-memory
error to catch there), and the refusal is what this records.

    KERAS_BACKEND=jax python benchmarks/auto_micro_batch.py --out results/gpu/jax
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run as a script

import keras  # noqa: E402
import transformer  # noqa: E402

from accumulate import enable_accumulation  # noqa: E402
from accumulate import model as model_module  # noqa: E402

BATCH, QUICK_BATCH = 4096, 64


def peak_device_bytes() -> int | None:
    """The device's peak allocation so far, if the backend reports one."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return (
            int(torch.cuda.max_memory_allocated())
            if torch.cuda.is_available()
            else None
        )
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "gpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model")
    args = parser.parse_args()
    size = transformer.SIZES["quick" if args.quick else "full"]
    batch = QUICK_BATCH if args.quick else BATCH
    model = enable_accumulation(transformer.causal_lm(size), micro_batch_size="auto")
    model = transformer.compiled(model)
    x, y, weight = transformer.token_data(size, batch)
    backend = model_module._backend
    tried: list[int] = []
    probe = backend.probe

    def recording_probe(model, x, y, sample_weight):
        tried.append(int(backend.batch_size(x)))
        probe(model, x, y, sample_weight)

    backend.probe = recording_probe
    report = {
        "backend": keras.backend.backend(),
        "accelerator": backend.accelerator(),
        "command": " ".join(["python", *sys.argv]),
        "model": f"GPT2CausalLM from config, {size}",
        "batch": batch,
        "date": time.strftime("%Y-%m-%d"),
    }
    started = time.perf_counter()
    try:
        model.fit(x, y, sample_weight=weight, batch_size=batch, epochs=1, verbose=0)
    except ValueError as error:
        if report["accelerator"] is not None:
            raise
        report["refused_on_cpu"] = str(error)
    else:
        report.update(
            {
                "tried": tried,
                "chosen": model._found_micro_batch_size,
                "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
                "seconds_with_search": time.perf_counter() - started,
                "peak_device_bytes": peak_device_bytes(),
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto-micro-batch.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
