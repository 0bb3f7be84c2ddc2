"""Exact gradient accumulation for Keras 3 ``model.fit``.

Example:
    >>> from accumulate import make_twins
    >>> standard, accumulating = make_twins(seed=42, accumulation_steps="epoch")
    >>> accumulating.accumulation_steps
    'epoch'
"""

from accumulate.accumulator import GradientAccumulator
from accumulate.model import AccumulatingModel
from accumulate.schedule import validate_accumulation_steps
from accumulate.twins import build_mlp, make_twins

__version__ = "0.1.0"

__all__ = [
    "AccumulatingModel",
    "GradientAccumulator",
    "__version__",
    "build_mlp",
    "make_twins",
    "validate_accumulation_steps",
]
