"""Collection for the doctests under accumulate/ (``--doctest-modules``).

Each backend's glue module imports its own framework, which only that
backend's environment has: collect just the one Keras runs on.
"""

import keras

collect_ignore = [
    f"accumulate/backends/{name}.py"
    for name in ("tensorflow", "jax", "torch")
    if name != keras.backend.backend()
]
