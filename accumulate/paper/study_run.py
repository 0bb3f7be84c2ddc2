"""One run of the batch-size study: its data, model, callbacks and record.

Every run uses the paper's 784-128-64-32-10 tanh MLP from `make_twins` (seed
42, so every run starts from the same weights), micro-batches of 512, pixels /
255, sparse categorical cross-entropy on logits, and validation on the 10,000
test images after every epoch, as the notebook does. The training set is
reshuffled every epoch, with the same sequence of epoch orders for every run
(one seed): the standard choice for SGD, and the same for all N. For
``"epoch"`` the order does not change the update (a full-batch gradient),
only float rounding. A run stops at the target accuracy, when its loss
diverges, or at the epoch budget.

TensorFlow is imported inside functions only, so that building the command
line (``--help``) stays fast.
"""

from __future__ import annotations

import math
import platform
import time
from datetime import datetime, timezone
from typing import Any

from accumulate.paper import datasets
from accumulate.paper.study_plan import (
    ADAPTIVE,
    DIVERGED_LOSS,
    MICRO_BATCH,
    MOMENTUM,
    RunSpec,
    noise_scale_window,
)
from accumulate.paper.study_records import Record, to_target

__all__ = ["run_one"]

_data_cache: dict[tuple[str, int | None, int | None], Any] = {}


def _load_tensors(
    dataset: str, train_samples: int | None, test_samples: int | None
) -> tuple[Any, Any, Any, Any]:
    """Scaled tensors for one dataset, loaded once per process."""
    key = (dataset, train_samples, test_samples)
    if key not in _data_cache:
        import numpy as np
        import tensorflow as tf

        from accumulate.paper.training import scale_images

        (x_train, y_train), (x_test, y_test) = datasets.load_dataset(dataset)
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
        x_test, y_test = x_test[:test_samples], y_test[:test_samples]

        _data_cache[key] = (
            tf.constant(scale_images(x_train)),
            tf.constant(y_train.astype(np.int32)),
            tf.constant(scale_images(x_test)),
            tf.constant(y_test.astype(np.int32)),
        )
    return _data_cache[key]


def _pipelines(spec: RunSpec) -> tuple[Any, Any, int, int]:
    """Shuffled training batches, the validation batch, sizes."""
    import tensorflow as tf

    x_train, y_train, x_test, y_test = _load_tensors(
        spec.dataset, spec.train_samples, spec.test_samples
    )
    samples = int(x_train.shape[0])
    batches = math.ceil(samples / MICRO_BATCH)
    lengths = [MICRO_BATCH] * (samples // MICRO_BATCH)
    if samples % MICRO_BATCH:
        lengths.append(samples % MICRO_BATCH)

    def epoch_batches(seed_pair: Any) -> Any:
        # One vectorised permutation per epoch, cut into micro-batches of
        # indices: about half the cost of an element-wise shuffle buffer.
        order = tf.random.experimental.stateless_shuffle(
            tf.range(samples, dtype=tf.int64), seed=seed_pair
        )
        return tf.data.Dataset.from_tensor_slices(
            tf.RaggedTensor.from_row_lengths(order, lengths)
        )

    # `Dataset.random` draws new numbers each time fit iterates the dataset
    # (each epoch), the same sequence for every run: the seed fixes the
    # sequence of epoch orders.
    train = (
        tf.data.Dataset.random(seed=spec.seed, rerandomize_each_iteration=True)
        .batch(2)
        .take(1)
        .flat_map(epoch_batches)
        .map(
            lambda index: (tf.gather(x_train, index), tf.gather(y_train, index)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .apply(tf.data.experimental.assert_cardinality(batches))
        .prefetch(tf.data.AUTOTUNE)
    )
    # The whole test set as one batch after every epoch, as the notebook.
    validation = tf.data.Dataset.from_tensors((x_test, y_test)).cache()
    return train, validation, samples, batches


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _make_callbacks(spec: RunSpec, batches_per_epoch: int, record: Record) -> list[Any]:
    import keras

    class Recorder(keras.callbacks.Callback):
        """Per-epoch logs, times, updates and windows; stops at the target."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()
            # A plain keras.Model (N = 1) has neither attribute.
            window = getattr(
                self.model,
                "current_accumulation_steps",
                getattr(self.model, "accumulation_steps", 1),
            )
            record["history"]["accumulation_steps"].append(window)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            history = record["history"]
            history["epoch_seconds"].append(time.perf_counter() - self._start)
            # Read after the accumulating model's own epoch-end flush (its
            # callback runs first), so this epoch's last update is counted.
            history["cumulative_updates"].append(int(self.model.optimizer.iterations))
            for key, value in (logs or {}).items():
                history.setdefault(key, []).append(_finite_or_none(value))
            loss = float((logs or {}).get("loss", math.nan))
            if not math.isfinite(loss) or loss > DIVERGED_LOSS:
                record["stopped"] = "diverged"
                self.model.stop_training = True
            elif float((logs or {}).get("val_accuracy", 0.0)) >= spec.target:
                record["stopped"] = "target"
                self.model.stop_training = True

    class AdaptiveWindow(keras.callbacks.Callback):
        """Sets the next epoch's window from this epoch's noise scale."""

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            window = noise_scale_window(
                float(logs.get("gradient_sq_norm", math.nan)),
                float(logs.get("gradient_variance", math.nan)),
                batches_per_epoch,
                self.model.current_accumulation_steps,
            )
            self.model.set_accumulation_steps(window)

    callbacks = [Recorder()]
    if spec.arm == ADAPTIVE:
        callbacks.append(AdaptiveWindow())
    return callbacks


def _build_model(spec: RunSpec, batches_per_epoch: int) -> Any:
    from accumulate.twins import make_twins

    if spec.arm == ADAPTIVE:
        # Two micro-batches: the smallest window that measures the noise.
        steps: int | str = 2
    else:
        steps = spec.window
    if steps == 1:
        # N = 1 is plain SGD: the standard twin, a keras.Model. Its
        # accumulating twin would make the same updates but cannot measure
        # the noise scale (one micro-batch per window).
        standard, _ = make_twins(spec.seed, accumulation_steps=2)
        return standard
    measuring = {"measure_noise_scale": True} if spec.measure_noise_scale else {}
    _, accumulating = make_twins(spec.seed, accumulation_steps=steps, **measuring)
    return accumulating


def run_one(spec: RunSpec) -> Record:
    """Trains one run of the study and returns its JSON-ready record.

    The record holds ``spec`` (the config), ``data`` (samples, batches per
    epoch), ``history`` (per epoch: Keras's logs, including the noise-scale
    keys where measured, ``epoch_seconds``, ``cumulative_updates`` and the
    ``accumulation_steps`` in effect), ``stopped`` (``"target"``,
    ``"diverged"`` or ``"budget"``), ``seconds`` (wall time of `fit`),
    ``to_target`` (see `to_target`) and ``environment``.
    """
    import keras

    from accumulate.paper import training

    keras.backend.clear_session()  # one worker trains many runs in turn
    train, validation, samples, batches_per_epoch = _pipelines(spec)
    model = _build_model(spec, batches_per_epoch)
    # The accuracy before any update (the same initial weights for every
    # run), the starting point of the interpolated crossing in the report.
    x_test, y_test = _load_tensors(spec.dataset, spec.train_samples, spec.test_samples)[
        2:
    ]
    logits = keras.ops.convert_to_numpy(model(x_test, training=False))
    initial_accuracy = float((logits.argmax(axis=1) == y_test.numpy()).mean())
    momentum = MOMENTUM if spec.optimizer == "momentum" else 0.0
    model.compile(
        optimizer=keras.optimizers.SGD(spec.learning_rate, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # One graph call runs the whole epoch where the backend allows it.
        **training.execution_settings(batches_per_epoch),
    )
    record: Record = {
        "spec": spec.to_dict(),
        "name": spec.name,
        "data": {
            "train_samples": samples,
            "test_samples": int(x_test.shape[0]),
            "batches_per_epoch": batches_per_epoch,
            "micro_batch": MICRO_BATCH,
        },
        "history": {
            "epoch_seconds": [],
            "cumulative_updates": [],
            "accumulation_steps": [],
        },
        "stopped": "budget",
        "initial_val_accuracy": initial_accuracy,
    }
    start = time.perf_counter()
    model.fit(
        train,
        epochs=spec.epochs,
        validation_data=validation,
        # The dataset reshuffles itself each epoch; fit cannot shuffle it.
        shuffle=False,
        callbacks=_make_callbacks(spec, batches_per_epoch, record),
        verbose=0,
    )
    record["seconds"] = time.perf_counter() - start
    history = record["history"]
    record["to_target"] = to_target(
        history.get("val_accuracy", []),
        history["cumulative_updates"],
        history["epoch_seconds"],
        spec.target,
    )
    record["jit_compile"] = bool(model.jit_compile)
    record["environment"] = _environment()
    return record


def _environment() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }
