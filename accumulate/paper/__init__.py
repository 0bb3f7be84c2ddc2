"""The paper application: the notebook's experiment reproduced with the library.

Data reading (`datasets`), run configuration (`config`), the runner
(`experiment`, `training`, `results`, `progress`), the report (`report`,
`figures`, `reference` and the notebook's logged numbers in ``data/``), the
command line (`cli`, run as ``python -m accumulate``), the notebook's own
training loops (`notebook_loops`), and the batch-size study that answers the
notebook's question (`study`, `study_report`). It builds on `accumulate`; the library
never imports it.
"""
