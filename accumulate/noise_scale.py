"""The gradient noise scale, measured from the micro-batches of each window.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training",
arXiv:1812.06162) predict where bigger batches stop paying from the *simple
noise scale* ``B_simple = tr(Σ) / |G|²``, where ``G`` is the true gradient and
``Σ`` the covariance of one sample's gradient. Both can be estimated from
gradients of two batch sizes at the same weights, which is exactly what an
accumulation window holds: every micro-batch's gradient and the window's.

The estimator, for micro-batches of unequal sizes. A window holds ``n``
micro-batches of sizes ``b_k`` (``B = Σ b_k`` samples) with mean gradients
``g_k``, and its gradient is ``Ḡ = Σ b_k g_k / B``. If the samples are drawn
independently, ``E|g_k|² = |G|² + tr(Σ)/b_k`` and ``E|Ḡ|² = |G|² + tr(Σ)/B``,
so with ``S = Σ b_k |g_k|²`` and ``T = B |Ḡ|²``::

    E[S] = B|G|² + n·tr(Σ)        E[T] = B|G|² + tr(Σ)

    tr(Σ) ≈ (S - T) / (n - 1)     |G|² ≈ (T - tr(Σ)) / B

Both estimates are unbiased within each window (their ratio is not: it is
taken only over an epoch's mean estimates, see `NoiseScaleMeter`). With equal
sizes ``b`` this is McCandlish et al.'s two-batch estimator with
``B_small = b`` and ``B_big = n·b``. A window needs ``n ≥ 2``.

Assumptions, and what breaks them:

* *Independent draws.* `fit` draws an epoch's samples without replacement
  from a data set of ``M``. Then ``E|g_k|²`` and ``E|Ḡ|²`` carry the finite
  population factors ``(M - b)/(M - 1)``, and working them through gives
  ``E[tr(Σ) estimate] = tr(Σ)·M/(M - 1)`` (unbiased for the covariance
  normalised by ``M - 1``) but ``E[|G|² estimate] = |G|² - tr(Σ)/(M - 1)``,
  whatever the window's size: ``|G|²`` is underestimated by ``B_simple/(M -
  1)`` relative, so ``B_simple`` is overestimated by about as much. That is
  small while ``B_simple ≪ M``; a caller who knows ``M`` can add
  ``tr(Σ)/(M - 1)`` back. A whole-epoch window (``B = M``) is the extreme
  case: its ``Ḡ`` is the exact full-batch gradient, and the bias is the same.
* *Same weights.* Every micro-batch of a window is evaluated at the same
  weights: true for accumulation by construction.
* *Samples are what the loss divides by*: with a Keras mask they are the
  unmasked entries (tokens), with sample weights they are weighted samples.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from accumulate.window import counts, squared_norm

__all__ = [
    "LOG_KEYS",
    "add_micro_batch",
    "end_window",
    "epoch_logs",
    "squared_norm",
    "window_estimates",
]

#: The per-epoch log entries, in the order they are reported.
LOG_KEYS = ("gradient_sq_norm", "gradient_variance", "gradient_noise_scale")


def window_estimates(
    weighted_sq_norms: Any,
    micro_batches: Any,
    window_sq_norm: Any,
    samples: Any,
) -> tuple[Any, Any]:
    """Unbiased ``(|G|², tr(Σ))`` from one window (see the module docstring).

    Args:
        weighted_sq_norms: ``S = Σ_k b_k |g_k|²`` over the window.
        micro_batches: ``n``, the number of micro-batches (at least 2).
        window_sq_norm: ``|Ḡ|²``, the window gradient's squared norm.
        samples: ``B = Σ_k b_k``.

    Example:
        >>> # Two micro-batches of 1 and 3 samples with gradients 0 and 4/3:
        >>> # Ḡ = 1, S = 3·16/9 = 16/3, T = 4, tr Σ = 4/3, |G|² = (4 - 4/3)/4.
        >>> sq_norm, variance = window_estimates(16 / 3, 2.0, 1.0, 4.0)
        >>> round(float(sq_norm), 4), round(float(variance), 4)
        (0.6667, 1.3333)
    """
    total = window_sq_norm * samples
    variance = (weighted_sq_norms - total) / (micro_batches - 1.0)
    return (total - variance) / samples, variance


def add_micro_batch(
    weighted_sq_norms: Any, micro_batches: Any, sq_norm: Any, weight: Any
) -> tuple[Any, Any]:
    """``(S, n)`` with one micro-batch of mean gradient norm² ``sq_norm`` added.

    A micro-batch that does not count (`window.counts`) adds nothing
    (selected, not multiplied: its gradient may be NaN).
    """
    weight = ops.cast(weight, "float32")
    counted = counts(weight)
    return (
        ops.where(counted, weighted_sq_norms + weight * sq_norm, weighted_sq_norms),
        micro_batches + ops.cast(counted, "float32"),
    )


def end_window(
    epoch_sums: tuple[Any, Any, Any],
    weighted_sq_norms: Any,
    micro_batches: Any,
    window_sq_norm: Any,
    samples: Any,
) -> tuple[Any, Any, Any]:
    """The epoch's sums ``(Σ|G|², Σtr(Σ), windows)`` with one window's estimates.

    A window of fewer than 2 micro-batches gives no estimate and adds nothing.
    Looked up through this module at call time, so a test can replace
    `window_estimates` and see the effect on every backend.
    """
    sq_norm, variance = window_estimates(
        weighted_sq_norms,
        micro_batches,
        ops.cast(window_sq_norm, "float32"),
        ops.cast(samples, "float32"),
    )
    measured = micro_batches >= 2.0
    sq_norm_sum, variance_sum, windows = epoch_sums
    return (
        ops.where(measured, sq_norm_sum + sq_norm, sq_norm_sum),
        ops.where(measured, variance_sum + variance, variance_sum),
        windows + ops.cast(measured, "float32"),
    )


def epoch_logs(sq_norm_sum: float, variance_sum: float, windows: float) -> dict:
    """The epoch's mean estimates and their ratio (NaN without a window).

    The ratio of the mean estimates, not the mean of per-window ratios: a
    ratio of noisy estimates is biased and heavy-tailed.

    Example:
        >>> epoch_logs(4.0, 6.0, 2.0)["gradient_noise_scale"]
        1.5
    """
    if windows == 0:
        return dict.fromkeys(LOG_KEYS, float("nan"))
    sq_norm = sq_norm_sum / windows
    variance = variance_sum / windows
    noise_scale = variance / sq_norm if sq_norm > 0 else float("inf")
    return dict(zip(LOG_KEYS, (sq_norm, variance, noise_scale), strict=True))
