"""The window as `keras.Variable`s, for the backends without `tf.Variable`s.

JAX's train step is stateless: everything it changes must travel in Keras's
training state. The accumulators are therefore non-trainable Keras variables
that the model lists in ``model.variables`` (and so in
``non_trainable_variables``, which Keras's JAX trainer passes through its
jitted step, as it does for seed-generator state) but not in
``model.weights``, so `get_weights` / `set_weights` and a plain twin are
unaffected. PyTorch's stateful step assigns the same variables in place.

The objects here only hold variables; they are plain Python objects, not
layers, so Keras's attribute tracking never adds their variables to the
model's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from accumulate import noise_scale, window


def _variable(
    shape: tuple[int, ...], dtype: str, name: str, layout: Any = None
) -> keras.Variable:
    # autocast=False: under mixed precision a float32 sum must stay float32
    # when read inside the model's autocast scope.
    placement = {} if layout is None else {"layout": layout}
    return keras.Variable(
        "zeros",
        shape,
        trainable=False,
        dtype=dtype,
        name=name,
        autocast=False,
        **placement,
    )


def _layout(variable: Any, per_device: bool) -> Any:
    """The layout of ``variable``'s sum under the current `keras.distribution`.

    A sum takes its variable's layout, as Keras's optimizer gives its slots:
    under `ModelParallel` a sharded kernel's sum is sharded the same way,
    not replicated on every device. A per-device sum adds a leading axis
    split over the data-parallel devices: each device holds its own partial
    sum, shaped as its shard of the variable. Counters take the
    distribution's default (replicated).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    layout = distribution.get_variable_layout(variable)
    if not per_device:
        return layout
    return keras.distribution.TensorLayout(
        (distribution.batch_dim_name, *layout.axes), distribution.device_mesh
    )


class WindowVariables:
    """One window's sums and counts, and the epoch's micro-batch count.

    Args:
        variables: the trainable variables the window's gradients are for.
        window_size: micro-batches per window, 0 for "epoch" (a variable, so
            a schedule changes it without retracing).
        dtype: the sums' dtype (see `window.accumulation_dtype`).
        devices: data-parallel devices that each keep a partial sum (a
            leading axis of the sums; 1: one sum, no such axis).
    """

    def __init__(
        self,
        variables: Sequence[Any],
        window_size: int,
        dtype: str = "float32",
        devices: int = 1,
    ):
        self.accumulated_variables = tuple(variables)
        self.variable_dtypes = [variable.dtype for variable in variables]
        self.devices = devices
        per_device = (devices,) if devices > 1 else ()
        self.gradient_sums = [
            _variable(
                (*per_device, *variable.shape),
                window.accumulation_dtype(variable.dtype, dtype),
                f"gradient_sum_{index}",
                _layout(variable, devices > 1),
            )
            for index, variable in enumerate(variables)
        ]
        self.samples = _variable((), "float32", "samples")
        self.steps = _variable((), "int32", "steps")
        # Not part of the window: how far into the epoch training is, so that
        # a run restored mid-epoch knows what it already holds.
        self.micro_batches_this_epoch = _variable(
            (), "int32", "micro_batches_this_epoch"
        )
        self.window_size = _variable((), "int32", "window_size")
        self.window_size.assign(window_size)

    @property
    def variables(self) -> list[keras.Variable]:
        """Every variable, in the order the train step reads them."""
        return [
            *self.gradient_sums,
            self.samples,
            self.steps,
            self.micro_batches_this_epoch,
            self.window_size,
        ]

    @property
    def variables_to_save(self) -> list[keras.Variable]:
        """What a checkpoint holds (as TensorFlow's state: window size is not)."""
        return self.variables[:-1]

    def summed(self, values: Sequence[Any]) -> list[Any]:
        """The window's sums from the sums' ``values``: per-device partial
        sums added up (the window's one cross-device reduction)."""
        if self.devices == 1:
            return list(values)
        return [ops.sum(value, axis=0) for value in values]

    def is_per_device(self, variable: Any) -> bool:
        return self.devices > 1 and any(variable is s for s in self.gradient_sums)

    def reset(self) -> None:
        for gradient_sum in self.gradient_sums:
            gradient_sum.assign(ops.zeros_like(gradient_sum.value))
        self.samples.assign(0.0)
        self.steps.assign(0)

    def start_epoch(self) -> None:
        self.micro_batches_this_epoch.assign(0)

    def is_finite(self) -> bool:
        return all(
            bool(np.all(np.isfinite(gradient_sum.numpy())))
            for gradient_sum in self.gradient_sums
        )


class NoiseVariables:
    """The noise-scale measurement's window totals and epoch sums."""

    def __init__(self):
        self.weighted_sq_norms = _variable((), "float32", "weighted_sq_norms")
        self.micro_batches = _variable((), "float32", "micro_batches")
        self.epoch_sums = [
            _variable((), "float32", name)
            for name in ("epoch_sq_norm_sum", "epoch_variance_sum", "epoch_windows")
        ]

    @property
    def variables(self) -> list[keras.Variable]:
        return [self.weighted_sq_norms, self.micro_batches, *self.epoch_sums]

    variables_to_save = variables

    def reset_window(self) -> None:
        self.weighted_sq_norms.assign(0.0)
        self.micro_batches.assign(0.0)

    def start_epoch(self) -> None:
        for variable in self.epoch_sums:
            variable.assign(0.0)

    def epoch_logs(self) -> dict[str, float]:
        return noise_scale.epoch_logs(
            *(float(variable.numpy()) for variable in self.epoch_sums)
        )


class VariableAccumulation:
    """What JAX and PyTorch share: the state's life cycle and eager applies.

    Each backend's ``Accumulation`` adds its train step and `_sync_state`.
    """

    @property
    def variables(self) -> list[Any]:
        # Keras's own state plus the window's: non-trainable, so they reach
        # `non_trainable_variables` and JAX's train state, not `weights`.
        return [*super().variables, *self._state_variables()]

    def _state_variables(self) -> list[keras.Variable]:
        state = getattr(self, "_accumulation", None)
        if state is None:
            return []
        meter = self._noise_scale
        return [*state.variables, *(meter.variables if meter is not None else [])]

    def _sync_state(self) -> None:
        """Makes the variables hold the latest values (JAX's fit keeps its own)."""

    def _window_counts(self) -> tuple[float, int]:
        self._sync_state()
        state = self._accumulation
        return float(state.samples.numpy()), int(state.steps.numpy())

    def _write_window_size(self) -> None:
        if self._accumulation is not None:
            self._sync_state()
            self._accumulation.window_size.assign(self._window_size_value())

    def _saved_value(self, variable: keras.Variable) -> np.ndarray:
        # Saved as one sum whatever the device count, so that a file
        # loads on any number of devices.
        value = np.asarray(variable.numpy())
        if self._accumulation.is_per_device(variable):
            return value.sum(axis=0)
        return value

    def _assign_saved(self, variable: keras.Variable, value: Any) -> None:
        if self._accumulation.is_per_device(variable):
            # The whole sum on the first device, nothing on the others.
            per_device = np.zeros(tuple(variable.shape), value.dtype)
            per_device[0] = value
            value = per_device
        variable.assign(value)

    def _state_scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _new_state(
        self, variables: Sequence[Any]
    ) -> tuple[WindowVariables, NoiseVariables | None]:
        meter = NoiseVariables() if self._measure_noise_scale else None
        # The noise scale needs each micro-batch's whole gradient: reduced.
        devices = 1 if self._measure_noise_scale else self._window_devices()
        state = WindowVariables(
            variables, self._window_size_value(), self._accumulation_dtype, devices
        )
        return state, meter

    def _window_devices(self) -> int:
        """Devices that each keep a partial sum of the window (see JAX's)."""
        return 1

    def _apply_open_window(self) -> None:
        self._sync_state()
        state = self._accumulation
        if int(state.steps.numpy()) == 0:
            return
        if not self.optimizer.built:
            self.optimizer.build(list(state.accumulated_variables))
        samples = state.samples.value
        gradients = window.mean(
            state.summed([gradient_sum.value for gradient_sum in state.gradient_sums]),
            self._window_divisor(samples),
            state.variable_dtypes,
        )
        meter = self._noise_scale
        if meter is not None:
            sums = noise_scale.end_window(
                tuple(variable.value for variable in meter.epoch_sums),
                meter.weighted_sq_norms.value,
                meter.micro_batches.value,
                window.squared_norm(gradients),
                samples,
            )
            for variable, value in zip(meter.epoch_sums, sums, strict=True):
                variable.assign(value)
            meter.reset_window()
        self._optimizer_apply(
            window.scaled(gradients, self._loss_scale()),
            list(state.accumulated_variables),
        )
        state.reset()

    def _optimizer_apply(self, gradients: list[Any], variables: list[Any]) -> None:
        self.optimizer.apply(gradients, variables)

    def _reset_open_window(self) -> None:
        self._sync_state()
        self._accumulation.reset()
        if self._noise_scale is not None:
            self._noise_scale.reset_window()
