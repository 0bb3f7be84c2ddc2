"""Shared pieces of the benchmarks: threads, data, timing, memory, the floor.

Imported by ``bench.py``, ``scaling.py`` and ``profile_fit.py`` (run as
scripts, so this directory is on ``sys.path``). Importing this module does not
initialise TensorFlow's runtime (importing TensorFlow and Keras does not):
call `configure_threads` before anything runs an op.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "results"
BATCH_SIZE = 512
LEARNING_RATE = 0.01
SEED = 42
QUICK_SAMPLES = 2048


# -- Process set-up ---------------------------------------------------------


def configure_threads(threads: int) -> None:
    """Limits TensorFlow to ``threads`` intra-op and inter-op threads.

    Must run before TensorFlow executes anything: the runtime reads these
    settings once, when it initialises.
    """
    if threads < 1:
        raise ValueError(f"--threads must be >= 1; received {threads}.")
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def quiet_tensorflow() -> None:
    """Silences TensorFlow's Python warnings (the retracing notices that
    building dozens of models in one process triggers)."""
    tf.get_logger().setLevel("ERROR")


def pin_to_cpus(cpus: Sequence[int]) -> None:
    """Restricts this process to the given CPU ids (Linux only)."""
    os.sched_setaffinity(0, set(cpus))


def environment_info(threads: int) -> dict[str, Any]:
    """Versions and machine facts to store next to the timings."""
    affinity = (
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    )
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- Data -------------------------------------------------------------------


def load_mnist_train(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 60,000 training images (uint8, 28x28) and labels (uint8)."""
    from accumulate.datasets import load_dataset

    (images, labels), _ = load_dataset("mnist", data_dir)
    return images, labels


def synthetic_mnist(
    num_samples: int, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Random MNIST-shaped uint8 images and labels, for quick runs."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_samples, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, num_samples, dtype=np.uint8)
    return images, labels


def to_float(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] as float32 and labels as int32."""
    return (images / np.float32(255.0)).astype(np.float32), labels.astype(np.int32)


def fit_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, threads: int
) -> tf.data.Dataset:
    """The dataset fed to every `fit`: `accumulate.training`'s pipeline.

    In-memory tensors, batched in order (no shuffling), cached and prefetched,
    with tf.data's private thread pool limited to ``threads``.
    """
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def num_batches(num_samples: int, batch_size: int) -> int:
    """Batches per epoch, counting a ragged last batch."""
    return math.ceil(num_samples / batch_size)


# -- Models -----------------------------------------------------------------


def loss_function() -> Any:
    """The benchmark's loss: sparse categorical cross-entropy on logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compile_for_fit(
    model: Any,
    *,
    jit_compile: bool,
    steps_per_execution: int,
    gradient_accumulation_steps: int | None = None,
) -> None:
    """Compiles ``model`` with SGD(0.01), the loss above and accuracy."""
    optimizer = keras.optimizers.SGD(
        LEARNING_RATE, gradient_accumulation_steps=gradient_accumulation_steps
    )
    model.compile(
        optimizer=optimizer,
        loss=loss_function(),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


# -- Timing -----------------------------------------------------------------


def _sync(model: Any) -> None:
    """Blocks until every queued update of ``model`` has run."""
    model.trainable_variables[-1].numpy()


@dataclass(frozen=True)
class EpochTime:
    """How long one epoch took: wall-clock and process CPU seconds.

    CPU time (all threads of the process) barely moves when other jobs take
    the cores away from us, so on a shared machine it is the steadier of the
    two; wall time is what a user waits for.
    """

    wall: float
    cpu: float


class _Clock:
    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self) -> EpochTime:
        return EpochTime(
            time.perf_counter() - self._wall, time.process_time() - self._cpu
        )


class EpochTimer(keras.callbacks.Callback):
    """A Keras callback timing the training part of each epoch.

    The clock starts in ``on_epoch_begin`` and stops in ``on_epoch_end`` after
    the callbacks placed before it, so it includes `AccumulatingModel`'s
    epoch-end flush, and after reading a weight, so queued updates are done.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[EpochTime] = []
        self._clock = _Clock()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._clock = _Clock()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        _sync(self.model)
        self.times.append(self._clock.stop())


def fit_one_epoch(model: Any, dataset: tf.data.Dataset) -> EpochTime:
    """Runs one `fit` epoch (no validation) and returns its training time."""
    timer = EpochTimer()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[timer], shuffle=False)
    return timer.times[-1]


def timed(run: Callable[[], Any], sync: Callable[[], Any]) -> EpochTime:
    """Time taken by ``run()`` followed by ``sync()``."""
    clock = _Clock()
    run()
    sync()
    return clock.stop()


# -- Memory -----------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kib / 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (or process start), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


# -- Round-robin measurement -----------------------------------------------


@dataclass
class Variant:
    """One thing to time: a way of training one epoch, and its settings."""

    name: str
    family: str
    run_epoch: Callable[[], EpochTime]
    jit_compile: bool | None = None
    steps_per_execution: int | None = None
    accumulation_steps: int | str | None = None
    warm_up: Callable[[], EpochTime] | None = None
    """Runs an untimed warm-up epoch; `run_epoch` when None."""

    @property
    def settings(self) -> str:
        """``jit=on|off spe=N`` (or ``eager`` for the notebook's loops)."""
        if self.jit_compile is None and self.steps_per_execution is None:
            return "eager"
        jit = "on" if self.jit_compile else "off"
        if self.steps_per_execution is None:
            return f"jit={jit}"
        return f"jit={jit} spe={self.steps_per_execution}"

    @property
    def key(self) -> str:
        """Unique label: name and settings."""
        return f"{self.name} [{self.settings}]"


@dataclass
class Measurement:
    """Timings and memory of one variant across its timed epochs.

    ``seconds[i]`` and ``cpu_seconds[i]`` come from round ``i``, so two
    variants' lists pair up epoch by epoch (see `paired_ratio`).
    """

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0

    @property
    def median_seconds(self) -> float:
        return float(np.median(self.seconds))

    @property
    def median_cpu_seconds(self) -> float:
        return float(np.median(self.cpu_seconds))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio of two variants' epoch times.

    Both were timed in the same round, a few seconds apart, so a slow spell
    of the machine hits both; the median then drops the spells that hit only
    one of them.
    """
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def _round_order(variants: Sequence[Variant], round_index: int) -> list[Variant]:
    """This round's order: settings groups kept together, both rotated.

    Variants with the same settings (the ones compared with each other) run
    back to back, so their epochs are seconds apart; rotating the groups and
    the variants inside each group means nobody always runs first or after
    the same neighbour.
    """
    groups: dict[str, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.settings, []).append(variant)
    group_list = list(groups.values())
    shift = round_index % len(group_list)
    order = []
    for group in group_list[shift:] + group_list[:shift]:
        inner = round_index % len(group)
        order += group[inner:] + group[:inner]
    return order


def measure_round_robin(
    variants: Sequence[Variant],
    epochs: int,
    warmup: int,
    log: Callable[[str], None] = print,
) -> dict[str, Measurement]:
    """Warms every variant up, then times ``epochs`` epochs of each, interleaved.

    Each round runs one epoch of every variant (see `_round_order`). Peak RSS
    is the highest kernel peak-RSS mark seen during the variant's timed
    epochs (reset before each epoch); growth is that peak minus the RSS just
    before the epoch.
    """
    results = {variant.key: Measurement() for variant in variants}
    for variant in variants:
        for _ in range(warmup):
            gc.collect()
            warm_up = variant.warm_up or variant.run_epoch
            results[variant.key].warmup_seconds.append(warm_up().wall)
        warmups = ", ".join(f"{s:.2f}" for s in results[variant.key].warmup_seconds)
        log(f"  warmed up {variant.key}: {warmups} s")
    for round_index in range(epochs):
        round_start = time.perf_counter()
        for variant in _round_order(variants, round_index):
            gc.collect()
            before = current_rss_mb()
            reset_peak_rss()
            epoch_time = variant.run_epoch()
            peak = peak_rss_mb()
            measurement = results[variant.key]
            measurement.seconds.append(epoch_time.wall)
            measurement.cpu_seconds.append(epoch_time.cpu)
            measurement.peak_rss_mb = max(measurement.peak_rss_mb, peak)
            measurement.rss_growth_mb = max(measurement.rss_growth_mb, peak - before)
        seconds = time.perf_counter() - round_start
        load = os.getloadavg()[0]
        log(f"  round {round_index + 1}/{epochs}: {seconds:.1f} s, load {load:.2f}")
    return results


# -- The floor --------------------------------------------------------------


def make_floor_epoch(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    jit_compile: bool,
) -> Callable[[], tuple[tf.Tensor, tf.Tensor]]:
    """A whole epoch of plain SGD as one `tf.function`: the speed floor.

    The data lives in memory as tensors; the full batches are stacked so the
    loop body has a static shape (which XLA needs) and the ragged last batch
    is one more step after the loop. Each step is the forward pass, the loss
    and its gradient, ``w -= lr * g`` and the running loss and accuracy sums:
    the same arithmetic as a `fit` step, with none of Keras's loop, metrics
    objects, optimizer or callbacks around it.

    Returns:
        a function running one epoch and returning (mean batch loss,
        accuracy) as tensors.
    """
    loss_fn = loss_function()
    full = len(x) // batch_size
    x_full = tf.constant(x[: full * batch_size].reshape(full, batch_size, *x.shape[1:]))
    y_full = tf.constant(y[: full * batch_size].reshape(full, batch_size))
    x_tail = tf.constant(x[full * batch_size :])
    y_tail = tf.constant(y[full * batch_size :])
    has_tail = len(x_tail) > 0
    variables = model.trainable_variables
    learning_rate = tf.constant(LEARNING_RATE, tf.float32)

    def sgd_step(x_batch: tf.Tensor, y_batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = model(x_batch, training=True)
            loss = loss_fn(y_batch, logits)
        gradients = tape.gradient(loss, variables)
        for variable, gradient in zip(variables, gradients, strict=True):
            variable.assign_sub(learning_rate * gradient)
        predictions = tf.argmax(logits, axis=1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predictions, y_batch), tf.float32))
        return loss, correct

    @tf.function(jit_compile=jit_compile)
    def epoch() -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        for index in tf.range(full):
            loss, correct = sgd_step(x_full[index], y_full[index])
            loss_sum += loss
            correct_sum += correct
        batches = full
        if has_tail:
            loss, correct = sgd_step(x_tail, y_tail)
            loss_sum += loss
            correct_sum += correct
            batches += 1
        return loss_sum / batches, correct_sum / len(x)

    return epoch


def floor_variant(
    model: Any, x: np.ndarray, y: np.ndarray, batch_size: int, jit_compile: bool
) -> Variant:
    """The floor as a `Variant` (settings: its jit flag only)."""
    epoch = make_floor_epoch(model, x, y, batch_size, jit_compile)

    def run_epoch() -> EpochTime:
        return timed(epoch, lambda: _sync(model))

    return Variant("floor", "floor", run_epoch, jit_compile=jit_compile)


# -- Output helpers ---------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table with left-aligned first column, right-aligned rest."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (
            cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
        )
        return "  ".join([first, *rest])

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), separator, *(line(row) for row in rows)])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def format_ratio(value: float | None) -> str:
    """``1.234x`` or ``-``."""
    return "-" if value is None else f"{value:.3f}x"


def start(args: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray, str]:
    """Pins threads and CPUs as ``args`` say, then loads the data to time.

    Returns the environment description, the images and labels, and a line
    saying what the data is (``--quick``: small synthetic MNIST).
    """
    if args.pin_cpus:
        pin_to_cpus([int(cpu) for cpu in args.pin_cpus.split(",")])
    configure_threads(args.threads)
    quiet_tensorflow()
    info = environment_info(args.threads)
    if args.quick:
        images, labels = synthetic_mnist(QUICK_SAMPLES)
        return info, images, labels, f"synthetic ({len(images)} samples)"
    images, labels = load_mnist_train(args.data_dir)
    return info, images, labels, f"MNIST train ({len(images)} samples)"
