"""`AccumulatingModel`: a `keras.Model` whose `fit` accumulates gradients exactly."""

from __future__ import annotations

import importlib
import inspect
import json
import numbers
import sys
from typing import Any

import keras
import numpy as np
from keras import ops
from keras.src.models.functional import Functional

from accumulate import micro_batches, reduction, window
from accumulate.fit_callback import with_epoch_boundaries
from accumulate.options import check_keywords
from accumulate.schedule import EPOCH, AccumulationSchedule

_STATE_KEY = "accumulation_state_"
_NOISE_STATE_KEY = "noise_scale_state_"
# Where the schedule stands: the schedule as JSON bytes, and the epoch with
# the window size in effect (0 for "epoch"). Python values, saved beside the
# variables so that a callback's set_accumulation_steps survives a backup.
_SCHEDULE_KEY = "accumulation_schedule_"
_POSITION_KEY = "accumulation_position_"
_SAVED_PREFIXES = (_STATE_KEY, _NOISE_STATE_KEY, _SCHEDULE_KEY, _POSITION_KEY)
# Frames between Keras's cloning function and our constructor: type.__call__
# adds none, a subclass's own __init__ one each.
_CLONE_FRAME_SEARCH_DEPTH = 6

# One module of glue per backend, as Keras splits its trainers: chosen once,
# when this module is imported, by the backend Keras runs on.
_BACKEND_MODULES = {
    "tensorflow": "accumulate.backends.tensorflow",
    "jax": "accumulate.backends.jax",
    "torch": "accumulate.backends.torch",
}


def _backend_module() -> Any:
    name = keras.backend.backend()
    if name not in _BACKEND_MODULES:
        raise NotImplementedError(
            f"AccumulatingModel runs on the {sorted(_BACKEND_MODULES)} Keras "
            f"backends; KERAS_BACKEND is {name!r}."
        )
    return importlib.import_module(_BACKEND_MODULES[name])


_backend = _backend_module()


def _is_functional_call(args: tuple, kwargs: dict) -> bool:
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


class AccumulatingModel(_backend.Accumulation, keras.Model):
    """A `keras.Model` that applies one exact update per window of micro-batches.

    Every batch that `fit` (or `train_on_batch`) feeds the model is a
    micro-batch: its gradient is added, weighted by what its loss divides by
    (its number of samples under Keras's default reduction; see
    `micro_batch_weight`), into accumulators that live inside the compiled
    train function, and the optimizer is applied to their weighted mean once
    the window is complete. The applied gradient is the gradient of the loss
    over every sample of the window, as if they had been one batch: ragged
    batches, sample weights, masks, every loss reduction and regularisation
    losses (``model.losses``) included. An existing model of any class
    accumulates as it is with `accumulate.enable_accumulation`.

    Args:
        accumulation_steps: a positive int N, to apply every N micro-batches,
            or ``"epoch"``, to apply once per epoch from every batch of the
            epoch (full-batch gradient descent through `fit`, whether the
            dataset's length is known or not). ``1`` is a standard step. Or
            a schedule ``{first_epoch: N_or_"epoch"}`` (see `schedule`); a
            callback can change it with `set_accumulation_steps`. A change
            takes effect when an epoch begins, never inside a window.
        flush_at_epoch_end: when a window is incomplete at the end of an epoch,
            apply it then, weighted by the samples it holds (the default), or
            carry it into the next epoch (``False``; not allowed with
            ``"epoch"``). With ``False``, a partial window left when `fit`
            returns stays in the accumulators: the next `fit` or
            `train_on_batch` continues it, `apply_accumulated_gradients()`
            applies it now, and `reset_accumulated_gradients()` drops it.
        measure_noise_scale: log the gradient noise scale of McCandlish et
            al. (2018) in `fit`'s epoch logs and history:
            ``gradient_sq_norm`` (|G|²), ``gradient_variance`` (tr Σ, one
            sample) and ``gradient_noise_scale`` (their ratio, B_simple, in
            samples; in the unit of `micro_batch_weight` under other loss
            reductions: tokens, or sample weight), estimated from each
            window's micro-batches (see `noise_scale` for the estimator and
            its assumptions). Needs windows of at least 2 micro-batches.
        accumulation_dtype: the dtype of the gradient sums. ``"float32"``
            (the default; float64 for float64 variables) keeps every
            micro-batch's gradient, even under a ``"bfloat16"`` dtype
            policy, where a bfloat16 sum (8 bits of mantissa, as Keras's
            built-in accumulation keeps it there) loses the small ones; it
            costs 4 bytes per trainable parameter. ``"bfloat16"`` halves that
            where you ask, at that precision.
        micro_batch_size: split every batch `fit` feeds the model into
            slices of this many samples (the last one ragged) inside the
            compiled step, and add their gradients before the update: ask
            `fit` for the batch you want (``batch_size=512``) in the memory
            of a slice (``micro_batch_size=64``). One `fit` step is then one
            update, so callbacks, the progress bar, schedules and
            ``BackupAndRestore`` count updates; the logged loss is the
            batch's. Global, as ``batch_size`` is: under ``tf.distribute``
            or a JAX `keras.distribution` each replica slices its share.
            With ``accumulation_steps=N`` a window is N batches, each split.
            ``"auto"``: `fit` finds the largest slice that fits on the
            accelerator before training (from the batch size down, halving
            on out-of-memory), and logs it. ``None`` (the default): batches
            are not split. See `accumulate.micro_batches`.
        *args, **kwargs: as for `keras.Model` (functional ``inputs, outputs``
            or nothing when subclassing). A keyword Keras would silently drop,
            or a near-miss of one of the options above, raises `ValueError`.

    Micro-batches of weight 0 (no samples, or only padding under a Keras
    mask) count for nothing: they add nothing, are not one of the window's N,
    and never trigger an update; a window is never applied empty.

    What counts once per update: everything the optimizer does. Clipping
    (``clipnorm``, ``global_clipnorm``), weight decay, EMA, Adam's bias
    correction and learning-rate schedules see the accumulated gradient, and
    ``optimizer.iterations`` counts applied updates, not micro-batches. The
    loss and metrics that `fit` shows are per micro-batch, averaged over the
    epoch, exactly as in plain Keras.

    Layers that behave differently in training do so per micro-batch:
    ``BatchNormalization`` normalises each micro-batch with its own statistics
    and updates its moving averages once per micro-batch; ``Dropout`` draws a
    fresh mask for each micro-batch. The result is exact with respect to the
    per-micro-batch forward passes, which is what a big batch split in memory
    would do too, except that batch statistics come from the micro-batch.

    The accumulators are not weights (``model.weights`` and `get_weights` do
    not contain them, so a standard twin can `set_weights` from this model),
    but they are saved and restored with the model's state (``.keras`` files,
    ``save_weights``, `keras.callbacks.BackupAndRestore`,
    ``tf.train.Checkpoint``), so a run restored mid-window continues exactly.
    So are the schedule (as a callback last set it) and the epoch it is at,
    except in a ``tf.train.Checkpoint``, which holds variables only.

    Example:
        >>> import keras, numpy as np
        >>> inputs = keras.Input((4,))
        >>> model = AccumulatingModel(inputs, keras.layers.Dense(1)(inputs),
        ...                           accumulation_steps=4)
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.ones((64, 4)), np.zeros((64, 1))
        >>> history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        >>> int(model.optimizer.iterations)  # 8 micro-batches, 2 updates
        2
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("_enabled_from") and _foreign_models(cls):
            raise TypeError(_combined_class_message(cls))

    def __new__(cls, *args: Any, **kwargs: Any):
        if _is_functional_call(args, kwargs):
            if cls is not AccumulatingModel and not issubclass(
                cls, AccumulatingFunctional
            ):
                # Keras would make the class (and so AccumulatingModel itself)
                # inherit from Functional, breaking every subclass after it.
                raise TypeError(
                    f"{cls.__name__} subclasses AccumulatingModel and was given "
                    "inputs and outputs; subclasses define call() instead. To "
                    "wrap a graph of layers use AccumulatingModel(inputs, "
                    "outputs, ...)."
                )
            if cls is AccumulatingModel:
                cls = AccumulatingFunctional
        return super().__new__(cls, *args, **kwargs)

    def __init__(
        self,
        *args: Any,
        accumulation_steps: int | str | dict[int, int | str] = 1,
        flush_at_epoch_end: bool = True,
        measure_noise_scale: bool = False,
        accumulation_dtype: str = "float32",
        micro_batch_size: int | str | None = None,
        **kwargs: Any,
    ):
        check_keywords(kwargs, functional=_is_functional_call(args, kwargs))
        super().__init__(*args, **kwargs)
        self._init_accumulation(
            accumulation_steps,
            flush_at_epoch_end,
            measure_noise_scale,
            accumulation_dtype,
            micro_batch_size,
        )

    def _init_accumulation(
        self,
        accumulation_steps: Any,
        flush_at_epoch_end: bool,
        measure_noise_scale: bool,
        accumulation_dtype: str = "float32",
        micro_batch_size: int | str | None = None,
    ) -> None:
        """The accumulation options and empty state of a new (or enabled) model."""
        self._micro_batch_size = micro_batches.check_micro_batch_size(micro_batch_size)
        # What "auto" found (fit searches once per model).
        self._found_micro_batch_size: int | None = None
        if accumulation_dtype not in window.ACCUMULATION_DTYPES:
            raise ValueError(
                "`accumulation_dtype` must be one of "
                f"{', '.join(map(repr, window.ACCUMULATION_DTYPES))}; received "
                f"accumulation_dtype={accumulation_dtype!r}. float32 (the "
                "default) keeps small micro-batch gradients under any dtype "
                "policy; bfloat16 halves the accumulators' memory."
            )
        self._accumulation_dtype = accumulation_dtype
        # The backend's window state (and noise-scale meter), made when the
        # model's variables exist.
        self._accumulation: Any = None
        self._noise_scale: Any = None
        self._accumulated_variable_ids: list[int] = []
        self._apply_function = None
        self._epoch = 0
        self._fitting = False
        self._configure_accumulation(
            accumulation_steps, flush_at_epoch_end, measure_noise_scale
        )

    def _configure_accumulation(
        self,
        accumulation_steps: Any,
        flush_at_epoch_end: bool,
        measure_noise_scale: bool = False,
    ) -> None:
        schedule = AccumulationSchedule(accumulation_steps)
        for name, value in (
            ("flush_at_epoch_end", flush_at_epoch_end),
            ("measure_noise_scale", measure_noise_scale),
        ):
            if not isinstance(value, bool):
                raise ValueError(
                    f"`{name}` must be True or False; received {name}={value!r}."
                )
        if EPOCH in schedule.values and not flush_at_epoch_end:
            raise ValueError(
                'accumulation_steps="epoch" applies at the end of every epoch, '
                "so it needs flush_at_epoch_end=True; received "
                f"accumulation_steps={schedule.config!r}, flush_at_epoch_end=False."
            )
        if (
            measure_noise_scale
            and 1 in schedule.values
            and self._micro_batch_size is None
        ):
            raise ValueError(
                "measure_noise_scale=True compares each micro-batch's gradient "
                "with its window's, so every window needs at least 2 "
                f"micro-batches; received accumulation_steps={schedule.config!r}"
                ", which updates after every micro-batch in some epochs. Use "
                'accumulation_steps >= 2 (or "epoch") throughout, or split '
                "each batch with micro_batch_size (its slices are the "
                "window's micro-batches)."
            )
        self._schedule = schedule
        self._flush_at_epoch_end = flush_at_epoch_end
        self._measure_noise_scale = measure_noise_scale
        if not self._fitting:
            self._window_size = schedule.at_epoch(self._epoch)
            self._write_window_size()

    @property
    def accumulation_steps(self) -> int | str | dict[int, int | str]:
        """As configured: an int N, ``"epoch"``, or a schedule by epoch."""
        return self._schedule.config

    @property
    def current_accumulation_steps(self) -> int | str:
        """The window size in effect now: an int N or ``"epoch"``."""
        return self._window_size

    @property
    def accumulation_dtype(self) -> str:
        """The gradient sums' dtype: ``"float32"`` or ``"bfloat16"``."""
        return self._accumulation_dtype

    @property
    def micro_batch_size(self) -> int | str | None:
        """As configured: the slice size, ``"auto"`` or ``None`` (no slicing)."""
        return self._micro_batch_size

    def _slice_size(self, batch: int | None, parts: int, what: str) -> int | None:
        """Each replica's slice of a batch in the step, ``None``: not split.

        ``batch`` is the replica's share when known when tracing (``None``
        when dynamic); a batch no bigger than a slice is not split.
        """
        size = self._micro_batch_size
        if size == micro_batches.AUTO:
            size = self._found_micro_batch_size
            if size is None:
                raise ValueError(
                    'micro_batch_size="auto" is chosen by fit(), which tries '
                    "slices of its first batch on the accelerator; this step "
                    "ran before any fit. Call fit() first, or give "
                    "micro_batch_size an int."
                )
        if size is None:
            return None
        size = micro_batches.share(size, parts, what)
        if batch is not None and batch <= size:
            return None
        return size

    @property
    def measure_noise_scale(self) -> bool:
        """Whether `fit` logs the gradient noise scale (see `noise_scale`)."""
        return self._measure_noise_scale

    def set_accumulation_steps(self, accumulation_steps: Any) -> None:
        """Changes the window size (or schedule) from the next epoch on.

        Meant for callbacks: called during `fit`, the change takes effect
        when the next epoch begins, never inside a window that the current
        epoch is filling. Outside `fit` it takes effect at once. The value is
        validated like the constructor's and saved with the model.

        Example:
            >>> import keras
            >>> class Grow(keras.callbacks.Callback):
            ...     def on_epoch_end(self, epoch, logs=None):
            ...         self.model.set_accumulation_steps(2 ** (epoch + 1))
        """
        self._configure_accumulation(
            accumulation_steps, self._flush_at_epoch_end, self._measure_noise_scale
        )

    def _begin_epoch(self, epoch: int, resuming: bool = False) -> None:
        """Puts the schedule's window size for ``epoch`` into effect.

        ``resuming``: the epoch was begun before and restored mid-way, so the
        noise meter keeps the sums it was restored with.
        """
        self._epoch = epoch
        self._window_size = self._schedule.at_epoch(epoch)
        self._write_window_size()
        if self._noise_scale is not None and not resuming:
            self._noise_scale.start_epoch()

    @property
    def samples_accumulated(self) -> float:
        """The current, not yet applied window's weight (all replicas).

        Its number of samples under Keras's default reduction; what its loss
        divides by under others (tokens, the sum of sample weights: see
        `micro_batch_weight`).
        """
        if self._accumulation is None:
            return 0
        return self._window_counts()[0]

    def _build_accumulation_state(self) -> None:
        """Creates the window (and meter) for the trainable variables in use.

        Called before training traces its step and when saved state is
        loaded; a no-op while the variables are those the state is for.
        """
        with self._state_scope():
            # Checked first: a refusal must leave an unbuilt optimizer
            # unbuilt, for apply_accumulated_gradients to build it for the
            # window's variables.
            needs_building = self._state_needs_building()
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)
            if not needs_building:
                return
            if self._accumulation is not None:
                # The traced functions captured (or index) the old state.
                self.train_function = None
                self._apply_function = None
            self._accumulation, self._noise_scale = self._new_state(
                self.trainable_variables
            )
        self._accumulated_variable_ids = [id(v) for v in self.trainable_variables]

    def _state_needs_building(self) -> bool:
        """Whether the state must be (re)built for the trainable variables now.

        Raises while a window is open for other variables: its sums belong to
        them (both remedies the message names work).
        """
        if self._accumulation is None:
            return True
        current = [id(variable) for variable in self.trainable_variables]
        if current == self._accumulated_variable_ids:
            return False
        if self.steps_accumulated:
            raise ValueError(
                "The model's trainable variables changed while "
                f"{self.steps_accumulated} micro-batches were "
                "accumulated for the previous ones. Apply them to the "
                "variables they were accumulated for "
                "(model.apply_accumulated_gradients()) or discard them "
                "(model.reset_accumulated_gradients()), then train on."
                + _backend.AFTER_TRAINABLE_CHANGED
            )
        return True

    @property
    def steps_accumulated(self) -> int:
        """Micro-batches in the current, not yet applied window."""
        if self._accumulation is None:
            return 0
        return self._window_counts()[1]

    def apply_accumulated_gradients(self) -> None:
        """Applies the current window now, if it holds any micro-batch.

        `fit` calls this at the end of each epoch unless
        ``flush_at_epoch_end=False``; call it yourself after `train_on_batch`
        in ``"epoch"`` mode, or to apply a carried-over partial window. The
        window is applied with the optimizer the model has now (after a
        `compile`, the new one) to the variables it was accumulated for,
        even if ``trainable`` changed since.
        """
        if self._accumulation is not None:
            self._apply_open_window()

    def reset_accumulated_gradients(self) -> None:
        """Discards the current window without applying it."""
        if self._accumulation is not None:
            self._reset_open_window()

    def _loss_scale(self) -> Any:
        """What ``optimizer.scale_loss`` multiplies the loss by, ``None`` for 1."""
        scale = self.optimizer.scale_loss(1.0)
        if isinstance(scale, numbers.Number) and scale == 1.0:
            return None
        return scale

    def _window_size_value(self) -> int:
        return 0 if self._window_size == EPOCH else self._window_size

    @property
    def flush_at_epoch_end(self) -> bool:
        """Whether an incomplete window is applied when an epoch ends."""
        return self._flush_at_epoch_end

    def micro_batch_weight(
        self, x: Any, y: Any, y_pred: Any, sample_weight: Any
    ) -> Any:
        """The weight of one micro-batch in its window: its loss's denominator.

        The window's gradient is the micro-batches' gradients weighted by
        this and divided by its sum, which is the big batch's gradient when
        the weight is what the micro-batch's loss divides by. The default
        reads it from the compiled loss's ``reduction`` (see `reduction`):

        * ``"sum_over_batch_size"`` (Keras's default) and ``"mean"``: the
          number of loss elements (samples, or tokens for a per-token loss),
          or of unmasked entries when the output carries a Keras mask
          (``Embedding(mask_zero=True)``, ``Masking``);
        * ``"mean_with_sample_weight"``: the sum of the sample weights (times
          the mask), or the number of elements without sample weights;
        * ``"sum"``: the window's gradient is the sum of its micro-batches',
          not divided; the weight (the number of samples) only says whether
          the micro-batch holds anything.

        ``reduction=None`` raises `ValueError`, as do outputs whose losses
        divide by counts that no single weight follows (mixed reductions, a
        masked and an unmasked output, masked outputs with different counts,
        checked when the step runs). A loss Keras does not compile (an
        overridden ``compute_loss``, ``add_loss``) is taken to divide by the
        number of samples. Override this method to return what your loss
        divides by: a scalar per micro-batch; 0 (or NaN) makes the
        micro-batch count for nothing (under ``"sum"``, any other value only
        says that it counts).
        """
        del y
        return reduction.window_weight(self, x, y_pred, sample_weight, _backend)

    def _sums_window(self) -> bool:
        """Whether the loss is a sum, so the window adds gradients undivided."""
        return reduction.sums_window(self)

    def _window_divisor(self, samples: Any) -> Any:
        """What the window's weighted sums are divided by when applied."""
        return ops.ones_like(samples) if self._sums_window() else samples

    # -- Keras integration -------------------------------------------------------

    def compile(self, *args: Any, **kwargs: Any) -> None:
        # Checked before and after the class's own compile: before for an
        # optimizer given as an object, after for one a task's compile
        # chose (optimizer="auto"), since compiling never trains.
        given = args[0] if args else kwargs.get("optimizer")
        if isinstance(given, keras.optimizers.Optimizer):
            _refuse_keras_accumulation(given)
        super().compile(*args, **kwargs)
        _refuse_keras_accumulation(self.optimizer)
        # A pending window is kept and applied by the new optimizer: its sums
        # are plain (unscaled) gradients at the current weights, so they mean
        # the same thing to any optimizer. Only the traced function that
        # captured the old optimizer goes.
        self._apply_function = None

    def make_train_function(self, force: bool = False):
        if self.built:
            self._build_accumulation_state()
        return super().make_train_function(force)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras skips compiling on load when `compile` is overridden; ours
        # only validates, so restore the compiled state as Keras would.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args: Any, callbacks: Any = None, **kwargs: Any):
        # Refused before Keras builds anything (the optimizer, on JAX) while
        # a window is open for other variables than the trainable ones.
        self._state_needs_building()
        if (
            self._micro_batch_size == micro_batches.AUTO
            and self._found_micro_batch_size is None
        ):
            self._find_micro_batch_size(args, kwargs)
        # While fitting, set_accumulation_steps waits for the next epoch.
        self._fitting = True
        try:
            return super().fit(
                *args, callbacks=with_epoch_boundaries(callbacks, self), **kwargs
            )
        finally:
            self._fitting = False

    def _find_micro_batch_size(self, args: tuple, kwargs: dict) -> None:
        """``micro_batch_size="auto"``: `micro_batches.search` on the batch
        this `fit` call trains on first."""
        arguments = inspect.signature(super().fit).bind_partial(*args, **kwargs)
        self._found_micro_batch_size = micro_batches.search(
            self, arguments.arguments, _backend
        )

    def _probed_state(self) -> list[Any]:
        """What a trial step changes on a stateful backend (moving statistics,
        seed generators, loss trackers), not the window, which it leaves
        alone (`micro_batches.search`)."""
        window_ids = {id(variable) for variable in self._state_variables()}
        return [
            variable
            for variable in [*self.non_trainable_variables, *self.metrics_variables]
            if id(variable) not in window_ids
        ]

    def train_on_batch(self, *args: Any, **kwargs: Any):
        self._state_needs_building()  # as in fit
        return super().train_on_batch(*args, **kwargs)

    # -- Serialisation -------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["accumulation_steps"] = self.accumulation_steps
        config["flush_at_epoch_end"] = self._flush_at_epoch_end
        config["measure_noise_scale"] = self._measure_noise_scale
        config["accumulation_dtype"] = self._accumulation_dtype
        config["micro_batch_size"] = self._micro_batch_size
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None):
        config = dict(config)
        options = {
            "accumulation_steps": config.pop("accumulation_steps", 1),
            "flush_at_epoch_end": config.pop("flush_at_epoch_end", True),
            "measure_noise_scale": config.pop("measure_noise_scale", False),
        }
        accumulation_dtype = config.pop("accumulation_dtype", "float32")
        micro_batch_size = config.pop("micro_batch_size", None)
        # KerasHub's Task.from_config takes the config only.
        extra = {} if custom_objects is None else {"custom_objects": custom_objects}
        model = super().from_config(config, **extra)
        # No state exists yet: it is made, in its dtype, when weights load.
        model._init_accumulation(
            **options,
            accumulation_dtype=accumulation_dtype,
            micro_batch_size=micro_batch_size,
        )
        return model

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        for prefix, variables in self._state_to_save().items():
            for index, variable in enumerate(variables):
                store[f"{prefix}{index}"] = self._saved_value(variable)
        schedule = json.dumps(self._schedule.config).encode()
        store[_SCHEDULE_KEY] = np.frombuffer(schedule, np.uint8)
        store[_POSITION_KEY] = np.array(
            [self._epoch, self._window_size_value()], np.int64
        )

    def load_own_variables(self, store: Any) -> None:
        keys = list(store.keys())
        super().load_own_variables(
            {key: store[key] for key in keys if not key.startswith(_SAVED_PREFIXES)}
        )
        if _SCHEDULE_KEY in keys:
            self._restore_schedule(store[_SCHEDULE_KEY], store[_POSITION_KEY])
        if not any(key.startswith(_STATE_KEY) for key in keys):
            return
        self._build_accumulation_state()
        for prefix, variables in self._state_to_save().items():
            saved_keys = [key for key in keys if key.startswith(prefix)]
            if prefix == _NOISE_STATE_KEY and not saved_keys:
                continue  # saved without measuring: start measuring afresh
            if len(saved_keys) != len(variables):
                raise ValueError(
                    f"The saved accumulation state has {len(saved_keys)} "
                    f"variables under {prefix!r} but this model has "
                    f"{len(variables)}; was it saved from a model with other "
                    "trainable variables?"
                )
            for index, variable in enumerate(variables):
                # np.asarray: keras 3.10's H5 store hands back h5py datasets.
                self._assign_saved(variable, np.asarray(store[f"{prefix}{index}"]))

    def _restore_schedule(self, schedule: Any, position: Any) -> None:
        """The saved schedule, epoch and window size put back into effect."""
        # np.asarray: keras 3.10's H5 store hands back h5py datasets.
        config = json.loads(np.asarray(schedule, np.uint8).tobytes().decode())
        epoch, window_size = (int(value) for value in np.asarray(position))
        # Validated against this model's options, as set_accumulation_steps is.
        self._configure_accumulation(
            config, self._flush_at_epoch_end, self._measure_noise_scale
        )
        self._epoch = epoch
        self._window_size = EPOCH if window_size == 0 else window_size
        self._write_window_size()

    def _state_to_save(self) -> dict[str, list[Any]]:
        state = {}
        if self._accumulation is not None:
            state[_STATE_KEY] = self._accumulation.variables_to_save
        if self._noise_scale is not None:
            state[_NOISE_STATE_KEY] = self._noise_scale.variables_to_save
        return state


def _refuse_keras_accumulation(optimizer: Any) -> None:
    inner_optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    keras_steps = getattr(inner_optimizer, "gradient_accumulation_steps", None)
    if keras_steps:
        raise ValueError(
            "The optimizer has Keras's own gradient accumulation enabled "
            f"(gradient_accumulation_steps={keras_steps}); AccumulatingModel "
            "already accumulates, so the gradients would be accumulated "
            "twice. Create the optimizer with gradient_accumulation_steps="
            "None and set AccumulatingModel(accumulation_steps=...) instead."
        )


def _foreign_models(cls: type) -> list[type]:
    """The Keras model classes ``cls`` inherits from besides our own."""
    return [
        base
        for base in cls.__mro__
        if issubclass(base, keras.Model)
        and not issubclass(base, AccumulatingModel)
        and base not in (keras.Model, Functional)
    ]


def _combined_class_message(cls: type) -> str:
    other = _foreign_models(cls)[0].__name__
    return (
        f"class {cls.__name__} combines AccumulatingModel with another Keras "
        f"model class, {other}. In either order this is refused: a model "
        "class that builds itself from inputs and outputs (every KerasHub "
        "task) makes Keras rewrite the base classes of every class above it "
        "for the whole process, AccumulatingModel's included, and one that "
        "overrides train_step would silently replace accumulation. Build the "
        f"model as it is and make it accumulate instead: model = "
        f"accumulate.enable_accumulation({other}(...), accumulation_steps=N)."
    )


@keras.saving.register_keras_serializable(
    package="accumulate", name="AccumulatingModel"
)
class AccumulatingFunctional(AccumulatingModel, Functional):
    """`AccumulatingModel(inputs, outputs)`: a functional graph that accumulates.

    A class of its own so that Keras never rewrites `AccumulatingModel`'s bases
    (it injects `Functional` into a subclass built from inputs and outputs).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        original = _model_being_cloned()
        if original is not None:
            kwargs.setdefault("accumulation_steps", original.accumulation_steps)
            kwargs.setdefault("flush_at_epoch_end", original.flush_at_epoch_end)
            kwargs.setdefault("measure_noise_scale", original.measure_noise_scale)
            kwargs.setdefault("accumulation_dtype", original.accumulation_dtype)
            kwargs.setdefault("micro_batch_size", original.micro_batch_size)
        super().__init__(*args, **kwargs)


def _model_being_cloned() -> AccumulatingModel | None:
    """The model `keras.models.clone_model` is cloning, when it constructs one.

    Keras clones a functional model with ``model.__class__(inputs, outputs,
    name=model.name)``, which drops every other constructor argument, so the
    options are read from the original: the ``model`` of Keras's
    ``_clone_functional_model`` frame (keras 3.10 to 3.15), a few frames up.
    """
    frame = sys._getframe(1)
    for _ in range(_CLONE_FRAME_SEARCH_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == "_clone_functional_model":
            original = frame.f_locals.get("model")
            return original if isinstance(original, AccumulatingModel) else None
        frame = frame.f_back
    return None
