"""The notebook's two eager training loops, kept as the performance baseline.

These are faithful re-writes of one epoch of the research notebook's loops
(sections 4 and 5 of the notebook, "Train Standard Model" and "Gradient
Accumulation Model"), with the printing and the per-epoch validation left
out. They are *not* how this library trains: they exist so that benchmarks
can compare `AccumulatingModel.fit` against what the notebook did, so they
keep the notebook's costs on purpose:

* a plain Python loop over a batched `tf.data.Dataset`, run eagerly (no
  `tf.function`), with one `tf.GradientTape` per batch;
* per-batch host syncs: the loss is fetched with ``.numpy()`` every batch (and
  the standard loop fetches the batch accuracy too);
* for the accumulating loop, gradients summed into a Python list of eager
  tensors, the last batch scaled by ``final_batch_size / batch_size``, the sum
  divided by ``len(dataset)`` and applied once at the end of the epoch.

The accumulating loop's normalisation is the notebook's, not an exact one:
dividing by the number of batches makes a ragged last batch of ``b`` samples
count ``b / batch_size`` of a batch in the numerator but a whole batch in the
denominator. `AccumulatingModel` weights by samples instead.

Example:
    >>> import keras, numpy as np
    >>> from accumulate.twins import build_mlp
    >>> images = np.zeros((20, 28, 28), np.uint8)
    >>> labels = np.zeros(20, np.uint8)
    >>> dataset = make_notebook_dataset(images, labels, batch_size=8)
    >>> loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> loss, accuracy = notebook_standard_epoch(
    ...     build_mlp(), keras.optimizers.SGD(0.01), dataset, loss_fn)
    >>> 0.0 <= accuracy <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "make_notebook_dataset",
    "notebook_accumulating_epoch",
    "notebook_standard_epoch",
]

LossFunction = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

NOTEBOOK_BATCH_SIZE = 512


def make_notebook_dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int = NOTEBOOK_BATCH_SIZE
) -> tf.data.Dataset:
    """The notebook's input pipeline: ``images / 255.0``, sliced and batched.

    As in the notebook the scaled images stay float64 (NumPy's result of
    dividing uint8 by a float), there is no shuffling and no prefetching, and
    the last batch is ragged (96 samples for MNIST's 60,000 at 512).
    """
    scaled = images / 255.0
    return tf.data.Dataset.from_tensor_slices((scaled, labels)).batch(batch_size)


def _batch_accuracy(y_batch: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """The notebook's accuracy expression for one batch (an eager scalar)."""
    return tf.reduce_mean(
        tf.cast(
            tf.equal(tf.cast(y_batch, tf.int64), tf.argmax(y_pred, axis=1)),
            tf.float32,
        )
    )


def notebook_standard_epoch(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    dataset: tf.data.Dataset,
    loss_fn: LossFunction,
) -> tuple[float, float]:
    """One epoch of the notebook's standard loop: one update per batch.

    Returns:
        ``(mean loss, mean accuracy)`` over the epoch's batches, each batch
        counting equally, as the notebook logs them.
    """
    batch_losses = []
    batch_accuracies = []
    for _step, (X_batch, y_batch) in enumerate(dataset):
        with tf.GradientTape() as tape:
            y_pred = model(X_batch, training=True)
            loss_value = loss_fn(y_batch, y_pred)
        grads = tape.gradient(loss_value, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
        # Two host syncs per batch, as in the notebook.
        batch_losses.append(loss_value.numpy())
        batch_accuracies.append(_batch_accuracy(y_batch, y_pred).numpy())
    return float(np.mean(batch_losses)), float(np.mean(batch_accuracies))


def notebook_accumulating_epoch(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    dataset: tf.data.Dataset,
    loss_fn: LossFunction,
    batch_size: int = NOTEBOOK_BATCH_SIZE,
) -> tuple[float, float]:
    """One epoch of the notebook's accumulating loop: one update per epoch.

    Args:
        model, optimizer, dataset, loss_fn: as for `notebook_standard_epoch`.
        batch_size: the batch size the dataset was batched with (the
            notebook's global ``batch_size``), used to scale the last batch.

    Returns:
        ``(mean loss, mean accuracy)`` over the epoch's batches, computed
        before the epoch's single update, as the notebook logs them.
    """
    accumulated_grads = [tf.zeros_like(w) for w in model.trainable_weights]
    batch_losses = []
    batch_accuracies = []
    for step, (X_batch, y_batch) in enumerate(dataset):
        with tf.GradientTape() as tape:
            y_pred = model(X_batch, training=True)
            loss_value = loss_fn(y_batch, y_pred)
        grads = tape.gradient(loss_value, model.trainable_weights)
        if (step + 1) == len(dataset):
            final_batch_size = len(X_batch)
            grads = [g * final_batch_size / batch_size for g in grads]
        accumulated_grads = [
            acc_g + g for acc_g, g in zip(accumulated_grads, grads, strict=True)
        ]
        # The loss is fetched every batch; the notebook keeps the accuracy as
        # an eager tensor and np.mean converts the list after the loop.
        batch_losses.append(loss_value.numpy())
        batch_accuracies.append(_batch_accuracy(y_batch, y_pred))
    accumulated_grads = [acc_g / len(dataset) for acc_g in accumulated_grads]
    optimizer.apply_gradients(
        zip(accumulated_grads, model.trainable_weights, strict=True)
    )
    return float(np.mean(batch_losses)), float(np.mean(batch_accuracies))
