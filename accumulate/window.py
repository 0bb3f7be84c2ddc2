"""The window arithmetic, once, in `keras.ops`: every backend uses these.

A window is a sample-weighted gradient sum, its total weight and its number of
micro-batches. Why weights: Keras reduces a loss with ``sum_over_batch_size``,
i.e. it divides the (sample-weighted) sum of per-sample losses by the number
of samples ``b`` in the batch, and adds regularisation once per batch. For
micro-batches ``k`` of a window holding ``B = sum(b_k)`` samples::

    sum_k (b_k / B) * loss_k = (sum over all samples of w_i * l_i) / B + R

which is exactly the loss of the window as one big batch. So each
micro-batch's gradient is added multiplied by ``b_k`` and the window's
gradient is the sum divided by ``B``.

The functions are pure (values in, values out), so they serve JAX's stateless
train step as they are; a stateful backend assigns what they return. Where a
micro-batch must count for nothing they select with ``where``, never multiply
by 0: ``0 * NaN`` is NaN, and an empty micro-batch's loss is ``0/0``.

Example:
    >>> import numpy as np
    >>> sums, samples, steps = zeros([np.zeros(2, "float32")])
    >>> sums, samples, steps = add(sums, samples, steps, [np.ones(2)], 3.0)
    >>> sums, samples, steps = add(sums, samples, steps, [np.array([5.0, 1])], 1.0)
    >>> [np.asarray(g).tolist() for g in mean(sums, samples, ["float32"])]
    [[2.0, 1.0]]
    >>> bool(is_complete(steps, 2)), bool(is_complete(steps, 0))
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

#: What `accumulation_dtype` may be asked for.
ACCUMULATION_DTYPES = ("float32", "bfloat16")


def accumulation_dtype(dtype: Any, requested: str = "float32") -> str:
    """The dtype of a variable's sum: ``requested``, and float64 for float64.

    float32 by default, whatever the variable's dtype: a bfloat16 sum of many
    micro-batches loses the small ones (8 bits of mantissa), so half
    precision accumulates in float32 unless ``requested="bfloat16"`` asks to
    save the memory.
    """
    dtype = str(getattr(dtype, "name", dtype))
    return "float64" if requested == "float32" and dtype == "float64" else requested


def zeros(
    variables: Sequence[Any], requested: str = "float32"
) -> tuple[list[Any], Any, Any]:
    """An empty window for ``variables``: ``(sums, samples, steps)``."""
    sums = [
        ops.zeros(tuple(variable.shape), accumulation_dtype(variable.dtype, requested))
        for variable in variables
    ]
    return sums, ops.zeros((), "float32"), ops.zeros((), "int32")


def counts(weight: Any) -> Any:
    """Whether a micro-batch of ``weight`` counts: not 0 (no samples, only
    padding) and not NaN. Negative weights (signed sample weights under
    ``mean_with_sample_weight``) count: their sum is what the loss divides by.
    """
    return ops.logical_and(ops.not_equal(weight, 0.0), ops.equal(weight, weight))


def add(
    sums: Sequence[Any],
    samples: Any,
    steps: Any,
    gradients: Sequence[Any],
    weight: Any,
    gradient_scale: Any = None,
    summed: bool = False,
) -> tuple[list[Any], Any, Any]:
    """The window with one micro-batch of ``weight`` folded in.

    ``gradient_scale`` is what the gradients are multiplied by (a loss
    scale): they are stored divided by it, so that the window can be applied
    with whatever scale the optimizer has by then. A micro-batch of weight 0
    (or NaN) adds nothing and is not counted. ``summed``: the loss is a sum, so the
    gradients are added as they are (the weight only counts).

    ``weight`` may also be a vector: one weight per device for sums and
    gradients with a leading device axis (each device's share of the
    micro-batch, `accumulate.backends.jax`). ``samples`` then grows by the
    counted shares' total and ``steps`` by one if any share counts.
    """
    weight = ops.cast(weight, "float32")
    is_counted = counts(weight)
    factor = ops.ones_like(weight) if summed else weight
    factor = factor if gradient_scale is None else factor / gradient_scale
    new_sums = []
    for gradient_sum, gradient in zip(sums, gradients, strict=True):
        if gradient is None:
            new_sums.append(gradient_sum)
            continue
        added = gradient_sum + weighted(
            gradient, _leading(factor, gradient), gradient_sum.dtype
        )
        new_sums.append(ops.where(_leading(is_counted, added), added, gradient_sum))
    samples = samples + ops.sum(ops.where(is_counted, weight, 0.0))
    steps = steps + ops.cast(ops.any(is_counted), steps.dtype)
    return new_sums, samples, steps


def _leading(value: Any, like: Any) -> Any:
    """``value`` (a scalar, or one per device) broadcast along ``like``'s
    leading axis."""
    missing = len(like.shape) - len(value.shape)
    return ops.reshape(value, (*value.shape, *(1,) * missing)) if value.shape else value


def weighted(gradient: Any, factor: Any, dtype: Any) -> Any:
    """``gradient * factor`` in ``dtype``, multiplied in float32 at least (one
    rounding to a bfloat16 sum, not two)."""
    wide = _wide(dtype)
    return ops.cast(ops.cast(gradient, wide) * ops.cast(factor, wide), dtype)


def is_complete(steps: Any, window_size: Any) -> Any:
    """Whether the window holds its N micro-batches (never, for N = 0: epoch)."""
    return ops.logical_and(window_size > 0, steps >= window_size)


def mean(
    sums: Sequence[Any | None], samples: Any, dtypes: Sequence[Any]
) -> list[Any | None]:
    """The window's gradient: the sums divided by their total weight.

    Divided in float32 at least (a bfloat16 sum over a weight like 4097 would
    round the weight), then cast to each variable's dtype; ``None`` stays
    ``None``.
    """
    return [
        None
        if gradient_sum is None
        else ops.cast(_divided(gradient_sum, samples), dtype)
        for gradient_sum, dtype in zip(sums, dtypes, strict=True)
    ]


def _divided(gradient_sum: Any, samples: Any) -> Any:
    wide = _wide(gradient_sum.dtype)
    return ops.cast(gradient_sum, wide) / ops.cast(samples, wide)


def _wide(dtype: Any) -> str:
    """float64 for float64, else float32: where a sum's arithmetic happens."""
    return "float64" if str(getattr(dtype, "name", dtype)) == "float64" else "float32"


def scaled(gradients: Sequence[Any | None], scale: Any) -> list[Any | None]:
    """``gradients`` times a loss scale (the optimizer unscales what it gets)."""
    if scale is None:
        return list(gradients)
    return [
        None if gradient is None else gradient * ops.cast(scale, gradient.dtype)
        for gradient in gradients
    ]


def squared_norm(gradients: Sequence[Any | None]) -> Any:
    """``Σ |g|²`` over every gradient, in float32.

    Each gradient is flattened first: XLA:CPU reduces a vector to a scalar
    about 3x faster than a matrix (measured on the paper's MLP).
    """
    total = ops.zeros((), "float32")
    for gradient in gradients:
        if gradient is not None:
            flat = ops.reshape(ops.cast(gradient, "float32"), (-1,))
            total = total + ops.sum(ops.square(flat))
    return total
