"""Tests for accumulate.paper.reference: the notebook's logged numbers."""

from __future__ import annotations

import csv
import doctest
from pathlib import Path

import numpy as np
import pytest

from accumulate.paper import reference
from accumulate.paper.reference import METRICS, MODELS, load_reference

PACKAGED_CSV = Path(reference.__file__).parent / "data" / "seed_metrics.csv"


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_every_curve_has_200_epochs(dataset):
    curves = load_reference(dataset)
    assert set(curves) == set(MODELS)
    for model in MODELS:
        assert set(curves[model]) == set(METRICS)
        for values in curves[model].values():
            assert values.shape == (200,) and values.dtype == np.float64
        assert np.isfinite(curves[model]["train_loss"]).all()


def test_values_match_the_csv_and_missing_ones_are_nan():
    with PACKAGED_CSV.open(newline="") as file:
        rows = list(csv.DictReader(file))
    row = next(
        row
        for row in rows
        if (row["dataset"], row["model"], row["epoch"]) == ("mnist", "standard", "200")
    )
    mnist = load_reference("mnist")
    for metric in METRICS:
        assert mnist["standard"][metric][199] == float(row[metric])
    # The notebook validated only the MNIST standard run.
    assert np.isnan(mnist["accumulating"]["val_loss"]).all()
    fashion = load_reference("fashion_mnist")
    assert all(np.isnan(fashion[model]["val_accuracy"]).all() for model in MODELS)


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="'cifar10'"):
        load_reference("cifar10")


def test_doctests_pass():
    assert doctest.testmod(reference).failed == 0
