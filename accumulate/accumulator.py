"""The accumulation state: one window of sample-weighted gradient sums.

This module holds the whole arithmetic of exact accumulation, split the way
optax's ``MultiSteps`` splits it:

* ``GradientAccumulator(variables)`` creates the state (init),
* ``add(gradients, weight)`` folds one micro-batch into it (update),
* ``mean_gradients()`` and ``reset()`` are used when the window is applied.

Why weights: Keras reduces a loss with ``sum_over_batch_size``, i.e. it divides
the (sample-weighted) sum of per-sample losses by the number of samples ``b`` in
the batch, and adds regularisation once per batch. For micro-batches ``k`` of a
window holding ``B = sum(b_k)`` samples::

    sum_k (b_k / B) * loss_k = (sum over all samples of w_i * l_i) / B + R

which is exactly the loss of the window as one big batch. So each micro-batch's
gradient is added multiplied by ``b_k`` and the window's gradient is the sum
divided by ``B``. A ragged last batch of 96 samples then counts 96/60000 of an
epoch, not 1/118 of it.

The variables are plain ``tf.Variable``s (not Keras weights) so they never show
up in ``model.weights``. Under a ``tf.distribute`` strategy they are created
``ON_READ`` with ``SUM`` aggregation: each replica accumulates into its own copy
and nothing is communicated until the window is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

_PER_REPLICA = {
    "trainable": False,
    "synchronization": tf.VariableSynchronization.ON_READ,
    "aggregation": tf.VariableAggregation.SUM,
}


_COUNTER = {
    "trainable": False,
    "synchronization": tf.VariableSynchronization.ON_READ,
    "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
}


def _accumulation_dtype(dtype: tf.DType | str) -> tf.DType:
    # Half-precision sums of many micro-batches lose the small ones; keep
    # float32 (or wider) whatever the variable's dtype.
    dtype = tf.as_dtype(dtype)
    return dtype if dtype.size >= 4 else tf.float32


class GradientAccumulator(tf.Module):
    """Running, sample-weighted gradient sums for one accumulation window.

    Args:
        variables: the trainable variables whose gradients are accumulated, in
            the order the gradients will be given.
        name: name scope of the created variables.

    Example:
        >>> import tensorflow as tf
        >>> w = tf.Variable([1.0, 2.0])
        >>> state = GradientAccumulator([w])
        >>> state.add([tf.constant([1.0, 1.0])], weight=3.0)
        >>> state.add([tf.constant([5.0, 1.0])], weight=1.0)
        >>> [g.numpy().tolist() for g in state.mean_gradients()]
        [[2.0, 1.0]]
    """

    def __init__(self, variables: Sequence[tf.Variable], name: str = "accumulation"):
        super().__init__(name=name)
        with tf.name_scope(name):
            self.gradient_sums = [
                tf.Variable(
                    tf.zeros(variable.shape, _accumulation_dtype(variable.dtype)),
                    name=f"gradient_sum_{index}",
                    **_PER_REPLICA,
                )
                for index, variable in enumerate(variables)
            ]
            # float32 counts are exact up to 2**24 samples per window and
            # past that err by less than float32 gradients already do.
            self.samples = tf.Variable(0.0, name="samples", **_PER_REPLICA)
            # Every replica runs the same number of micro-batches, so one
            # replica's counts are the global counts.
            self.steps = tf.Variable(0, dtype=tf.int64, name="steps", **_COUNTER)
            # Not part of the window: how far into the epoch training is, so
            # that a run restored mid-epoch knows what it already holds.
            self.micro_batches_this_epoch = tf.Variable(
                0, dtype=tf.int64, name="micro_batches_this_epoch", **_COUNTER
            )
        self.variable_dtypes = [tf.as_dtype(variable.dtype) for variable in variables]
        # Which variables receive a gradient is known when the train step is
        # traced; the window is applied with `None` for the others so that the
        # optimizer leaves them alone, as in a standard step.
        self.connected: list[bool] | None = None

    def add(
        self, gradients: Sequence[tf.Tensor | None], weight: tf.Tensor | float
    ) -> None:
        """Adds ``weight * gradient`` for each variable and counts the samples."""
        self.connected = [gradient is not None for gradient in gradients]
        weight = tf.cast(weight, tf.float32)
        for gradient_sum, gradient in zip(self.gradient_sums, gradients, strict=True):
            if gradient is None:
                continue
            gradient = tf.convert_to_tensor(gradient)  # densifies IndexedSlices
            gradient_sum.assign_add(
                tf.cast(gradient, gradient_sum.dtype)
                * tf.cast(weight, gradient_sum.dtype)
            )
        self.samples.assign_add(weight)
        self.steps.assign_add(1)
        self.micro_batches_this_epoch.assign_add(1)

    def gradient_sum_values(self) -> list[tf.Tensor | None]:
        """This replica's weighted sums, ``None`` for variables without gradient."""
        connected = self.connected or [True] * len(self.gradient_sums)
        return [
            gradient_sum.read_value() if is_connected else None
            for gradient_sum, is_connected in zip(
                self.gradient_sums, connected, strict=True
            )
        ]

    def mean_gradients(
        self,
        total_samples: tf.Tensor | None = None,
        gradient_sums: Sequence[tf.Tensor | None] | None = None,
    ) -> list[tf.Tensor | None]:
        """The window's gradient: the weighted sums divided by the total weight.

        ``total_samples`` and ``gradient_sums`` default to this replica's
        count and sums (`gradient_sum_values`); a distributed caller passes
        them summed over replicas.
        """
        if total_samples is None:
            total_samples = self.samples.read_value()
        if gradient_sums is None:
            gradient_sums = self.gradient_sum_values()
        means = []
        for gradient_sum, dtype in zip(
            gradient_sums, self.variable_dtypes, strict=True
        ):
            if gradient_sum is None:
                means.append(None)
                continue
            mean = gradient_sum / tf.cast(total_samples, gradient_sum.dtype)
            means.append(tf.cast(mean, dtype))
        return means

    def reset(self) -> None:
        """Empties the window."""
        for gradient_sum in self.gradient_sums:
            gradient_sum.assign(tf.zeros_like(gradient_sum))
        self.samples.assign(0.0)
        self.steps.assign(0)

    def start_epoch(self) -> None:
        """Restarts the epoch's micro-batch count (the window is kept)."""
        self.micro_batches_this_epoch.assign(0)

    def is_finite(self) -> bool:
        """Whether every accumulated value is finite (reads them: host sync)."""
        return all(
            bool(tf.reduce_all(tf.math.is_finite(gradient_sum)))
            for gradient_sum in self.gradient_sums
        )

    @property
    def variables_to_save(self) -> list[tf.Variable]:
        """Every variable of the state, in a fixed order (for checkpoints)."""
        return [
            *self.gradient_sums,
            self.samples,
            self.steps,
            self.micro_batches_this_epoch,
        ]
