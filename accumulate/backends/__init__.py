"""One module of backend glue per Keras backend; `accumulate.model` picks one.

Each defines ``Accumulation``, the half of `AccumulatingModel` that runs on
that backend's trainer (its train step, its state, applying a window), and
the small helpers `batch_size` and `assert_equal_counts`.
"""
