"""Load MNIST and Fashion-MNIST from local IDX files, falling back to Keras.

Sources are tried in this order:

1. the ``data_dir`` argument of :func:`load_dataset`,
2. the ``ACCUMULATE_DATA_DIR`` environment variable,
3. ``keras.datasets.<mnist|fashion_mnist>.load_data()`` (downloads on first use).

A configured directory is laid out as ``<dir>/mnist/`` and
``<dir>/fashion-mnist/``, each holding the four standard IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), gzipped (``.gz``)
or not. Pointing ``data_dir`` straight at a dataset folder also works.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DataSourceError", "IdxFormatError", "load_dataset", "read_idx"]

ENV_VAR = "ACCUMULATE_DATA_DIR"

# canonical name -> (folder under the data dir, keras.datasets submodule)
_DATASETS = {
    "mnist": ("mnist", "mnist"),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist"),
}
_ALIASES = {"fashion-mnist": "fashion_mnist"}
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_UBYTE = 0x08
_IMAGE_SHAPE = (28, 28)
_NUM_CLASSES = 10

Split = tuple[np.ndarray, np.ndarray]


class IdxFormatError(ValueError):
    """An IDX file is corrupt or does not hold what an MNIST-style file must."""


class DataSourceError(RuntimeError):
    """No configured source could provide the requested dataset."""


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally ``.gz``) into a uint8 array.

    Only element type 0x08 (unsigned byte), the one MNIST-style datasets use,
    is supported. ``ndim``, if given, is the required number of dimensions.
    Raises :class:`IdxFormatError` for a corrupt gzip stream, a bad header,
    or a payload shorter or longer than the header promises.

    >>> import gzip, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx1-ubyte.gz")
    >>> with gzip.open(path, "wb") as f:
    ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
    >>> read_idx(path, ndim=1)
    array([7, 2, 1], dtype=uint8)
    """
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        # BadGzipFile (an OSError) covers bad magic and CRC; EOFError truncation.
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxFormatError(f"{path}: corrupt gzip stream ({exc})") from exc

    if len(data) < 4:
        raise IdxFormatError(
            f"{path}: truncated header, expected at least 4 bytes, found {len(data)}"
        )
    if data[:2] != b"\x00\x00":
        hint = (
            " (it looks gzip-compressed; name it *.gz)"
            if data[:2] == b"\x1f\x8b"
            else ""
        )
        raise IdxFormatError(
            f"{path}: bad magic number 0x{data[:4].hex()}, expected 0x0000 followed "
            f"by type and dimension bytes{hint}"
        )
    dtype_byte, file_ndim = data[2], data[3]
    if dtype_byte != _UBYTE:
        raise IdxFormatError(
            f"{path}: unsupported data type byte 0x{dtype_byte:02x}, "
            f"expected 0x{_UBYTE:02x} (unsigned byte)"
        )
    if ndim is not None and file_ndim != ndim:
        raise IdxFormatError(
            f"{path}: expected {ndim} dimension(s) (magic 0x000008{ndim:02x}), "
            f"found {file_ndim} (magic 0x{data[:4].hex()})"
        )

    header_size = 4 + 4 * file_ndim
    if len(data) < header_size:
        raise IdxFormatError(
            f"{path}: truncated header, expected {header_size} bytes, found {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", file_ndim, offset=4))
    expected = header_size + math.prod(shape)
    if len(data) < expected:
        raise IdxFormatError(
            f"{path}: truncated, header promises shape {shape} ({expected} bytes), "
            f"found {len(data)} bytes"
        )
    if len(data) > expected:
        raise IdxFormatError(
            f"{path}: {len(data) - expected} trailing bytes, header promises shape "
            f"{shape} ({expected} bytes), found {len(data)} bytes"
        )
    # frombuffer over bytes is read-only; copy so callers can normalise in place.
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape).copy()


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[Split, Split]:
    """Return ``((x_train, y_train), (x_test, y_test))`` as uint8 arrays.

    ``name`` is ``"mnist"`` or ``"fashion_mnist"`` (alias ``"fashion-mnist"``).
    Shapes match ``keras.datasets.mnist.load_data()``: images ``(n, 28, 28)``,
    labels ``(n,)`` with values 0..9, ``n`` taken from the file headers. See
    the module docstring for the source order and directory layout.

    Raises ``ValueError`` for an unknown name, ``FileNotFoundError`` if a
    configured directory lacks the files, :class:`IdxFormatError` for bad
    files and :class:`DataSourceError` if no source is configured and Keras
    cannot provide the data either.

    >>> (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    >>> x_train.shape, y_train.shape, x_test.shape, x_train.dtype
    ((60000, 28, 28), (60000,), (10000, 28, 28), dtype('uint8'))
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in _DATASETS:
        allowed = ", ".join(repr(n) for n in [*_DATASETS, *_ALIASES])
        raise ValueError(f"name must be one of {allowed}; got {name!r}")
    folder, keras_module = _DATASETS[canonical]

    env_dir = os.environ.get(ENV_VAR) or None  # an empty variable counts as unset
    if data_dir is not None:
        files = _find_files(Path(data_dir), folder, "data_dir argument")
    elif env_dir is not None:
        files = _find_files(Path(env_dir), folder, f"{ENV_VAR} environment variable")
    else:
        return _load_from_keras(keras_module, folder)
    return _read_split(files, "train"), _read_split(files, "test")


def _find_files(root: Path, folder: str, source: str) -> dict[str, Path]:
    candidates = [root / folder]
    # Pointing straight at the *other* dataset's folder would silently return
    # the wrong data, so the direct form is only offered for other folder names.
    other_folders = {f for f, _ in _DATASETS.values() if f != folder}
    if root.name not in other_folders:
        candidates.append(root)

    missing: list[Path] = []
    for directory in candidates:
        found: dict[str, Path] = {}
        for key, stem in _FILES.items():
            options = [directory / f"{stem}.gz", directory / stem]  # prefer .gz
            path = next((p for p in options if p.is_file()), None)
            if path is None:
                missing.extend(options)
            else:
                found[key] = path
        if len(found) == len(_FILES):
            return found

    listing = "\n".join(f"  {p}" for p in missing)
    raise FileNotFoundError(
        f"{folder} IDX files not found in {root} (from the {source}); "
        f"looked for these paths, which do not exist:\n{listing}"
    )


def _read_split(files: dict[str, Path], split: str) -> Split:
    images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != _IMAGE_SHAPE:
        raise IdxFormatError(
            f"{images_path}: expected 28x28 images, found "
            f"{images.shape[1]}x{images.shape[2]}"
        )
    if labels.size and labels.max() >= _NUM_CLASSES:
        bad = int(np.argmax(labels >= _NUM_CLASSES))
        raise IdxFormatError(
            f"{labels_path}: label values must be in 0..{_NUM_CLASSES - 1}, "
            f"found {labels[bad]} at index {bad}"
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; expected the counts to match"
        )
    return images, labels


def _load_from_keras(keras_module: str, folder: str) -> tuple[Split, Split]:
    loader = f"keras.datasets.{keras_module}.load_data()"
    try:
        import keras  # deferred: importing TensorFlow/Keras takes seconds

        (x_train, y_train), (x_test, y_test) = getattr(
            keras.datasets, keras_module
        ).load_data()
    # Keras reports download failures as a bare Exception, so catch broadly.
    except Exception as exc:
        layout = "\n".join(f"  <dir>/{folder}/{stem}.gz" for stem in _FILES.values())
        raise DataSourceError(
            f"could not load {keras_module!r}; sources tried:\n"
            f"  1. data_dir argument: not given\n"
            f"  2. {ENV_VAR} environment variable: not set\n"
            f"  3. {loader}: {type(exc).__name__}: {exc}\n"
            f"To fix, pass data_dir=<dir> or set {ENV_VAR}=<dir>, where <dir> "
            f"holds the IDX files (.gz or uncompressed) laid out as:\n{layout}"
        ) from exc
    return (x_train, y_train), (x_test, y_test)
