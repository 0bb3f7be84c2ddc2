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


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-only; this run is {BACKEND}")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)


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
