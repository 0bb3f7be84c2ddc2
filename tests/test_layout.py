"""The package's layout: the library stands without the paper application,
nothing imports in a circle, and the paper's data flows one way.

The library is `accumulate` without its `paper` subpackage (and without
`__main__`, the command's entry point, which may import the paper's CLI).
These tests read the sources with `ast`, so they see every import statement,
including those inside functions, that an import-time check would miss.
The paper's flow is drawn in docs/paper.md; `PAPER_FLOW` below is that
drawing as a table.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

import accumulate

PACKAGE = Path(accumulate.__file__).resolve().parent
PAPER = "accumulate.paper"
ENTRY_POINT = "__main__.py"
# What the benchmarks import: renaming one breaks them.
PAPER_MODULES_OTHERS_USE = ("datasets", "training", "notebook_loops")


def library_modules(package: Path) -> dict[str, Path]:
    """Module name -> file, for every library module under ``package``.

    The library is the package's own modules and its backend glue
    (``backends/``); ``paper/`` is the application.
    """
    modules = {}
    for path in sorted([*package.glob("*.py"), *package.glob("backends/*.py")]):
        if path.name == ENTRY_POINT:
            continue
        parts = ["accumulate", *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(source: str, module: str, runtime_only: bool) -> set[str]:
    """Absolute names of the modules ``source`` (module ``module``) imports.

    ``from package import name`` counts as importing ``package.name`` too,
    since ``name`` may be a submodule. With ``runtime_only``, imports under
    ``if TYPE_CHECKING:`` are left out: they never run.
    """
    tree = ast.parse(source)
    package = module if module == "accumulate" else module.rpartition(".")[0]
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if _is_type_checking_block(node):
                skipped |= {id(child) for child in ast.walk(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def paper_imports(package: Path) -> dict[str, set[str]]:
    """Library module -> the `accumulate.paper` modules it imports (if any)."""
    found = {}
    for module, path in library_modules(package).items():
        names = imported_modules(path.read_text(), module, runtime_only=False)
        bad = {name for name in names if name == PAPER or name.startswith(f"{PAPER}.")}
        if bad:
            found[module] = bad
    return found


def package_modules(package: Path) -> dict[str, Path]:
    """Module name -> file, for every module of ``package``, the paper included."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = ["accumulate", *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(package: Path) -> dict[str, list[str]]:
    """Module -> the package's modules it imports at run time."""
    modules = package_modules(package)
    return {
        module: sorted(
            name
            for name in imported_modules(path.read_text(), module, runtime_only=True)
            if name in modules and name != module
        )
        for module, path in modules.items()
    }


def import_cycle(package: Path) -> list[str] | None:
    """A cycle of runtime imports among all of ``package``'s modules, or None."""
    graph = import_graph(package)
    state: dict[str, str] = {}  # "open" while on the stack, then "done"
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


# The paper application's one-way flow (docs/paper.md): what each module of
# the study and of the reproduction report may import among them. Training
# writes run files; reading them (records, analysis), drawing and writing
# come after, and none of those imports the training modules; the text and
# the figures format what the analysis computed, and the analysis imports
# neither. A module not listed here is outside these two flows.
_STUDY_READING = {"study_plan", "study_records"}
_STUDY_ANALYSIS = {*_STUDY_READING, "study_analysis", "study_answers"}
PAPER_FLOW: dict[str, set[str]] = {
    "study_plan": set(),
    "study_records": set(),
    "study_run": {"study_plan", "study_records"},
    "study_runner": {"study_plan", "study_records", "study_run"},
    "study_analysis": _STUDY_READING,
    "study_answers": {*_STUDY_READING, "study_analysis"},
    "study_figures": _STUDY_ANALYSIS,
    "study_text": _STUDY_ANALYSIS,
    "study_report": {*_STUDY_ANALYSIS, "study_figures", "study_text"},
    "study": {
        *_STUDY_ANALYSIS,
        "study_run",
        "study_runner",
        "study_figures",
        "study_text",
        "study_report",
    },
    "reproduction_analysis": set(),
    "reference_comparison": set(),
    "reproduction_text": {"reproduction_analysis", "reference_comparison"},
    "report": {"reproduction_analysis", "reference_comparison", "reproduction_text"},
}


def flow_violations(package: Path) -> dict[str, set[str]]:
    """Paper module -> the imports `PAPER_FLOW` does not allow it."""
    prefix = f"{PAPER}."
    graph = import_graph(package)
    violations = {}
    for module, allowed in PAPER_FLOW.items():
        imported = {
            name.removeprefix(prefix)
            for name in graph.get(prefix + module, [])
            if name.startswith(prefix)
        }
        if bad := (imported & set(PAPER_FLOW)) - allowed:
            violations[module] = bad
    return violations


def test_library_imports_nothing_from_the_paper():
    assert paper_imports(PACKAGE) == {}


def test_no_import_cycle_anywhere_in_the_package():
    assert len(package_modules(PACKAGE)) > len(library_modules(PACKAGE))
    assert import_cycle(PACKAGE) is None


def test_the_paper_flows_one_way():
    assert set(PAPER_FLOW) <= {
        name.removeprefix(f"{PAPER}.") for name in package_modules(PACKAGE)
    }
    assert flow_violations(PACKAGE) == {}


def test_the_paper_modules_stay_short():
    lengths = {
        path.name: len(path.read_text().splitlines())
        for path in (PACKAGE / "paper").glob("*.py")
    }
    assert {name: n for name, n in lengths.items() if n >= 500} == {}


def test_the_library_is_the_expected_modules():
    # A new top-level module is library code: this list makes that a decision.
    assert set(library_modules(PACKAGE)) == {
        "accumulate",
        "accumulate.accumulator",
        "accumulate.backends",
        "accumulate.backends.jax",
        "accumulate.backends.tensorflow",
        "accumulate.backends.torch",
        "accumulate.backends.variables",
        "accumulate.distributed",
        "accumulate.fit_callback",
        "accumulate.micro_batches",
        "accumulate.model",
        "accumulate.noise_scale",
        "accumulate.schedule",
        "accumulate.options",
        "accumulate.enabling",
        "accumulate.reduction",
        "accumulate.twins",
        "accumulate.window",
    }


@pytest.mark.parametrize("module", PAPER_MODULES_OTHERS_USE)
def test_paper_modules_the_benchmarks_import_exist(module):
    assert (PACKAGE / "paper" / f"{module}.py").is_file()


@pytest.mark.parametrize(
    "statement",
    [
        "import accumulate.paper.report",
        "from accumulate.paper import cli",
        "from accumulate import paper",
        "from .paper.config import ExperimentConfig",
        "def later():\n    from accumulate.paper.datasets import load_dataset\n",
    ],
)
def test_paper_import_check_catches(tmp_path, statement):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "model.py").write_text(statement + "\n")
    assert set(paper_imports(tmp_path)) == {"accumulate.model"}


def test_cycle_check_catches_a_cycle_but_not_type_checking_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "model.py").write_text("from accumulate import fit_callback\n")
    (tmp_path / "fit_callback.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from accumulate.model import AccumulatingModel\n"
    )
    assert import_cycle(tmp_path) is None
    (tmp_path / "fit_callback.py").write_text("from . import model\n")
    assert import_cycle(tmp_path) in (
        ["accumulate.model", "accumulate.fit_callback", "accumulate.model"],
        ["accumulate.fit_callback", "accumulate.model", "accumulate.fit_callback"],
    )


def test_cycle_check_reaches_into_the_paper(tmp_path):
    # The circle the study once had: the command imported the report, and the
    # report the command, inside a function.
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "__init__.py").write_text("")
    (tmp_path / "paper" / "study.py").write_text(
        "def run():\n    from accumulate.paper import study_report\n"
    )
    (tmp_path / "paper" / "study_report.py").write_text(
        "from accumulate.paper.study import EPOCH\n"
    )
    study, report = "accumulate.paper.study", "accumulate.paper.study_report"
    assert import_cycle(tmp_path) in ([study, report, study], [report, study, report])


@pytest.mark.parametrize(
    ("module", "statement", "forbidden"),
    [
        # The analysis reads records: it may not train.
        ("study_analysis", "from accumulate.paper import study_runner", "study_runner"),
        # The text formats the analysis: the analysis may not import it.
        ("study_answers", "from .study_text import number", "study_text"),
        # Reading run files never needs the command.
        ("study_records", "import accumulate.paper.study", "study"),
        ("reproduction_analysis", "from accumulate.paper import report", "report"),
    ],
)
def test_flow_check_catches_an_import_against_the_flow(
    tmp_path, module, statement, forbidden
):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "paper").mkdir()
    for name in ("__init__", *PAPER_FLOW):
        (tmp_path / "paper" / f"{name}.py").write_text("")
    (tmp_path / "paper" / f"{module}.py").write_text(f"def later():\n    {statement}\n")
    assert flow_violations(tmp_path) == {module: {forbidden}}


# -- Lazy loading -------------------------------------------------------------


def _fresh_interpreter(code: str) -> dict:
    """Runs ``code`` in a new Python and returns the JSON it prints last."""
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(completed.stdout.splitlines()[-1])


HEAVY = ("tensorflow", "keras", "matplotlib", "sklearn")


def test_cli_help_imports_no_tensorflow():
    loaded = _fresh_interpreter(
        "import json, sys\n"
        "from accumulate.paper.cli import main\n"
        "for argv in (['--help'], ['reproduce', '--help'], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    assert loaded == []


def test_the_reports_need_no_training_framework():
    # Reading run files and writing reports imports neither TensorFlow nor
    # Keras: the flow keeps the training modules out of it.
    loaded = _fresh_interpreter(
        "import json, sys\n"
        "import accumulate.paper.report, accumulate.paper.study_report\n"
        "print(json.dumps([name for name in ('tensorflow', 'keras', 'jax', 'torch')"
        " if name in sys.modules]))\n"
    )
    assert loaded == []


def test_python_m_accumulate_help_is_quiet(record_property):
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "accumulate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Recorded, not asserted: on a busy machine any limit would be flaky, and
    # what keeps it fast (no TensorFlow import) is asserted above.
    record_property("help_seconds", round(time.perf_counter() - started, 3))
    assert completed.returncode == 0
    assert "reproduce" in completed.stdout
    assert completed.stderr == ""


def test_import_accumulate_is_lazy_until_a_name_is_used():
    # The framework of the backend this process runs on (the interpreter
    # inherits KERAS_BACKEND); off TensorFlow, TensorFlow is never loaded.
    framework = keras.backend.backend()
    state = _fresh_interpreter(
        "import json, sys\n"
        "import accumulate\n"
        f"before = {framework!r} in sys.modules\n"
        "model = accumulate.AccumulatingModel\n"
        "print(json.dumps({'before': before,\n"
        f"                  'after': {framework!r} in sys.modules,\n"
        "                  'tensorflow': 'tensorflow' in sys.modules,\n"
        "                  'name': model.__name__,\n"
        "                  'version': accumulate.__version__}))\n"
    )
    assert state == {
        "before": False,
        "after": True,
        "tensorflow": framework == "tensorflow",
        "name": "AccumulatingModel",
        "version": accumulate.__version__,
    }


def test_public_names_resolve_to_the_library_objects():
    from accumulate.accumulator import GradientAccumulator
    from accumulate.enabling import enable_accumulation
    from accumulate.model import AccumulatingModel
    from accumulate.schedule import validate_accumulation_steps
    from accumulate.twins import build_mlp, make_twins

    expected = {
        "AccumulatingModel": AccumulatingModel,
        "enable_accumulation": enable_accumulation,
        "GradientAccumulator": GradientAccumulator,
        "build_mlp": build_mlp,
        "make_twins": make_twins,
        "validate_accumulation_steps": validate_accumulation_steps,
    }
    for name, value in expected.items():
        assert getattr(accumulate, name) is value
    assert set(accumulate.__all__) == {*expected, "__version__"}
    assert set(accumulate.__all__) <= set(dir(accumulate))


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        accumulate.no_such_name  # noqa: B018
