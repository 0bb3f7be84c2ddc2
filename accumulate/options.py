"""The keyword arguments `AccumulatingModel` takes, and a check for typos.

Keras's functional constructor keeps ``name`` and ``trainable`` and drops
every other keyword without a word, so ``AccumulatingModel(inputs, outputs,
accumulaton_steps=8)`` would build a model that never accumulates. A
subclass's constructor reaches `keras.Layer`, which refuses unknown keywords
but does not say which one was meant. `check_keywords` fills both gaps.

Example:
    >>> check_keywords({"name": "net"}, functional=True)
    >>> check_keywords({"accumulaton_steps": 8}, functional=True)
    Traceback (most recent call last):
    ...
    ValueError: AccumulatingModel got an unknown keyword argument \
'accumulaton_steps'; did you mean 'accumulation_steps'? ...
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: The options `AccumulatingModel` adds to `keras.Model`'s arguments.
OPTIONS = (
    "accumulation_steps",
    "flush_at_epoch_end",
    "measure_noise_scale",
    "accumulation_dtype",
    "micro_batch_size",
)
# What Keras's functional constructor uses; it drops anything else.
_FUNCTIONAL_KEYWORDS = ("inputs", "outputs", "name", "trainable")
# A typo of one of OPTIONS (a letter or a word missing) scores above this.
_SIMILARITY = 0.75


def _closest(keyword: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(keyword, list(candidates), 1, _SIMILARITY)
    return matches[0] if matches else None


def check_keywords(keywords: Iterable[str], functional: bool) -> None:
    """Raises `ValueError` for a keyword that would be ignored or is a typo.

    Args:
        keywords: the keyword arguments left after `AccumulatingModel`'s own.
        functional: whether the model is built from ``inputs, outputs``; then
            every keyword Keras's functional constructor does not use is an
            error (Keras would drop it). Otherwise only near-misses of
            `OPTIONS` are (Keras itself refuses the rest).
    """
    valid = OPTIONS + _FUNCTIONAL_KEYWORDS if functional else OPTIONS
    for keyword in keywords:
        if keyword in valid:
            continue
        closest = _closest(keyword, OPTIONS)
        if closest is None and not functional:
            continue  # keras.Layer raises for it, and it is not one of ours
        closest = closest or _closest(keyword, valid)
        hint = f"; did you mean {closest!r}?" if closest else "."
        raise ValueError(
            f"AccumulatingModel got an unknown keyword argument {keyword!r}"
            f"{hint} Its options are {', '.join(OPTIONS)}"
            + (
                "; a functional model also takes name and trainable (Keras "
                "would silently drop anything else)."
                if functional
                else "."
            )
        )
