"""The fine-tuning example runs as a user would run it, and says what it must."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras_hub")

EXAMPLE = Path(__file__).parent.parent / "examples" / "fine_tune_causal_lm.py"


# Once, in the newest TensorFlow suite: every backend's and version's
# exactness on KerasHub tasks is tests/test_enabling.py's.
@pytest.mark.tensorflow_only
@pytest.mark.tools
@pytest.mark.slow
def test_the_causal_lm_example_is_exact_where_keras_builtin_is_not():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout

    def number(label: str) -> float:
        match = re.search(rf"{re.escape(label)}\s+([-+0-9.e]+)", output)
        assert match, output
        return float(match.group(1))

    assert number("ours, 8 x 8") <= 1e-5
    assert number("Keras built-in, 8 x 8") > 1e-2  # averages micro-batch means
    assert "generate():" in output
    assert "Peak memory one epoch adds" in output
    assert output.count(" MB") == 3
