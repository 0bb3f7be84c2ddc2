"""A batch split into micro-batches inside the train step (``micro_batch_size``).

`fit(batch_size=512)` on a model with ``micro_batch_size=64`` hands the
train step a batch of 512. The step adds the gradients of its slices of 64
(the last one ragged) into the window one after the other, inside the
compiled step, and counts the batch as one step of the window: one `fit`
step is one update, and everything Keras counts (callbacks, the progress
bar, schedules, ``BackupAndRestore``) counts updates. Peak memory is one
slice's forward and backward pass, plus the batch's inputs.

Each slice is weighed as a micro-batch of its own (`window.add`), so the
update is the whole batch's, exactly, for every loss reduction.

What lives here is what every backend shares: the option's check, each
replica's (or device's) slice, the batch's logged loss from its slices',
and the ``"auto"`` search for the largest slice that fits.

Example:
    >>> check_micro_batch_size(64), check_micro_batch_size(None)
    (64, None)
    >>> slice_plan(batch=100, size=32)  # 3 full slices, then a ragged 4
    (3, 4)
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
from keras import ops

from accumulate.window import counts

#: ``micro_batch_size="auto"``: the largest slice that fits, searched on the
#: accelerator before training starts.
AUTO = "auto"

logger = logging.getLogger("accumulate")


def check_micro_batch_size(value: Any) -> int | str | None:
    """``value`` if it is a valid ``micro_batch_size``, else `ValueError`.

    Valid: ``None`` (the batch is not split), a positive int, ``"auto"``.
    """
    if value is None or value == AUTO:
        return value
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if is_int and value >= 1:
        return int(value)
    raise ValueError(
        "`micro_batch_size` must be a positive int (the samples of each "
        'slice of a batch), "auto" (the largest that fits on the '
        "accelerator) or None (no slicing); received "
        f"micro_batch_size={value!r}."
    )


def share(micro_batch_size: int, parts: int, what: str) -> int:
    """Each of ``parts`` replicas' (or devices') share of a slice.

    ``micro_batch_size`` is global, as `fit`'s ``batch_size`` is, and each
    replica slices its own share of the batch: the share must be whole.
    """
    if micro_batch_size % parts:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} is global (as fit's "
            f"batch_size is) and is split over the {parts} {what} that share "
            f"each batch, so it must be a multiple of {parts}: use "
            f"micro_batch_size={max(parts, micro_batch_size // parts * parts)}."
        )
    return micro_batch_size // parts


def slice_plan(batch: int, size: int) -> tuple[int, int]:
    """``(full, remainder)``: the full slices of ``size`` in ``batch`` and
    the samples of the ragged last slice (0: none)."""
    return batch // size, batch % size


def loss_totals() -> tuple[Any, Any, Any]:
    """Empty running totals for `add_loss`: ``(loss sum, weight sum, any)``."""
    return ops.zeros((), "float32"), ops.zeros((), "float32"), ops.zeros((), "bool")


def add_loss(
    totals: tuple[Any, Any, Any], loss: Any, weight: Any, summed: bool
) -> tuple[Any, Any, Any]:
    """The totals with one slice's loss and weight added (see `batch_loss`).

    ``weight`` may hold one weight per device (their shares' losses in
    ``loss``). A slice that does not count (`window.counts`) adds nothing:
    selected, never multiplied (its loss may be NaN).
    """
    loss_sum, weight_sum, any_counted = totals
    loss = ops.cast(loss, "float32")
    weight = ops.cast(weight, "float32")
    counted = counts(weight)
    added = loss if summed else loss * weight
    return (
        loss_sum + ops.sum(ops.where(counted, added, 0.0)),
        weight_sum + ops.sum(ops.where(counted, weight, 0.0)),
        ops.logical_or(any_counted, ops.any(counted)),
    )


def batch_loss(totals: tuple[Any, Any, Any], fallback: Any, summed: bool) -> Any:
    """The batch's loss from its slices', as one step on the batch logs it.

    A mean reduction's slices ``S_k / D_k + R`` weighted by ``D_k`` give
    ``Σ S_k / Σ D_k + R``, the batch's loss; a sum's slices add up. With no
    slice that counts (only padding), every slice's loss is the same
    regularisation alone: ``fallback``, any one slice's.
    """
    loss_sum, weight_sum, any_counted = totals
    if summed:
        return ops.where(any_counted, loss_sum, ops.cast(fallback, "float32"))
    divisor = ops.where(any_counted, weight_sum, 1.0)
    return ops.where(any_counted, loss_sum / divisor, ops.cast(fallback, "float32"))


def largest_fitting(
    fits: Callable[[int], None],
    batch_size: int,
    is_out_of_memory: Callable[[BaseException], bool],
) -> int:
    """The largest slice, from ``batch_size`` down by halving, that fits.

    ``fits(size)`` runs one slice's forward and backward pass and raises
    what the backend raises when memory runs out (``is_out_of_memory``
    tells it from other errors, which propagate). The halving follows
    Composer's ``device_train_microbatch_size="auto"``.

    Example:
        >>> def fits(size):
        ...     if size > 48:
        ...         raise MemoryError(f"{size} does not fit")
        >>> largest_fitting(fits, 512, lambda error: isinstance(error, MemoryError))
        32
    """
    size = batch_size
    while True:
        try:
            fits(size)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if size == 1:
                raise MemoryError(
                    'micro_batch_size="auto" found that not even one sample '
                    "fits in the accelerator's memory: its forward and "
                    "backward pass ran out of memory. Free memory, or use a "
                    "smaller model."
                ) from error
            logger.info("micro-batch of %d ran out of memory; halving", size)
            size = max(1, size // 2)
            continue
        return size


def first_batch(x: Any, y: Any, sample_weight: Any, batch_size: int | None) -> tuple:
    """The first batch `fit` would train on, as ``(x, y, sample_weight)``.

    Arrays (and nests of them) give their first ``batch_size`` rows (Keras's
    default of 32 when it is not given); a `tf.data.Dataset`, a
    `keras.utils.PyDataset` or another re-iterable source gives its first
    element. A one-shot iterator (a generator) cannot be read without
    taking its batch from training, so it is refused.
    """
    if isinstance(x, keras.utils.PyDataset):
        return keras.utils.unpack_x_y_sample_weight(x[0])
    first = keras.tree.flatten(x)[0] if x is not None else None
    if hasattr(first, "shape") and hasattr(first, "__getitem__"):
        rows = 32 if batch_size is None else batch_size
        return keras.tree.map_structure(
            lambda array: None if array is None else array[:rows],
            (x, y, sample_weight),
        )
    iterator = iter(x)
    if iterator is x:
        raise ValueError(
            'micro_batch_size="auto" tries slices of the first batch before '
            "training, and fit's x is a one-shot iterator: reading it would "
            "take that batch from training. Pass a tf.data.Dataset, a "
            "keras.utils.PyDataset or arrays, or give micro_batch_size an int."
        )
    return keras.utils.unpack_x_y_sample_weight(next(iterator))


def rows(data: Any, count: int) -> Any:
    """The first ``count`` rows of every array of ``data``."""
    return keras.tree.map_structure(
        lambda array: None if array is None else array[:count], data
    )


@contextlib.contextmanager
def preserved(variables: Sequence[Any]) -> Iterator[None]:
    """Puts ``variables`` back as they were (a trial step's state changes:
    moving statistics, seed generators, loss trackers)."""
    values = [variable.numpy() for variable in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)


def search(model: Any, fit_arguments: dict[str, Any], backend: Any) -> int:
    """``micro_batch_size="auto"``: the largest slice of `fit`'s first batch
    whose forward and backward pass fits on the accelerator.

    The optimizer's and the window's state are built first, so that their
    memory is held during the trials, as it will be in training
    (`largest_fitting`). ``backend`` is the model's glue module: its
    ``accelerator()``, ``probe(model, x, y, sample_weight)`` (one trial
    pass), ``is_out_of_memory(error)`` and ``PROBE_CHANGES_STATE``. The
    choice is logged, and printed unless `fit` is silent.
    """
    where = backend.accelerator()
    if where is None:
        raise ValueError(
            'micro_batch_size="auto" finds the largest slice that fits in '
            "an accelerator's memory by trying slices until one does not "
            f"run out of it, and this process has none (Keras backend "
            f"{keras.backend.backend()!r} on CPU), where running out of "
            "memory is not an error to catch but the machine swapping. "
            "Give micro_batch_size an int: the samples whose activations "
            "fit in the memory you can spare."
        )
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow's
    if (
        keras.distribution.distribution() is not None
        or getattr(strategy, "num_replicas_in_sync", 1) > 1
    ):
        raise ValueError(
            'micro_batch_size="auto" tries slices on one device; under a '
            "distribution, give micro_batch_size an int (global, as "
            "batch_size is)."
        )
    batch = first_batch(
        fit_arguments.get("x"),
        fit_arguments.get("y"),
        fit_arguments.get("sample_weight"),
        fit_arguments.get("batch_size"),
    )
    if getattr(model, "preprocessor", None) is not None:
        # A KerasHub task's fit preprocesses its raw inputs first.
        batch = keras.utils.unpack_x_y_sample_weight(model.preprocess_samples(*batch))
    if not model.built:
        model(rows(batch[0], 1))
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model._build_accumulation_state()
    changed = model._probed_state() if backend.PROBE_CHANGES_STATE else []

    def fits(size: int) -> None:
        with preserved(changed):
            backend.probe(model, *rows(batch, size))

    samples = int(backend.batch_size(batch[0]))
    size = largest_fitting(fits, samples, backend.is_out_of_memory)
    message = (
        f'micro_batch_size="auto": slices of {size} samples fit on {where} '
        f"(tried from the batch of {samples}, halving)."
    )
    logger.info(message)
    if fit_arguments.get("verbose", "auto") != 0:
        print(message)
    return size
