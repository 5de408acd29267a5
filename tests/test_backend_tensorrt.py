"""target="tensorrt-int8": the export-only path (what runs here), its artifact, and the errors.

Machines without TensorRT (and without a GPU) still get the TensorRT-ready ONNX and its conformance
report: compile() writes them and raises BackendUnavailable naming the directory; export_only=True
returns a model that runs that ONNX on ONNX Runtime CPU. The engine build and the engine runtime need
TensorRT and a CUDA GPU: those tests skip, saying why, where either is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.backends.tensorrt.build import DEFAULT_MAX_DIM, profile_shapes, rebuild_engine, unavailable_reason
from lowbit.runtime import artifact
from lowbit.runtime.qparams import sqnr
from lowbit.runtime.signature import Signature, TensorSig
from lowbit.runtime.tensorrt_engine import check_profile

from models import cnn_cal

EXPORT_FILES = {"model.onnx", "conformance.json", "plan.json", "qparams.safetensors", "report.json"}
NO_ENGINE = unavailable_reason()  # None where TensorRT and a GPU are present
needs_engine = pytest.mark.skipif(NO_ENGINE is not None, reason=f"TensorRT not installed or no GPU: {NO_ENGINE}")
without_engine = pytest.mark.skipif(NO_ENGINE is None, reason="TensorRT and a GPU are present: the engine builds")
without_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                      reason="TensorRT is installed: this checks the error without it")


@pytest.fixture(scope="module")
def exported(cnn):
    return lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(4), export_only=True,
                          progress=False)


def test_backend_unavailable_is_the_old_name_too():
    assert lowbit.BackendNotAvailable is lowbit.BackendUnavailable
    assert issubclass(lowbit.BackendUnavailable, ImportError)
    assert issubclass(lowbit.EngineMismatchError, lowbit.ArtifactError)


@without_engine
def test_compile_without_tensorrt_writes_the_export_and_raises(cnn, tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DUMP_DIR", raising=False)
    with pytest.raises(lowbit.BackendNotAvailable) as info:  # the old name catches it
        lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(4), progress=False,
                       dump_dir=tmp_path / "dumps")
    err = info.value
    assert isinstance(err, lowbit.BackendUnavailable)
    out = err.artifact_dir
    assert out == tmp_path / "dumps" / "tensorrt_export"
    msg = str(err)
    assert "needs TensorRT and a CUDA GPU" in msg and str(out) in msg
    assert f"lowbit.backends.tensorrt.rebuild_engine({str(out)!r})" in msg and "export_only=True" in msg
    assert (tmp_path / "dumps" / "index.html").is_file()  # the pass dumps are still there, beside it
    manifest = artifact.read_manifest(out)
    assert set(manifest["files"]) == EXPORT_FILES
    assert manifest["kind"] == "tensorrt" and manifest["target"] == "tensorrt-int8" and manifest["engine"] is None
    meta = manifest["tensorrt"]
    assert meta["engine_file"] is None and meta["not_built"] == NO_ENGINE
    assert meta["profile"]["dims"] == {"batch": [1, 8, DEFAULT_MAX_DIM]}
    assert meta["profile"]["shapes"]["x"] == {"min": [1, 1, 16, 16], "opt": [8, 1, 16, 16],
                                              "max": [DEFAULT_MAX_DIM, 1, 16, 16]}
    assert json.loads((out / "conformance.json").read_text())["ok"] is True
    m = lowbit.load(out)  # the runtime alone: the ONNX on ONNX Runtime CPU
    assert "engine not built" in m.report.sections["engine"]["note"]
    assert m(torch.randn(3, 1, 16, 16)).shape == (3, 10)


@without_engine
def test_compile_without_dump_dir_writes_to_a_fresh_temp_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DUMP_DIR", raising=False)
    torch.manual_seed(0)
    fc = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    xs = [(torch.randn(4, 8),) for _ in range(2)]
    with pytest.raises(lowbit.BackendUnavailable) as info:
        lowbit.compile(fc, xs[0], target="tensorrt-int8", calibration=xs, progress=False)
    out = info.value.artifact_dir
    assert out is not None and out.is_dir() and str(out) in str(info.value)
    assert set(artifact.read_manifest(out)["files"]) == EXPORT_FILES


def test_export_only_model_runs_the_onnx_on_ort(exported, cnn):
    engine = exported.report.sections["engine"]
    assert engine["engine"] == "onnxruntime"
    assert engine["note"] == "engine not built (export_only): calls run the TensorRT-ready ONNX on ONNX Runtime CPU"
    assert "engine not built (export_only)" in str(exported.report)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(exported(x.numpy()), exported(x))
    assert sqnr(cnn(x), exported(x)) >= 30.0
    with pytest.raises(lowbit.InputError, match="input 'x'"):
        exported(torch.randn(2, 1, 15, 16))


def test_activations_are_symmetric_int8_whatever_the_config(exported):
    for name, spec in exported.plan["layers"].items():
        act = spec["activation"]
        assert act["dtype"] == "int8" and act["symmetric"] and act["granularity"] == "per_tensor", name
        assert spec["output"] is None, f"{name}: TensorRT wants conv outputs unquantized"
        w = spec["weight"]
        assert w["symmetric"] and w["narrow"] and w["granularity"] == "per_channel" and w["axis"] == 0
    assert "forced" in exported.report.sections["tensorrt"]["activations"]


def test_export_only_artifact_reloads_without_the_compiler(exported, tmp_path):
    d = exported.save(tmp_path / "cnn")
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPORT_FILES and manifest["kind"] == "tensorrt"
    assert manifest["opset"] == 19 and manifest["tensorrt"]["not_built"] == "export_only"
    x = torch.randn(3, 1, 16, 16)
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    script = (
        "import sys, lowbit\n"
        "from safetensors.torch import load_file, save_file\n"
        f"m = lowbit.load({str(d)!r})\n"
        f"x = load_file({str(tmp_path / 'inputs.safetensors')!r})['x']\n"
        f"save_file({{'out': m(x)}}, {str(tmp_path / 'out.safetensors')!r})\n"
        "bad = [k for k in sys.modules if k.startswith(('lowbit.compiler', 'lowbit.passes', 'lowbit.backends'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["out"], exported(x))


def _fake_engine_artifact(exported, tmp_path) -> Path:
    """The export-only artifact re-written as if an engine had been built elsewhere (the engine file is
    not an engine: nothing here tries to run it; loading must refuse before that)."""
    d = exported.save(tmp_path / "built_elsewhere")
    manifest = artifact.read_manifest(d)
    body = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256", "format_version")}
    body["engine"] = "tensorrt"
    body["tensorrt"] = {**manifest["tensorrt"], "engine_file": "engine.plan", "timing_cache": "timing.cache",
                        "tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100 80GB HBM3",
                        "compute_capability": "9.0", "not_built": None}

    def write(tmp: Path) -> None:
        for name in manifest["files"]:
            (tmp / name).write_bytes((d / name).read_bytes())
        (tmp / "engine.plan").write_bytes(b"built on another machine")
        (tmp / "timing.cache").write_bytes(b"")

    return artifact.write_artifact(d, write, body)


@without_tensorrt
def test_engine_artifact_without_tensorrt_names_the_engine_and_the_rebuild(exported, tmp_path):
    d = _fake_engine_artifact(exported, tmp_path)
    with pytest.raises(lowbit.BackendUnavailable) as info:
        lowbit.load(d)
    msg = str(info.value)
    assert "TensorRT 10.8.0 on NVIDIA H100 80GB HBM3 (compute capability 9.0)" in msg
    assert "TensorRT is not installed" in msg
    assert f"lowbit.backends.tensorrt.rebuild_engine({str(d)!r})" in msg
    assert f"lowbit.load({str(d)!r}, engine='onnxruntime')" in msg
    m = lowbit.load(d, engine="onnxruntime")  # the bundled ONNX still runs
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(m(x), exported(x))
    assert "engine='onnxruntime'" in m.report.sections["engine"]["note"]
    with pytest.raises(lowbit.BackendUnavailable, match="TensorRT is not installed"):
        rebuild_engine(d)


def test_engine_choice_is_checked(exported, tmp_path):
    d = exported.save(tmp_path / "cnn")
    with pytest.raises(lowbit.ArtifactError, match="holds no TensorRT engine"):
        lowbit.load(d, engine="tensorrt")
    with pytest.raises(lowbit.InputError, match="engine='openvino'"):
        lowbit.load(d, engine="openvino")


@pytest.mark.parametrize("damage", ["conformance.json", "model.onnx"])
def test_damaged_tensorrt_artifacts_are_refused(exported, tmp_path, damage):
    d = exported.save(tmp_path / "cnn")
    data = bytearray((d / damage).read_bytes())
    data[-3] ^= 0xFF
    (d / damage).write_bytes(bytes(data))
    with pytest.raises(lowbit.ArtifactError, match=damage):
        lowbit.load(d)


def test_profiles_come_from_the_dynamic_dims():
    sig = Signature([TensorSig("ids", "int64", ("batch", "seq")), TensorSig("mask", "int64", ("batch", "seq")),
                     TensorSig("pix", "float32", ("batch", 3, 8))], ["ids", "mask", "pix"], 0, ["output_0"],
                    dim_bounds={"seq": (2, 64)})
    example = [torch.zeros(4, 16, dtype=torch.int64), torch.zeros(4, 16, dtype=torch.int64), torch.zeros(4, 3, 8)]
    p = profile_shapes(sig, example)
    assert p["dims"] == {"batch": [1, 4, DEFAULT_MAX_DIM], "seq": [2, 16, 64]}
    assert p["shapes"]["pix"] == {"min": [1, 3, 8], "opt": [4, 3, 8], "max": [DEFAULT_MAX_DIM, 3, 8]}
    p = profile_shapes(sig, example, {"batch": (1, 32, 256)})
    assert p["shapes"]["ids"]["max"] == [256, 64]
    with pytest.raises(lowbit.InputError, match="not dynamic dims"):
        profile_shapes(sig, example, {"height": (1, 2, 3)})
    with pytest.raises(lowbit.InputError, match="min <= opt <= max"):
        profile_shapes(sig, example, {"batch": (8, 4, 16)})
    flat = [torch.zeros(300, 16, dtype=torch.int64)] * 2 + [torch.zeros(300, 3, 8)]
    with pytest.raises(lowbit.InputError, match=r"input 'ids' dim 0 \(batch\) is 300, outside .*\[1, 128\]"):
        check_profile(profile_shapes(sig, example), sig, flat)


def test_options_and_schemes_are_checked(cnn):
    with pytest.raises(lowbit.InputError, match="unknown option"):
        lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(1), progress=False,
                       export_only=True, fp16=True)
    with pytest.raises(lowbit.PlanError, match=r"'fc'.*not supported by target 'tensorrt-int8'"):
        lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(1), progress=False,
                       export_only=True, plan={"layers": {"fc": {"scheme": "w8a16"}}})


def test_residual_qdq_can_be_switched_off(cnn):
    q = lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(4), progress=False,
                       export_only=True, residual_qdq=False)
    assert q.report.sections["tensorrt"]["residual_qdq"]["fired"] == 0
    assert q.report.sections["tensorrt"]["violations"] == []


# --------------------------------------------------------------------------------------------------
# With TensorRT and a GPU (skipped elsewhere, saying why)
# --------------------------------------------------------------------------------------------------


@needs_engine
def test_engine_builds_runs_and_round_trips(cnn, exported, tmp_path):
    q = lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(4), progress=False)
    meta = q.state["tensorrt"]
    assert meta["engine_file"] == "engine.plan" and meta["strongly_typed"]
    assert meta["gpu_name"] == torch.cuda.get_device_name() and meta["tensorrt_version"]
    x = torch.randn(5, 1, 16, 16)
    out = q(x)
    assert out.is_cuda
    db = sqnr(exported(x), out.cpu())
    print(f"\n[cnn] TensorRT engine vs the same ONNX on ORT CPU: SQNR {db:.1f} dB")
    assert db >= 30.0
    d = q.save(tmp_path / "engine")
    assert {"engine.plan", "timing.cache"} <= set(artifact.read_manifest(d)["files"])
    assert torch.equal(lowbit.load(d)(x), out)
    rebuild_engine(d)  # the timing cache in the artifact makes the rebuild pick the same tactics
    assert (lowbit.load(d)(x) - out).abs().max() <= 1e-3
    manifest = artifact.read_manifest(d)
    body = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256", "format_version")}
    body["tensorrt"] = {**manifest["tensorrt"], "gpu_name": "some other GPU"}
    artifact.write_artifact(d, lambda tmp: [(tmp / n).write_bytes((d / n).read_bytes()) for n in manifest["files"]],
                            body)
    with pytest.raises(lowbit.EngineMismatchError, match="'some other GPU' in the engine"):
        lowbit.load(d)
