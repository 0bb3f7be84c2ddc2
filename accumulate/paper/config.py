"""`ExperimentConfig`: what one reproduction run trains, and how."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from accumulate.paper.reference import DATASETS

__all__ = ["DATASETS", "EPOCH", "OPTIMIZERS", "ExperimentConfig"]

OPTIMIZERS = ("sgd", "adam")
# The notebook's accumulating twin: one update per epoch from every batch.
EPOCH = "epoch"

# The fields that decide the numbers a run produces; `data_dir` only says
# where the (same) data is read from.
_IDENTITY_FIELDS = (
    "dataset",
    "epochs",
    "seed",
    "optimizer",
    "learning_rate",
    "batch_size",
    "accumulation_steps",
)


@dataclass(frozen=True)
class ExperimentConfig:
    """One run: both twins trained from ``seed`` on ``dataset``.

    The defaults are the notebook's set-up as its logs show it: 200 epochs,
    batches of 512 and plain SGD with a learning rate of 0.01. (Its text says
    Adam(0.01), but its logged curves match SGD; see the report.)

    Example:
        >>> ExperimentConfig("mnist").optimizer
        'sgd'
        >>> ExperimentConfig("cifar10")
        Traceback (most recent call last):
        ...
        ValueError: dataset must be one of 'mnist', 'fashion_mnist'; got 'cifar10'
    """

    dataset: str
    epochs: int = 200
    seed: int = 42
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    batch_size: int = 512
    data_dir: str | None = None
    # The accumulating twin's window: "epoch" (the notebook's) or N batches.
    # Result files written before this field existed lack it and were all
    # "epoch" runs, which is why it has that default.
    accumulation_steps: int | str = EPOCH

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(
                f"dataset must be one of {', '.join(map(repr, DATASETS))}; "
                f"got {self.dataset!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; "
                f"got {self.optimizer!r}"
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        steps = self.accumulation_steps
        # Checked here rather than with accumulate.validate_accumulation_steps,
        # which would import TensorFlow just to build a config.
        if steps != EPOCH and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(
                f"accumulation_steps must be a positive integer or {EPOCH!r}; "
                f"got {steps!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        # NumPy's legacy seeding, which Keras's set_random_seed uses, takes
        # exactly this range.
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32); got {self.seed!r}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"learning_rate must be positive; got {self.learning_rate!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ExperimentConfig:
        """The config stored by `to_dict` (extra keys are ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in fields.items() if key in names})

    def same_experiment(self, other: ExperimentConfig) -> bool:
        """Whether ``other`` produces the same numbers (wherever its data lives)."""
        return all(
            getattr(self, name) == getattr(other, name) for name in _IDENTITY_FIELDS
        )

    @property
    def label(self) -> str:
        """A short name for progress lines, e.g. ``mnist/seed42/sgd``.

        Runs whose accumulating twin uses an N-batch window end in
        ``/steps<N>``.
        """
        label = f"{self.dataset}/seed{self.seed}/{self.optimizer}"
        if self.accumulation_steps != EPOCH:
            label += f"/steps{self.accumulation_steps}"
        return label
