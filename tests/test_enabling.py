"""`enable_accumulation`: any Keras model, as it is, accumulates exactly.

The oracle is always a plain model of the same class, with the same weights,
taking one Keras step on the whole window; the window is the same data fed
to ours as micro-batches through ``fit``. Every test runs on each backend.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from accumulate import AccumulatingModel, enable_accumulation  # noqa: E402
from accumulate.model import AccumulatingFunctional  # noqa: E402
from tests.conftest import BACKEND  # noqa: E402
from tests.hub_tasks import LABELS, TASKS, TEXTS, causal_lm  # noqa: E402
from tests.oracle import random_data, update_error  # noqa: E402

MEAN_WITH_WEIGHTS = "mean_with_sample_weight"
REDUCTIONS = ("sum_over_batch_size", MEAN_WITH_WEIGHTS, "sum")
# Float32 round-off, relative to the size of the update.
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def no_library_class_changes():
    causal_lm()  # Keras injects Functional into a task's bases when built
    classes = (
        AccumulatingModel,
        AccumulatingFunctional,
        keras_hub.models.GPT2CausalLM,
        keras_hub.models.BertTextClassifier,
        keras.Sequential,
    )
    before = [(cls.__bases__, cls.__mro__) for cls in classes]
    yield
    causal_lm()
    assert [(cls.__bases__, cls.__mro__) for cls in classes] == before


def _optimizer(name: str) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(1e-2)
    return keras.optimizers.SGD(0.1, momentum=0.9 if name == "momentum" else 0.0)


def _loss(reduction: str) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )


# -- Keras models of every kind --------------------------------------------------


class SmallClassifier(keras.Model):
    def __init__(self, regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(
            8, activation="tanh", kernel_regularizer=regularizer
        )
        self.logits = keras.layers.Dense(3)

    def call(self, inputs):
        return self.logits(self.hidden(inputs))


def _keras_model(route: str, regularizer, tmp_path) -> keras.Model:
    def layers():
        return [
            keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(3),
        ]

    if route == "sequential":
        return keras.Sequential([keras.Input((6,)), *layers()])
    if route == "subclassed":
        model = SmallClassifier(regularizer)
        model(np.zeros((1, 6), "float32"))
        return model
    inputs = keras.Input((6,))
    outputs = inputs
    for layer in layers():
        outputs = layer(outputs)
    model = keras.Model(inputs, outputs)
    if route == "loaded":
        path = tmp_path / f"model_{id(model)}.keras"
        model.save(path)
        return keras.models.load_model(path)
    return model


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("route", ["sequential", "functional", "subclassed", "loaded"])
def test_a_keras_model_accumulates_exactly_under_its_loss_reduction(
    route, reduction, tmp_path
):
    # A sum counts regularisation once per micro-batch: refused (tested below).
    regularizer = None if reduction == "sum" else keras.regularizers.L2(0.05)
    plain = _keras_model(route, regularizer, tmp_path)
    ours = _keras_model(route, regularizer, tmp_path)
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    optimizer = "adam" if route in ("functional", "loaded") else "sgd"
    ours = enable_accumulation(ours, accumulation_steps="epoch")
    assert isinstance(ours, type(plain)) and isinstance(ours, AccumulatingModel)
    for model in (plain, ours):
        model.compile(optimizer=_optimizer(optimizer), loss=_loss(reduction))
    x, y, weights = random_data(11, 6, 3)
    # Micro-batches of 4, 4 and 3 samples, one update at the epoch's end.
    ours.fit(x, y, sample_weight=weights, batch_size=4, shuffle=False, verbose=0)
    plain.train_on_batch(x, y, sample_weight=weights)
    assert int(ours.optimizer.iterations) == 1
    assert update_error(ours, plain, before) <= TOLERANCE


def test_a_masked_padded_window_is_exact_under_mean_with_sample_weight():
    # Token losses under a Keras mask with per-sample weights: the window's
    # weight is the sum of sample weights over unmasked entries.
    def model():
        inputs = keras.Input((None,), dtype="int32")
        hidden = keras.layers.Embedding(12, 4, mask_zero=True)(inputs)
        return keras.Model(inputs, keras.layers.Dense(5)(hidden))

    plain, ours = model(), model()
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, accumulation_steps=3)
    # SGD: on TensorFlow, Keras's Adam squares an Embedding's sparse gradient
    # slice by slice, before duplicate rows are summed; the window's gradient
    # is dense, so Adam there sees the square of the sum.
    for each in (plain, ours):
        each.compile(optimizer=_optimizer("sgd"), loss=_loss("mean_with_sample_weight"))
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 12, size=(9, 7))
    lengths = rng.integers(1, 8, size=9)
    tokens[np.arange(7)[None, :] >= lengths[:, None]] = 0  # padding
    targets = rng.integers(0, 5, size=(9, 7))
    # Keras weighs token losses by token: one weight per sample, repeated.
    weights = np.repeat(rng.uniform(0.1, 2.0, size=(9, 1)), 7, axis=1)
    ours.fit(
        tokens, targets, sample_weight=weights, batch_size=3, shuffle=False, verbose=0
    )
    plain.train_on_batch(tokens, targets, sample_weight=weights)
    assert int(ours.optimizer.iterations) == 1
    assert update_error(ours, plain, before) <= TOLERANCE


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_outputs_with_loss_weights_accumulate_exactly(reduction):
    def model():
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        return keras.Model(
            inputs, [keras.layers.Dense(3)(hidden), keras.layers.Dense(2)(hidden)]
        )

    plain, ours = model(), model()
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, accumulation_steps="epoch")
    for each in (plain, ours):
        each.compile(
            optimizer=_optimizer("sgd"),
            loss=[_loss(reduction), _loss(reduction)],
            loss_weights=[0.3, 1.0],
        )
    x, y, weights = random_data(11, 6, 3)
    targets = [y, y % 2]
    ours.fit(x, targets, sample_weight=weights, batch_size=4, shuffle=False, verbose=0)
    plain.train_on_batch(x, targets, sample_weight=weights)
    assert int(ours.optimizer.iterations) == 1
    assert update_error(ours, plain, before) <= TOLERANCE


# -- KerasHub tasks, from raw strings ----------------------------------------------

_TASK_CASES = [
    (task, reduction)
    for task in TASKS
    for reduction in ("sum_over_batch_size", "mean_with_sample_weight")
] + [("causal_lm", "sum")]


def _task_data(task: str, samples: int):
    if task == "causal_lm":
        return (TEXTS[:samples],)
    weights = np.linspace(0.2, 2.0, samples).astype("float32")
    return TEXTS[:samples], np.array(LABELS[:samples]), weights


@pytest.mark.parametrize(
    "optimizer,samples,batch,steps",
    [("sgd", 6, 3, 2), ("adam", 10, 4, "epoch")],
    ids=["equal-sgd", "ragged-adam"],
)
@pytest.mark.parametrize("task,reduction", _TASK_CASES)
def test_a_kerashub_task_accumulates_exactly_from_raw_strings(
    task, reduction, optimizer, samples, batch, steps
):
    if optimizer == "adam" and task == "text_classifier" and BACKEND == "tensorflow":
        # BERT's embeddings get sparse gradients on TensorFlow, which Keras's
        # Adam squares slice by slice before duplicate rows are summed (see
        # the masked test); linear optimizers are alike for both.
        optimizer = "momentum"
    plain, ours = TASKS[task](), TASKS[task]()
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, accumulation_steps=steps)
    assert isinstance(ours, type(plain))
    for model in (plain, ours):
        model.compile(optimizer=_optimizer(optimizer), loss=_loss(reduction))
    data = _task_data(task, samples)
    x, y, weights = (*data, None, None)[:3]
    ours.fit(x, y, sample_weight=weights, batch_size=batch, shuffle=False, verbose=0)
    # The task's preprocessor, on the whole window.
    plain.train_on_batch(x, y, sample_weight=weights)
    assert int(ours.optimizer.iterations) == 1
    assert update_error(ours, plain, before) <= TOLERANCE


def test_lora_fine_tuning_accumulates_exactly():
    plain, ours = causal_lm(), causal_lm()
    ours.set_weights(plain.get_weights())
    for model in (plain, ours):
        model.backbone.enable_lora(rank=2)
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, accumulation_steps=2)
    for model in (plain, ours):
        model.compile(optimizer=_optimizer("adam"), loss=_loss(MEAN_WITH_WEIGHTS))
    ours.fit(TEXTS[:8], batch_size=4, shuffle=False, verbose=0)
    plain.train_on_batch(TEXTS[:8])
    assert len(ours.trainable_variables) < len(ours.weights) // 2
    assert update_error(ours, plain, before) <= TOLERANCE


def test_a_task_saved_mid_window_loads_as_its_class_and_finishes_the_window(
    tmp_path,
):
    def enabled():
        model = enable_accumulation(
            causal_lm(), accumulation_steps=4, flush_at_epoch_end=False
        )
        model.compile(optimizer=_optimizer("adam"), loss=_loss(MEAN_WITH_WEIGHTS))
        return model

    uninterrupted, interrupted = enabled(), enabled()
    interrupted.set_weights(uninterrupted.get_weights())
    for model in (uninterrupted, interrupted):
        model.fit(TEXTS[:6], batch_size=2, shuffle=False, verbose=0)
    assert interrupted.steps_accumulated == 3
    interrupted.save(tmp_path / "lm.keras")
    loaded = keras.models.load_model(tmp_path / "lm.keras")
    assert isinstance(loaded, keras_hub.models.GPT2CausalLM)
    assert isinstance(loaded, AccumulatingModel)
    assert loaded.accumulation_steps == 4 and not loaded.flush_at_epoch_end
    assert loaded.steps_accumulated == 3
    for model in (uninterrupted, loaded):
        model.fit(TEXTS[6:8], batch_size=2, shuffle=False, verbose=0)
    assert int(loaded.optimizer.iterations) == 1
    before = interrupted.get_weights()
    assert update_error(loaded, uninterrupted, before) <= TOLERANCE
    assert isinstance(loaded.generate("the", max_length=8), str)


def test_a_cloned_enabled_model_accumulates_with_the_same_options():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model = enable_accumulation(model, accumulation_steps=3, flush_at_epoch_end=False)
    clone = keras.models.clone_model(model)
    assert isinstance(clone, AccumulatingModel)
    assert (clone.accumulation_steps, clone.flush_at_epoch_end) == (3, False)


# -- What is refused, and the remedy each message names ----------------------------


@pytest.mark.parametrize("first", ["accumulating", "task"])
def test_combining_accumulating_model_with_a_task_class_is_refused_in_either_order(
    first,
):
    bases = (
        (AccumulatingModel, keras_hub.models.GPT2CausalLM)
        if first == "accumulating"
        else (keras_hub.models.GPT2CausalLM, AccumulatingModel)
    )
    with pytest.raises(TypeError, match=r"enable_accumulation\(GPT2CausalLM"):
        type("AccumulatingGPT2", bases, {})
    # The named remedy works, and ordinary subclasses still do.
    model = enable_accumulation(causal_lm(), accumulation_steps=2)
    assert isinstance(model, keras_hub.models.GPT2CausalLM)

    class Net(AccumulatingModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, inputs):
            return self.dense(inputs)

    assert Net(accumulation_steps=2).accumulation_steps == 2


def test_a_class_with_its_own_train_step_is_refused():
    class Custom(keras.Sequential):
        def train_step(self, *args, **kwargs):
            return super().train_step(*args, **kwargs)

    with pytest.raises(TypeError, match="overrides train_step"):
        enable_accumulation(Custom([keras.Input((2,)), keras.layers.Dense(1)]))


def test_enabling_twice_is_refused_and_names_set_accumulation_steps():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model = enable_accumulation(model, 2)
    with pytest.raises(ValueError, match="set_accumulation_steps"):
        enable_accumulation(model, 4)


def test_invalid_options_leave_the_model_as_it_was():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="accumulation_steps"):
        enable_accumulation(model, accumulation_steps=0)
    assert type(model) is keras.Sequential


def _fit_once(model, loss, regularizer=None):
    x, y, _ = random_data(8, 6, 3)
    model.compile(optimizer="sgd", loss=loss)
    model.fit(x, y, batch_size=4, verbose=0)


@pytest.mark.parametrize(
    "loss,regularizer,match",
    [
        (_loss(None), None, "reduction=None"),
        (_loss("sum"), keras.regularizers.L2(0.1), "regularisation"),
        (
            [_loss("sum"), _loss("sum_over_batch_size")],
            None,
            "mix loss reductions",
        ),
    ],
    ids=["none", "sum-with-regularisation", "mixed"],
)
def test_a_loss_no_window_weight_follows_is_refused(loss, regularizer, match):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, kernel_regularizer=regularizer)(inputs)
    outputs = keras.layers.Dense(3)(hidden)
    if isinstance(loss, list):
        outputs = [outputs, keras.layers.Dense(3)(hidden)]
    model = enable_accumulation(keras.Model(inputs, outputs), 2)
    x, y, _ = random_data(8, 6, 3)
    model.compile(optimizer="sgd", loss=loss)
    targets = [y, y] if isinstance(loss, list) else y
    with pytest.raises(ValueError, match=match):
        model.fit(x, targets, batch_size=4, verbose=0)


def test_keras_builtin_accumulation_is_refused():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        enable_accumulation(model, 2)
    assert type(model) is keras.Sequential


# -- Found by an adversarial review: each of these was wrong before ----------------


def _masked_tokens(rng):
    tokens = rng.integers(1, 20, size=(16, 6))
    tokens[:, 4:] = 0
    tokens[:4, 1:] = 0  # the first micro-batch: one token each
    return tokens


class MaskedRegressor(keras.Model):
    """A masked output whose own compute_loss averages over samples."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(20, 4, mask_zero=True)
        self.dense = keras.layers.Dense(1)

    def call(self, inputs):
        return self.dense(self.embedding(inputs))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
        per_sample = keras.ops.mean(y_pred[..., 0], axis=1, keepdims=True)
        target = keras.ops.convert_to_tensor(y)  # numpy from train_on_batch
        return keras.ops.mean(keras.ops.square(per_sample - target))


def test_a_loss_keras_does_not_compile_is_weighed_by_samples_despite_a_mask():
    rng = np.random.default_rng(0)
    tokens, targets = _masked_tokens(rng), rng.normal(size=(16, 1)).astype("float32")
    plain, ours = MaskedRegressor(), MaskedRegressor()
    for model in (plain, ours):
        model(tokens[:1])
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, 4)
    for model in (plain, ours):
        model.compile(optimizer=_optimizer("sgd"))  # loss=None: compute_loss's
    ours.fit(tokens, targets, batch_size=4, shuffle=False, verbose=0)
    plain.train_on_batch(tokens, targets)
    assert update_error(ours, plain, before) <= TOLERANCE


def test_an_output_without_a_loss_does_not_weigh():
    def model():
        inputs = keras.Input((6,), dtype="int32")
        hidden = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
        pooled = keras.layers.GlobalAveragePooling1D()(hidden)
        return keras.Model(
            inputs, [keras.layers.Dense(2)(hidden), keras.layers.Dense(3)(pooled)]
        )

    rng = np.random.default_rng(1)
    tokens, labels = _masked_tokens(rng), rng.integers(0, 3, size=16)
    plain, ours = model(), model()
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, 4)
    for each in (plain, ours):  # the masked per-token output has no loss
        each.compile(optimizer=_optimizer("sgd"), loss=[None, _loss(MEAN_WITH_WEIGHTS)])
    targets = [np.zeros((16, 6)), labels]
    ours.fit(tokens, targets, batch_size=4, shuffle=False, verbose=0)
    plain.train_on_batch(tokens, targets)
    assert update_error(ours, plain, before) <= TOLERANCE


def test_signed_sample_weights_count_even_where_a_micro_batch_sums_below_zero():
    x, _, _ = random_data(16, 6, 3, seed=2)
    y = np.random.default_rng(2).normal(size=(16, 1)).astype("float32")
    weights = np.ones(16, "float32")
    weights[4:8] = [-1.0, -0.5, 0.5, -0.2]  # the second micro-batch sums to -1.2
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    ours = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    ours.set_weights(plain.get_weights())
    before = plain.get_weights()
    ours = enable_accumulation(ours, 4)
    for model in (plain, ours):
        model.compile(
            optimizer=_optimizer("sgd"),
            loss=keras.losses.MeanSquaredError(reduction=MEAN_WITH_WEIGHTS),
        )
    ours.fit(x, y, sample_weight=weights, batch_size=4, shuffle=False, verbose=0)
    plain.train_on_batch(x, y, sample_weight=weights)
    assert int(ours.optimizer.iterations) == 1
    assert update_error(ours, plain, before) <= TOLERANCE


def test_outputs_counted_from_different_masks_are_refused_where_unchecked():
    inputs = keras.Input((6,), dtype="int32")
    first = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
    second = keras.layers.Embedding(20, 4, mask_zero=True)(inputs[:, :3])
    model = keras.Model(
        inputs, [keras.layers.Dense(2)(first), keras.layers.Dense(2)(second)]
    )
    model = enable_accumulation(model, 2)
    # Checked per step, by a host callback under jax.jit; XLA on TensorFlow
    # cannot check, so there the model is refused when traced.
    jit = BACKEND != "torch"
    model.compile(optimizer="sgd", loss=[_loss("mean")] * 2, jit_compile=jit)
    tokens = _masked_tokens(np.random.default_rng(3))
    targets = [np.zeros((16, 6)), np.zeros((16, 3))]  # 4 and 3 tokens a row
    with pytest.raises(Exception, match="different masks or weights"):
        model.fit(tokens, targets, batch_size=4, verbose=0)


def test_an_unregistered_subclass_clones_and_pickles_still_accumulating():
    import pickle

    class Unregistered(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    model = Unregistered()
    model(np.zeros((1, 3), "float32"))
    model = enable_accumulation(model, accumulation_steps=3)
    clone = keras.models.clone_model(model)
    assert isinstance(clone, Unregistered) and clone.accumulation_steps == 3
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    sequential = enable_accumulation(sequential, accumulation_steps=5)
    sequential.compile(optimizer="sgd", loss="mse")
    copy = pickle.loads(pickle.dumps(sequential))
    assert isinstance(copy, keras.Sequential) and copy.accumulation_steps == 5


def test_a_plain_model_loads_enabled_weights_with_skip_mismatch(tmp_path):
    def model():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    ours = enable_accumulation(model(), 2)
    ours.compile(optimizer="sgd", loss="mse")
    ours.fit(np.ones((6, 3)), np.ones((6, 2)), batch_size=2, verbose=0)
    ours.save_weights(tmp_path / "ours.weights.h5")
    plain = model()
    # The window's state is saved beside the weights; a plain model skips it.
    plain.load_weights(tmp_path / "ours.weights.h5", skip_mismatch=True)
    for mine, theirs in zip(plain.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
