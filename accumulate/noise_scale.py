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

from collections.abc import Sequence

import tensorflow as tf

_ON_FIRST_REPLICA = {
    "trainable": False,
    "synchronization": tf.VariableSynchronization.ON_READ,
    "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
}
_PER_REPLICA = {
    "trainable": False,
    "synchronization": tf.VariableSynchronization.ON_READ,
    "aggregation": tf.VariableAggregation.SUM,
}

#: The per-epoch log entries, in the order they are reported.
LOG_KEYS = ("gradient_sq_norm", "gradient_variance", "gradient_noise_scale")


def window_estimates(
    weighted_sq_norms: tf.Tensor,
    micro_batches: tf.Tensor,
    window_sq_norm: tf.Tensor,
    samples: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
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


def squared_norm(gradients: Sequence[tf.Tensor | None]) -> tf.Tensor:
    """``Σ |g|²`` over every gradient, in float32."""
    return tf.add_n(
        [
            tf.reduce_sum(tf.square(tf.cast(gradient, tf.float32)))
            for gradient in gradients
            if gradient is not None
        ]
        or [tf.constant(0.0)]
    )


class NoiseScaleMeter(tf.Module):
    """State of the noise-scale measurement: one window, and one epoch.

    * Per window (per replica, summed when the window is applied):
      ``weighted_sq_norms`` (``S``) and ``micro_batches`` (``n``). Under
      ``tf.distribute`` each replica's share of a micro-batch is a small batch
      in its own right: it adds ``b_r |g_r|²`` and counts 1.
    * Per epoch: the sums of the windows' estimates and how many windows
      gave one. The epoch's noise scale is the ratio of the mean estimates,
      not the mean of per-window ratios (a ratio of noisy estimates is
      biased and heavy-tailed).

    Example:
        >>> import tensorflow as tf
        >>> meter = NoiseScaleMeter()
        >>> meter.add_micro_batch(tf.constant(0.0), weight=1.0)
        >>> meter.add_micro_batch(tf.constant(16 / 9), weight=3.0)
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

    def add_micro_batch(self, sq_norm: tf.Tensor, weight: tf.Tensor | float) -> None:
        """Adds one (non-empty) micro-batch with mean gradient norm² ``sq_norm``."""
        self.weighted_sq_norms.assign_add(tf.cast(weight, tf.float32) * sq_norm)
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
        weighted_sq_norms, micro_batches = totals or self.window_totals()
        sq_norm, variance = window_estimates(
            weighted_sq_norms,
            micro_batches,
            tf.cast(window_sq_norm, tf.float32),
            tf.cast(samples, tf.float32),
        )
        measured = micro_batches >= 2.0
        self.epoch_sq_norm_sum.assign_add(tf.where(measured, sq_norm, 0.0))
        self.epoch_variance_sum.assign_add(tf.where(measured, variance, 0.0))
        self.epoch_windows.assign_add(tf.cast(measured, tf.float32))
        self.reset_window()

    def reset_window(self) -> None:
        """Drops the window's totals (with the window itself)."""
        self.weighted_sq_norms.assign(0.0)
        self.micro_batches.assign(0.0)

    @property
    def variables_to_save(self) -> list[tf.Variable]:
        """Every variable of the measurement, in a fixed order (checkpoints)."""
        return [
            self.weighted_sq_norms,
            self.micro_batches,
            self.epoch_sq_norm_sum,
            self.epoch_variance_sum,
            self.epoch_windows,
        ]

    def epoch_logs(self) -> dict[str, float]:
        """The epoch's mean estimates and their ratio (NaN without a window)."""
        windows = float(self.epoch_windows.numpy())
        if windows == 0:
            return dict.fromkeys(LOG_KEYS, float("nan"))
        sq_norm = float(self.epoch_sq_norm_sum.numpy()) / windows
        variance = float(self.epoch_variance_sum.numpy()) / windows
        noise_scale = variance / sq_norm if sq_norm > 0 else float("inf")
        return dict(zip(LOG_KEYS, (sq_norm, variance, noise_scale), strict=True))

    def start_epoch(self) -> None:
        """Forgets the previous epoch's estimates."""
        for variable in (
            self.epoch_sq_norm_sum,
            self.epoch_variance_sum,
            self.epoch_windows,
        ):
            variable.assign(0.0)
