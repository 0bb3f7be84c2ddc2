import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest
from hypothesis import HealthCheck, settings

# Each process runs one Keras backend (KERAS_BACKEND, fixed before keras is
# imported: `make test-jax`, `make test-torch`). Tests of TensorFlow-only
# machinery (tf.distribute, tf.train.Checkpoint, SavedModel, GradientTape)
# carry the `tensorflow_only` marker and are skipped elsewhere.
BACKEND = keras.backend.backend()


# Keras's PyTorch trainer runs one step per execution (it raises otherwise).
STEPS_PER_EXECUTION = (1,) if BACKEND == "torch" else (1, 3)


def _several_steps_per_execution(item) -> bool:
    if "several_steps_per_execution" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(name, 1) != 1 for name in ("spe", "steps_per_execution"))


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-only; this run is {BACKEND}")
    one_step = pytest.mark.skip(reason="Keras on torch: steps_per_execution=1")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)
        elif BACKEND == "torch" and _several_steps_per_execution(item):
            item.add_marker(one_step)


# Each example builds and traces real Keras models: slow by hypothesis's
# standards, so no deadline, and a budget that keeps `make test` short.
settings.register_profile(
    "keras",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "12")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("keras")
