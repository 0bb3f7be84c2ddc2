"""The paper's notebook, executed end to end with one epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "gradient_accumulation.ipynb"


# `make notebook` runs it in .venv, on TensorFlow: its suite is TensorFlow's.
# The reproduction it calls runs on every backend in tests/paper/test_cli.py.
@pytest.mark.tensorflow_only
@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ACCUMULATE_DATA_DIR"),
    reason="needs the real data: set ACCUMULATE_DATA_DIR (make test does)",
)
def test_notebook_runs_with_one_epoch(tmp_path):
    out = tmp_path / "executed.ipynb"
    environment = {
        **os.environ,
        "ACCUMULATE_NOTEBOOK_EPOCHS": "1",
        "ACCUMULATE_NOTEBOOK_RESULTS": str(tmp_path / "results"),
    }
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "notebooks" / "execute.py"),
            str(NOTEBOOK),
            "--out",
            str(out),
            "--timeout",
            "600",
        ],
        env=environment,
        check=True,
        timeout=900,
    )
    executed = nbformat.read(out, as_version=4)
    outputs = [
        output
        for cell in executed.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "twins identical: True" in text
    assert "updates applied: 1" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 7  # examples, 2 curves, 2 updates, 2 confusion matrices
    for dataset in ("mnist", "fashion_mnist"):
        assert (tmp_path / "results" / dataset / "history-seed42.json").exists()


def test_committed_notebook_carries_outputs_of_a_full_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs for cell in code_cells), "commit the executed notebook"
    first_output = "".join(output.get("text", "") for output in code_cells[0].outputs)
    assert "200 epochs" in first_output
