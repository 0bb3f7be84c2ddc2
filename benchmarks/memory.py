"""Peak memory and epoch time of accumulation: each variant in its own process.

What accumulation is for: the big batch ``B`` in the memory of a micro-batch
``b = B / N``. For each model (a KerasHub GPT-2, `transformer`, and the
paper's MLP) and each backend, every variant trains in a fresh process, so
that no peak is shared: plain `fit` at batch b, 2b, ... B; ours at N = 2,
4, 8 micro-batches of b and in ``"epoch"`` mode; Keras's built-in
(``gradient_accumulation_steps``) at 8 x b; and, on the transformer, LoRA
fine-tuning plain and ours, and ``micro_batch_size=b`` with `fit` asking for
batches of B and of 64 x b (512 sequences), split inside the step.

Measured per variant: the peak memory that `fit` adds over what the process
held with the model built and the data loaded (resident memory on CPU:
Linux's ``VmHWM``, reset through ``clear_refs``; the framework's own
peak-bytes counter on a GPU). Tracing and compiling are counted, as users
pay them; no warm-up step precedes the baseline, since the allocators keep
what a step freed and a warmed-up process would hide the step's peak. Also
measured: the median epoch time after the first (which traces), the
accumulators' bytes and one float32 copy of the trainable weights. The
limit for ours is plain `fit` at b plus that copy; the report gives how far
each backend is from it. Writes ``bench-memory.json`` and
``bench-memory.png`` (peak memory against effective batch) into ``--out``.

    python benchmarks/memory.py --python tensorflow=.venv/bin/python \\
        --python jax=.venv-jax/bin/python --python torch=.venv-torch/bin/python

No TensorFlow is imported here (the GPU check runs it without): the MLP's
data is MNIST from ``--data-dir`` when given, else drawn at its shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run as a script
MODELS = ("transformer", "mlp")
# (micro-batch b, accumulation steps N) per model; B = N * b.
SETTINGS = {"transformer": (8, 8), "mlp": (64, 8)}
QUICK_SETTINGS = {"transformer": (4, 4), "mlp": (16, 4)}
# Samples per epoch: two windows of N micro-batches (so that "epoch" holds
# twice what N does), except on the MLP, which trains on all of MNIST.
MLP_SAMPLES, QUICK_SAMPLES = 60000, 512
# The biggest batch asked of micro_batch_size, in micro-batches.
SLICES_OF_BIG_BATCH = 64


def variants(
    model: str, micro_batch: int, steps: int, curve: bool = True
) -> list[dict[str, Any]]:
    """The variants of one model: plain fit from b to B, ours, Keras's.

    ``curve=False`` keeps the ends: plain fit at b and B, ours at N.
    """
    rows = []
    batch = micro_batch
    while batch <= micro_batch * steps:
        if curve or batch in (micro_batch, micro_batch * steps):
            rows.append({"name": f"plain-{batch}", "kind": "plain", "batch": batch})
        batch *= 2
    for count in (2, 4, 8):
        if count == steps or (curve and count < steps):
            rows.append(
                {
                    "name": f"ours-{count}x{micro_batch}",
                    "kind": "ours",
                    "steps": count,
                    "batch": micro_batch,
                }
            )
    rows.append(
        {
            "name": f"ours-epochx{micro_batch}",
            "kind": "ours",
            "steps": "epoch",
            "batch": micro_batch,
        }
    )
    rows.append(
        {
            "name": f"keras-{steps}x{micro_batch}",
            "kind": "builtin",
            "steps": steps,
            "batch": micro_batch,
        }
    )
    if model == "transformer":
        # micro_batch_size: fit asks for the window as one batch (and for a
        # batch 64 micro-batches big: 512 sequences of the full model, whose
        # plain step would need about 56 GB), split into slices of b in the
        # step.
        for batch in (micro_batch * steps, micro_batch * SLICES_OF_BIG_BATCH):
            rows.append(
                {
                    "name": f"sliced-{batch}/{micro_batch}",
                    "kind": "sliced",
                    "batch": batch,
                    "micro_batch_size": micro_batch,
                }
            )
        rows.append(
            {
                "name": f"plain-{micro_batch}-lora",
                "kind": "plain",
                "batch": micro_batch,
                "lora": True,
            }
        )
        rows.append(
            {
                "name": f"ours-{steps}x{micro_batch}-lora",
                "kind": "ours",
                "steps": steps,
                "batch": micro_batch,
                "lora": True,
            }
        )
    for row in rows:
        row["model"] = model
    return rows


# -- the child: one variant, one process -------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak bytes over a baseline: the GPU's counter, else resident memory."""

    def __init__(self, backend: str):
        self.device, self.backend = "cpu", backend
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                self.device = torch.cuda.get_device_name()
        elif backend == "jax":
            import jax

            if jax.default_backend() == "gpu":
                self.device = jax.devices()[0].device_kind
        self.baseline = 0

    def _in_use(self) -> int:
        if self.device == "cpu":
            return _status_kb("VmRSS") * 1024
        if self.backend == "torch":
            import torch

            return torch.cuda.memory_allocated()
        import jax

        return jax.devices()[0].memory_stats()["bytes_in_use"]

    def start(self) -> None:
        """The baseline is now; the peak counts from here."""
        if self.device == "cpu":
            # Linux resets the high-water mark (VmHWM) to the current RSS.
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        elif self.backend == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.baseline = self._in_use()

    def peak_added(self) -> int:
        if self.device == "cpu":
            return _status_kb("VmHWM") * 1024 - self.baseline
        if self.backend == "torch":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        import jax

        # JAX's peak cannot be reset: the model's building (before the
        # baseline) peaks far below a training step.
        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] - self.baseline


def _mlp_data(samples: int, data_dir: str | None) -> tuple[Any, Any]:
    import numpy as np

    if data_dir:
        from accumulate.paper.datasets import load_dataset

        (x, y), _ = load_dataset("mnist", data_dir)
        return (x[:samples] / np.float32(255)).astype("float32"), y[:samples]
    rng = np.random.default_rng(0)
    x = rng.random((samples, 28, 28), dtype="float32")
    return x, rng.integers(0, 10, samples).astype("int32")


def _model_and_data(row: dict[str, Any], quick: bool, data_dir: str | None):
    import keras
    import transformer

    from accumulate import enable_accumulation
    from accumulate.twins import build_mlp

    micro_batch, steps = (QUICK_SETTINGS if quick else SETTINGS)[row["model"]]
    builtin = row["steps"] if row["kind"] == "builtin" else None
    if row["model"] == "transformer":
        size = transformer.SIZES["quick" if quick else "full"]
        model = transformer.causal_lm(size, lora=row.get("lora", False))
        x, y, weight = transformer.token_data(
            size, max(2 * steps * micro_batch, row["batch"])
        )
        model = transformer.compiled(model, keras_accumulation=builtin)
    else:
        keras.utils.set_random_seed(42)
        model = build_mlp()
        x, y = _mlp_data(QUICK_SAMPLES if quick else MLP_SAMPLES, data_dir)
        weight = None
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, gradient_accumulation_steps=builtin),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    if row["kind"] == "ours":
        model = enable_accumulation(model, accumulation_steps=row["steps"])
    if row["kind"] == "sliced":
        model = enable_accumulation(model, micro_batch_size=row["micro_batch_size"])
    return model, (x, y, weight)


def _accumulator_bytes(model: Any) -> int:
    """The bytes of the gradient sums: ours, or Keras's built-in's."""
    state = getattr(model, "_accumulation", None)
    if state is not None:
        sums = state.gradient_sums
    else:
        sums = getattr(model.optimizer, "_accumulated_gradients", None) or []
    return sum(_size(s.shape) * _itemsize(s.dtype) for s in sums)


def _size(shape: Any) -> int:
    total = 1
    for dimension in shape:
        total *= int(dimension)
    return total


def _itemsize(dtype: Any) -> int:
    import numpy as np

    name = str(getattr(dtype, "name", dtype)).replace("tf.", "")
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def measure(row: dict[str, Any], quick: bool, epochs: int, data_dir: str | None):
    """Trains one variant and returns what it cost."""
    import keras
    import numpy as np

    model, (x, y, weight) = _model_and_data(row, quick, data_dir)
    batch = row["batch"]

    updates_before = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    memory = PeakMemory(keras.backend.backend())
    memory.start()
    epoch_seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_seconds.append(time.perf_counter() - self.started)

    history = model.fit(
        x,
        y,
        sample_weight=weight,
        batch_size=batch,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[EpochTimer()],
    )
    peak = memory.peak_added()
    trainable = sum(_size(v.shape) for v in model.trainable_variables)
    samples = len(y)
    return {
        **row,
        "backend": keras.backend.backend(),
        "device": memory.device,
        "process": os.getpid(),
        "peak_added_bytes": int(peak),
        "baseline_bytes": int(memory.baseline),
        "epoch_seconds": epoch_seconds,
        # The first epoch traces (and compiles); the others are steady.
        "epoch_s": float(np.median(epoch_seconds[1:] or epoch_seconds)),
        "samples_per_epoch": samples,
        "effective_batch": samples
        if row.get("steps") == "epoch"
        else batch * (row.get("steps") or 1),
        "parameters": int(model.count_params()),
        "trainable_parameters": int(trainable),
        "float32_weight_copy_bytes": 4 * int(trainable),
        "accumulator_bytes": _accumulator_bytes(model),
        "optimizer_updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        - updates_before,
        "final_loss": float(history.history["loss"][-1]),
    }


# -- the parent: every variant, in turn, in fresh processes -------------------


def run_child(python: str, backend: str, row: dict[str, Any], args: Any) -> dict:
    command = [
        python,
        __file__,
        "--child",
        json.dumps(row),
        "--epochs",
        str(args.epochs),
    ] + (["--quick"] if args.quick else [])
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    environment = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{backend} {row['name']} failed:\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _plain_run(results: list[dict[str, Any]], run: dict[str, Any], batch: int):
    """Plain fit at ``batch`` on the same backend and model as ``run``."""
    for other in results:
        if (
            other["kind"] == "plain"
            and other["batch"] == batch
            and all(
                other.get(key) == run.get(key) for key in ("backend", "model", "lora")
            )
        ):
            return other
    return None


def limits(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each accumulating run against its limit: plain fit at b plus one copy.

    The limit's copy is float32 weights (what the default accumulators
    hold); ``over_limit`` is how far the peak is above it, in bytes and as a
    fraction of the limit.
    """
    rows = []
    for run in results:
        if run["kind"] == "plain":
            continue
        floor = _plain_run(results, run, run.get("micro_batch_size", run["batch"]))
        big = _plain_run(results, run, run["effective_batch"])
        if floor is None:
            continue
        limit = floor["peak_added_bytes"] + run["float32_weight_copy_bytes"]
        rows.append(
            {
                "backend": run["backend"],
                "model": run["model"],
                "variant": run["name"],
                "peak_added_mb": run["peak_added_bytes"] / 2**20,
                "limit_mb": limit / 2**20,
                "over_limit_mb": (run["peak_added_bytes"] - limit) / 2**20,
                "over_limit_fraction": (run["peak_added_bytes"] - limit) / limit,
                "below_plain_at_effective_batch": None
                if big is None
                else big["peak_added_bytes"] / max(run["peak_added_bytes"], 1),
                "epoch_s_vs_plain_at_micro_batch": run["epoch_s"] / floor["epoch_s"],
                "accumulator_mb": run["accumulator_bytes"] / 2**20,
            }
        )
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | model | variant | effective batch | peak added MB | "
        "epoch s | accumulators MB | updates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results:
        lines.append(
            f"| {run['backend']} | {run['model']} | {run['name']} | "
            f"{run['effective_batch']} | {run['peak_added_bytes'] / 2**20:,.0f} | "
            f"{run['epoch_s']:.2f} | {run['accumulator_bytes'] / 2**20:.2f} | "
            f"{run['optimizer_updates']} |"
        )
    return "\n".join(lines)


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({run["backend"] for run in results})
    models = [model for model in MODELS if any(r["model"] == model for r in results)]
    figure_, axes = plt.subplots(
        len(models),
        len(backends),
        squeeze=False,
        figsize=(4.2 * len(backends), 3.6 * len(models)),
    )
    styles = {
        "plain": ("#4c72b0", "o-", "plain fit at batch B"),
        "ours": ("#dd8452", "s-", "ours, N micro-batches of b"),
        "builtin": ("#8172b3", "^", "Keras built-in, N x b"),
        "sliced": ("#55a868", "D-", "ours, batch B in slices of b"),
    }
    for row, model in enumerate(models):
        for column, backend in enumerate(backends):
            axis = axes[row][column]
            runs = [
                r
                for r in results
                if r["model"] == model and r["backend"] == backend and not r.get("lora")
            ]
            for kind, (colour, style, label) in styles.items():
                points = sorted(
                    (r["effective_batch"], r["peak_added_bytes"] / 2**20)
                    for r in runs
                    if r["kind"] == kind
                )
                if points:
                    axis.plot(
                        *zip(*points, strict=True), style, color=colour, label=label
                    )
            axis.set_xscale("log", base=2)
            axis.set_title(
                f"{model}, {backend} ({runs[0]['device'] if runs else ''})", fontsize=9
            )
            axis.set_xlabel("effective batch (samples per update)")
            axis.set_ylabel("peak memory added (MB)")
            floor = min(
                (r for r in runs if r["kind"] == "plain"),
                key=lambda r: r["batch"],
                default=None,
            )
            copy = max((r["float32_weight_copy_bytes"] for r in runs), default=0)
            if floor is not None:
                axis.axhline(
                    (floor["peak_added_bytes"] + copy) / 2**20,
                    color="grey",
                    linestyle="--",
                    linewidth=1,
                    label="limit: plain fit at b + one float32 copy",
                )
            axis.set_ylim(0, 1.12 * max(r["peak_added_bytes"] / 2**20 for r in runs))
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure_.tight_layout()
    figure_.savefig(path, dpi=120)


def _updated(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with the runs ``new`` remeasured replaced in place, others added."""

    def key(run: dict) -> tuple:
        return run["backend"], run["model"], run["name"]

    fresh = {key(run): run for run in new}
    merged = [fresh.pop(key(run), run) for run in old]
    return merged + list(fresh.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=PYTHON",
        help="a backend and the interpreter that runs it (repeatable; default: "
        "this interpreter on $KERAS_BACKEND)",
    )
    add(
        "--models",
        default=",".join(MODELS),
        help="comma-separated, of " + ", ".join(MODELS),
    )
    add("--only", default="", help="comma-separated variant names (default: all)")
    add(
        "--no-curve",
        action="store_true",
        help="only plain fit at b and B and ours at N (no points between)",
    )
    add("--epochs", type=int, default=2, help="epochs per variant (default 2)")
    add("--data-dir", help="MNIST directory for the MLP (default: drawn data)")
    add("--out", type=Path, default=HERE.parent / "results")
    add("--quick", action="store_true", help="smoke test: tiny models and data")
    add(
        "--update",
        action="store_true",
        help="keep the runs of an existing report in --out that this run does "
        "not measure again (to remeasure a few variants)",
    )
    add(
        "--replot",
        action="store_true",
        help="only redraw bench-memory.png from the bench-memory.json in --out",
    )
    add("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replot:
        report = json.loads((args.out / "bench-memory.json").read_text())
        figure(report["results"], args.out / "bench-memory.png")
        return
    if args.child:
        sys.path.insert(0, str(HERE))
        row = json.loads(args.child)
        print(json.dumps(measure(row, args.quick, args.epochs, args.data_dir)))
        return

    pythons = dict(item.split("=", 1) for item in args.python) or {
        os.environ.get("KERAS_BACKEND", "tensorflow"): sys.executable
    }
    only = {name for name in args.only.split(",") if name}
    results = []
    for backend, python in pythons.items():
        for model in args.models.split(","):
            micro_batch, steps = (QUICK_SETTINGS if args.quick else SETTINGS)[model]
            for row in variants(model, micro_batch, steps, not args.no_curve):
                if only and row["name"] not in only:
                    continue
                run = run_child(python, backend, row, args)
                results.append(run)
                print(
                    f"{backend:<10} {model:<11} {row['name']:<18} "
                    f"+{run['peak_added_bytes'] / 2**20:8.0f} MB "
                    f"{run['epoch_s']:7.2f} s/epoch",
                    flush=True,
                )
    command = " ".join([Path(sys.executable).name, *sys.argv])
    commands = [command]
    previous = args.out / "bench-memory.json"
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        results = _updated(old["results"], results)
        commands = old["meta"].get("commands", [old["meta"].get("command")]) + commands
    report = {
        "meta": {
            "commands": commands,
            "quick": args.quick,
            "epochs": args.epochs,
            "settings": {
                m: {"micro_batch": b, "accumulation_steps": n}
                for m, (b, n) in (QUICK_SETTINGS if args.quick else SETTINGS).items()
            },
            "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "results": results,
        "limits": limits(results),
        "table": table(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-memory.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        figure(results, args.out / "bench-memory.png")
    except ImportError:  # the accelerator machine may have no matplotlib
        print("matplotlib is missing: no figure")
    print(report["table"])


if __name__ == "__main__":
    main()
