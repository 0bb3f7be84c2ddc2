"""Executes a notebook in place (or into another file) with nbclient.

    python notebooks/execute.py notebooks/gradient_accumulation.ipynb [--out FILE]

The epoch count and results folder come from the environment
(``ACCUMULATE_NOTEBOOK_EPOCHS``, ``ACCUMULATE_NOTEBOOK_RESULTS``), as the
notebook reads them.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(notebook: Path, out: Path, timeout: int = 1800) -> None:
    """Runs every cell of ``notebook`` (from its folder) and writes ``out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the kernel inherits it
    document = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        document,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook.parent.resolve())}},
    )
    client.execute()
    _drop_native_log_lines(document)
    nbformat.write(document, out)


# TensorFlow's C++ start-up lines ("I0000 00:00:... cudart_stub.cc ...") go to
# the kernel's stderr before any Python setting can silence them.
_NATIVE_LOG_LINE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl)")


def _drop_native_log_lines(document: nbformat.NotebookNode) -> None:
    for cell in document.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.get("name") == "stderr":
                lines = output.text.splitlines(keepends=True)
                output.text = "".join(
                    line for line in lines if not _NATIVE_LOG_LINE.match(line)
                )
                if not output.text.strip():
                    continue
            kept.append(output)
        cell.outputs = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, help="default: overwrite the notebook")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    arguments = parser.parse_args()
    execute(arguments.notebook, arguments.out or arguments.notebook, arguments.timeout)


if __name__ == "__main__":
    main()
