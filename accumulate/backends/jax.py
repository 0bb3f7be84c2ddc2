"""JAX glue: the accumulating train step as Keras's stateless JAX step.

Keras's JAX trainer jits ``train_step(state, data) -> (logs, state)``, with
``state = (trainable, non_trainable, optimizer, metrics)`` values. The
window's variables are among the model's non-trainable variables
(`accumulate.backends.variables`), so their values arrive in
``state[1]``; the step folds the micro-batch in with `accumulate.window`,
and a `jax.lax.cond` applies the optimizer (``stateless_apply``) when the
window is complete. Nothing leaves the compiled step: no host sync per
micro-batch.

Under a `keras.distribution` with a batch axis of several devices, each
device keeps its own partial sums (a leading axis of the sums, laid out over
the batch axis): the step computes each device's gradient of its share with
`jax.vmap` over that axis, so no gradient crosses devices until the window
is applied, where the sums are added up: one all-reduce per window
(docs/design.md, "JAX at scale").

Outside the jitted step (epoch-end flush, `apply_accumulated_gradients`)
the window is applied eagerly to the variables; Keras's JAX `fit` writes its
state back to the variables before validation and ``on_epoch_end``, and
reads them again when the next epoch starts, so those applies are seen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras
from keras import ops

from accumulate import micro_batches, noise_scale, window
from accumulate.backends.variables import VariableAccumulation

# What the trainable-variables-changed error adds on this backend.
AFTER_TRAINABLE_CHANGED = (
    " On JAX, compile() again before the next fit, as any Keras model needs "
    "after `trainable` changed: the optimizer updates exactly the variables "
    "it was built with."
)


def batch_size(x: Any) -> Any:
    """The micro-batch's number of samples (static under `jax.jit`)."""
    first_input = next(t for t in keras.tree.flatten(x) if t is not None)
    return first_input.shape[0]


def assert_equal_counts(counts: list[Any], message: str, model: Any) -> None:
    """Fails the step when several outputs' counts differ.

    `jax.jit` has no runtime assertion, so a host callback checks them: only
    for models whose outputs count from different masks or weights.
    """
    del model

    def check(*values: Any) -> None:
        if any(float(value) != float(values[0]) for value in values[1:]):
            raise ValueError(message)

    jax.debug.callback(check, *counts)


# Whether `probe` changes the model's state: no, it is stateless.
PROBE_CHANGES_STATE = False


def accelerator() -> str | None:
    """The accelerator JAX runs on (``None``: CPU only)."""
    device = jax.devices()[0]
    return None if device.platform == "cpu" else device.device_kind


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def probe(model: Any, x: Any, y: Any, sample_weight: Any) -> None:
    """One micro-batch's forward and backward pass, jitted as the step is
    (statelessly: nothing changes); raises XLA's out-of-memory error if it
    does not fit."""
    places = model._window_places()

    def gradients(values: tuple, x: Any, y: Any, sample_weight: Any) -> Any:
        return model._gradients(*values, places, x, y, sample_weight)[1]

    values = tuple(
        [variable.value for variable in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.metrics_variables,
            model.optimizer.variables,
        )
    )
    jax.block_until_ready(jax.jit(gradients)(values, x, y, sample_weight))


# Added to a seed generator's seed on device d (times d): each device's
# share of a micro-batch draws its own dropout masks, not device 0's.
_SEED_STRIDE = 0x9E3779B1


def data_parallel_devices() -> int:
    """Devices along the current `keras.distribution`'s batch axis (1: none)."""
    distribution = keras.distribution.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    if distribution is None or name is None:
        return 1
    mesh = distribution.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(name)])


def _split(tensor: Any, devices: int) -> Any:
    """``(b, ...)`` as ``(devices, b / devices, ...)``, one row per device."""
    distribution = keras.distribution.distribution()
    split = jnp.reshape(
        tensor, (devices, tensor.shape[0] // devices, *tensor.shape[1:])
    )
    sharding = jax.sharding.NamedSharding(
        distribution.device_mesh.backend_mesh,
        jax.sharding.PartitionSpec(distribution.batch_dim_name),
    )
    return jax.lax.with_sharding_constraint(split, sharding)


def _rows(tensor: Any, start: Any, size: int, devices: int) -> Any:
    """``size`` rows from ``start`` of every device's share of ``tensor``.

    A dynamic slice (of static size): no copy of the batch. Under a
    data-parallel distribution the rows are taken within each device's
    share, where they lie, so that no sample moves between devices.
    """
    if devices == 1:
        return jax.lax.dynamic_slice_in_dim(tensor, start, size, axis=0)
    shares = jax.lax.dynamic_slice_in_dim(_split(tensor, devices), start, size, axis=1)
    return _joined(shares)


def _joined(tensor: Any) -> Any:
    return jnp.reshape(tensor, (-1, *tensor.shape[2:]))


def _combined(old: Any, per_device: Any, additive: bool) -> Any:
    """One value from each device's update of a state value.

    ``additive`` (a metric's totals and counts): every device's increment.
    Otherwise floats (moving statistics) are averaged and integers (step
    counters, seeds) taken from the first device, which drew as one device
    would.
    """
    if additive and jnp.issubdtype(per_device.dtype, jnp.floating):
        return old + jnp.sum(per_device - old, axis=0)
    if jnp.issubdtype(per_device.dtype, jnp.floating):
        return jnp.mean(per_device, axis=0)
    return per_device[0]


class Accumulation(VariableAccumulation):
    """The JAX half of `AccumulatingModel` (mixed in before keras.Model)."""

    def _sync_state(self) -> None:
        # Inside fit the latest values live in the trainer's state, not in
        # the variables; Keras's public sync writes them back.
        self.jax_state_sync()

    def _loss_and_weight(
        self,
        trainable_variables: list[Any],
        non_trainable_variables: list[Any],
        metrics_variables: list[Any],
        optimizer_variables: list[Any],
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> tuple[Any, tuple]:
        # Keras's own loss, plus the micro-batch's weight, which needs y_pred
        # while its Keras mask is still attached (inside the traced call).
        loss, aux = self.compute_loss_and_updates(
            trainable_variables,
            non_trainable_variables,
            metrics_variables,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_variables,
        )
        unscaled_loss, y_pred, non_trainable_variables, metrics_variables = aux
        weight = ops.cast(
            self.micro_batch_weight(x, y, y_pred, sample_weight), "float32"
        )
        return loss, (
            unscaled_loss,
            y_pred,
            non_trainable_variables,
            metrics_variables,
            weight,
        )

    def _window_devices(self) -> int:
        return data_parallel_devices()

    def _gradients_per_device(
        self,
        devices: int,
        window_places: list[int],
        trainable: list[Any],
        non_trainable: list[Any],
        metrics_values: list[Any],
        optimizer_values: list[Any],
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> tuple[tuple, list[Any]]:
        """Each device's gradient of its share of the micro-batch, unreduced.

        The share's loss is the model's own on ``b / devices`` samples, so
        `window.add` weighs the shares as micro-batches of their own:
        exact for every reduction `micro_batch_weight` reads. `jax.vmap`
        over a leading device axis (split along the batch axis, where the
        data already lie) keeps every gradient on its device: the
        contraction over samples happens within each device's rows, and no
        collective is needed until the window is applied.
        """
        window_place_set = set(window_places)
        own = [i for i in range(len(non_trainable)) if i not in window_place_set]
        variables = self.non_trainable_variables
        seeds = {i for i in own if variables[i].name == "seed_generator_state"}
        data = jax.tree_util.tree_map(
            lambda tensor: _split(tensor, devices), (x, y, sample_weight)
        )

        # What the call updates (traced once): only that leaves the vmap,
        # so frozen weights are not broadcast to every device and back.
        updated, updated_metrics = [], []

        def one_device(device: Any, x: Any, y: Any, sample_weight: Any) -> tuple:
            values = list(non_trainable)
            for i in seeds:
                offset = jnp.stack([device * jnp.uint32(_SEED_STRIDE), 0]).astype(
                    values[i].dtype
                )
                values[i] = values[i] + offset
            (_, aux), gradients = jax.value_and_grad(
                self._loss_and_weight, has_aux=True
            )(
                trainable,
                values,
                metrics_values,
                optimizer_values,
                x,
                y,
                sample_weight,
            )
            loss, y_pred, new_values, new_metrics, weight = aux
            # Keras hands back the very value it was given when a call left
            # a variable alone.
            updated.extend(i for i in own if new_values[i] is not values[i])
            updated_metrics.extend(
                j
                for j, value in enumerate(new_metrics)
                if value is not metrics_values[j]
            )
            return (
                loss,
                y_pred,
                [new_values[i] for i in updated],
                [new_metrics[j] for j in updated_metrics],
                weight,
            ), gradients

        aux, gradients = jax.vmap(one_device)(
            jnp.arange(devices, dtype="uint32"), *data
        )
        losses, y_pred, new_values, new_metrics, weights = aux
        non_trainable, metrics_values = list(non_trainable), list(metrics_values)
        for i, per_device in zip(updated, new_values, strict=True):
            non_trainable[i] = _combined(non_trainable[i], per_device, additive=False)
        for j, per_device in zip(updated_metrics, new_metrics, strict=True):
            metrics_values[j] = _combined(metrics_values[j], per_device, additive=True)
        # The micro-batch's loss from its devices' shares', as one device
        # would log it: weighed as the window weighs them, as slices are.
        summed = self._sums_window()
        totals = micro_batches.add_loss(
            micro_batches.loss_totals(), losses, weights, summed
        )
        loss = micro_batches.batch_loss(totals, losses[0], summed)
        y_pred = jax.tree_util.tree_map(_joined, y_pred)
        return (loss, y_pred, non_trainable, metrics_values, weights), gradients

    def _stateless_loss_scale(self, optimizer_variables: list[Any]) -> Any:
        mapping = list(zip(self.optimizer.variables, optimizer_variables, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return self._loss_scale()

    def _window_places(self) -> list[int]:
        """Where the window's values are among the non-trainable ones."""
        position = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        return [position[id(v)] for v in self._state_variables()]

    def _gradients(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        metrics_values: list[Any],
        optimizer_values: list[Any],
        places: list[int],
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> tuple[tuple, list[Any]]:
        """``(loss, y_pred, non_trainable, metrics, weight), gradients`` of
        one micro-batch: per device under a data-parallel distribution."""
        devices = self._accumulation.devices
        if devices > 1:
            return self._gradients_per_device(
                devices,
                places,
                trainable,
                non_trainable,
                metrics_values,
                optimizer_values,
                x,
                y,
                sample_weight,
            )
        gradient_function = jax.value_and_grad(self._loss_and_weight, has_aux=True)
        (_, aux), gradients = gradient_function(
            trainable,
            non_trainable,
            metrics_values,
            optimizer_values,
            x,
            y,
            sample_weight,
        )
        return aux, gradients

    def _fold_in(
        self,
        non_trainable: list[Any],
        places: list[int],
        gradients: list[Any],
        weight: Any,
        scale: Any,
    ) -> list[Any]:
        """The non-trainable values with one micro-batch's gradients added to
        the window's sums (and noise totals); its step is counted by the
        caller (`_count_and_apply`)."""
        values = [non_trainable[place] for place in places]
        count = len(self._accumulation.gradient_sums)
        sums, (samples, steps), noise = (
            values[:count],
            values[count : count + 2],
            values[count + 4 :],
        )
        sums, samples, _ = window.add(
            sums,
            samples,
            steps,
            gradients,
            weight,
            gradient_scale=scale,
            summed=self._sums_window(),
        )
        if noise:
            sq_norm = window.squared_norm(gradients)
            if scale is not None:
                sq_norm = sq_norm / ops.square(ops.cast(scale, "float32"))
            noise[:2] = noise_scale.add_micro_batch(*noise[:2], sq_norm, weight)
        non_trainable = list(non_trainable)
        for place, value in zip(
            places[:count] + places[count + 4 :], [*sums, *noise], strict=True
        ):
            non_trainable[place] = value
        non_trainable[places[count]] = samples
        return non_trainable

    def _added_micro_batch(
        self,
        state: tuple,
        places: list[int],
        scale: Any,
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> tuple:
        """``(loss, y_pred, non_trainable, metrics, weight)`` with one
        micro-batch's gradients added to the window in ``non_trainable``."""
        trainable, non_trainable, optimizer_values, metrics_values = state
        aux, gradients = self._gradients(
            trainable,
            non_trainable,
            metrics_values,
            optimizer_values,
            places,
            x,
            y,
            sample_weight,
        )
        loss, y_pred, non_trainable, metrics_values, weight = aux
        non_trainable = self._fold_in(non_trainable, places, gradients, weight, scale)
        return loss, y_pred, non_trainable, metrics_values, weight

    def train_step(self, state: tuple, data: Any) -> tuple[dict, tuple]:
        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if batch_size(x) == 0:
            return self._empty_step(state)
        places = self._window_places()
        scale = self._stateless_loss_scale(optimizer_values)
        devices = self._accumulation.devices
        size = self._slice_size(batch_size(x), devices, "devices")
        if size is not None:
            return self._sliced_step(state, places, scale, size, x, y, sample_weight)
        unscaled_loss, y_pred, non_trainable, metrics_values, weight = (
            self._added_micro_batch(state, places, scale, x, y, sample_weight)
        )
        trainable, non_trainable, optimizer_values = self._count_and_apply(
            trainable,
            non_trainable,
            optimizer_values,
            places,
            ops.any(window.counts(ops.cast(weight, "float32"))),
            scale,
        )
        # Keras's metric update for its JAX step (keras 3.10 to 3.15).
        logs, metrics_values = self._update_metrics_variables(
            metrics_values, unscaled_loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)

    def _sliced_step(
        self,
        state: tuple,
        places: list[int],
        scale: Any,
        size: int,
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> tuple[dict, tuple]:
        """The batch in slices of ``size`` per device (`accumulate.micro_batches`).

        A `jax.lax.fori_loop` over the full slices, each a
        `jax.lax.dynamic_slice_in_dim` of the batch (of each device's rows,
        where they lie, under a data-parallel distribution), then the ragged
        rest: its shape differs, so it is traced once more, after the loop.
        """
        trainable, non_trainable, optimizer_values, metrics_values = state
        devices = self._accumulation.devices
        data = (x, y, sample_weight)
        full, rest = micro_batches.slice_plan(batch_size(x) // devices, size)
        summed = self._sums_window()

        def fold(part: tuple, carry: tuple) -> tuple:
            non_trainable, metrics_values, totals, _ = carry
            x, y, sample_weight = part
            loss, y_pred, non_trainable, metrics_values, weight = (
                self._added_micro_batch(
                    (trainable, non_trainable, optimizer_values, metrics_values),
                    places,
                    scale,
                    x,
                    y,
                    sample_weight,
                )
            )
            metrics_values = self._metrics_updated(
                metrics_values,
                lambda: self.compute_metrics(x, y, y_pred, sample_weight),
            )
            loss = ops.cast(loss, "float32")
            totals = micro_batches.add_loss(totals, loss, weight, summed)
            return non_trainable, metrics_values, totals, loss

        def full_slice(index: Any, carry: tuple) -> tuple:
            part = jax.tree_util.tree_map(
                lambda tensor: _rows(tensor, index * size, size, devices), data
            )
            return fold(part, carry)

        carry = (
            list(non_trainable),
            list(metrics_values),
            micro_batches.loss_totals(),
            ops.zeros((), "float32"),
        )
        if full:
            carry = jax.lax.fori_loop(0, full, full_slice, carry)
        if rest:
            part = jax.tree_util.tree_map(
                lambda tensor: _rows(tensor, full * size, rest, devices), data
            )
            carry = fold(part, carry)
        non_trainable, metrics_values, totals, last_loss = carry
        trainable, non_trainable, optimizer_values = self._count_and_apply(
            trainable, non_trainable, optimizer_values, places, totals[2], scale
        )
        loss = micro_batches.batch_loss(totals, last_loss, summed)

        def log() -> dict:
            self._loss_tracker.update_state(loss, sample_weight=batch_size(x))
            return self.get_metrics_result()

        logs = {}
        metrics_values = self._metrics_updated(metrics_values, log, logs)
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)

    def _metrics_updated(
        self, metrics_values: list[Any], update: Any, logs: dict | None = None
    ) -> list[Any]:
        """The metrics' values after ``update()`` ran on them statelessly;
        what it returns goes into ``logs``."""
        mapping = list(zip(self.metrics_variables, metrics_values, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            result = update()
        if logs is not None:
            logs.update(result)
        new_values = []
        for variable, old in zip(self.metrics_variables, metrics_values, strict=True):
            value = scope.get_current_value(variable)
            new_values.append(old if value is None else value)
        return new_values

    def _count_and_apply(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        optimizer_values: list[Any],
        places: list[int],
        counted: Any,
        scale: Any,
    ) -> tuple[list[Any], list[Any], list[Any]]:
        """Counts the step (the batch drawn; a window step if ``counted``)
        and applies the window when that completes it."""
        values = [non_trainable[place] for place in places]
        count = len(self._accumulation.gradient_sums)
        sums, (samples, steps, this_epoch, size), noise = (
            values[:count],
            values[count : count + 4],
            values[count + 4 :],
        )
        this_epoch = this_epoch + 1
        steps = steps + ops.cast(counted, steps.dtype)

        def apply_window(operands: tuple) -> tuple:
            trainable, optimizer_values, sums, samples, steps, noise = operands
            mean = window.mean(
                self._accumulation.summed(sums),
                self._window_divisor(samples),
                self._accumulation.variable_dtypes,
            )
            if noise:
                noise = [
                    ops.zeros_like(noise[0]),
                    ops.zeros_like(noise[1]),
                    *noise_scale.end_window(
                        tuple(noise[2:]),
                        noise[0],
                        noise[1],
                        window.squared_norm(mean),
                        samples,
                    ),
                ]
            trainable, optimizer_values = self.optimizer.stateless_apply(
                optimizer_values, window.scaled(mean, scale), trainable
            )
            empty = [ops.zeros_like(gradient_sum) for gradient_sum in sums]
            return (
                trainable,
                optimizer_values,
                empty,
                ops.zeros_like(samples),
                ops.zeros_like(steps),
                noise,
            )

        def keep_window(operands: tuple) -> tuple:
            return operands

        trainable, optimizer_values, sums, samples, steps, noise = jax.lax.cond(
            window.is_complete(steps, size),
            apply_window,
            keep_window,
            (list(trainable), list(optimizer_values), sums, samples, steps, noise),
        )
        non_trainable = list(non_trainable)
        new_values = [*sums, samples, steps, this_epoch, size, *noise]
        for place, value in zip(places, new_values, strict=True):
            non_trainable[place] = value
        return trainable, non_trainable, optimizer_values

    def _empty_step(self, state: tuple) -> tuple[dict, tuple]:
        """A micro-batch of 0 samples: counted as drawn, nothing else moves.

        Its loss has no gradient (JAX refuses a 0-sample loss), and it would
        add nothing to the window anyway. The batch size is static under
        `jax.jit`, so this is a separate trace, not a branch.
        """
        trainable, non_trainable, optimizer_values, metrics_values = state
        position = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        place = position[id(self._accumulation.micro_batches_this_epoch)]
        non_trainable = list(non_trainable)
        non_trainable[place] = non_trainable[place] + 1
        mapping = list(zip(self.metrics_variables, metrics_values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            logs = self.get_metrics_result()
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)

    def _optimizer_apply(self, gradients: list[Any], variables: list[Any]) -> None:
        # Outside the jitted step, as Keras's JAX trainer applies inside it:
        # statelessly. LossScaleOptimizer's stateful apply assigns inside a
        # jax.lax.cond on JAX and leaks tracers (mixed_float16). Jitted, with
        # the old values donated: run eagerly, each of the optimizer's ops
        # allocates a copy of every variable, and the epoch-end apply of an
        # 8.4M-parameter GPT-2 (Adam) peaked 320 MB above a window applied
        # in the step (benchmarks/memory.py).
        optimizer = self.optimizer
        if self._apply_function is None:
            self._apply_function = jax.jit(
                optimizer.stateless_apply, donate_argnums=(0, 2)
            )
        new_values, optimizer_values = self._apply_function(
            [variable.value for variable in optimizer.variables],
            gradients,
            [variable.value for variable in variables],
        )
        for variable, value in zip(variables, new_values, strict=True):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
            variable.assign(value)
