"""The benchmarks' one harness: variant tables in, timed rows and reports out.

``bench.py``, ``scaling.py`` and ``profile_fit.py`` (run as scripts, so this
directory is on ``sys.path``) are tables of `Spec` rows over this module; the
settings axes (``jit_compile``, ``steps_per_execution``) multiply a table into
`Variant` objects. Every timing is made the same way (`measure`): one process,
each variant warmed up (traced and, with XLA, compiled), then round-robin
rounds of one epoch per variant; a variant's time is the median of its timed
epochs and its ratios are paired per round (`paired_ratio`).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

try:
    from accumulate.paper import datasets, notebook_loops, training
except ImportError:  # before the paper/ split
    from accumulate import datasets, notebook_loops, training
from accumulate.twins import PAPER_HIDDEN_UNITS, build_mlp, make_twins

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
BATCH_SIZE = 512
LEARNING_RATE = 0.01
SEED = 42
QUICK_SAMPLES = 2048
STARTED = time.perf_counter()
DEFAULT_FIT = "fit [jit=off spe=1]"
# The reproduction runner's setting: the one the overhead targets apply to.
REPRODUCTION_JIT = training.JIT_COMPILE


@dataclass(frozen=True)
class Spec:
    """One row of a variant table.

    ``model``: `AccumulatingModel` keyword arguments, or None for the plain
    `keras.Model` twin (same seed, same weights). ``optimizer``: more
    `keras.optimizers.SGD` keyword arguments. ``compare``: names of other
    variants at the same settings to pair ratios with, besides plain fit and
    the floor.
    """

    name: str
    family: str
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    compare: tuple[str, ...] = ()


# -- Command line, process and data ------------------------------------------


def parser(doc: str, epochs: int, out: Path = RESULTS_DIR) -> argparse.ArgumentParser:
    """The options every script takes, so one BENCH_ARGS suits them all."""
    first, rest = doc.split("\n\n", 1)
    result = argparse.ArgumentParser(
        description=first,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = result.add_argument
    add("--data-dir", default=os.environ.get("ACCUMULATE_DATA_DIR"))
    add("--epochs", type=int, help=f"timed epochs a variant (default {epochs})")
    add("--warmup", type=int, default=1, help="untimed epochs a variant first")
    add("--out", type=Path, default=out, help="output directory")
    add("--quick", action="store_true", help="smoke test: synthetic, few variants")
    add("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    add("--pin-cpus", help="comma-separated CPU ids to pin the process to")
    result.set_defaults(default_epochs=epochs)
    return result


@dataclass
class Data:
    """The training set as loaded (uint8) and as every `fit` sees it."""

    images: np.ndarray
    labels: np.ndarray
    description: str
    threads: int

    def __post_init__(self) -> None:
        self.x = (self.images / np.float32(255.0)).astype(np.float32)
        self.y = self.labels.astype(np.int32)
        self.batches = math.ceil(len(self.x) / BATCH_SIZE)
        self.dataset = self.pipeline()

    def pipeline(self, short: bool = False) -> tf.data.Dataset:
        """`accumulate.training`'s pipeline: in order, cached, prefetched.

        tf.data's own thread pool is capped so ``--threads`` holds for it
        too. ``short`` keeps two full batches and the ragged tail: every
        batch shape of an epoch, so warming up on it traces and compiles
        them all in a fraction of a wide model's epoch.
        """
        x, y = self.x, self.y
        if short:
            keep = np.r_[: 2 * BATCH_SIZE, len(x) - len(x) % BATCH_SIZE : len(x)]
            x, y = x[keep], y[keep]
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.threads
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE)
        return dataset.cache().prefetch(tf.data.AUTOTUNE).with_options(options)


def start(
    parsed: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, dict[str, Any], Data]:
    """Parses the command line, sets up the process, loads the data.

    The thread counts are set first: TensorFlow's runtime reads them once,
    when it runs its first op.
    """
    args = parsed.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else args.default_epochs)
    if args.epochs < 1 or args.threads < 1:
        parsed.error("--epochs and --threads must be >= 1")
    if args.pin_cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.pin_cpus.split(",")})
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    # Dozens of models in one process make TensorFlow warn about retracing:
    # expected here, and it would bury the progress lines.
    tf.get_logger().setLevel("ERROR")
    if args.quick:
        rng = np.random.default_rng(SEED)
        images = rng.integers(0, 256, (QUICK_SAMPLES, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, QUICK_SAMPLES, dtype=np.uint8)
        description = f"synthetic ({QUICK_SAMPLES} samples)"
    else:
        (images, labels), _ = datasets.load_dataset("mnist", args.data_dir)
        description = f"MNIST train ({len(images)} samples)"
    affinity = getattr(os, "sched_getaffinity", None)
    meta = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(affinity(0)) if affinity else None,
        "threads": args.threads,
        "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return args, meta, Data(images, labels, description, args.threads)


# -- Variants ------------------------------------------------------------------


class EpochTime(NamedTuple):
    """Wall and process CPU seconds of one epoch.

    CPU time (all threads) barely moves when other jobs take the cores, so
    on a shared machine it is the steadier one; wall time is what users wait.
    """

    wall: float
    cpu: float


def _clock() -> Callable[[], EpochTime]:
    wall, cpu = time.perf_counter(), time.process_time()
    return lambda: EpochTime(time.perf_counter() - wall, time.process_time() - cpu)


def sync(model: Any) -> None:
    """Blocks until every queued update of ``model`` has run."""
    model.trainable_variables[-1].numpy()


class EpochTimer(keras.callbacks.Callback):
    """Times each epoch's training, the epoch-end flush included.

    It stops after the callbacks placed before it (`AccumulatingModel`'s
    flush is one) and after every queued update has run.
    """

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.stop = _clock()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        sync(self.model)
        self.time = self.stop()


def fit_epoch(model: Any, dataset: tf.data.Dataset) -> EpochTime:
    """Runs one `fit` epoch (no validation) and returns its training time."""
    timer = EpochTimer()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[timer], shuffle=False)
    return timer.time


def timed(run: Callable[[], Any], model: Any) -> EpochTime:
    """Time of ``run()`` until ``model``'s updates are done."""
    stop = _clock()
    run()
    sync(model)
    return stop()


def settings_label(jit_compile: bool | None, steps_per_execution: int | None) -> str:
    """``jit=on spe=118``, ``jit=off`` (the floor) or ``eager`` (the notebook)."""
    if jit_compile is None:
        return "eager"
    jit = f"jit={'on' if jit_compile else 'off'}"
    return jit if steps_per_execution is None else f"{jit} spe={steps_per_execution}"


@dataclass
class Variant:
    """One thing to time and, once `measure` has run it, its timings.

    ``epoch_seconds[i]`` and ``epoch_cpu_seconds[i]`` come from round ``i``,
    so two variants' lists pair up round by round.
    """

    spec: Spec
    run_epoch: Callable[[], EpochTime]
    model: Any
    jit_compile: bool | None = None
    steps_per_execution: int | None = None
    warm_up: Callable[[], EpochTime] | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_cpu_seconds: list[float] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0

    @property
    def settings(self) -> str:
        return settings_label(self.jit_compile, self.steps_per_execution)

    @property
    def key(self) -> str:
        return f"{self.spec.name} [{self.settings}]"


def loss_function() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build_model(spec: Spec, hidden_units: tuple[int, ...] = PAPER_HIDDEN_UNITS) -> Any:
    """The spec's twin of the MLP with ``hidden_units``, seeded with `SEED`."""
    if spec.model is None:
        keras.utils.set_random_seed(SEED)
        return build_mlp(hidden_units)
    build = functools.partial(build_mlp, hidden_units)
    return make_twins(SEED, build=build, **spec.model)[1]


def compiled(
    spec: Spec, jit: bool, spe: int, hidden: tuple[int, ...] = PAPER_HIDDEN_UNITS
) -> Any:
    """`build_model`, compiled with SGD(0.01), the loss and accuracy."""
    model = build_model(spec, hidden)
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, **spec.optimizer),
        loss=loss_function(),
        metrics=["accuracy"],
        jit_compile=jit,
        steps_per_execution=spe,
    )
    return model


def fit_variant(
    spec: Spec,
    data: Data,
    jit: bool,
    spe: int,
    hidden: tuple[int, ...] = PAPER_HIDDEN_UNITS,
    short_warmup: bool = False,
) -> Variant:
    """One `fit` epoch of the spec's model at the given settings."""
    model = compiled(spec, jit, spe, hidden)
    warm = data.pipeline(short=True) if short_warmup else data.dataset
    run = functools.partial(fit_epoch, model, data.dataset)
    return Variant(
        spec, run, model, jit, spe, functools.partial(fit_epoch, model, warm)
    )


def floor_variant(data: Data, jit_compile: bool) -> Variant:
    """A whole epoch of plain SGD as one `tf.function`: the speed floor.

    The arithmetic of a `fit` step (forward pass, loss, gradient,
    ``w -= lr * g``, loss and hit sums) without Keras's loop, metric objects,
    optimizer or callbacks. Full batches are stacked so the loop body has the
    static shape XLA needs; the ragged last batch is one more step.
    """
    spec = Spec("floor", "floor")
    model, loss_fn = build_model(spec), loss_function()
    variables, full = model.trainable_variables, len(data.x) // BATCH_SIZE
    cut = full * BATCH_SIZE
    x_full = tf.constant(data.x[:cut].reshape(full, BATCH_SIZE, 28, 28))
    y_full = tf.constant(data.y[:cut].reshape(full, BATCH_SIZE))
    x_tail, y_tail = tf.constant(data.x[cut:]), tf.constant(data.y[cut:])

    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        for weight, gradient in zip(
            variables, tape.gradient(loss, variables), strict=True
        ):
            weight.assign_sub(LEARNING_RATE * gradient)
        hits = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y)
        return tf.stack([loss, tf.reduce_sum(tf.cast(hits, tf.float32))])

    @tf.function(jit_compile=jit_compile)
    def epoch() -> tf.Tensor:
        sums = tf.zeros(2)
        for index in tf.range(full):
            sums += step(x_full[index], y_full[index])
        return sums + step(x_tail, y_tail) if cut < len(data.x) else sums

    return Variant(spec, lambda: timed(epoch, model), model, jit_compile)


def notebook_variants(data: Data) -> list[Variant]:
    """The notebook's two eager loops, on the notebook's own float64 pipeline."""
    dataset = notebook_loops.make_notebook_dataset(data.images, data.labels, BATCH_SIZE)
    loops = {
        "notebook-standard": notebook_loops.notebook_standard_epoch,
        "notebook-accumulating": notebook_loops.notebook_accumulating_epoch,
    }
    variants = []
    for name, loop in loops.items():
        spec = Spec(name, "notebook")
        model, optimizer = build_model(spec), keras.optimizers.SGD(LEARNING_RATE)
        run = functools.partial(loop, model, optimizer, dataset, loss_function())
        variants.append(Variant(spec, functools.partial(timed, run, model), model))
    return variants


# -- Measuring ---------------------------------------------------------------


def _rss_mb(field_name: str) -> float:
    """VmRSS (now) or VmHWM (peak since `_reset_peak`) of this process, MiB."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field_name))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):  # not Linux: the process-lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:  # Linux >= 4.0; elsewhere peaks are the process's lifetime peak
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _round_order(variants: Sequence[Variant], round_index: int) -> list[Variant]:
    """This round's order: settings groups kept together, both rotated.

    Variants compared with each other share settings and so run back to back,
    seconds apart; rotating the groups and each group's members means none
    always runs first or after the same neighbour.
    """
    groups: dict[str, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.settings, []).append(variant)
    ordered = list(groups.values())
    shift = round_index % len(ordered)
    result = []
    for group in ordered[shift:] + ordered[:shift]:
        inner = round_index % len(group)
        result += group[inner:] + group[:inner]
    return result


def measure(variants: Sequence[Variant], epochs: int, warmup: int) -> None:
    """Warms every variant up, then times ``epochs`` round-robin rounds.

    Peak RSS is the highest kernel peak mark over the variant's timed epochs
    (reset before each); growth is that peak minus the RSS just before.
    """
    for variant in variants:
        for _ in range(warmup):
            gc.collect()
            variant.warmup_seconds.append((variant.warm_up or variant.run_epoch)()[0])
        log(f"  warmed up {variant.key}: {variant.warmup_seconds} s")
    for round_index in range(epochs):
        round_start = time.perf_counter()
        for variant in _round_order(variants, round_index):
            gc.collect()
            before = _rss_mb("VmRSS")
            _reset_peak()
            wall, cpu = variant.run_epoch()
            peak = _rss_mb("VmHWM")
            variant.epoch_seconds.append(wall)
            variant.epoch_cpu_seconds.append(cpu)
            variant.peak_rss_mb = max(variant.peak_rss_mb, peak)
            variant.rss_growth_mb = max(variant.rss_growth_mb, peak - before)
        seconds, load = time.perf_counter() - round_start, os.getloadavg()[0]
        log(f"  round {round_index + 1}/{epochs}: {seconds:.1f} s, load {load:.2f}")


def paired_ratio(mine: Variant, theirs: Variant | None) -> dict[str, float] | None:
    """Median over rounds of per-round epoch-time ratios, wall and CPU.

    Both epochs of a round ran seconds apart, so a slow spell of the machine
    hits both; the median drops the spells that hit only one.
    """
    if theirs is None:
        return None
    return {
        "wall": float(np.median(np.divide(mine.epoch_seconds, theirs.epoch_seconds))),
        "cpu": float(
            np.median(np.divide(mine.epoch_cpu_seconds, theirs.epoch_cpu_seconds))
        ),
    }


def _bytes(variables: Iterable[Any]) -> int:
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


def rows(variants: Sequence[Variant], num_samples: int) -> list[dict[str, Any]]:
    """One JSON-ready row per measured variant, with its paired ratios.

    Keras variants are compared with plain fit at the same settings and the
    floor at the same jit; floors and notebook loops with fit at Keras's
    defaults and the jit-off floor.
    """
    by_key = {variant.key: variant for variant in variants}
    result = []
    for variant in variants:
        spec, keras_loop = variant.spec, variant.steps_per_execution is not None
        floor = settings_label(bool(variant.jit_compile), None)
        references = {
            "fit": f"fit [{variant.settings}]" if keras_loop else DEFAULT_FIT,
            "floor": f"floor [{floor}]" if keras_loop else "floor [jit=off]",
        }
        state = getattr(variant.model, "_accumulation", None)
        median = float(np.median(variant.epoch_seconds))
        row = {"key": variant.key, "name": spec.name, "family": spec.family}
        for name in ("settings", "jit_compile", "steps_per_execution"):
            row[name] = getattr(variant, name)
        row["accumulation_steps"] = (spec.model or {}).get(
            "accumulation_steps", spec.optimizer.get("gradient_accumulation_steps")
        )
        for name in ("epoch_seconds", "epoch_cpu_seconds", "warmup_seconds"):
            row[name] = getattr(variant, name)
        row["median_s"], row["min_s"] = median, min(variant.epoch_seconds)
        row["cpu_median_s"] = float(np.median(variant.epoch_cpu_seconds))
        row["samples_per_s"] = num_samples / median
        for name, reference in references.items():
            pair = paired_ratio(variant, by_key.get(reference)) or {}
            row[f"{name}_reference"] = reference
            row[f"ratio_to_{name}"] = pair.get("wall")
            row[f"cpu_ratio_to_{name}"] = pair.get("cpu")
        row["peak_rss_mb"], row["rss_growth_mb"] = (
            variant.peak_rss_mb,
            variant.rss_growth_mb,
        )
        row["trainable_bytes"] = _bytes(variant.model.trainable_variables)
        row["accumulator_bytes"] = state and _bytes(state.gradient_sums)
        row["accumulation_state_bytes"] = state and _bytes(state.variables_to_save)
        result.append(row)
    return result


# -- Output ------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


# Every column a table may show: header -> (row key, format).
COLUMNS = {
    "variant": ("key", "{}"), "name": ("name", "{}"), "width": ("width", "{}"),
    "params": ("parameters", "{:,}"), "s/epoch": ("median_s", "{:.3f}"),
    "min s": ("min_s", "{:.3f}"), "CPU s": ("cpu_median_s", "{:.3f}"),
    "samples/s": ("samples_per_s", "{:,.0f}"), "x fit": ("ratio_to_fit", "{:.3f}x"),
    "x fit CPU": ("cpu_ratio_to_fit", "{:.3f}x"),
    "x floor": ("ratio_to_floor", "{:.3f}x"),
    "x floor CPU": ("cpu_ratio_to_floor", "{:.3f}x"),
    "peak RSS MB": ("peak_rss_mb", "{:.0f}"), "+MB": ("rss_growth_mb", "{:.1f}"),
    "weights B": ("trainable_bytes", "{:,}"), "accum. B": ("accumulator_bytes", "{:,}"),
}  # fmt: skip


def table(rows: Iterable[dict[str, Any]], headers: Sequence[str]) -> str:
    """A plain-text table of the `COLUMNS` named by ``headers``; None: ``-``."""
    columns = [COLUMNS[header] for header in headers]
    cells = [list(headers)]
    cells += [
        ["-" if r[k] is None else f.format(r[k]) for k, f in columns] for r in rows
    ]
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    data: Data,
    stem: str,
    report: dict[str, Any],
    figure: Any,
    subtitle: str,
) -> None:
    """Completes ``meta``; writes ``<stem>.json`` and the figure's ``<stem>.png``."""
    meta.update(
        load_average_at_end=list(os.getloadavg()),
        wall_seconds=time.perf_counter() - STARTED,
        data=data.description,
        num_samples=len(data.x),
        batch_size=BATCH_SIZE,
        batches_per_epoch=data.batches,
        timed_epochs=args.epochs,
        warmup_epochs=args.warmup,
        quick=args.quick,
        statistic="median of timed epochs; variants interleaved round-robin",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps({"meta": meta, **report}, indent=2) + "\n")
    title = f"{data.description}, batch {BATCH_SIZE}, {args.threads} thread(s)"
    figure.suptitle(f"{title}, {subtitle}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    pyplot().close(figure)
    log(f"\nwrote {path} and {path.with_suffix('.png')}")
