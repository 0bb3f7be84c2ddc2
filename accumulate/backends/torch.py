"""PyTorch glue: the accumulating train step as Keras's stateful torch step.

Keras's torch trainer runs ``train_step(data)`` eagerly: backward fills each
variable's ``.grad``, and the window (`accumulate.backends.variables`) is
updated in place with `accumulate.window.add`'s arithmetic (``add_``).
Whether a micro-batch counts and whether the window is complete are plain
Python ``if``s on host reads of the counters, as every eager torch step
already reads its loss; at N=1 with no window open the gradients go straight
to ``optimizer.apply``, as in Keras's step.
"""

from __future__ import annotations

from typing import Any

import keras
import torch

from accumulate import micro_batches
from accumulate.backends.variables import VariableAccumulation

# What the trainable-variables-changed error adds on this backend.
AFTER_TRAINABLE_CHANGED = ""
# Whether `probe` changes the model's state (the caller restores it).
PROBE_CHANGES_STATE = True


def accelerator() -> str | None:
    """The accelerator PyTorch runs on, as Keras chooses it (``None``: CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    if torch.backends.mps.is_available():
        return "mps"
    return None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def probe(model: Any, x: Any, y: Any, sample_weight: Any) -> None:
    """One micro-batch's forward and backward pass; raises PyTorch's
    out-of-memory error if it does not fit."""
    try:
        model._gradients(x, y, sample_weight)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        model.zero_grad()


def batch_size(x: Any) -> int:
    """The micro-batch's number of samples."""
    first_input = next(t for t in keras.tree.flatten(x) if t is not None)
    return first_input.shape[0]


def assert_equal_counts(counts: list[Any], message: str, model: Any) -> None:
    """Fails the step when several outputs' counts differ."""
    del model
    if any(float(count) != float(counts[0]) for count in counts[1:]):
        raise ValueError(message)


def _counts(weight: float) -> bool:
    """`accumulate.window.counts`, on a host float."""
    return weight != 0.0 and weight == weight


class Accumulation(VariableAccumulation):
    """The PyTorch half of `AccumulatingModel` (mixed in before keras.Model)."""

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if batch_size(x) == 0:
            # No samples: nothing to add, and a 0-sample loss has no
            # gradient (backward refuses it). Counted as drawn, for resume.
            self._accumulation.micro_batches_this_epoch.value.add_(1)
            return self.get_metrics_result()
        size = self._slice_size(batch_size(x), 1, "devices")
        if size is not None:
            return self._sliced_step(x, y, sample_weight, size)
        loss, y_pred, weight, gradients, scale = self._gradients(x, y, sample_weight)
        self._loss_tracker.update_state(loss, sample_weight=batch_size(x))
        self._fold_in(gradients, weight, scale)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _gradients(self, x: Any, y: Any, sample_weight: Any) -> tuple:
        """``(loss, y_pred, weight, gradients, loss scale)`` of one micro-batch."""
        training = {"training": True} if self._call_has_training_arg else {}
        y_pred = self(x, **training)
        # Before the loss: a model whose outputs no single weight fits fails
        # with our explanation, not with whatever its loss raises first.
        weight = self.micro_batch_weight(x, y, y_pred, sample_weight)
        self.zero_grad()
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        scale = self._loss_scale()
        self.optimizer.scale_loss(loss).backward()
        # None for a variable the loss does not reach, as in Keras's step:
        # the optimizer then leaves it alone when the window is applied.
        state = self._accumulation
        gradients = [variable.value.grad for variable in state.accumulated_variables]
        state.connected = [gradient is not None for gradient in gradients]
        return loss.detach(), y_pred, weight, gradients, scale

    def _sliced_step(
        self, x: Any, y: Any, sample_weight: Any, size: int
    ) -> dict[str, Any]:
        """The batch in slices of ``size`` (`accumulate.micro_batches`): a
        Python loop, eager as Keras's torch step is; each slice is a view of
        the batch, not a copy."""
        summed = self._sums_window()
        totals = micro_batches.loss_totals()
        for start in range(0, batch_size(x), size):
            part = keras.tree.map_structure(
                lambda tensor, start=start: (
                    None if tensor is None else tensor[start : start + size]
                ),
                (x, y, sample_weight),
            )
            totals, loss = self._add_slice(part, totals, summed)
        self._count_batch(totals[2])
        loss = micro_batches.batch_loss(totals, loss, summed)
        self._loss_tracker.update_state(loss, sample_weight=batch_size(x))
        return self.get_metrics_result()

    def _add_slice(self, part: tuple, totals: tuple, summed: bool) -> tuple:
        """One slice added; returns the loss totals and its loss. A function
        of its own so that the slice's predictions (a language model's
        logits) are freed before the next slice's forward pass."""
        x, y, sample_weight = part
        loss, y_pred, weight, gradients, scale = self._gradients(x, y, sample_weight)
        self._fold_in(gradients, weight, scale, count_step=False)
        self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return micro_batches.add_loss(totals, loss, weight, summed), loss

    @torch.compiler.disable
    @torch.no_grad()
    def _fold_in(
        self, gradients: list[Any], weight: Any, scale: Any, count_step: bool = True
    ) -> None:
        """Adds one micro-batch; with ``count_step``, counts it as drawn and
        as a window step, and applies a complete window."""
        # Never compiled: the bookkeeping branches on host reads of the
        # counters, and under torch.compile (jit_compile=True) dynamo took
        # those reads for constants and made wrong updates (caught by
        # tests/test_conformance.py's jit_compile cases).
        weight = float(weight)
        if not count_step:
            self._add_micro_batch(gradients, weight, scale, count_step=False)
            return
        state = self._accumulation
        state.micro_batches_this_epoch.value.add_(1)
        window_size = int(state.window_size.value)
        if window_size == 1 and int(state.steps.value) == 0:
            # N=1 with nothing carried over: Keras's own update on the loss's
            # gradients as they are (the window is not touched), for a
            # micro-batch that counts.
            if _counts(weight):
                self._optimizer_apply(gradients, list(state.accumulated_variables))
            return
        self._add_micro_batch(gradients, weight, scale)
        if 0 < window_size <= int(state.steps.value):
            self._apply_open_window()

    @torch.compiler.disable
    @torch.no_grad()
    def _count_batch(self, counted: Any) -> None:
        """A sliced batch drawn: one window step if any slice counted, and the
        window applied when that completes it."""
        state = self._accumulation
        state.micro_batches_this_epoch.value.add_(1)
        state.steps.value.add_(int(bool(counted)))
        if 0 < int(state.window_size.value) <= int(state.steps.value):
            self._apply_open_window()

    def _add_micro_batch(
        self, gradients: list[Any], weight: float, scale: Any, count_step: bool = True
    ) -> None:
        # `accumulate.window.add`'s arithmetic, in place: one `add_` per
        # variable instead of the pure version's three temporaries and a copy
        # (measured in docs/performance.md, "On PyTorch").
        if not _counts(weight):
            return
        state = self._accumulation
        factor = 1.0 if self._sums_window() else weight
        factor = factor if scale is None else factor / float(scale)
        for gradient_sum, gradient in zip(state.gradient_sums, gradients, strict=True):
            if gradient is not None:
                total = gradient_sum.value
                total.add_(gradient.to(total.dtype), alpha=factor)
        state.samples.value.add_(weight)
        if count_step:
            state.steps.value.add_(1)
        meter = self._noise_scale
        if meter is not None:
            # One norm kernel per variable: `window.squared_norm`'s keras.ops
            # take five dispatches per variable, eager.
            norms = [
                torch.linalg.vector_norm(gradient, dtype=torch.float32)
                for gradient in gradients
                if gradient is not None
            ]
            sq_norm = float(torch.stack(norms).square().sum())
            if scale is not None:
                sq_norm = sq_norm / float(scale) ** 2
            meter.weighted_sq_norms.value.add_(weight * sq_norm)
            meter.micro_batches.value.add_(1.0)

    def _optimizer_apply(self, gradients: list[Any], variables: list[Any]) -> None:
        connected = getattr(self._accumulation, "connected", None)
        if connected is not None:
            gradients = [
                gradient if is_connected else None
                for gradient, is_connected in zip(gradients, connected, strict=True)
            ]
        with torch.no_grad():
            self.optimizer.apply(gradients, variables)
