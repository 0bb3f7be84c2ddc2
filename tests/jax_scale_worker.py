"""The worker of `tests/test_jax_scale.py`: one interpreter, 4 CPU devices.

``python tests/jax_scale_worker.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: trains one
accumulating model with no distribution, under `DataParallel` over the 4
devices and under `ModelParallel` on a 2 x 2 mesh whose `LayoutMap` shards
both Dense kernels, from the same weights on the same data, and writes the
weights, every window sum's placement against its variable's, and the
collectives in each compiled program (`benchmarks.collectives`: the test
reads numbers, not HLO).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import keras
import numpy as np

import accumulate
from benchmarks.collectives import collectives

STEPS = 4  # micro-batches per window
BATCH = 8  # micro-batch: 2 samples per device on 4 devices
SAMPLES = 100  # 12 whole micro-batches and a ragged one of 4
CLASSES = 4
TOKENS = 5  # per padded sequence
LOSSES = ("sum_over_batch_size", "mean_with_sample_weight")


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = rng.integers(0, CLASSES, size=SAMPLES)
    weights = rng.uniform(0.5, 2.0, size=SAMPLES).astype("float32")
    weights[8:10] = 0.0  # micro-batch 1: the first device's share weighs 0
    weights[16:24] = 0.0  # micro-batch 2 weighs 0 on every device
    return x, y, weights


def build(reduction: str, **options: Any) -> accumulate.AccumulatingModel:
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(
        8,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(1e-3),
        name="hidden",
    )(inputs)
    outputs = keras.layers.Dense(CLASSES, name="logits")(hidden)
    options.setdefault("accumulation_steps", STEPS)
    model = accumulate.AccumulatingModel(inputs, outputs, **options)
    compile_model(model, reduction)
    return model


def compile_model(model: keras.Model, reduction: str) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction
        ),
        metrics=["accuracy"],
    )


def devices_per_row(distribution: Any) -> int:
    if distribution is None:
        return 1
    shape = distribution.device_mesh.shape
    return int(np.prod(shape)) // shape[0]


def placed(batch: Any, distribution: Any) -> Any:
    if distribution is None:
        return batch
    return jax.tree_util.tree_map(
        lambda array: jax.device_put(
            array, distribution.get_data_layout(array.shape).backend_layout
        ),
        batch,
    )


def train_step_hlo(model: keras.Model, batch: tuple) -> str:
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    batch = placed(batch, keras.distribution.distribution())
    return jax.jit(model.train_step).lower(state, batch).compile().as_text()


def placements(model: accumulate.AccumulatingModel) -> list[dict[str, Any]]:
    state = model._accumulation
    found = []
    for variable, gradient_sum in zip(
        state.accumulated_variables, state.gradient_sums, strict=True
    ):
        value, summed = variable.value, gradient_sum.value
        found.append(
            {
                "variable": variable.path,
                "variable_spec": list(map(str, value.sharding.spec)),
                "sum_spec": list(map(str, summed.sharding.spec)),
                "variable_shard": list(value.sharding.shard_shape(value.shape)),
                "sum_shard": list(summed.sharding.shard_shape(summed.shape)),
                "variable_device_bytes": value.addressable_shards[0].data.nbytes,
                "sum_device_bytes": summed.addressable_shards[0].data.nbytes,
                "sum_bytes": int(np.prod(summed.shape)) * summed.dtype.itemsize,
                "variable_bytes": int(np.prod(value.shape)) * value.dtype.itemsize,
            }
        )
    for counter in (state.samples, state.steps):
        found.append(
            {
                "variable": counter.name,
                "sum_spec": list(map(str, counter.value.sharding.spec)),
            }
        )
    return found


def distributions() -> dict[str, Any]:
    devices = jax.devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "model")
    layout_map["logits/kernel"] = ("model", None)
    return {
        "single": None,
        "data": keras.distribution.DataParallel(devices=devices),
        "model": keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        ),
    }


def run(out_path: str) -> None:
    x, y, weights = data()
    keras.utils.set_random_seed(0)
    initial = build("sum_over_batch_size").get_weights()
    results: dict[str, Any] = {}
    keras.utils.set_random_seed(0)
    padded_initial = build_padded().get_weights()
    for name, distribution in distributions().items():
        keras.distribution.set_distribution(distribution)
        results[f"{name}/padded"] = padded_run(padded_initial)
        for reduction in LOSSES:
            model = build(reduction)
            model.set_weights(initial)
            history = model.fit(
                x,
                y,
                sample_weight=weights,
                batch_size=BATCH,
                epochs=2,
                shuffle=False,
                verbose=0,
            )
            run_result: dict[str, Any] = {
                "weights": [w.tolist() for w in model.get_weights()],
                "iterations": int(model.optimizer.iterations),
                "loss": history.history["loss"],
                "devices": model._accumulation.devices,
            }
            if reduction == LOSSES[0]:
                batch = (x[:BATCH], y[:BATCH], weights[:BATCH])
                run_result["collectives"] = collectives(
                    train_step_hlo(model, batch), devices_per_row(distribution)
                )
                if distribution is not None:
                    run_result["saved"] = saved_window(model, batch, out_path)
                    run_result["placements"] = placements(model)
                    run_result["plain_collectives"] = plain_collectives(initial, batch)
            results[f"{name}/{reduction}"] = run_result
        results[f"{name}/sliced"] = sliced_run(initial, (x, y, weights))
        if distribution is not None:
            results[f"{name}/dropout"] = dropout_draws()
            results[f"{name}/noise_scale"] = noise_scale_run(x, y)
    keras.distribution.set_distribution(None)
    with open(out_path, "w") as file:
        json.dump(results, file)


def sliced_run(initial: list, data: tuple) -> dict[str, Any]:
    """Batches of STEPS x BATCH, each split into slices of BATCH inside the
    step: the windows of the unsplit run (`micro_batch_size`), with each
    device slicing its own rows."""
    x, y, weights = data
    model = build(LOSSES[1], accumulation_steps=1, micro_batch_size=BATCH)
    model.set_weights(initial)
    model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=STEPS * BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    batch = (x[: STEPS * BATCH], y[: STEPS * BATCH], weights[: STEPS * BATCH])
    distribution = keras.distribution.distribution()
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "iterations": int(model.optimizer.iterations),
        "devices": model._accumulation.devices,
        "collectives": collectives(
            train_step_hlo(model, batch), devices_per_row(distribution)
        ),
    }


def build_padded() -> accumulate.AccumulatingModel:
    """Token sequences padded with 0: Keras's mask reaches the loss, which
    divides by the unmasked tokens."""
    inputs = keras.Input((TOKENS,), dtype="int32")
    embedded = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
    outputs = keras.layers.Dense(CLASSES)(embedded)
    model = accumulate.AccumulatingModel(inputs, outputs, accumulation_steps=STEPS)
    compile_model(model, "sum_over_batch_size")
    return model


def padded_run(initial: list) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, TOKENS + 1, SAMPLES)
    lengths[8:10] = 0  # micro-batch 1: the first device's share is padding
    lengths[16:24] = 0  # micro-batch 2: all padding
    tokens = rng.integers(1, 20, (SAMPLES, TOKENS))
    tokens = np.where(np.arange(TOKENS) < lengths[:, None], tokens, 0)
    labels = rng.integers(0, CLASSES, (SAMPLES, TOKENS))
    model = build_padded()
    model.set_weights(initial)
    history = model.fit(
        tokens, labels, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "iterations": int(model.optimizer.iterations),
        "loss": history.history["loss"],
        "devices": model._accumulation.devices,
    }


def dropout_draws() -> dict[str, Any]:
    """One micro-batch's dropout masks on each device's share, and the seed
    generator's state after the step, from the per-device gradient pass."""
    inputs = keras.Input((64,))
    dropped = keras.layers.Dropout(0.5, seed=3)(inputs)
    model = accumulate.AccumulatingModel(
        inputs, keras.layers.Dense(CLASSES)(dropped), accumulation_steps=STEPS
    )
    compile_model(model, "sum_over_batch_size")
    x = np.ones((BATCH, 64), "float32")
    y = np.zeros(BATCH, "int64")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    trainable, non_trainable, optimizer_values, metrics_values = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    places = [position[id(v)] for v in model._state_variables()]
    seed = next(
        i
        for i, v in enumerate(model.non_trainable_variables)
        if v.name == "seed_generator_state"
    )
    (_, y_pred, after, _, _), _ = model._gradients_per_device(
        model._accumulation.devices,
        places,
        trainable,
        non_trainable,
        metrics_values,
        optimizer_values,
        x,
        y,
        None,
    )
    return {
        "devices": model._accumulation.devices,
        "y_pred": np.asarray(y_pred).tolist(),
        "seed_before": np.asarray(non_trainable[seed]).tolist(),
        "seed_after": np.asarray(after[seed]).tolist(),
    }


def noise_scale_run(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The noise scale needs each micro-batch's whole gradient: one sum."""
    inputs = keras.Input((6,))
    model = accumulate.AccumulatingModel(
        inputs,
        keras.layers.Dense(CLASSES)(inputs),
        accumulation_steps=STEPS,
        measure_noise_scale=True,
    )
    compile_model(model, "sum_over_batch_size")
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return {
        "devices": model._accumulation.devices,
        "logs": sorted(history.history),
        "iterations": int(model.optimizer.iterations),
    }


def saved_window(model: keras.Model, batch: tuple, out_path: str) -> dict:
    """An open window's sums, and those of the model saved and loaded on
    one device: per-device partial sums are saved as one sum."""
    for _ in range(2):
        model.train_on_batch(*batch)
    state = model._accumulation
    sums = state.summed([gradient_sum.value for gradient_sum in state.gradient_sums])
    path = f"{out_path}.keras"
    model.save(path)
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    loaded = keras.models.load_model(path)
    keras.distribution.set_distribution(distribution)
    loaded_sums = [
        gradient_sum.numpy() for gradient_sum in loaded._accumulation.gradient_sums
    ]
    # And back onto the devices: the whole sum on the first.
    reloaded = keras.models.load_model(path)
    reloaded_state = reloaded._accumulation
    reloaded_sums = reloaded_state.summed(
        [gradient_sum.value for gradient_sum in reloaded_state.gradient_sums]
    )
    return {
        "sums": [np.asarray(value).tolist() for value in sums],
        "loaded_sums": [value.tolist() for value in loaded_sums],
        "samples": [model.samples_accumulated, loaded.samples_accumulated],
        "loaded_devices": loaded._accumulation.devices,
        "reloaded_sums": [np.asarray(value).tolist() for value in reloaded_sums],
        "reloaded_devices": reloaded_state.devices,
    }


def plain_collectives(initial: list, batch: tuple) -> dict[str, Any]:
    """The collectives of plain Keras's step and of Keras's built-in
    accumulation (``gradient_accumulation_steps``), same model."""
    found = {}
    for name, keras_steps in (("plain", None), ("keras", STEPS)):
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(hidden))
        model.compile(
            optimizer=keras.optimizers.Adam(
                0.01, gradient_accumulation_steps=keras_steps
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.set_weights(initial)
        model.fit(*batch[:2], batch_size=BATCH, epochs=1, verbose=0)
        found[name] = collectives(
            train_step_hlo(model, batch),
            devices_per_row(keras.distribution.distribution()),
        )
    return found


if __name__ == "__main__":
    run(sys.argv[1])
