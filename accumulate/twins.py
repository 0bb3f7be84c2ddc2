"""The paper's MLP and its standard/accumulating twins."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from accumulate.model import AccumulatingModel

PAPER_HIDDEN_UNITS = (128, 64, 32)


def build_mlp(
    hidden_units: tuple[int, ...] = PAPER_HIDDEN_UNITS,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (28, 28),
    activation: str = "tanh",
) -> keras.Model:
    """The notebook's model: Flatten -> 128 -> 64 -> 32 tanh -> 10 logits.

    With the defaults it has 111,146 parameters, as the notebook reports.

    Example:
        >>> build_mlp().count_params()
        111146
    """
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for index, units in enumerate(hidden_units, start=1):
        x = keras.layers.Dense(units, activation=activation, name=f"hidden_{index}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")


def make_twins(
    seed: int,
    accumulation_steps: int | str = "epoch",
    build: Callable[[], keras.Model] | None = None,
    **accumulating_kwargs,
) -> tuple[keras.Model, AccumulatingModel]:
    """A standard model and an `AccumulatingModel` with bit-identical weights.

    Both are built by ``build`` (default: `build_mlp`) after seeding Keras with
    ``seed``; the accumulating twin then copies the standard twin's weights, so
    they start identical even if ``build`` draws more random numbers than its
    layers' initialisers. The same seed gives the same weights on every call.

    Args:
        seed: seeds Python, NumPy, TensorFlow and Keras before building.
        accumulation_steps: passed to `AccumulatingModel`.
        build: a callable returning a functional or `Sequential` model (one
            with ``inputs`` and ``outputs``).
        **accumulating_kwargs: more `AccumulatingModel` options, such as
            ``flush_at_epoch_end``.

    Returns:
        ``(standard, accumulating)``, neither compiled.

    Example:
        >>> standard, accumulating = make_twins(seed=42)
        >>> all((a == b).all() for a, b in
        ...     zip(standard.get_weights(), accumulating.get_weights()))
        True
    """
    build = build or build_mlp
    keras.utils.set_random_seed(seed)
    standard = build()
    keras.utils.set_random_seed(seed)
    template = build()
    if not getattr(template, "inputs", None) or not getattr(template, "outputs", None):
        raise ValueError(
            "`build` must return a functional or Sequential model with defined "
            f"inputs and outputs; received a {type(template).__name__} without "
            "them (give it a keras.Input)."
        )
    accumulating = AccumulatingModel(
        template.inputs,
        template.outputs,
        accumulation_steps=accumulation_steps,
        name=f"{standard.name}_accumulating",
        **accumulating_kwargs,
    )
    accumulating.set_weights(standard.get_weights())
    for standard_weight, accumulating_weight in zip(
        standard.get_weights(), accumulating.get_weights(), strict=True
    ):
        if not np.array_equal(standard_weight, accumulating_weight):
            raise RuntimeError("The twins' weights differ after copying.")
    return standard, accumulating
