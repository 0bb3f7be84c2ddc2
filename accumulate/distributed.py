"""What accumulation needs from `tf.distribute`, kept out of the model's logic.

Each replica accumulates into its own copy of the state (``ON_READ`` / ``SUM``
variables, see `accumulator.py`). When a window is applied, one all-reduce
sums the gradient sums and the sample count together; the optimizer must then
not all-reduce them again, which Keras's TensorFlow optimizer does in a
replica context. The helpers here do that, and restore per-replica state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf


def _do_nothing() -> None:
    return None


def cond_in_cross_replica_context(
    predicate: tf.Tensor,
    apply_on_every_replica: Callable[[], None],
    optimizer: Any,
) -> None:
    """``tf.cond(predicate, apply_on_every_replica)`` from a replica context.

    A `tf.cond` whose branch synchronises the replicas is not allowed in a
    replica context, so the condition moves to the cross-replica context (as
    Keras's LossScaleOptimizer does). Every replica ran the same micro-batches,
    so the first replica's predicate is everyone's. The branch applies
    ``optimizer`` to gradients that are already all-reduced.
    """
    replica_context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or replica_context is None:
        tf.cond(predicate, apply_on_every_replica, _do_nothing)
        return

    def in_cross_replica_context(strategy: tf.distribute.Strategy, predicate: Any):
        first_predicate = strategy.experimental_local_results(predicate)[0]
        with gradients_already_reduced(optimizer, strategy):
            tf.cond(
                first_predicate,
                lambda: strategy.extended.call_for_each_replica(apply_on_every_replica),
                _do_nothing,
            )

    replica_context.merge_call(in_cross_replica_context, args=(predicate,))


def all_reduce_window(
    gradient_sums: Sequence[tf.Tensor | None], scalars: Sequence[tf.Tensor]
) -> tuple[list[tf.Tensor | None], list[tf.Tensor]]:
    """Sums the window (and its counts) over replicas in one all-reduce.

    A no-op on one replica.
    """
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None or replica_context.num_replicas_in_sync <= 1:
        return list(gradient_sums), list(scalars)
    present = [gradient for gradient in gradient_sums if gradient is not None]
    reduced = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM, [*present, *scalars]
    )
    reduced_iterator = iter(reduced[: len(present)])
    return [
        None if gradient is None else next(reduced_iterator)
        for gradient in gradient_sums
    ], list(reduced[len(present) :])


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and the ones it wraps (a LossScaleOptimizer's inner one)."""
    chain = []
    while optimizer is not None:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


def _already_reduced(grads_and_vars: Any) -> list[Any]:
    return list(grads_and_vars)


@contextlib.contextmanager
def gradients_already_reduced(
    optimizer: Any, strategy: tf.distribute.Strategy
) -> Iterator[None]:
    """Stops Keras's TF optimizer from all-reducing the gradients in `apply`.

    In a replica context ``optimizer.apply`` sums the gradients over replicas
    (``_all_reduce_sum_gradients`` of Keras's TensorFlow optimizer, keras
    3.10 to 3.15). `all_reduce_window` has already summed them, so a second
    sum would multiply them by the number of replicas. A side effect: Keras
    clips before its all-reduce, i.e. per replica; here clipping sees the
    window's whole gradient, as on one device. Entered in the cross-replica
    context, around every replica's `apply`.
    """
    members = _optimizer_chain(optimizer)
    if strategy.num_replicas_in_sync <= 1:
        yield
        return
    missing = [m for m in members if not hasattr(m, "_all_reduce_sum_gradients")]
    if missing:
        raise NotImplementedError(
            f"{type(missing[0]).__name__} has no `_all_reduce_sum_gradients`; "
            "this Keras version reduces gradients in a way accumulate does not "
            "know, so distributed accumulation would not be exact."
        )
    for member in members:
        member._all_reduce_sum_gradients = _already_reduced
    try:
        yield
    finally:
        for member in members:
            del member._all_reduce_sum_gradients


def assign_total(
    variable: tf.Variable, value: Any, strategy: tf.distribute.Strategy
) -> None:
    """Restores a per-replica variable so that reading it gives ``value``.

    A ``SUM`` variable's replicas share the value; any other is copied.
    """
    if variable.aggregation == tf.VariableAggregation.SUM:
        value = value / strategy.num_replicas_in_sync
    strategy.run(lambda: variable.assign(tf.cast(value, variable.dtype)))


def first_replica_batch(iterator: Any, strategy: tf.distribute.Strategy) -> Any:
    """This worker's first replica's first batch, for a symbolic build."""
    # keras 3.11+ yields (begin_step, end_step, batches), 3.10 (step, batches).
    for *_, batches in iterator:
        return tf.nest.map_structure(
            lambda value: (
                strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues)
                else value
            ),
            next(batches),
        )
    raise ValueError("The training data yielded no batch.")
