"""Tests for the reproduction runner: one real tiny run, and `run_all`'s files."""

from __future__ import annotations

import doctest
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from accumulate.paper import config as config_module
from accumulate.paper import experiment, results
from accumulate.paper.config import ExperimentConfig
from accumulate.paper.datasets import load_dataset
from accumulate.paper.experiment import ResultConflictError, run_all, run_experiment
from accumulate.paper.progress import EpochEnd, format_duration, format_progress
from accumulate.paper.results import load_result, result_path, save_result
from accumulate.paper.training import weights_digest
from accumulate.twins import make_twins
from tests.tiny_data import TEST_SAMPLES, TRAIN_SAMPLES, write_tiny_data_dir

EPOCHS = 2
BATCH_SIZE = 64
BATCHES_PER_EPOCH = math.ceil(TRAIN_SAMPLES / BATCH_SIZE)
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    return write_tiny_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_config(tiny_data_dir):
    return ExperimentConfig(
        "mnist", epochs=EPOCHS, batch_size=BATCH_SIZE, data_dir=str(tiny_data_dir)
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_config):
    """One real run of both twins, and the progress events it sent."""
    events: list[EpochEnd] = []
    return run_experiment(tiny_config, progress=events.append), events


# -- ExperimentConfig and file names ------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dataset": "cifar10"}, "'cifar10'"),
        ({"dataset": "mnist", "optimizer": "rmsprop"}, "'rmsprop'"),
        ({"dataset": "mnist", "epochs": 0}, "epochs"),
        ({"dataset": "mnist", "batch_size": 2.5}, "batch_size"),
        ({"dataset": "mnist", "learning_rate": 0.0}, "learning_rate"),
        ({"dataset": "mnist", "seed": -1}, "seed"),
        ({"dataset": "mnist", "accumulation_steps": 0}, "accumulation_steps"),
        ({"dataset": "mnist", "accumulation_steps": True}, "accumulation_steps"),
        ({"dataset": "mnist", "accumulation_steps": "8"}, "accumulation_steps"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**fields)


def test_config_round_trips_through_dict():
    config = ExperimentConfig("fashion_mnist", epochs=3, seed=7, optimizer="adam")
    stored = {**config.to_dict(), "versions": {"keras": "3"}}
    assert ExperimentConfig.from_dict(stored) == config
    assert config.same_experiment(ExperimentConfig.from_dict(stored))


def test_results_without_a_window_were_per_epoch_runs():
    # Result files written before `accumulation_steps` existed lack the key.
    stored = ExperimentConfig("mnist").to_dict()
    del stored["accumulation_steps"]
    assert ExperimentConfig.from_dict(stored).accumulation_steps == "epoch"


def test_another_window_is_another_experiment():
    every_8 = ExperimentConfig("mnist", accumulation_steps=8)
    assert not every_8.same_experiment(ExperimentConfig("mnist"))
    assert every_8.label == "mnist/seed42/sgd/steps8"
    assert ExperimentConfig("mnist").label == "mnist/seed42/sgd"


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({}, "history-seed42.json"),
        ({"accumulation_steps": 8}, "history-seed42-steps8.json"),
        ({"accumulation_steps": "epoch"}, "history-seed42.json"),
        ({"seed": 3}, "history-seed3.json"),
        ({"optimizer": "adam"}, "history-seed42-adam.json"),
        ({"learning_rate": 0.001}, "history-seed42-lr0.001.json"),
        ({"batch_size": 64, "epochs": 5}, "history-seed42-batch64.json"),
    ],
)
def test_result_path_names_runs_apart(tmp_path, fields, name):
    path = result_path(tmp_path, ExperimentConfig("mnist", **fields))
    assert path == tmp_path / "mnist" / name


def test_doctests_pass():
    for module in (config_module, results):
        assert doctest.testmod(module).failed == 0


def test_format_progress_shows_epoch_metrics_and_eta():
    event = EpochEnd(
        run="mnist/seed42/sgd",
        model="standard",
        epoch=3,
        epochs=200,
        seconds=0.5,
        eta_seconds=125,
        metrics={"loss": 0.5, "accuracy": 0.9, "val_accuracy": 0.91},
    )
    line = format_progress(event)
    assert "epoch   3/200" in line
    assert "acc 0.9000" in line and "val_acc 0.9100" in line
    assert line.endswith("ETA 2m05s")
    assert format_duration(3725) == "1h02m"


# -- One real run ----------------------------------------------------------------


def test_twins_start_identical(tiny_run, tiny_config):
    result, _ = tiny_run
    digests = {result[model]["initial_weights_sha256"] for model in experiment.MODELS}
    assert len(digests) == 1
    # ... and the digest is of the initial weights, not the trained ones.
    standard, _ = make_twins(tiny_config.seed)
    assert digests == {weights_digest(standard)}


def test_update_counts(tiny_run):
    result, _ = tiny_run
    assert result["standard"]["updates"] == BATCHES_PER_EPOCH * EPOCHS
    assert result["standard"]["cumulative_updates"] == [
        BATCHES_PER_EPOCH * epoch for epoch in range(1, EPOCHS + 1)
    ]
    assert result["accumulating"]["updates"] == EPOCHS
    assert result["accumulating"]["cumulative_updates"] == list(range(1, EPOCHS + 1))


def test_history_keys_and_lengths(tiny_run, tiny_data_dir):
    result, _ = tiny_run
    (_, _), (_, test_labels) = load_dataset("mnist", tiny_data_dir)
    assert result["data"] == {
        "source": str(tiny_data_dir),
        "train_samples": TRAIN_SAMPLES,
        "test_samples": TEST_SAMPLES,
        "batches_per_epoch": BATCHES_PER_EPOCH,
        "test_labels": test_labels.tolist(),
    }
    config = result["config"]
    assert config["epochs"] == EPOCHS and config["optimizer"] == "sgd"
    assert {"tensorflow", "keras"} <= set(config["versions"])
    assert config["machine"]["cpu_count"] >= 1
    for model in experiment.MODELS:
        history = result[model]
        for metric in METRICS:
            assert len(history[metric]) == EPOCHS
            assert all(math.isfinite(value) for value in history[metric])
        assert len(history["epoch_seconds"]) == EPOCHS
        assert history["seconds"] >= sum(history["epoch_seconds"]) * 0.99
        predictions = history["test_predictions"]
        assert len(predictions) == TEST_SAMPLES
        assert set(predictions) <= set(range(10))
        # The last validation ran on the final weights, as the predictions did.
        accuracy = np.mean(np.asarray(predictions) == test_labels)
        assert history["val_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)


def test_progress_events(tiny_run):
    _, events = tiny_run
    assert [(event.model, event.epoch) for event in events] == [
        (model, epoch) for model in experiment.MODELS for epoch in range(1, EPOCHS + 1)
    ]
    assert all(event.epochs == EPOCHS and event.seconds > 0 for event in events)
    assert events[-1].eta_seconds == 0
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(events[0].metrics)


def test_result_round_trips_through_json(tiny_run, tmp_path):
    result, _ = tiny_run
    path = save_result(result, tmp_path / "mnist" / "history-seed42.json")
    assert load_result(path) == result
    assert not list(path.parent.glob(".*partial"))


def test_speed_settings_do_not_change_the_numbers(tiny_run, tiny_data_dir):
    """Plain `fit` on NumPy arrays (no XLA, one batch per call) gives the same."""
    result, _ = tiny_run
    (x_train, y_train), (x_test, y_test) = load_dataset("mnist", tiny_data_dir)
    x_train, x_test = x_train / 255.0, x_test / 255.0
    for model, name in zip(make_twins(42), experiment.MODELS, strict=True):
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=False,
        )
        history = model.fit(
            x_train,
            y_train,
            batch_size=BATCH_SIZE,
            epochs=EPOCHS,
            shuffle=False,
            validation_data=(x_test, y_test),
            verbose=0,
        ).history
        plain = [history["loss"], history["accuracy"]]
        plain += [history["val_loss"], history["val_accuracy"]]
        ours = [result[name][metric] for metric in METRICS]
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow_only  # its oracle is a tf.GradientTape loop
def test_accumulating_twin_is_full_batch_gradient_descent(tiny_run, tiny_data_dir):
    """Ragged batches included (300 = 4 x 64 + 44), each epoch is one exact step."""
    result, _ = tiny_run
    (x_train, y_train), (x_test, y_test) = load_dataset("mnist", tiny_data_dir)
    x_train = (x_train / 255.0).astype("float32")
    x_test = (x_test / 255.0).astype("float32")
    model, _ = make_twins(42)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.01)
    val_losses = []
    for _ in range(EPOCHS):
        with tf.GradientTape() as tape:
            train_loss = loss(y_train, model(x_train, training=True))
        gradients = tape.gradient(train_loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        val_losses.append(float(loss(y_test, model(x_test, training=False))))
    np.testing.assert_allclose(
        result["accumulating"]["val_loss"], val_losses, rtol=1e-5, atol=1e-6
    )


# -- run_all: files, skipping, forcing, failures ---------------------------------


def _fake_result(config: ExperimentConfig) -> dict:
    return {"config": config.to_dict(), "standard": {}, "accumulating": {}}


@pytest.fixture
def fake_runs(monkeypatch):
    """Replaces training by a stub; returns the list of configs it ran."""
    ran: list[ExperimentConfig] = []

    def fake_run_experiment(config, progress=None):
        if config.seed == 13:
            raise RuntimeError("unlucky seed")
        ran.append(config)
        return _fake_result(config)

    monkeypatch.setattr(experiment, "run_experiment", fake_run_experiment)
    return ran


def test_run_all_writes_then_skips_unless_forced(tmp_path, fake_runs):
    configs = [ExperimentConfig("mnist", epochs=2, seed=seed) for seed in (42, 1)]
    records = run_all(configs, tmp_path, jobs=1)
    assert [record.status for record in records] == ["ran", "ran"]
    assert [record.path for record in records] == [
        tmp_path / "mnist" / "history-seed42.json",
        tmp_path / "mnist" / "history-seed1.json",
    ]
    assert json.loads(records[0].path.read_text())["config"]["seed"] == 42

    again = run_all(configs, tmp_path, jobs=1)
    assert [record.status for record in again] == ["skipped", "skipped"]
    assert len(fake_runs) == 2

    forced = run_all(configs[:1], tmp_path, force=True, jobs=1)
    assert [record.status for record in forced] == ["ran"]
    assert len(fake_runs) == 3


def test_run_all_refuses_to_skip_a_different_experiment(tmp_path, fake_runs):
    run_all([ExperimentConfig("mnist", epochs=3)], tmp_path, jobs=1)
    longer = ExperimentConfig("mnist", epochs=200)
    with pytest.raises(ResultConflictError, match="3 epochs"):
        run_all([longer], tmp_path, jobs=1)
    assert run_all([longer], tmp_path, force=True, jobs=1)[0].status == "ran"
    assert load_result(result_path(tmp_path, longer))["config"]["epochs"] == 200


def test_run_all_keeps_going_after_a_failed_run(tmp_path, fake_runs):
    configs = [ExperimentConfig("mnist", epochs=1, seed=seed) for seed in (13, 2)]
    failed, ran = run_all(configs, tmp_path, jobs=1)
    assert failed.status == "failed" and "unlucky seed" in failed.error
    assert not failed.path.exists()
    assert ran.status == "ran" and ran.path.exists()


def test_run_all_rejects_duplicates_and_bad_jobs(tmp_path, fake_runs):
    config = ExperimentConfig("mnist", epochs=1)
    with pytest.raises(ValueError, match="several configurations"):
        run_all([config, config], tmp_path)
    with pytest.raises(ValueError, match="jobs"):
        run_all([config], tmp_path, jobs=0)
