"""Training one twin with `fit` the way the notebook trains it, but fast.

The notebook's set-up, kept: pixels divided by 255 (in float64, then stored
as float32, which is what its float64 arrays become inside the model), batches
of 512 in file order (no shuffling), sparse categorical cross-entropy on
logits, accuracy, and validation on the whole test set after every epoch.

What makes it fast without changing the numbers (measured on MNIST, figures
at `JIT_COMPILE`; ``tests/test_experiment.py`` checks the histories against a
plain ``fit`` on NumPy arrays):

* the data is converted to tensors once and served from an in-memory,
  pre-batched, cached ``tf.data`` pipeline with prefetching;
* ``steps_per_execution`` is a whole epoch, so one graph call runs every batch
  of the epoch. Keras's epoch logs are the same running means either way;
* validation runs as one batch of the whole test set, as the notebook does;
* ``jit_compile`` (XLA): see `JIT_COMPILE`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from accumulate.paper.config import ExperimentConfig
from accumulate.paper.datasets import load_dataset
from accumulate.paper.progress import EpochProgressCallback, ProgressSink

__all__ = [
    "JIT_COMPILE",
    "TrainingData",
    "make_optimizer",
    "prepare_data",
    "scale_images",
    "train_twin",
    "weights_digest",
]

# Measured on MNIST, one thread, 8 epochs, with a whole epoch per execution:
# XLA gave the same epoch logs as graph mode to within float rounding (largest
# difference 5e-7) and a steady-state epoch of about 0.30 s against 0.31-0.46 s
# (noisy, shared machine), for 1-2 s of compilation in the first epoch that a
# 200-epoch run amortises. One step per execution cost 0.40-0.52 s per epoch.
# Keras falls back to graph mode where XLA is unsupported (Apple GPUs), and
# each twin's result records what it actually used.
JIT_COMPILE = True


def execution_settings(batches_per_epoch: int) -> dict[str, Any]:
    """A whole epoch per execution under XLA, where the backend has both.

    Keras's PyTorch trainer runs one step per execution and its
    ``jit_compile`` means torch.compile (not XLA), so there the twins train
    eagerly, one batch per call.
    """
    if keras.backend.backend() == "torch":
        return {"steps_per_execution": 1, "jit_compile": False}
    return {"steps_per_execution": batches_per_epoch, "jit_compile": JIT_COMPILE}


_HISTORY_KEYS = {
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
}


@dataclass(frozen=True)
class TrainingData:
    """A dataset ready for `fit`: pipelines plus the test set for predictions."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test_images: tf.Tensor
    test_labels: np.ndarray
    train_samples: int
    batches_per_epoch: int


def scale_images(images: np.ndarray) -> np.ndarray:
    """Pixels as the notebook scales them: ``images / 255`` as float32."""
    # The notebook's `images / 255.0` is float64; the model computes in
    # float32, so casting here gives the model the very same inputs.
    return (images / 255.0).astype(np.float32)


def prepare_data(config: ExperimentConfig) -> TrainingData:
    """Loads ``config.dataset`` and builds the train and validation pipelines."""
    (train_images, train_labels), (test_images, test_labels) = load_dataset(
        config.dataset, config.data_dir
    )
    train = tf.data.Dataset.from_tensor_slices(
        (tf.constant(scale_images(train_images)), tf.constant(train_labels, tf.int32))
    )
    test_images_tensor = tf.constant(scale_images(test_images))
    validation = tf.data.Dataset.from_tensors(
        (test_images_tensor, tf.constant(test_labels, tf.int32))
    )
    return TrainingData(
        train=train.batch(config.batch_size).cache().prefetch(tf.data.AUTOTUNE),
        validation=validation.cache().prefetch(tf.data.AUTOTUNE),
        test_images=test_images_tensor,
        test_labels=np.asarray(test_labels, dtype=np.int64),
        train_samples=len(train_labels),
        batches_per_epoch=math.ceil(len(train_labels) / config.batch_size),
    )


def make_optimizer(config: ExperimentConfig) -> keras.optimizers.Optimizer:
    """A fresh optimizer: each twin needs its own state and update counter."""
    optimizers = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
    return optimizers[config.optimizer](learning_rate=config.learning_rate)


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of the model's weights, to show that twins start identical."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def train_twin(
    model: keras.Model,
    model_name: str,
    data: TrainingData,
    config: ExperimentConfig,
    epochs_after: int = 0,
    progress: ProgressSink | None = None,
) -> dict[str, Any]:
    """Compiles and fits one twin; returns its history, updates and timings.

    Args:
        model: an uncompiled twin from `make_twins`.
        model_name: ``"standard"`` or ``"accumulating"``, for progress.
        data: from `prepare_data`.
        config: the run's settings.
        epochs_after: epochs the run still trains after this twin (for the ETA).
        progress: receives an `EpochEnd` after every epoch.

    Returns:
        ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``
        (one float per epoch), ``updates`` (``optimizer.iterations``),
        ``cumulative_updates`` and ``epoch_seconds`` (per epoch), ``seconds``
        (wall time of `fit`), ``initial_weights_sha256``, ``jit_compile``
        (whether XLA was used) and ``test_predictions`` (predicted class of
        every test image).
    """
    initial_digest = weights_digest(model)
    model.compile(
        optimizer=make_optimizer(config),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **execution_settings(data.batches_per_epoch),
    )
    recorder = EpochProgressCallback(
        config.label, model_name, config.epochs, epochs_after, progress
    )
    start = time.perf_counter()
    history = model.fit(
        data.train,
        epochs=config.epochs,
        validation_data=data.validation,
        shuffle=False,  # fit never shuffles a tf.data input; said for the reader
        callbacks=[recorder],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    # To NumPy through Keras: a torch output still carries autograd.
    logits = keras.ops.convert_to_numpy(model(data.test_images, training=False))
    result: dict[str, Any] = {
        ours: [float(value) for value in history.history[keras_key]]
        for keras_key, ours in _HISTORY_KEYS.items()
    }
    result.update(
        updates=int(model.optimizer.iterations),
        cumulative_updates=recorder.cumulative_updates,
        seconds=seconds,
        epoch_seconds=recorder.epoch_seconds,
        initial_weights_sha256=initial_digest,
        jit_compile=bool(model.jit_compile),
        test_predictions=np.argmax(logits, axis=1).astype(int).tolist(),
    )
    return result
