"""Worker processes for many training runs: spawned, one TensorFlow thread each.

Both the reproduction (`accumulate.paper.experiment`) and the batch-size study
(`accumulate.paper.study_runner`) train several runs side by side on a few
cores. Each worker computes with one thread, so that the workers share the
cores instead of fighting over them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["spawn_pool", "use_one_thread"]


def spawn_pool(
    jobs: int, initializer: Callable[..., None], *initargs: Any
) -> ProcessPoolExecutor:
    """A pool of ``jobs`` spawned workers, each starting with ``initializer``."""
    # Spawned, not forked: a forked child would inherit this process's
    # TensorFlow runtime (and its threads) in an undefined state.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=initializer, initargs=initargs
    )


def use_one_thread() -> None:
    """Gives this process one TensorFlow thread; call before its first op."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
