"""The committed reports come back from the committed runs, word for word.

`make report` and `make study-report` rebuild them; these tests rebuild them
into a temporary folder from copies of the committed run files and compare
each ``report.md`` and classification report with the committed one. A change
to the analysis or the text that moves a number, or a word, fails here until
the reports are regenerated and committed with it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from accumulate.paper.report import build_report
from accumulate.paper.study_report import build_study_report

REPOSITORY = Path(__file__).resolve().parents[2]
RESULTS = REPOSITORY / "results"


def _copy_runs(source: Path, target: Path, pattern: str) -> None:
    target.mkdir(parents=True)
    for path in source.glob(pattern):
        shutil.copy(path, target / path.name)


@pytest.mark.parametrize(
    ("folder", "reference"),
    [
        ("mnist", None),
        ("fashion_mnist", None),
        # The JAX run, against the TensorFlow reference runs (`make reproduce-jax`).
        ("jax/mnist", "results"),
    ],
)
def test_reproduction_reports_regenerate(tmp_path, monkeypatch, folder, reference):
    committed = RESULTS / folder
    out = tmp_path / "results"
    _copy_runs(committed, out / folder, "history-*.json")
    # The report names the reference folder as given: relative, as make does.
    monkeypatch.chdir(REPOSITORY)
    written = build_report(out / Path(folder).parent, reference_dir=reference)
    names = {path.name for path in written}
    assert "report.md" in names
    for name in sorted(names):
        if name.endswith((".md", ".txt")):
            generated = (out / folder / name).read_text(encoding="utf-8")
            assert generated == (committed / name).read_text(encoding="utf-8"), name


def test_the_study_report_regenerates(tmp_path):
    committed = RESULTS / "study"
    shutil.copytree(committed / "runs", tmp_path / "runs")
    shutil.copy(committed / "study.json", tmp_path / "study.json")
    build_study_report(tmp_path)
    generated = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert generated == (committed / "report.md").read_text(encoding="utf-8")
