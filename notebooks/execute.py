"""Executes a notebook in place (or into another file) with nbclient.

    python notebooks/execute.py notebooks/gradient_accumulation.ipynb [--out FILE]

The epoch count and results folder come from the environment
(``ACCUMULATE_NOTEBOOK_EPOCHS``, ``ACCUMULATE_NOTEBOOK_RESULTS``), as the
notebook reads them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(notebook: Path, out: Path, timeout: int = 1800) -> None:
    """Runs every cell of ``notebook`` (from its folder) and writes ``out``."""
    document = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        document,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook.parent.resolve())}},
    )
    client.execute()
    nbformat.write(document, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, help="default: overwrite the notebook")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    arguments = parser.parse_args()
    execute(arguments.notebook, arguments.out or arguments.notebook, arguments.timeout)


if __name__ == "__main__":
    main()
