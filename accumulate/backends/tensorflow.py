"""TensorFlow glue: the accumulating train step inside Keras's `tf.function`.

The window lives in per-replica ``tf.Variable``s (`accumulate.accumulator`)
that the traced train step updates in place; under ``tf.distribute`` each
replica accumulates alone and one all-reduce per window sums them
(`accumulate.distributed`). The arithmetic is `accumulate.window`'s and
`accumulate.noise_scale`'s, shared with the other backends.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from accumulate import distributed, micro_batches, noise_scale, window
from accumulate.accumulator import GradientAccumulator, NoiseScaleMeter

# What the trainable-variables-changed error adds on this backend.
AFTER_TRAINABLE_CHANGED = ""
# Whether `probe` changes the model's state (the caller restores it).
PROBE_CHANGES_STATE = True


def accelerator() -> str | None:
    """The accelerator TensorFlow runs on (``None``: CPU only)."""
    for kind in ("GPU", "TPU"):
        devices = tf.config.list_logical_devices(kind)
        if devices:
            return devices[0].name
    return None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, tf.errors.ResourceExhaustedError)


def probe(model: Any, x: Any, y: Any, sample_weight: Any) -> None:
    """One micro-batch's forward and backward pass, compiled as the step is;
    raises TensorFlow's out-of-memory error if it does not fit."""

    def gradients(x: Any, y: Any, sample_weight: Any) -> Any:
        return [g for g in model._gradients(x, y, sample_weight)[2] if g is not None]

    function = tf.function(gradients, jit_compile=bool(model.jit_compile))
    # Reading a value waits for the device.
    float(tf.add_n([tf.reduce_sum(g) for g in function(x, y, sample_weight)]))


def batch_size(x: Any) -> tf.Tensor:
    """The micro-batch's number of samples (dynamic: batches may be ragged)."""
    first_input = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first_input)[0]


def assert_equal_counts(counts: list[Any], message: str, model: Any) -> None:
    """Fails the step when several outputs' counts differ.

    XLA drops runtime assertions, so under ``jit_compile=True`` a model whose
    counts could differ is refused when the step is traced.
    """
    if model.jit_compile:
        raise ValueError(
            message + " Under jit_compile=True (XLA) this cannot be checked "
            "per micro-batch; compile with jit_compile=False to have it checked."
        )
    for count in counts[1:]:
        tf.debugging.assert_equal(count, counts[0], message=message)


def _rows(tensor: tf.Tensor, start: tf.Tensor, size: int) -> tf.Tensor:
    """``size`` rows of ``tensor`` from ``start``: a slice of static size."""
    others = tensor.shape.rank - 1
    begin = tf.stack([start, *[tf.zeros((), start.dtype)] * others])
    return tf.slice(tensor, begin, [size, *[-1] * others])


def _each(function: Any, data: Any) -> Any:
    """``function`` of every tensor of ``data`` (absent ``y``, weights: None)."""
    return tf.nest.map_structure(
        lambda tensor: None if tensor is None else function(tensor), data
    )


def _ids(variables: list[Any]) -> list[int]:
    return [id(variable) for variable in variables]


class Accumulation:
    """The TensorFlow half of `AccumulatingModel` (mixed in before keras.Model)."""

    def _window_counts(self) -> tuple[float, int]:
        """``(samples, micro-batches)`` of the open window (all replicas)."""
        state = self._accumulation
        return float(state.samples.numpy()), int(state.steps.numpy())

    def _write_window_size(self) -> None:
        if self._accumulation is not None:
            distributed.assign_total(
                self._accumulation.window_size,
                self._window_size_value(),
                self.distribute_strategy,
            )

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        size = self._slice_size(
            None, self.distribute_strategy.num_replicas_in_sync, "replicas"
        )
        if size is not None:
            return self._sliced_step(x, y, sample_weight, size)
        loss, y_pred, gradients = self._gradients(x, y, sample_weight)
        self._loss_tracker.update_state(loss, sample_weight=batch_size(x))
        state = self._accumulation
        state.count_micro_batch(batch_size(x))
        self._fold_in(x, y, y_pred, sample_weight, gradients, count_step=True)
        return self._step_logs(
            self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        )

    def _gradients(self, x: Any, y: Any, sample_weight: Any) -> tuple:
        """``(loss, y_pred, gradients)`` of one micro-batch on this replica.

        The loss is this replica's own mean (or sum), as one device would
        log it.
        """
        # Keras divides a mean loss by the number of replicas (not a sum).
        summed = self._sums_window()
        replicas = 1 if summed else self.distribute_strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            training = {"training": True} if self._call_has_training_arg else {}
            y_pred = self(x, **training)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            # Keras divides each replica's loss by the number of replicas;
            # undo it so that every replica adds (samples x its own mean
            # gradient) and the window divides by the samples of all replicas.
            loss = loss * replicas
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        if self._accumulated_variable_ids != _ids(self.trainable_variables):
            # Keras builds a model without a strategy while tracing: its
            # variables exist only now. Create the state outside the graph
            # (and only then: init_scope from a replica thread on every step
            # corrupts steps where some replicas get an empty micro-batch).
            with tf.init_scope():
                self._build_accumulation_state()
        return loss, y_pred, gradients

    def _fold_in(
        self,
        x: Any,
        y: Any,
        y_pred: Any,
        sample_weight: Any,
        gradients: list[Any],
        count_step: bool,
    ) -> tf.Tensor:
        """Adds one micro-batch's gradients; applies a complete window if
        ``count_step``. Returns its weight."""
        state = self._accumulation
        weight = self.micro_batch_weight(x, y, y_pred, sample_weight)
        state.add(
            gradients,
            weight,
            gradient_scale=self._loss_scale(),
            noise_meter=self._noise_scale,
            summed=self._sums_window(),
            count_step=count_step,
        )
        if count_step:
            self._apply_if_complete()
        return weight

    def _apply_if_complete(self) -> None:
        distributed.cond_in_cross_replica_context(
            self._accumulation.window_is_complete(), self._apply_window, self.optimizer
        )

    def _sliced_step(
        self, x: Any, y: Any, sample_weight: Any, size: int
    ) -> dict[str, Any]:
        """The batch in slices of ``size`` (`accumulate.micro_batches`).

        A `tf.while_loop` over the full slices, each cut with a `tf.slice`
        of static size (XLA compiles it as a dynamic slice: no copy of the
        batch), then the ragged rest, if any, in a `tf.cond`.
        """
        data = (x, y, sample_weight)
        samples = batch_size(x)
        # Known when tracing if the batch's shape is static: then a loop or
        # a rest that cannot run is not traced (an empty rest's loss would
        # have a static shape of 0).
        static = next(t for t in tf.nest.flatten(x) if t is not None).shape[0]
        full = samples // size
        rest = samples - full * size
        summed = self._sums_window()

        def fold(part: tuple, totals: tuple) -> tuple:
            x, y, sample_weight = part
            loss, y_pred, gradients = self._gradients(x, y, sample_weight)
            weight = self._fold_in(
                x, y, y_pred, sample_weight, gradients, count_step=False
            )
            self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            return (*micro_batches.add_loss(totals[:3], loss, weight, summed), loss)

        def full_slice(index: tf.Tensor, *totals: Any) -> tuple:
            start = index * size
            part = _each(lambda tensor: _rows(tensor, start, size), data)
            return (index + 1, *fold(part, totals))

        totals = (*micro_batches.loss_totals(), tf.zeros((), tf.float32))
        if static is None or static >= size:
            _, *totals = tf.while_loop(
                lambda index, *_: index < full,
                full_slice,
                (tf.zeros((), samples.dtype), *totals),
                # One slice at a time: overlapping iterations would hold
                # several slices' activations at once.
                parallel_iterations=1,
            )
        if static is None or static % size:
            last = _each(lambda tensor: tensor[full * size :], data)
            totals = tf.cond(
                rest > 0, lambda: fold(last, totals), lambda: tuple(totals)
            )
        state = self._accumulation
        state.count_micro_batch(samples)
        state.count_step(totals[2])
        self._apply_if_complete()
        loss = micro_batches.batch_loss(totals[:3], totals[3], summed)
        self._loss_tracker.update_state(loss, sample_weight=samples)
        return self._step_logs(self.get_metrics_result())

    def _step_logs(self, logs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(
            self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            # Keras 3.15 reduces multi-worker logs with
            # strategy.reduce("MEAN", value, axis=0), which fails on scalars
            # (for any Keras model): give them the axis it averages over.
            logs = tf.nest.map_structure(lambda value: tf.reshape(value, [1]), logs)
        return logs

    def _apply_window(self) -> None:
        """One optimizer update on the window's mean gradient, then reset."""
        state = self._accumulation
        meter = self._noise_scale
        gradient_sums, (total_samples, *noise_totals) = distributed.all_reduce_window(
            state.gradient_sum_values(),
            [state.samples.read_value(), *(meter.window_totals() if meter else [])],
        )
        gradients = state.mean_gradients(
            self._window_divisor(total_samples), gradient_sums
        )
        if meter is not None:
            meter.end_window(
                noise_scale.squared_norm(gradients), total_samples, noise_totals
            )
        scale = self._loss_scale()
        # The sums are unscaled; the optimizer unscales what it is given.
        gradients = window.scaled(gradients, scale)
        self.optimizer.apply(gradients, list(state.accumulated_variables))
        state.reset()

    def _apply_open_window(self) -> None:
        state = self._accumulation
        if state is None:
            return
        with self.distribute_strategy.scope():
            if not self.optimizer.built:
                self.optimizer.build(list(state.accumulated_variables))
        if self._apply_function is None:

            @tf.function
            def apply_if_not_empty():
                self.distribute_strategy.run(
                    lambda: distributed.cond_in_cross_replica_context(
                        self._accumulation.steps > 0,
                        self._apply_window,
                        self.optimizer,
                    )
                )

            self._apply_function = apply_if_not_empty
        self._apply_function()

    def _reset_open_window(self) -> None:
        if self._accumulation is not None:
            with self.distribute_strategy.scope():
                self.distribute_strategy.run(self._accumulation.reset)
                if self._noise_scale is not None:
                    self.distribute_strategy.run(self._noise_scale.reset_window)

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None):
        strategy = self._distribute_strategy
        if (
            isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and iterator is not None
            and data_batch is None
        ):
            # Keras 3.15 reduces the first distributed batch with
            # strategy.reduce("MEAN", batch), which fails under multi-worker
            # for any Keras model; the build only needs shapes and dtypes.
            with strategy.scope():
                self._symbolic_build(
                    data_batch=distributed.first_replica_batch(iterator, strategy)
                )
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _state_variables(self) -> list[Any]:
        # The window is tf.Variables of its own, in none of Keras's lists.
        return []

    def _state_scope(self) -> Any:
        # Under a strategy the state is per replica: created in its scope.
        return self.distribute_strategy.scope()

    def _new_state(
        self, variables: list[Any]
    ) -> tuple[GradientAccumulator, NoiseScaleMeter | None]:
        meter = NoiseScaleMeter() if self._measure_noise_scale else None
        state = GradientAccumulator(
            variables, self._window_size_value(), dtype=self._accumulation_dtype
        )
        return state, meter

    def _trackable_children(self, save_type: str = "checkpoint", **kwargs: Any):
        # As Keras does for train_function: a SavedModel must not trace the
        # apply function (it would try to save its gradients).
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "savedmodel":
            children.pop("_apply_function", None)
        return children

    def _saved_value(self, variable: tf.Variable) -> Any:
        return variable.numpy()

    def _assign_saved(self, variable: tf.Variable, value: Any) -> None:
        distributed.assign_total(variable, value, self.distribute_strategy)
