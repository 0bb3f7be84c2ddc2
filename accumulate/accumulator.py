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


def _do_nothing() -> None:
    return None


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
        window_size: micro-batches per window; 0 applies only on request
            (whole-epoch windows, applied by `fit` at the epoch's end).
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

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        window_size: int = 0,
        name: str = "accumulation",
    ):
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
            # Micro-batches in the window. Every replica is told the same
            # `counts`, so one replica's count is the global count.
            self.steps = tf.Variable(0, dtype=tf.int64, name="steps", **_COUNTER)
            # Not part of the window: how far into the epoch training is, so
            # that a run restored mid-epoch knows what it already holds.
            self.micro_batches_this_epoch = tf.Variable(
                0, dtype=tf.int64, name="micro_batches_this_epoch", **_COUNTER
            )
            # Micro-batches per window in effect, 0 for the whole epoch: read
            # in the graph, so a schedule changes it without retracing. Not
            # saved: it follows from the schedule and the epoch.
            self.window_size = tf.Variable(
                window_size, dtype=tf.int64, name="window_size", **_COUNTER
            )
        self.variable_dtypes = [tf.as_dtype(variable.dtype) for variable in variables]
        # The variables the window is for, kept out of checkpoint tracking
        # (they are the model's, saved there): object.__setattr__ skips
        # tf.Module's tracking, so they are not saved twice.
        object.__setattr__(self, "_variables", tuple(variables))
        # Which variables receive a gradient is known when the train step is
        # traced; the window is applied with `None` for the others so that the
        # optimizer leaves them alone, as in a standard step.
        self.connected: list[bool] | None = None

    def add(
        self,
        gradients: Sequence[tf.Tensor | None],
        weight: tf.Tensor | float,
        gradient_scale: tf.Tensor | float | None = None,
    ) -> None:
        """Folds one micro-batch in: ``weight * gradient`` and its weight.

        Args:
            gradients: one per variable, ``None`` where a variable gets none.
            weight: the micro-batch's share of the window (its loss's
                denominator, see `AccumulatingModel.micro_batch_weight`).
            gradient_scale: what the gradients are multiplied by (a loss
                scale); they are stored divided by it, so that a window can be
                applied with whatever scale the optimizer has by then.

        A micro-batch of weight 0 (no samples, or only padding) adds nothing
        and is not counted as a step of the window, so it can neither
        complete a window nor poison it with the NaN gradient of a 0/0 loss.
        Every update here depends on the micro-batch's data: a train step
        that finds no data (Keras's end-of-data step on a dataset of unknown
        length) fails at ``get_next`` and changes nothing here.
        """
        self.connected = [gradient is not None for gradient in gradients]
        weight = tf.cast(weight, tf.float32)
        counts = weight > 0.0
        factor = weight if gradient_scale is None else weight / gradient_scale

        def add_micro_batch() -> None:
            for gradient_sum, gradient in zip(
                self.gradient_sums, gradients, strict=True
            ):
                if gradient is None:
                    continue
                gradient = tf.convert_to_tensor(gradient)  # densifies IndexedSlices
                gradient_sum.assign_add(
                    tf.cast(gradient, gradient_sum.dtype)
                    * tf.cast(factor, gradient_sum.dtype)
                )
            self.samples.assign_add(weight)

        # A branch, not a product with 0: 0 * NaN is NaN.
        tf.cond(counts, add_micro_batch, _do_nothing)
        self.steps.assign_add(tf.cast(counts, tf.int64))

    def count_micro_batch(self, batch_size: tf.Tensor) -> None:
        """Counts one micro-batch drawn from the data this epoch, empty or not.

        The count is computed from ``batch_size`` (a tensor of the
        micro-batch) so that it does not run when the step finds no data.
        """
        self.micro_batches_this_epoch.assign_add(tf.cast(batch_size >= 0, tf.int64))

    @property
    def accumulated_variables(self) -> tuple[tf.Variable, ...]:
        """The variables the window's gradients are for, in order."""
        return self._variables

    def window_is_complete(self) -> tf.Tensor:
        """Whether the window holds as many micro-batches as it should."""
        return tf.logical_and(self.window_size > 0, self.steps >= self.window_size)

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
