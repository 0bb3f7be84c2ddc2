"""A tiny MNIST-shaped dataset on disk, for tests that run the real pipeline.

Writes the four gzipped IDX files `accumulate.paper.datasets.load_dataset` reads,
for both dataset folders. Images are noise plus a bright row picked by the
label, so a few epochs already learn something.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

TRAIN_SAMPLES = 300
TEST_SAMPLES = 100
FOLDERS = ("mnist", "fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _images_and_labels(rng: np.random.Generator, count: int):
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 64, (count, 28, 28)).astype(np.uint8)
    images[np.arange(count), 2 + 2 * labels, :] = 255
    return images, labels


def write_tiny_data_dir(
    root: Path, train_samples: int = TRAIN_SAMPLES, test_samples: int = TEST_SAMPLES
) -> Path:
    """Writes ``<root>/mnist`` and ``<root>/fashion-mnist``; returns ``root``."""
    rng = np.random.default_rng(0)
    for folder in FOLDERS:
        train_images, train_labels = _images_and_labels(rng, train_samples)
        test_images, test_labels = _images_and_labels(rng, test_samples)
        files = {
            "train-images-idx3-ubyte": train_images,
            "train-labels-idx1-ubyte": train_labels,
            "t10k-images-idx3-ubyte": test_images,
            "t10k-labels-idx1-ubyte": test_labels,
        }
        directory = root / folder
        directory.mkdir(parents=True, exist_ok=True)
        for stem, array in files.items():
            (directory / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    return root


# What `build_report` writes into each dataset folder.
REPORT_FILES = (
    "curves.png",
    "updates.png",
    "confusion.png",
    "classification-report-standard.txt",
    "classification-report-accumulating.txt",
    "report.md",
)
