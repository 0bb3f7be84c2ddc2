"""How many micro-batches make one update, epoch by epoch.

``accumulation_steps`` is a positive int N, ``"epoch"``, or a schedule
``{first_epoch: N_or_"epoch", ...}`` (as Lightning's
``GradientAccumulationScheduler`` and optax's ``MultiSteps(every_k_schedule)``
take): from each key's epoch on (0-based, as `fit` counts), its value holds.
Epochs before the first key use 1, a standard step per batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

EPOCH = "epoch"

WindowSize = int | str


def validate_accumulation_steps(accumulation_steps: Any) -> WindowSize:
    """Returns one window size (an int N or ``"epoch"``), or raises `ValueError`.

    Example:
        >>> validate_accumulation_steps(4), validate_accumulation_steps("epoch")
        (4, 'epoch')
    """
    if isinstance(accumulation_steps, str) and accumulation_steps == EPOCH:
        return EPOCH
    if (
        isinstance(accumulation_steps, numbers.Integral)
        and not isinstance(accumulation_steps, bool)
        and accumulation_steps >= 1
    ):
        return int(accumulation_steps)
    raise ValueError(
        "`accumulation_steps` must be a positive integer N (apply the "
        'accumulated gradient every N micro-batches), the string "epoch" '
        '(apply it once per epoch), or a dict {first_epoch: N or "epoch"}; '
        f"received accumulation_steps={accumulation_steps!r} "
        f"(type {type(accumulation_steps).__name__})."
    )


def _epoch_key(key: Any) -> int:
    # .keras files store the schedule as JSON, whose keys are strings.
    if isinstance(key, str) and key.isdigit():
        return int(key)
    if isinstance(key, numbers.Integral) and not isinstance(key, bool) and key >= 0:
        return int(key)
    raise ValueError(
        "The keys of an `accumulation_steps` schedule are the 0-based epochs "
        "from which each value holds (non-negative integers); received the "
        f"key {key!r} (type {type(key).__name__})."
    )


class AccumulationSchedule:
    """The window size in effect at each epoch.

    Args:
        accumulation_steps: an int N, ``"epoch"``, or a dict
            ``{first_epoch: N_or_"epoch"}`` (keys may be strings of digits).

    Example:
        >>> schedule = AccumulationSchedule({2: 4, 5: "epoch"})
        >>> [schedule.at_epoch(epoch) for epoch in range(7)]
        [1, 1, 4, 4, 4, 'epoch', 'epoch']
        >>> schedule.config
        {2: 4, 5: 'epoch'}
    """

    def __init__(self, accumulation_steps: Any):
        if isinstance(accumulation_steps, Mapping):
            if not accumulation_steps:
                raise ValueError(
                    "An `accumulation_steps` schedule needs at least one entry "
                    '{first_epoch: N or "epoch"}; received an empty dict.'
                )
            steps = {
                _epoch_key(key): validate_accumulation_steps(value)
                for key, value in accumulation_steps.items()
            }
            self._steps = dict(sorted(steps.items()))
            self._constant = False
        else:
            self._steps = {0: validate_accumulation_steps(accumulation_steps)}
            self._constant = True

    def at_epoch(self, epoch: int) -> WindowSize:
        """The window size in effect during ``epoch`` (0-based)."""
        size: WindowSize = 1
        for first_epoch, value in self._steps.items():
            if first_epoch > epoch:
                break
            size = value
        return size

    @property
    def values(self) -> list[WindowSize]:
        """Every window size the schedule uses, the implicit leading 1 included."""
        values = list(self._steps.values())
        if 0 not in self._steps:
            values.insert(0, 1)
        return values

    @property
    def config(self) -> WindowSize | dict[int, WindowSize]:
        """The schedule as given: an int, ``"epoch"`` or a dict by epoch."""
        return self._steps[0] if self._constant else dict(self._steps)
