"""The benchmarks' one harness: variant tables (`Spec` rows) in, reports out.

Every timing is made the same way (`measure`): one process, each variant
warmed up (traced and, with XLA, compiled), then round-robin rounds of one
epoch per variant; a variant's time is the median of its timed epochs and its
ratios are paired per round (`paired_ratio`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import platform
import time
from argparse import Namespace
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import keras
import matplotlib.pyplot as plt
import numpy as np
import psutil
import tensorflow as tf

from accumulate.paper import datasets, notebook_loops, training
from accumulate.twins import PAPER_HIDDEN_UNITS, build_mlp, make_twins

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
BATCH_SIZE, LEARNING_RATE, SEED, QUICK_SAMPLES = 512, 0.01, 42, 2048
STARTED, PROCESS = time.perf_counter(), psutil.Process()
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
DEFAULT_FIT = "fit [jit=off spe=1]"
# The reproduction runner's setting: the one the overhead targets apply to.
REPRODUCTION_JIT = training.JIT_COMPILE
WIDE_PARAMETERS = 2_000_000  # wider models warm up short (and get --wide-epochs)
# Wall and process CPU seconds: CPU time barely moves when other jobs take the
# cores (on a shared machine, the steadier); wall time is what users wait for.
EpochTime = tuple[float, float]
log = functools.partial(print, flush=True)


@dataclass(frozen=True)
class Spec:
    """A variant-table row. ``model``: `AccumulatingModel` arguments (None: the
    plain twin); ``compare``: variants at the same settings to pair with."""

    name: str
    family: str
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    compare: tuple[str, ...] = ()
    hidden: tuple[int, ...] = PAPER_HIDDEN_UNITS


FIT = Spec("fit", "keras-fit")


def accumulating(steps: int | str, **more: Any) -> Spec:
    return Spec(f"acc-{steps}", "accumulating", {"accumulation_steps": steps}, **more)


def parser(doc: str, epochs: int, out: Path = RESULTS_DIR) -> argparse.ArgumentParser:
    """The options every script takes, so one BENCH_ARGS suits them all."""
    result = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = result.add_argument
    add("--data-dir", help="MNIST directory (default: $ACCUMULATE_DATA_DIR)")
    add("--epochs", type=int, help=f"timed epochs a variant (default {epochs})")
    add("--warmup", type=int, default=1, help="untimed epochs a variant first")
    add("--out", type=Path, default=out, help="output directory")
    add("--quick", action="store_true", help="smoke test: synthetic, few variants")
    add("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    add("--instances", type=int, default=1, help="models per variant (see Instances)")
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
        """`accumulate.paper.training`'s pipeline, its thread pool held to --threads;
        ``short``: two full batches and the ragged tail, every batch shape."""
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
) -> tuple[Namespace, dict[str, Any], Data]:
    args = parsed.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else args.default_epochs)
    if min(args.epochs, args.threads, args.instances) < 1:
        parsed.error("--epochs, --threads and --instances must be >= 1")
    # Before the first op: TensorFlow's runtime reads these only once.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if keras.backend.backend() == "torch":
        import torch  # the torch backend's own pool, held to --threads too

        torch.set_num_threads(args.threads)
    # Dozens of models in one process make TensorFlow warn about retracing:
    # expected here, and it would bury the progress lines.
    tf.get_logger().setLevel("ERROR")
    plt.switch_backend("Agg")  # files only: no display needed
    if args.quick:
        rng = np.random.default_rng(SEED)
        images = rng.integers(0, 256, (QUICK_SAMPLES, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, QUICK_SAMPLES, dtype=np.uint8)
        description = f"synthetic ({QUICK_SAMPLES} samples)"
    else:
        (images, labels), _ = datasets.load_dataset("mnist", args.data_dir)
        description = f"MNIST train ({len(images)} samples)"
    data = Data(images, labels, description, args.threads)
    log(f"{description}, {data.batches} batches, {args.threads} thread(s)")
    affinity = getattr(PROCESS, "cpu_affinity", None)  # not on macOS
    meta = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "machine": platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "cpu_affinity": sorted(affinity()) if affinity else None,
        "threads": args.threads,
        "load_average_at_start": list(psutil.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": description,
        "num_samples": len(data.x),
        "batch_size": BATCH_SIZE,
        "batches_per_epoch": data.batches,
        "timed_epochs": args.epochs,
        "warmup_epochs": args.warmup,
        "quick": args.quick,
        "optimizer": f"SGD({LEARNING_RATE})",
        "loss": "SparseCategoricalCrossentropy(from_logits=True)",
        "statistic": "median of timed epochs; variants interleaved round-robin",
    }
    return args, meta, data


def _clock() -> Callable[[], EpochTime]:
    wall, cpu = time.perf_counter(), time.process_time()
    return lambda: (time.perf_counter() - wall, time.process_time() - cpu)


def sync(model: Any) -> None:
    """Blocks until every queued update of ``model`` has run."""
    model.trainable_variables[-1].numpy()


def timed(run: Callable[[], Any], model: Any) -> EpochTime:
    stop = _clock()
    run()
    sync(model)
    return stop()


class EpochTimer(keras.callbacks.Callback):
    """Times an epoch's training: not `fit`'s set-up, but the callbacks placed
    before it (`AccumulatingModel`'s flush) and every queued update."""

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.stop = _clock()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        sync(self.model)
        self.time = self.stop()


def fit_epoch(model: Any, dataset: tf.data.Dataset) -> EpochTime:
    timer = EpochTimer()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[timer], shuffle=False)
    return timer.time


def settings_label(jit_compile: bool | None, steps_per_execution: int | None) -> str:
    """``jit=on spe=118``, ``jit=off`` (the floor) or ``eager`` (the notebook)."""
    if jit_compile is None:
        return "eager"
    jit = f"jit={'on' if jit_compile else 'off'}"
    return jit if steps_per_execution is None else f"{jit} spe={steps_per_execution}"


@dataclass
class Variant:
    """One thing to time and its timings; list entry ``i`` is from round ``i``."""

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
    REPORTED: ClassVar = ("settings", "jit_compile", "steps_per_execution",
                          "epoch_seconds", "epoch_cpu_seconds", "warmup_seconds",
                          "peak_rss_mb", "rss_growth_mb")  # fmt: skip

    @property
    def settings(self) -> str:
        return settings_label(self.jit_compile, self.steps_per_execution)

    @property
    def key(self) -> str:
        return f"{self.spec.name} [{self.settings}]"


def build_model(spec: Spec) -> Any:
    if spec.model is None:
        keras.utils.set_random_seed(SEED)
        return build_mlp(spec.hidden)
    build = functools.partial(build_mlp, spec.hidden)
    return make_twins(SEED, build=build, **spec.model)[1]


def compiled(spec: Spec, jit: bool, spe: int) -> Any:
    model = build_model(spec)
    optimizer = keras.optimizers.SGD(LEARNING_RATE, **spec.optimizer)
    model.compile(
        optimizer, LOSS, metrics=["accuracy"], jit_compile=jit, steps_per_execution=spe
    )
    return model


class Instances:
    """Identically built models of one variant, each timed in turn.

    Two identically built models differ by up to 9% in epoch time on this
    machine, persistently (where their buffers landed), which is more than
    most differences measured here. Round ``i`` times instance ``i % K`` of
    every variant, so the median of the per-round ratios spans K placements
    of each variant instead of resting on one.
    """

    def __init__(self, models: Sequence[Any], dataset: Any, warm_up_data: Any):
        self.models = list(models)
        self.dataset, self.warm_up_data = dataset, warm_up_data
        self.round = 0

    def run_epoch(self) -> EpochTime:
        model = self.models[self.round % len(self.models)]
        self.round += 1
        return fit_epoch(model, self.dataset)

    def warm_up(self) -> EpochTime:
        # Every instance traces its own train function: warm each one up.
        times = [fit_epoch(model, self.warm_up_data) for model in self.models]
        return tuple(map(sum, zip(*times, strict=True)))


def fit_variant(
    spec: Spec, data: Data, jit: bool, spe: int, instances: int = 1
) -> Variant:
    """One `fit` epoch of the spec's model(s); a wide one warms up short.

    ``instances`` > 1 builds that many models and times them in turn
    (`Instances`); ``Variant.model`` is the first.
    """
    models = [compiled(spec, jit, spe) for _ in range(instances)]
    short = models[0].count_params() > WIDE_PARAMETERS
    warm_up_data = data.pipeline(short=short)
    if instances == 1:
        warm_up = functools.partial(fit_epoch, models[0], warm_up_data)
        run = functools.partial(fit_epoch, models[0], data.dataset)
    else:
        rotation = Instances(models, data.dataset, warm_up_data)
        warm_up, run = rotation.warm_up, rotation.run_epoch
    return Variant(spec, run, models[0], jit, spe, warm_up)


def floor_variant(data: Data, jit_compile: bool) -> Variant:
    """The speed floor: a `fit` step's arithmetic with no Keras loop, metrics,
    optimizer or callbacks, a whole epoch in one `tf.function`. Full batches are
    stacked for the static shape XLA needs; the ragged last is one more step."""
    spec = Spec("floor", "floor")
    model = build_model(spec)
    variables, full = model.trainable_variables, len(data.x) // BATCH_SIZE
    cut = full * BATCH_SIZE
    x_full = tf.constant(data.x[:cut].reshape(full, BATCH_SIZE, 28, 28))
    y_full = tf.constant(data.y[:cut].reshape(full, BATCH_SIZE))
    x_tail, y_tail = tf.constant(data.x[cut:]), tf.constant(data.y[cut:])

    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = LOSS(y, logits)
        gradients = tape.gradient(loss, variables)
        for weight, gradient in zip(variables, gradients, strict=True):
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
    variants = []
    for name in ("standard", "accumulating"):
        loop = getattr(notebook_loops, f"notebook_{name}_epoch")
        spec = Spec(f"notebook-{name}", "notebook")
        model, optimizer = build_model(spec), keras.optimizers.SGD(LEARNING_RATE)
        run = functools.partial(loop, model, optimizer, dataset, LOSS)
        variants.append(Variant(spec, functools.partial(timed, run, model), model))
    return variants


def _rss_mb(peak: bool = False) -> float:
    """RSS now or, with ``peak``, its peak since the last reset (VmHWM, Linux)."""
    status = Path("/proc/self/status")
    if peak and status.exists():
        return int(status.read_text().split("VmHWM:")[1].split()[0]) / 1024
    return PROCESS.memory_info().rss / 2**20


def _round_order(variants: Sequence[Variant], round_index: int) -> list[Variant]:
    """Settings groups (variants paired with each other) run back to back,
    seconds apart; groups and members rotate, so none always runs first or
    after the same neighbour."""
    groups: dict[str, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.settings, []).append(variant)

    def rotated(items: list[Any]) -> list[Any]:
        shift = round_index % len(items)
        return items[shift:] + items[:shift]

    return [v for group in rotated(list(groups.values())) for v in rotated(group)]


def measure(variants: Sequence[Variant], epochs: int, warmup: int) -> None:
    """Warms every variant up, then times ``epochs`` round-robin rounds. Peak
    RSS: the highest over timed epochs; growth: that minus the RSS before."""
    log(f"{len(variants)} variants, {warmup} warm-up + {epochs} timed epochs")
    for variant in variants:
        for _ in range(warmup):
            gc.collect()
            variant.warmup_seconds.append((variant.warm_up or variant.run_epoch)()[0])
        log(f"  warmed up {variant.key}: {variant.warmup_seconds} s")
    for round_index in range(epochs):
        round_start = time.perf_counter()
        for variant in _round_order(variants, round_index):
            gc.collect()
            before = _rss_mb()
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux >= 4.0)
            wall, cpu = variant.run_epoch()
            peak = _rss_mb(peak=True)
            variant.epoch_seconds.append(wall)
            variant.epoch_cpu_seconds.append(cpu)
            variant.peak_rss_mb = max(variant.peak_rss_mb, peak)
            variant.rss_growth_mb = max(variant.rss_growth_mb, peak - before)
        seconds, load = time.perf_counter() - round_start, psutil.getloadavg()[0]
        log(f"  round {round_index + 1}/{epochs}: {seconds:.1f} s, load {load:.2f}")


def paired_ratio(mine: Variant, theirs: Variant | None) -> dict[str, float] | None:
    """Median of per-round epoch-time ratios, wall and CPU: a slow spell of the
    machine hits both epochs of a round, and the median drops ones that don't."""
    if theirs is None:
        return None
    pairs = {"wall": "epoch_seconds", "cpu": "epoch_cpu_seconds"}
    return {
        kind: float(np.median(np.divide(getattr(mine, name), getattr(theirs, name))))
        for kind, name in pairs.items()
    }


def _bytes(variables: Iterable[Any]) -> int:
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


def rows(variants: Sequence[Variant], num_samples: int) -> list[dict[str, Any]]:
    """A JSON row per variant with ratios to fit at the same settings and the
    floor at the same jit (floor and notebook: to Keras's defaults, jit off)."""
    by_key = {variant.key: variant for variant in variants}
    result = []
    for v in variants:
        spec, keras_loop = v.spec, v.steps_per_execution is not None
        median = float(np.median(v.epoch_seconds))
        state = getattr(v.model, "_accumulation", None)
        row = {"key": v.key, "name": spec.name, "family": spec.family}
        row["backend"] = keras.backend.backend()
        row |= {name: getattr(v, name) for name in Variant.REPORTED}
        row["accumulation_steps"] = (spec.model or {}).get(
            "accumulation_steps", spec.optimizer.get("gradient_accumulation_steps")
        )
        row["median_s"], row["min_s"] = median, min(v.epoch_seconds)
        row["cpu_median_s"] = float(np.median(v.epoch_cpu_seconds))
        row["samples_per_s"] = num_samples / median
        references = {
            "fit": f"fit [{v.settings}]" if keras_loop else DEFAULT_FIT,
            "floor": f"floor [{settings_label(keras_loop and v.jit_compile, None)}]",
        }
        for name, reference in references.items():
            pair = paired_ratio(v, by_key.get(reference)) or {}
            row[f"{name}_reference"] = reference
            row[f"ratio_to_{name}"] = pair.get("wall")
            row[f"cpu_ratio_to_{name}"] = pair.get("cpu")
        row["trainable_bytes"] = _bytes(v.model.trainable_variables)
        row["accumulator_bytes"] = state and _bytes(state.gradient_sums)
        row["accumulation_state_bytes"] = state and _bytes(state.variables_to_save)
        result.append(row)
    return result


# Every column a table may show: header -> (row key, format).
COLUMNS = {
    "variant": ("key", "{}"), "backend": ("backend", "{}"), "name": ("name", "{}"),
    "width": ("width", "{}"),
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
        "  ".join([first.ljust(widths[0]), *map(str.rjust, rest, widths[1:])])
        for first, *rest in cells
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_report(
    args: Namespace, meta: dict, stem: str, report: dict, figure: Any, subtitle: str
) -> None:
    """Writes ``<stem>.json`` (``meta``, completed, and ``report``) and ``.png``."""
    meta["load_average_at_end"] = list(psutil.getloadavg())
    meta["wall_seconds"] = time.perf_counter() - STARTED
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps({"meta": meta, **report}, indent=2) + "\n")
    title = f"{meta['data']}, batch {BATCH_SIZE}, {args.threads} thread(s)"
    figure.suptitle(f"{title}, {subtitle}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(figure)
    log(f"\nwrote {path} and {path.with_suffix('.png')}")
