"""The paper application: the notebook's experiment reproduced with the library.

Data reading (`datasets`), run configuration (`config`), the runner
(`experiment`, `training`, `results`, `progress`), the report (`report`,
`figures`, `reference` and the notebook's logged numbers in ``data/``), the
command line (`cli`, run as ``python -m accumulate``) and the notebook's own
training loops (`notebook_loops`). It builds on `accumulate`; the library
never imports it.
"""
