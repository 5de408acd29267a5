"""benchmarks/cpu.py: the harness (interleaving, failures, JSON/markdown) and a real tiny CNN run."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def _load_cpu():
    name = "lowbit_benchmarks_cpu"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / "cpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ROW_KEYS = {"name", "group", "ms_median", "ms_all", "speedup", "cos_mean", "cos_min", "top1", "size_mb", "compile_s",
            "error"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_row(clock: FakeClock, name: str, group: str, cost_s: float, calls: list[str]) -> harness.RowSpec:
    def build(ctx: harness.BuildContext) -> harness.Built:
        clock.now += 1.0  # one fake second of compilation

        def fn(batch):
            calls.append(name)
            clock.now += cost_s
            return batch["x"] * 2

        return harness.Built(fn, size_mb=1.5, note="fake")

    return harness.RowSpec(name, group, build, settings=f"{name} settings")


def _broken_build(ctx: harness.BuildContext) -> harness.Built:
    raise RuntimeError("boom: target not written yet")


def test_interleaving_speedup_and_failed_row_with_fake_timer(tmp_path: Path) -> None:
    clock = FakeClock()
    calls: list[str] = []
    specs = [
        _fake_row(clock, "fp32 slow", "fp32", 0.010, calls),
        _fake_row(clock, "fp32 fast", "fp32", 0.004, calls),
        harness.RowSpec("broken", "lowbit", _broken_build),
        _fake_row(clock, "int8", "lowbit", 0.002, calls),
    ]
    batches = [{"x": torch.ones(2)}, {"x": torch.zeros(2)}]
    ctx = harness.BuildContext(calibration=batches, example=batches[0], workdir=tmp_path, threads=2,
                               stages=harness.StageCache(clock))
    res = harness.run_benchmark(specs, ctx, score=lambda fn: {"top1": float(fn(batches[0]).sum() == 4)},
                                timing_batches=batches, rounds=3, iters=2, warmup=1, clock=clock, log=lambda s: None)
    rows = {r["name"]: r for r in res["rows"]}
    assert [r["name"] for r in res["rows"]] == ["fp32 slow", "fp32 fast", "broken", "int8"]
    for r in res["rows"]:
        assert ROW_KEYS <= set(r)
    json.dumps(res)  # serialisable as is

    broken = rows["broken"]
    assert broken["error"] == "RuntimeError: boom: target not written yet"
    assert broken["ms_median"] is None and broken["ms_all"] == [] and broken["speedup"] is None

    assert rows["fp32 fast"]["ms_median"] == pytest.approx(4.0)
    assert rows["int8"]["ms_median"] == pytest.approx(2.0)
    assert len(rows["int8"]["ms_all"]) == 3 * 2
    assert res["best_fp32"] == "fp32 fast"
    assert rows["int8"]["speedup"] == pytest.approx(2.0)
    assert rows["fp32 slow"]["speedup"] == pytest.approx(0.4)
    assert rows["int8"]["compile_s"] == pytest.approx(1.002)  # build (1 s) + the first call (2 ms)
    assert rows["int8"]["top1"] == 1.0

    # round-robin: every round visits every live row once, the start rotating
    assert res["orders"] == [["fp32 slow", "fp32 fast", "int8"], ["fp32 fast", "int8", "fp32 slow"],
                             ["int8", "fp32 slow", "fp32 fast"]]
    timed = calls[-3 * 3 * 2:]
    assert timed[:6] == ["fp32 slow"] * 2 + ["fp32 fast"] * 2 + ["int8"] * 2

    table = harness.markdown_table(res["rows"], quality="top1")
    assert "| broken | lowbit | n/a (RuntimeError: boom: target not written yet) |" in table
    assert "| int8 (fake) | lowbit | 2.00 | 2.00x | 100.00 | 1.5 | 1.0 |" in table


def test_a_runner_failing_while_timing_is_recorded(tmp_path: Path) -> None:
    clock = FakeClock()
    state = {"n": 0}

    def build(ctx):
        def fn(batch):
            state["n"] += 1
            if state["n"] > 3:
                raise ValueError("went away")
            return batch["x"]

        return harness.Built(fn)

    specs = [harness.RowSpec("flaky", "peer", build)]
    b = [{"x": torch.ones(1)}]
    ctx = harness.BuildContext(calibration=b, example=b[0], workdir=tmp_path, threads=1, stages=harness.StageCache())
    res = harness.run_benchmark(specs, ctx, score=lambda fn: {}, timing_batches=b, rounds=2, iters=2, warmup=1,
                                clock=clock, log=lambda s: None)
    (row,) = res["rows"]
    assert row["error"].startswith("failed while timing (round 0): ValueError: went away")
    assert row["ms_median"] is None


def test_stage_cache_shares_work_and_remembers_failures() -> None:
    clock = FakeClock()
    cache = harness.StageCache(clock)
    made = []

    def make():
        made.append(1)
        clock.now += 2.0
        return "onnx"

    assert cache.get("export", make) == ("onnx", 2.0)
    assert cache.get("export", make) == ("onnx", 2.0)
    assert len(made) == 1

    def fail():
        made.append(2)
        raise OSError("disk full")

    for _ in range(2):
        with pytest.raises(OSError, match="disk full"):
            cache.get("bad", fail)
    assert made.count(2) == 1


def test_tiny_cnn_real_engines_and_results_files(tmp_path: Path) -> None:
    """Real rows (torch eager, ORT FP32 + quantize_static, lowbit torch) on an untrained tiny CNN,
    plus an unknown lowbit target that must come out as an error row."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    cpu = _load_cpu()
    import cnn
    import peers

    torch.manual_seed(0)
    model = cnn.SmallResNet(width=4).eval()
    xs = torch.randn(4 * cnn.BATCH, 1, 32, 32)
    cal = cnn.batches(xs[: 2 * cnn.BATCH])
    test = cnn.batches(xs[2 * cnn.BATCH:])
    labels = [torch.randint(0, 10, (cnn.BATCH,)) for _ in test]

    def score(fn):
        correct = sum(int((fn(b).argmax(-1) == y).sum()) for b, y in zip(test, labels, strict=True))
        return {"top1": correct / (len(test) * cnn.BATCH)}

    lowbit_rows = [peers.LowbitRow("lowbit torch", "torch"), peers.LowbitRow("lowbit nowhere", "no-such-target")]
    specs = cpu.select(cnn.specs(model, threads=2, n_cal=len(cal), lowbit_rows=lowbit_rows),
                       r"onnxruntime$|quantize_static|lowbit")
    assert [s.name for s in specs] == ["FP32 torch eager", "FP32 onnxruntime", "ORT quantize_static QDQ",
                                       "lowbit torch", "lowbit nowhere"]
    ctx = harness.BuildContext(calibration=cal, example=test[0], workdir=tmp_path, threads=2,
                               stages=harness.StageCache())
    res = harness.run_benchmark(specs, ctx, score=score, timing_batches=test, rounds=2, iters=1, warmup=1,
                                log=lambda s: None)
    rows = {r["name"]: r for r in res["rows"]}
    assert "no-such-target" in rows["lowbit nowhere"]["error"]
    for name in ("FP32 torch eager", "FP32 onnxruntime", "ORT quantize_static QDQ", "lowbit torch"):
        r = rows[name]
        assert r["error"] is None, (name, r["error"], r["extra"].get("traceback"))
        assert r["ms_median"] > 0 and len(r["ms_all"]) == 2 and r["speedup"] > 0
        assert 0.0 <= r["top1"] <= 1.0 and r["size_mb"] > 0 and r["compile_s"] >= 0
    assert rows["FP32 onnxruntime"]["top1"] == rows["FP32 torch eager"]["top1"]

    payload = {"environment": harness.environment(2), "args": vars(cpu.parse_args(["--quick", "--only", "cnn"])),
               "cnn": {**res, "fp32_top1_trained": 0.1, "test_images": len(test) * cnn.BATCH}}
    md = cpu.render(payload)
    harness.write_results(tmp_path / "out", "cpu", payload, md)
    saved = json.loads((tmp_path / "out" / "cpu.json").read_text())
    assert saved["environment"]["threads"] == 2 and "torch" in saved["environment"]["versions"]
    assert {r["name"] for r in saved["cnn"]["rows"]} == set(rows)
    text = (tmp_path / "out" / "cpu.md").read_text()
    assert "## CNN" in text and "| lowbit nowhere | lowbit | n/a (" in text and "top-1 %" in text


def test_quick_flags() -> None:
    cpu = _load_cpu()
    a = cpu.parse_args(["--quick"])
    assert (a.rounds, a.cal_batches, a.eval_batches, a.epochs) == (2, 4, 2, 1)
    a = cpu.parse_args(["--rounds", "3", "--only", "minilm", "--out", "x"])
    assert (a.rounds, a.cal_batches, a.eval_batches, a.only, a.out) == (3, 32, 8, "minilm", "x")


def test_shared_stage_is_charged_once_to_every_row_that_uses_it(tmp_path: Path) -> None:
    clock = FakeClock()
    stages = harness.StageCache(clock)

    def export():
        clock.now += 10.0
        return "model.onnx"

    def row(own_s: float):
        def build(ctx):
            _, t = ctx.stages.get("export", export)
            clock.now += own_s
            return harness.Built(lambda b: b["x"], stages_s=t)

        return build

    specs = [harness.RowSpec("a", "fp32", row(1.0)), harness.RowSpec("b", "peer", row(2.0))]
    b = [{"x": torch.ones(1)}]
    ctx = harness.BuildContext(calibration=b, example=b[0], workdir=tmp_path, threads=1, stages=stages)
    results, _ = harness.build_rows(specs, ctx, log=lambda s: None, clock=clock)
    assert [r.compile_s for r in results] == [pytest.approx(11.0), pytest.approx(12.0)]


def test_mobilenet_section_profiles_ratios_and_markdown(tmp_path: Path) -> None:
    """The MobileNet part's pieces without training: per-op profiles from each engine of a small MobileNet's
    FP32 export, the targets' ratios read off named rows, and the markdown section."""
    pytest.importorskip("onnxruntime")
    cpu = _load_cpu()
    import cnn
    import op_profile

    torch.manual_seed(0)
    model = cnn.randomize_bn(cnn.MobileNet(in_ch=3, blocks=((32, 16, 1, True),), last=32))
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["output"],
                      opset_version=17)
    ort_ops = op_profile.onnxruntime_ops(path, {"x": x.numpy()}, calls=2, warmup=1)
    assert any("Conv" in k for k in ort_ops) and all(v >= 0 for v in ort_ops.values())
    profiles = {"ORT FP32 (ONNX Runtime profile)": ort_ops}
    if importlib.util.find_spec("openvino") is not None:
        ov_ops = op_profile.openvino_ops(path, {"x": x.numpy()}, calls=2, warmup=1,
                                         config={"INFERENCE_PRECISION_HINT": "f32"})
        assert any(k.startswith(("Convolution ", "GroupConvolution ")) for k in ov_ops), ov_ops
        profiles["OpenVINO FP32 (OpenVINO profile)"] = ov_ops

    def row(name, ms, **kw):
        return {"name": name, "group": "lowbit" if name.startswith("lowbit") else "fp32", "ms_median": ms,
                "speedup": None, "settings": f"{name} settings", **kw}

    part = {"workload": "MobileNet", "profiles": profiles,
            "digits32": {"batch": [32, 1, 32, 32], "test_images": 384, "fp32_top1_trained": 0.98,
                         "rows": [row("FP32 torch eager", 2.0, top1=0.98, sqnr_db=None),
                                  row("lowbit openvino-int8", 1.0, top1=0.975, sqnr_db=40.0)]},
            "random224": {"batch": [8, 3, 224, 224],
                          "rows": [row("FP32 openvino", 30.0), row("OpenVINO + NNCF", 12.0),
                                   row("lowbit openvino-int8", 10.0), row("FP32 onnxruntime", 40.0),
                                   row("lowbit onnxruntime-int8", 25.0)]}}
    ratios = cpu.mobilenet_ratios(part)
    assert "- 224x224: lowbit openvino-int8 vs OpenVINO FP32 (target >= 1.3x): 3.00x" in ratios
    assert "- 224x224: lowbit openvino-int8 vs OpenVINO + NNCF (target >= 1.0x): 1.20x" in ratios
    assert "- 224x224: lowbit onnxruntime-int8 vs ORT FP32 (target >= 1.3x): 1.60x" in ratios
    assert any(r.startswith("- top-1 drop of lowbit openvino-int8 vs FP32: 0.50 points") for r in ratios)
    text = "\n".join(cpu.render_mobilenet(part))
    assert "## MobileNet-style CNN" in text and "SQNR dB" in text and "| Conv |" in text and "3.00x" in text
    assert "Top-1 drop over" not in text  # no seed sweep ran
    # the seed sweep: seed 0 from the main table, each row's drop per seed, the mean over the seeds it has
    part["top1_seeds"] = {"test_images": 384, "seeds": [
        {"seed": 1, "fp32": 0.99, "OpenVINO + NNCF": 0.99, "lowbit openvino-int8": 0.98,
         "lowbit onnxruntime-int8": 0.985, cpu.FLOAT_HARDSWISH: None}]}
    lines = cpu.render_mobilenet(part)
    assert "### Top-1 drop over 2 splits and training runs (points; 384 test images each, one image = 0.26)" in lines
    assert "| 0 | 98.00 | - | 0.50 | - | - |" in lines
    assert "| 1 | 99.00 | 0.00 | 1.00 | 0.50 | - |" in lines
    assert "| mean | | 0.00 | 0.75 | 0.50 | - |" in lines


def test_no_benchmark_or_example_module_shadows_a_library():
    """benchmarks/ and examples/ sit on sys.path in the test process (and are sys.path[0] when their scripts
    run): a module named like a library a dependency probes for is imported in its place (a `kernels.py`
    here once broke `import transformers` when transformers 5.25 began importing `kernels`)."""
    import re

    import transformers.utils.import_utils as iu

    probed = set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', Path(iu.__file__).read_text()))
    installed = set(importlib.metadata.packages_distributions())
    root = BENCH.parent
    stems = {p.stem for folder in ("benchmarks", "examples") for p in (root / folder).glob("*.py")}
    assert "gguf" in probed and "torch" in installed  # the two lists were read
    assert stems & (probed | installed) == set(), f"rename: {sorted(stems & (probed | installed))}"
