"""benchmarks/gpu_kernels.py: its CPU paths (no-GPU exit and the interpreter dry run) work end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest  # noqa: E402
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script loaded as a module (benchmarks/ is not a package); registered while in use."""
    name = "lowbit_benchmarks_kernels"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed when there is no GPU")
def test_benchmark_without_cuda_exits_with_message(bench: ModuleType, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--out", "unused.json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(os.environ["TRITON_INTERPRET"] != "1", reason="the dry run needs the Triton interpreter")
def test_benchmark_dry_run_checks_every_kernel(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="Triton is not installed (optional extra lowbit[triton])")
    out = tmp_path / "kernels.json"
    assert bench.main(["--dry-run", "--m", "1", "33", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    rows = report["rows"]
    lowbit_rows = [r for r in rows if r["kernel"].startswith("lowbit")]
    assert {r["m"] for r in rows} == {1, 33} and len(lowbit_rows) == 2 * 6
    assert all(r["check"] == "ok" for r in lowbit_rows), [r for r in lowbit_rows if r["check"] != "ok"]
    assert all(r["vs_fp16"] is not None and r["pct_peak"] is not None for r in lowbit_rows)
    # M <= 16 rows report bandwidth, larger M report throughput
    assert all(r["tbps"] is not None for r in lowbit_rows if r["m"] == 1)
    assert all(r["tflops"] is not None for r in lowbit_rows if r["m"] == 33 and "quantize" not in r["kernel"])


def test_markdown_table_marks_missing_metrics(bench: ModuleType) -> None:
    rows = [bench.Row("torch._int_mm", 1, 16, 64, None, note="n/a: shape")]
    table = bench.markdown_table(rows)
    assert table.splitlines()[2].startswith("| torch._int_mm | 1 | 16 | 64 | - |")
