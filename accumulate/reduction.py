"""What one micro-batch weighs in its window, read from the compiled loss.

Keras reduces each output's loss with the loss's ``reduction``. For the
micro-batches ``k`` of a window, with ``S_k`` the sum of their (sample- and
mask-weighted) per-element losses and ``R`` the regularisation, the window
as one big batch has the loss:

==========================  =============================  ====================
reduction                   big-batch loss                 ``D_k`` (the weight)
==========================  =============================  ====================
``sum_over_batch_size``,    ``Σ S_k / Σ D_k + R``          loss elements, or
``mean``                                                   unmasked entries
``mean_with_sample_weight``  ``Σ S_k / Σ D_k + R``          sum of sample weights
                                                           (times the mask)
``sum``                     ``Σ S_k + R``                  none: not divided
==========================  =============================  ====================

Each micro-batch's own loss is ``S_k / D_k + R``, so adding its gradient
times ``D_k`` and dividing the window by ``Σ D_k`` gives the big batch's
gradient for both means. Under ``sum`` the gradients simply add up, so the
window is not divided (`sums_window`); its weight then only says whether the
micro-batch holds anything.

Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss=keras.losses.MeanSquaredError(reduction="sum"))
    >>> loss_reductions(model), sums_window(model)
    (['sum'], True)
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops
from keras.src.backend import get_keras_mask

#: The reductions that divide by the batch's weight.
MEANS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
SUM = "sum"


def _reduction(loss: Any) -> str | None:
    if isinstance(loss, keras.losses.Loss):
        return loss.reduction
    # A name or a function: Keras wraps it with the default reduction.
    return "sum_over_batch_size"


def loss_reductions(model: keras.Model) -> list[str | None]:
    """The reduction of each loss ``compile`` was given, outputs without one
    left out; ``[]`` when Keras compiled no loss (``compute_loss`` or
    ``add_loss`` only)."""
    losses = keras.tree.flatten(getattr(model, "loss", None))
    return [_reduction(loss) for loss in losses if loss is not None]


def sums_window(model: keras.Model) -> bool:
    """Whether the window's gradient is the sum of its micro-batches'."""
    reductions = loss_reductions(model)
    return bool(reductions) and all(reduction == SUM for reduction in reductions)


def _regularised(model: keras.Model) -> bool:
    """Whether the model has weight or activity regularisers.

    Read from its structure, not from ``model.losses``, which JAX's traced
    step cannot read.
    """
    if any(variable.regularizer is not None for variable in model.trainable_variables):
        return True
    return any(
        getattr(layer, "activity_regularizer", None) is not None
        for layer in model._flatten_layers()
    )


def _check_reductions(model: keras.Model, reductions: list[str | None]) -> None:
    unknown = [r for r in reductions if r not in (*MEANS, SUM)]
    if unknown:
        raise ValueError(
            f"The model's loss has reduction={unknown[0]!r}: it returns one loss "
            "per sample, and Keras's train step then reduces them in a way no "
            "weight per micro-batch can follow. Compile a loss with reduction "
            f"one of {[*MEANS, SUM]}, or override micro_batch_weight() to "
            "return what the loss divides by."
        )
    # "mean" is Keras's other name for sum_over_batch_size.
    kinds = {"sum_over_batch_size" if r == "mean" else r for r in reductions}
    if len(kinds) > 1:
        raise ValueError(
            f"The model's outputs mix loss reductions {sorted(kinds)}: each "
            "divides its loss by another count (or, for sum, by none), so no "
            "single weight per micro-batch makes the window exact. Give every "
            "output's loss the same reduction."
        )
    if kinds == {SUM}:
        if _regularised(model):
            raise ValueError(
                "The model's loss has reduction='sum' and the model has "
                "regularisers: every micro-batch's loss adds the "
                "regularisation once, the big batch's only once in all, so the "
                "window would count it once per micro-batch. Use a mean "
                "reduction (sum_over_batch_size or mean_with_sample_weight), "
                "or drop the regularisers."
            )
        if getattr(model, "measure_noise_scale", False):
            raise ValueError(
                "measure_noise_scale=True estimates the noise scale from mean "
                "gradients; the model's loss has reduction='sum'. Use a mean "
                "reduction, or measure_noise_scale=False."
            )


def _elements(y_pred: Any, backend: Any) -> Any:
    # Keras's losses average the last axis away: one loss per sample for
    # (batch, classes), one per token for (batch, tokens, vocabulary).
    count = ops.cast(backend.batch_size(y_pred), "float32")
    for size in ops.shape(y_pred)[1:-1]:
        count = count * ops.cast(size, "float32")
    return count


def _weighted_count(mask: Any, sample_weight: Any) -> Any:
    """``Σ mask · sample_weight`` with Keras's rank alignment of the two."""
    if sample_weight is None:
        return ops.sum(ops.cast(mask, "float32"))
    sample_weight = ops.cast(sample_weight, "float32")
    if mask is None:
        return ops.sum(sample_weight)
    mask = ops.cast(mask, "float32")
    if len(sample_weight.shape) == len(mask.shape) + 1:
        sample_weight = ops.squeeze(sample_weight, axis=-1)
    while len(sample_weight.shape) < len(mask.shape):
        sample_weight = ops.expand_dims(sample_weight, axis=-1)
    return ops.sum(mask * sample_weight)


def _per_output(sample_weight: Any, outputs: int) -> list[Any]:
    weights = keras.tree.flatten(sample_weight) if sample_weight is not None else []
    if len(weights) == outputs:
        return weights
    return [sample_weight] * outputs  # one array (or none) for every output


def _output_losses(model: keras.Model, outputs: int) -> list[Any]:
    """Each output's loss (``None`` for an output without one), in the order of
    ``keras.tree.flatten(y_pred)``; every output counts when the two cannot
    be lined up."""
    loss = getattr(model, "loss", None)
    if not isinstance(loss, (dict, list, tuple)):
        return [loss] * outputs  # one loss for every output
    names = getattr(model, "output_names", None)
    if isinstance(loss, dict) and names and len(names) == outputs:
        return [loss.get(name) for name in names]
    flat = keras.tree.flatten(loss) if isinstance(loss, dict) else list(loss)
    return flat if len(flat) == outputs else [True] * outputs


def window_weight(
    model: keras.Model,
    x: Any,
    y_pred: Any,
    sample_weight: Any,
    backend: Any,
) -> Any:
    """The micro-batch's weight: what its compiled loss divides by.

    ``backend`` is the backend's glue module: its ``batch_size(x)`` and
    ``assert_equal_counts(counts, message, model)``, the check that several
    outputs' data-dependent counts agree.
    """
    reductions = loss_reductions(model)
    if not reductions:
        # Keras compiled no loss (compute_loss or add_loss): by samples.
        return backend.batch_size(x)
    _check_reductions(model, reductions)
    if reductions[0] == SUM:
        return backend.batch_size(x)  # the window is not divided: it only counts
    outputs = keras.tree.flatten(y_pred)
    by_sample_weight = "mean_with_sample_weight" in reductions
    weights = _per_output(sample_weight if by_sample_weight else None, len(outputs))
    # Only the outputs with a loss divide anything.
    counted = [
        (output, get_keras_mask(output), weight)
        for output, weight, loss in zip(
            outputs, weights, _output_losses(model, len(outputs)), strict=True
        )
        if loss is not None
    ]
    fixed = [mask is None and weight is None for _, mask, weight in counted]
    if len(counted) == 1:
        output, mask, weight = counted[0]
        return _elements(output, backend) if fixed[0] else _weighted_count(mask, weight)
    if all(fixed):
        # Each output's count is the batch size times its fixed shape, so
        # the counts are proportional and the batch size weighs them all.
        return backend.batch_size(x)
    if any(fixed):
        raise ValueError(
            "Some of the model's outputs divide their loss by a count that "
            "depends on the data (a Keras mask, or sample weights under "
            "mean_with_sample_weight) and some by their number of elements; "
            "no single weight per micro-batch makes accumulation exact. "
            "Override micro_batch_weight(), or give every output the same mask."
        )
    counts = [_weighted_count(mask, weight) for _, mask, weight in counted]
    if len({(id(mask), id(weight)) for _, mask, weight in counted}) > 1:
        # Counts from different masks or weights: equal only if the data
        # make them so, which the step checks where it can.
        backend.assert_equal_counts(
            counts,
            "The model's outputs divide their losses by counts (unmasked "
            "entries, or sample weights under mean_with_sample_weight) from "
            "different masks or weights, and no single weight per micro-batch "
            "is exact unless they are equal in every micro-batch. Override "
            "micro_batch_weight(), or give the outputs the same mask.",
            model,
        )
    return counts[0]
