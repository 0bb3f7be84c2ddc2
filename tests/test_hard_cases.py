"""Hard exactness cases: masked sequences, several outputs, class weights.

Each test compares one accumulated window with one real step of a standard
`keras.Model` on the whole window as one batch (same initial weights, SGD),
so "exact" means equal up to float32 summation order.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accumulate import AccumulatingModel

TOLERANCE = 2e-6  # float32: the window's sums are added in another order
LENGTH = 7  # every sequence is padded to it, in the big batch and micro-batches
VOCAB = 13


def _sequence_layers(inputs):
    embedded = keras.layers.Embedding(VOCAB, 6, mask_zero=True)(inputs)
    hidden = keras.layers.SimpleRNN(8, return_sequences=True)(embedded)
    return keras.layers.Dense(4)(hidden)  # per-timestep logits, mask carried


def _twins(build_outputs, input_shape, steps, **compile_kwargs):
    """A standard model and an AccumulatingModel with the same weights."""
    dtype = compile_kwargs.pop("input_dtype", "float32")
    keras.utils.set_random_seed(2)
    inputs = keras.Input(input_shape, dtype=dtype)
    standard = keras.Model(inputs, build_outputs(inputs))
    # Layers of its own (shared layers would share the weights).
    inputs = keras.Input(input_shape, dtype=dtype)
    accumulating = AccumulatingModel(
        inputs, build_outputs(inputs), accumulation_steps=steps, name="hard"
    )
    initial = standard.get_weights()
    accumulating.set_weights(initial)
    for model in (standard, accumulating):
        model.compile(optimizer=keras.optimizers.SGD(0.3), **compile_kwargs)
    return standard, accumulating, initial


@pytest.fixture(scope="module")
def sequence_models():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return _twins(_sequence_layers, (LENGTH,), "epoch", loss=loss, input_dtype="int32")


def _padded(lengths, rng):
    tokens = np.zeros((len(lengths), LENGTH), "int32")
    labels = np.zeros((len(lengths), LENGTH), "int32")
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(1, VOCAB, size=length)
        labels[row, :length] = rng.integers(0, 4, size=length)
    return tokens, labels


def _max_gap(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b, strict=True))


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    micro_batches=st.lists(
        st.lists(st.integers(min_value=0, max_value=LENGTH), min_size=1, max_size=4),
        min_size=2,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_masked_sequence_loss_is_exact(sequence_models, micro_batches, seed):
    """Micro-batches holding different numbers of real tokens (even none)."""
    if sum(map(sum, micro_batches)) == 0:
        micro_batches[0][0] = 1  # the big batch needs a real token
    standard, accumulating, initial = sequence_models
    rng = np.random.default_rng(seed)
    parts = [_padded(lengths, rng) for lengths in micro_batches]

    standard.set_weights(initial)
    standard.train_on_batch(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    )

    accumulating.set_weights(initial)
    accumulating.reset_accumulated_gradients()
    for tokens, labels in parts:
        accumulating.train_on_batch(tokens, labels)
    assert accumulating.samples_accumulated == sum(map(sum, micro_batches))
    accumulating.apply_accumulated_gradients()

    assert _max_gap(standard.get_weights(), accumulating.get_weights()) <= TOLERANCE


def test_sample_count_weights_would_not_be_exact_for_masked_loss(sequence_models):
    """The counter-example the token weighting fixes (so the test above bites)."""
    standard, accumulating, initial = sequence_models
    rng = np.random.default_rng(0)
    parts = [_padded([7, 7], rng), _padded([1, 1], rng)]
    standard.set_weights(initial)
    standard.train_on_batch(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    )

    accumulating.set_weights(initial)
    accumulating.reset_accumulated_gradients()
    original = accumulating.micro_batch_weight
    accumulating.micro_batch_weight = lambda x, y, y_pred, sw: keras.ops.shape(x)[0]
    accumulating.train_function = None
    try:
        for tokens, labels in parts:
            accumulating.train_on_batch(tokens, labels)
        accumulating.apply_accumulated_gradients()
    finally:
        accumulating.micro_batch_weight = original
        accumulating.train_function = None
    assert _max_gap(standard.get_weights(), accumulating.get_weights()) > 1e-4


def _two_outputs(inputs):
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return {
        "label": keras.layers.Dense(3, name="label")(hidden),
        "value": keras.layers.Dense(1, name="value")(hidden),
    }


def test_two_outputs_with_loss_weights_are_exact():
    standard, accumulating, initial = _twins(
        _two_outputs,
        (5,),
        "epoch",
        loss={
            "label": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "value": keras.losses.MeanSquaredError(),
        },
        loss_weights={"label": 0.7, "value": 2.5},
    )
    rng = np.random.default_rng(4)
    x = rng.normal(size=(29, 5)).astype("float32")
    y = {"label": rng.integers(0, 3, size=29), "value": rng.normal(size=(29, 1))}
    weights = rng.uniform(0.2, 3.0, size=29).astype("float32")
    standard.fit(
        x, y, sample_weight=weights, batch_size=29, epochs=1, verbose=0, shuffle=False
    )
    accumulating.set_weights(initial)
    accumulating.fit(
        x, y, sample_weight=weights, batch_size=8, epochs=1, verbose=0, shuffle=False
    )  # 8, 8, 8, 5: ragged
    assert int(accumulating.optimizer.iterations.numpy()) == 1
    assert _max_gap(standard.get_weights(), accumulating.get_weights()) <= TOLERANCE


def test_class_weight_is_exact():
    """Keras turns class_weight into sample weights; the loss still divides
    by the number of samples, so sample-count weighting stays exact."""

    def outputs(inputs):
        return keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs))

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    standard, accumulating, _ = _twins(outputs, (5,), "epoch", loss=loss)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 5)).astype("float32")
    y = rng.integers(0, 3, size=30)
    class_weight = {0: 0.5, 1: 4.0, 2: 1.5}
    standard.fit(
        x,
        y,
        class_weight=class_weight,
        batch_size=30,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    accumulating.fit(
        x,
        y,
        class_weight=class_weight,
        batch_size=7,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    assert _max_gap(standard.get_weights(), accumulating.get_weights()) <= TOLERANCE


def test_masked_and_unmasked_outputs_together_raise_a_clear_error():
    def outputs(inputs):
        embedded = keras.layers.Embedding(VOCAB, 4, mask_zero=True)(inputs)
        per_step = keras.layers.Dense(3, name="per_step")(embedded)
        pooled = keras.layers.GlobalAveragePooling1D()(embedded)
        return {
            "per_step": per_step,
            "pooled": keras.layers.Dense(2, name="pooled")(pooled),
        }

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _, accumulating, _ = _twins(
        outputs,
        (LENGTH,),
        2,
        loss={"per_step": loss, "pooled": loss},
        input_dtype="int32",
    )
    tokens, labels = _padded([3, 5], np.random.default_rng(1))
    with pytest.raises(ValueError, match="depends on the data"):
        accumulating.train_on_batch(
            tokens, {"per_step": labels, "pooled": np.array([0, 1])}
        )
