"""Exact gradient accumulation for Keras 3 ``model.fit``.

Example:
    >>> from accumulate import make_twins
    >>> standard, accumulating = make_twins(seed=42, accumulation_steps="epoch")
    >>> accumulating.accumulation_steps
    'epoch'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AccumulatingModel",
    "GradientAccumulator",
    "__version__",
    "build_mlp",
    "enable_accumulation",
    "make_twins",
    "validate_accumulation_steps",
]

# The public names are loaded on first use (PEP 562) because they pull in
# Keras and its backend (TensorFlow by default), which takes seconds and
# prints a start-up banner: `python -m accumulate --help` and `import
# accumulate.paper.config` must not pay for it.
_LAZY = {
    "AccumulatingModel": "accumulate.model",
    "GradientAccumulator": "accumulate.accumulator",
    "build_mlp": "accumulate.twins",
    "enable_accumulation": "accumulate.enabling",
    "make_twins": "accumulate.twins",
    "validate_accumulation_steps": "accumulate.schedule",
}

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from accumulate.accumulator import GradientAccumulator
    from accumulate.enabling import enable_accumulation
    from accumulate.model import AccumulatingModel
    from accumulate.schedule import validate_accumulation_steps
    from accumulate.twins import build_mlp, make_twins


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'accumulate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
