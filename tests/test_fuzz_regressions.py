"""Replay the shrunk graphs the random-graph differential test caught (``tests/fuzz_regressions/*.json``).

Each file is a graph spec (``fuzz_models.py``) named after the bug it caught, with a ``"bug"`` field that
says what went wrong and what fixed it. Each one must now pass every leg of ``fuzz_harness.run_case``
(torch reference vs FP32, ORT and, when registered, TensorRT's ONNX on ORT against the reference); a
regression that only gets rejected (an overflowing input) would test nothing, so that fails too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_harness import run_case
from fuzz_models import describe, load_spec, value_shapes

REGRESSIONS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.json"))


def test_there_are_regressions_to_replay():
    assert REGRESSIONS, "tests/fuzz_regressions/ holds no graph specs"


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_fuzz_regression(path):
    spec = load_spec(path)
    assert spec.get("bug"), f"{path.name}: say in a 'bug' field what this graph caught"
    value_shapes(spec)  # the spec is still valid for the current builder
    outcome = run_case(spec)
    assert outcome.status == "passed", f"{path.name}: {describe(spec)}\n{outcome.line()}"
