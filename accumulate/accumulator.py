"""The TensorFlow accumulation state: per-replica `tf.Variable` windows.

The arithmetic (what a micro-batch adds, the window's mean, the noise-scale
estimates) is `accumulate.window`'s and `accumulate.noise_scale`'s, shared
with every backend. What is TensorFlow's own is where it lives, split the
way optax's ``MultiSteps`` splits it:

* ``GradientAccumulator(variables)`` creates the state (init),
* ``add(gradients, weight)`` folds one micro-batch into it (update),
* ``mean_gradients()`` and ``reset()`` are used when the window is applied.

The variables are plain ``tf.Variable``s (not Keras weights) so they never show
up in ``model.weights``. Under a ``tf.distribute`` strategy they are created
``ON_READ`` with ``SUM`` aggregation: each replica accumulates into its own copy
and nothing is communicated until the window is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from accumulate import noise_scale, window

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


def _accumulation_dtype(dtype: tf.DType | str, requested: str) -> tf.DType:
    return tf.as_dtype(window.accumulation_dtype(tf.as_dtype(dtype).name, requested))


class GradientAccumulator(tf.Module):
    """Running, sample-weighted gradient sums for one accumulation window.

    Args:
        variables: the trainable variables whose gradients are accumulated, in
            the order the gradients will be given.
        window_size: micro-batches per window; 0 applies only on request
            (whole-epoch windows, applied by `fit` at the epoch's end).
        name: name scope of the created variables.
        dtype: the sums' dtype, ``"float32"`` (float64 for float64
            variables) or ``"bfloat16"`` (see `window.accumulation_dtype`).

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
        dtype: str = "float32",
    ):
        super().__init__(name=name)
        with tf.name_scope(name):
            self.gradient_sums = [
                tf.Variable(
                    tf.zeros(
                        variable.shape, _accumulation_dtype(variable.dtype, dtype)
                    ),
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
        noise_meter: NoiseScaleMeter | None = None,
        summed: bool = False,
        count_step: bool = True,
    ) -> None:
        """Folds one micro-batch in: ``weight * gradient`` and its weight.

        Args:
            gradients: one per variable, ``None`` where a variable gets none.
            weight: the micro-batch's share of the window (its loss's
                denominator, see `AccumulatingModel.micro_batch_weight`).
            gradient_scale: what the gradients are multiplied by (a loss
                scale); they are stored divided by it, so that a window can be
                applied with whatever scale the optimizer has by then.
            noise_meter: measures the micro-batch's gradient norm too, in the
                same branch (a branch of its own per step costs ~2-5% of an
                MNIST step, measured by ``make bench``).
            summed: the loss is a sum (``reduction="sum"``): the gradients
                are added as they are, and ``weight`` only counts.
            count_step: count the micro-batch as one of the window's steps
                (``False`` for a slice of a batch: the caller counts the
                batch once, `accumulate.micro_batches`).

        A micro-batch of weight 0 (no samples, or only padding) adds nothing
        and is not counted as a step of the window, so it can neither
        complete a window nor poison it with the NaN gradient of a 0/0 loss.
        Every update here depends on the micro-batch's data: a train step
        that finds no data (Keras's end-of-data step on a dataset of unknown
        length) fails at ``get_next`` and changes nothing here.
        """
        self.connected = [gradient is not None for gradient in gradients]
        weight = tf.cast(weight, tf.float32)
        counts = window.counts(weight)
        factor = tf.ones_like(weight) if summed else weight
        factor = factor if gradient_scale is None else factor / gradient_scale

        def add_micro_batch() -> None:
            dense_gradients = []
            for gradient_sum, gradient in zip(
                self.gradient_sums, gradients, strict=True
            ):
                if gradient is None:
                    continue
                gradient = tf.convert_to_tensor(gradient)  # densifies IndexedSlices
                dense_gradients.append(gradient)
                gradient_sum.assign_add(
                    window.weighted(gradient, factor, gradient_sum.dtype)
                )
            self.samples.assign_add(weight)
            if noise_meter is not None:
                noise_meter.add_micro_batch(dense_gradients, weight, gradient_scale)

        # A branch, not a product with 0: 0 * NaN is NaN.
        tf.cond(counts, add_micro_batch, _do_nothing)
        if count_step:
            self.count_step(counts)

    def count_step(self, counts: tf.Tensor) -> None:
        """Counts one step of the window if ``counts`` (a boolean tensor)."""
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
        return window.mean(gradient_sums, total_samples, self.variable_dtypes)

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


_ON_FIRST_REPLICA = {
    "trainable": False,
    "synchronization": tf.VariableSynchronization.ON_READ,
    "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
}


class NoiseScaleMeter(tf.Module):
    """State of the noise-scale measurement (`noise_scale`): a window, an epoch.

    * Per window (per replica, summed when the window is applied):
      ``weighted_sq_norms`` (``S``) and ``micro_batches`` (``n``). Under
      ``tf.distribute`` each replica's share of a micro-batch is a small batch
      in its own right: it adds ``b_r |g_r|²`` and counts 1.
    * Per epoch: the sums of the windows' estimates and how many windows
      gave one (`noise_scale.epoch_logs` takes their ratio).

    Example:
        >>> import tensorflow as tf
        >>> meter = NoiseScaleMeter()
        >>> meter.add_micro_batch([tf.constant(0.0)], weight=1.0)
        >>> meter.add_micro_batch([tf.constant([4 / 3])], weight=3.0)
        >>> meter.end_window(window_sq_norm=1.0, samples=4.0)
        >>> {k: round(v, 4) for k, v in meter.epoch_logs().items()}
        {'gradient_sq_norm': 0.6667, 'gradient_variance': 1.3333, \
'gradient_noise_scale': 2.0}
    """

    def __init__(self, name: str = "noise_scale"):
        super().__init__(name=name)
        with tf.name_scope(name):
            self.weighted_sq_norms = tf.Variable(
                0.0, name="weighted_sq_norms", **_PER_REPLICA
            )
            self.micro_batches = tf.Variable(0.0, name="micro_batches", **_PER_REPLICA)
            self.epoch_sq_norm_sum = tf.Variable(
                0.0, name="epoch_sq_norm_sum", **_ON_FIRST_REPLICA
            )
            self.epoch_variance_sum = tf.Variable(
                0.0, name="epoch_variance_sum", **_ON_FIRST_REPLICA
            )
            self.epoch_windows = tf.Variable(
                0.0, name="epoch_windows", **_ON_FIRST_REPLICA
            )

    @property
    def _epoch_variables(self) -> tuple[tf.Variable, tf.Variable, tf.Variable]:
        return self.epoch_sq_norm_sum, self.epoch_variance_sum, self.epoch_windows

    def add_micro_batch(
        self,
        gradients: Sequence[tf.Tensor],
        weight: tf.Tensor | float,
        gradient_scale: tf.Tensor | float | None = None,
    ) -> None:
        """Adds ``weight · |g|²`` for one micro-batch of mean gradient ``g``.

        For a micro-batch that counts (`window.counts`):
        `GradientAccumulator.add` calls it in its branch for those. One
        ``L2Loss`` kernel per variable, on the flattened gradient: the fewest
        graph ops, and XLA:CPU reduces a vector about 3x faster than a matrix
        to a scalar (measured on the paper's MLP: 36 vs 98 µs per step).
        """
        squared_norm = 2.0 * tf.add_n(
            [
                tf.nn.l2_loss(tf.reshape(tf.cast(gradient, tf.float32), [-1]))
                for gradient in gradients
            ]
        )
        if gradient_scale is not None:
            squared_norm = squared_norm / tf.square(tf.cast(gradient_scale, tf.float32))
        self.weighted_sq_norms.assign_add(tf.cast(weight, tf.float32) * squared_norm)
        self.micro_batches.assign_add(1.0)

    def window_totals(self) -> list[tf.Tensor]:
        """This replica's ``[S, n]``, to be summed over replicas."""
        return [self.weighted_sq_norms.read_value(), self.micro_batches.read_value()]

    def end_window(
        self,
        window_sq_norm: tf.Tensor | float,
        samples: tf.Tensor | float,
        totals: Sequence[tf.Tensor] | None = None,
    ) -> None:
        """Adds the window's estimates to the epoch's (if ``n ≥ 2``) and resets.

        ``totals`` are `window_totals` summed over replicas (default: this
        replica's).
        """
        sums = noise_scale.end_window(
            tuple(variable.read_value() for variable in self._epoch_variables),
            *(totals or self.window_totals()),
            window_sq_norm,
            samples,
        )
        for variable, value in zip(self._epoch_variables, sums, strict=True):
            variable.assign(value)
        self.reset_window()

    def reset_window(self) -> None:
        """Drops the window's totals (with the window itself)."""
        self.weighted_sq_norms.assign(0.0)
        self.micro_batches.assign(0.0)

    @property
    def variables_to_save(self) -> list[tf.Variable]:
        """Every variable of the measurement, in a fixed order (checkpoints)."""
        return [self.weighted_sq_norms, self.micro_batches, *self._epoch_variables]

    def epoch_logs(self) -> dict[str, float]:
        """The epoch's mean estimates and their ratio (NaN without a window)."""
        return noise_scale.epoch_logs(
            *(float(variable.numpy()) for variable in self._epoch_variables)
        )

    def start_epoch(self) -> None:
        """Forgets the previous epoch's estimates."""
        for variable in self._epoch_variables:
            variable.assign(0.0)
