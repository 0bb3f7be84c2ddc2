"""Tests for accumulate.paper.datasets: IDX reading, sources, validation."""

from __future__ import annotations

import doctest
import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest

from accumulate.paper import datasets
from accumulate.paper.datasets import (
    DataSourceError,
    IdxFormatError,
    load_dataset,
    read_idx,
)

ENV = "ACCUMULATE_DATA_DIR"
STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------- helpers
def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (big-endian header, then the data)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def write_file(path: Path, payload: bytes, *, gz: bool) -> Path:
    """Write payload to path (+ ".gz" and compressed if gz); return the path."""
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def make_arrays(seed: int = 0, n_train: int = 5, n_test: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_dataset(folder: Path, arrays: dict, *, gz: bool = True) -> dict[str, Path]:
    """Write the four IDX files of arrays into folder; return key -> path."""
    return {
        key: write_file(folder / STEMS[key], idx_bytes(arrays[key]), gz=gz)
        for key in STEMS
    }


def assert_matches(result, arrays: dict) -> None:
    (x_train, y_train), (x_test, y_test) = result
    for got, key in [
        (x_train, "train_images"),
        (y_train, "train_labels"),
        (x_test, "test_images"),
        (y_test, "test_labels"),
    ]:
        assert got.dtype == np.uint8
        assert got.shape == arrays[key].shape
        np.testing.assert_array_equal(got, arrays[key])


@pytest.fixture
def arrays() -> dict:
    return make_arrays()


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI sets ACCUMULATE_DATA_DIR; tests of other sources must not see it.
    monkeypatch.delenv(ENV, raising=False)


# ------------------------------------------------------------------ read_idx
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "x-idx3-ubyte", idx_bytes(array), gz=gz)
    result = read_idx(path)
    assert result.dtype == np.uint8
    assert result.shape == (2, 3, 4)
    np.testing.assert_array_equal(result, array)
    result[0, 0, 0] = 99  # callers may normalise in place
    assert read_idx(str(path), ndim=3)[0, 0, 0] == 0


def test_read_idx_rejects_wrong_ndim(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x-idx1-ubyte", idx_bytes(np.arange(4)), gz=False)
    with pytest.raises(IdxFormatError, match=r"expected 3 dimension.*found 1"):
        read_idx(path, ndim=3)


def test_read_idx_docstring_example_runs() -> None:
    (test,) = doctest.DocTestFinder().find(datasets.read_idx, "read_idx")
    result = doctest.DocTestRunner().run(test)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------- directory sources
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_data_dir_round_trip(tmp_path: Path, arrays: dict, gz: bool) -> None:
    write_dataset(tmp_path / "mnist", arrays, gz=gz)
    assert_matches(load_dataset("mnist", data_dir=tmp_path), arrays)


def test_data_dir_accepts_str(tmp_path: Path, arrays: dict) -> None:
    write_dataset(tmp_path / "mnist", arrays)
    assert_matches(load_dataset("mnist", data_dir=str(tmp_path)), arrays)


def test_env_var_used(
    tmp_path: Path, arrays: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path / "mnist", arrays)
    monkeypatch.setenv(ENV, str(tmp_path))
    assert_matches(load_dataset("mnist"), arrays)


def test_argument_beats_env(
    tmp_path: Path, arrays: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path / "from_arg" / "mnist", arrays)
    write_dataset(tmp_path / "from_env" / "mnist", make_arrays(seed=1))
    monkeypatch.setenv(ENV, str(tmp_path / "from_env"))
    assert_matches(load_dataset("mnist", data_dir=tmp_path / "from_arg"), arrays)


@pytest.mark.parametrize("folder", ["mnist", "my-digits"])
def test_data_dir_pointing_at_dataset_folder(
    tmp_path: Path, arrays: dict, folder: str
) -> None:
    write_dataset(tmp_path / folder, arrays)
    assert_matches(load_dataset("mnist", data_dir=tmp_path / folder), arrays)


def test_other_datasets_folder_is_not_used_directly(
    tmp_path: Path, arrays: dict
) -> None:
    # Asking for Fashion-MNIST while pointing at the MNIST folder must not
    # silently return MNIST.
    write_dataset(tmp_path / "mnist", arrays)
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):
        load_dataset("fashion_mnist", data_dir=tmp_path / "mnist")


@pytest.mark.parametrize("name", ["fashion_mnist", "fashion-mnist"])
def test_fashion_mnist_and_alias(tmp_path: Path, arrays: dict, name: str) -> None:
    write_dataset(tmp_path / "mnist", make_arrays(seed=1))
    write_dataset(tmp_path / "fashion-mnist", arrays)
    assert_matches(load_dataset(name, data_dir=tmp_path), arrays)


def test_gz_preferred_over_raw(tmp_path: Path, arrays: dict) -> None:
    write_dataset(tmp_path / "mnist", make_arrays(seed=1), gz=False)
    write_dataset(tmp_path / "mnist", arrays, gz=True)
    assert_matches(load_dataset("mnist", data_dir=tmp_path), arrays)


@pytest.mark.parametrize("name", ["cifar10", "MNIST", "", None])
def test_invalid_name(name) -> None:
    with pytest.raises(ValueError) as info:
        load_dataset(name, data_dir="/nonexistent")
    message = str(info.value)
    assert "name" in message
    assert repr(name) in message
    for allowed in ("'mnist'", "'fashion_mnist'", "'fashion-mnist'"):
        assert allowed in message


def test_missing_files_lists_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "data_dir argument" in message
    for stem in STEMS.values():
        for directory in (tmp_path / "mnist", tmp_path):
            assert str(directory / f"{stem}.gz") in message
            assert f"{directory / stem}\n" in f"{message}\n"


def test_missing_single_file_lists_only_it(tmp_path: Path, arrays: dict) -> None:
    paths = write_dataset(tmp_path / "mnist", arrays)
    paths["test_labels"].unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    missing = tmp_path / "mnist" / STEMS["test_labels"]
    assert str(missing) + ".gz" in message
    assert f"{missing}\n" in f"{message}\n"
    assert str(paths["train_images"]) not in message  # present files not listed


def test_missing_files_via_env_names_env_and_does_not_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist")
    assert ENV in str(info.value)
    assert str(tmp_path / "nowhere" / "mnist" / STEMS["train_images"]) in str(
        info.value
    )


# ---------------------------------------------------------------- corruption
def _payload(arrays: dict, key: str) -> bytes:
    return idx_bytes(arrays[key])


def _set_byte(data: bytes, index: int, value: int) -> bytes:
    return data[:index] + bytes([value]) + data[index + 1 :]


# Each case: (file key, build raw payload from arrays, expected message regex).
CORRUPTIONS = {
    "bad-magic": (
        "train_images",
        lambda a: b"\x01\x02" + _payload(a, "train_images")[2:],
        r"bad magic number 0x01020803",
    ),
    "wrong-type-byte": (
        "train_labels",
        lambda a: _set_byte(_payload(a, "train_labels"), 2, 0x0D),
        r"data type byte 0x0d, expected 0x08",
    ),
    "images-wrong-ndim": (
        "train_images",
        lambda a: idx_bytes(a["train_images"].reshape(5, 784)),
        r"expected 3 dimension.*found 2",
    ),
    "labels-wrong-ndim": (
        "test_labels",
        lambda a: idx_bytes(a["test_labels"].reshape(3, 1)),
        r"expected 1 dimension.*found 2",
    ),
    "truncated-data": (
        "test_images",
        lambda a: _payload(a, "test_images")[:-10],
        r"truncated.*\(3, 28, 28\).*2368 bytes.*found 2358",
    ),
    "truncated-header": (
        "train_images",
        lambda a: _payload(a, "train_images")[:10],
        r"truncated header, expected 16 bytes, found 10",
    ),
    "empty-file": ("train_labels", lambda a: b"", r"truncated header"),
    "trailing-bytes": (
        "train_labels",
        lambda a: _payload(a, "train_labels") + b"\x00\x00\x00",
        r"3 trailing bytes",
    ),
    "not-28x28": (
        "train_images",
        lambda a: idx_bytes(np.zeros((5, 27, 28), np.uint8)),
        r"expected 28x28 images, found 27x28",
    ),
    "label-out-of-range": (
        "train_labels",
        lambda a: idx_bytes(np.array([1, 2, 10, 3, 4], np.uint8)),
        r"0\.\.9, found 10 at index 2",
    ),
}


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_file_raises(tmp_path: Path, arrays: dict, case: str, gz: bool) -> None:
    key, build, pattern = CORRUPTIONS[case]
    write_dataset(tmp_path / "mnist", arrays, gz=gz)
    bad = write_file(tmp_path / "mnist" / STEMS[key], build(arrays), gz=gz)
    with pytest.raises(IdxFormatError, match=pattern) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)
    assert str(bad) in str(info.value)


GZIP_CORRUPTIONS = {
    # The last 8 bytes of a gzip member are CRC32 and length; flip the CRC.
    "bad-crc": lambda gz: gz[:-8] + bytes([gz[-8] ^ 0xFF]) + gz[-7:],
    "truncated-gzip": lambda gz: gz[: len(gz) // 2],
    "not-gzip": gzip.decompress,
}


@pytest.mark.parametrize("case", GZIP_CORRUPTIONS)
def test_corrupt_gzip_raises(tmp_path: Path, arrays: dict, case: str) -> None:
    paths = write_dataset(tmp_path / "mnist", arrays, gz=True)
    bad = paths["train_images"]
    bad.write_bytes(GZIP_CORRUPTIONS[case](bad.read_bytes()))
    with pytest.raises(IdxFormatError, match="corrupt gzip stream") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_label_count_mismatch(tmp_path: Path, arrays: dict, split: str) -> None:
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:-1]
    paths = write_dataset(tmp_path / "mnist", arrays)
    n_images = len(arrays[f"{split}_images"])
    with pytest.raises(IdxFormatError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(paths[f"{split}_images"]) in message
    assert str(paths[f"{split}_labels"]) in message
    assert f"{n_images} images" in message
    assert f"{n_images - 1} labels" in message


# ------------------------------------------------------------ keras fallback
def test_keras_fallback_used_without_directory(
    no_env: None, monkeypatch: pytest.MonkeyPatch, arrays: dict
) -> None:
    import keras

    expected = (
        (arrays["train_images"], arrays["train_labels"]),
        (arrays["test_images"], arrays["test_labels"]),
    )
    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: expected)
    (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    assert x_train is arrays["train_images"]
    assert y_train is arrays["train_labels"]
    assert x_test is arrays["test_images"]
    assert y_test is arrays["test_labels"]


def test_keras_fallback_uses_fashion_loader_for_alias(
    monkeypatch: pytest.MonkeyPatch, arrays: dict
) -> None:
    import keras

    monkeypatch.setenv(ENV, "")  # empty counts as unset
    fake = ((arrays["train_images"], arrays["train_labels"]), (np.ones(1), np.ones(1)))

    def wrong_loader():
        raise AssertionError("mnist loader used for fashion-mnist")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: fake)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", wrong_loader)
    (x_train, _), _ = load_dataset("fashion-mnist")
    assert x_train is arrays["train_images"]


def test_no_source_raises_data_source_error(
    no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    def offline():
        raise OSError("no network here")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DataSourceError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, OSError)
    assert "data_dir argument: not given" in message
    assert f"{ENV} environment variable: not set" in message
    assert "keras.datasets.mnist.load_data(): OSError: no network here" in message
    assert "data_dir=" in message
    for stem in STEMS.values():
        assert f"<dir>/mnist/{stem}.gz" in message


# ----------------------------------------------------------------- real data
@pytest.mark.skipif(
    not os.environ.get(ENV),
    reason=f"{ENV} is not set; point it at a directory holding mnist/ and "
    "fashion-mnist/ IDX files to test loading the real datasets",
)
def test_real_datasets_load() -> None:
    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    elapsed = time.perf_counter() - start
    assert x_train.shape == (60000, 28, 28)
    assert y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28)
    assert y_test.shape == (10000,)
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}
    # The published MNIST class counts; any file mix-up changes them.
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(y_train, minlength=10).tolist() == train_counts
    assert np.bincount(y_test, minlength=10).tolist() == test_counts
    assert sum(train_counts) == 60000
    assert sum(test_counts) == 10000
    assert 0 < x_train.mean() < 255
    assert elapsed < 5, f"loading MNIST took {elapsed:.2f}s"

    (fx_train, fy_train), (fx_test, fy_test) = load_dataset("fashion_mnist")
    assert fx_train.shape == (60000, 28, 28)
    assert fx_test.shape == (10000, 28, 28)
    assert fx_train.dtype == fy_train.dtype == np.uint8
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert np.bincount(fy_train, minlength=10).tolist() == [6000] * 10
    assert np.bincount(fy_test, minlength=10).tolist() == [1000] * 10
    assert not np.array_equal(fx_test, x_test)
