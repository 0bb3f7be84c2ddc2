"""Collection for the doctests under accumulate/ (``--doctest-modules``).

Each backend's glue module imports its own framework, which only that
backend's environment has: collect just the one Keras runs on. TensorFlow's
own state, distribution helpers and the notebook's eager TensorFlow loops
are TensorFlow code whatever the backend: their doctests run with it only.
The JAX scale test's worker is a script for its own interpreter (JAX, 4
virtual devices), never a module to import here.
"""

import keras

BACKEND = keras.backend.backend()
collect_ignore = [
    f"accumulate/backends/{name}.py"
    for name in ("tensorflow", "jax", "torch")
    if name != BACKEND
]
collect_ignore.append("tests/jax_scale_worker.py")
if BACKEND != "tensorflow":
    collect_ignore += [
        "accumulate/accumulator.py",
        "accumulate/distributed.py",
        "accumulate/paper/notebook_loops.py",
    ]
