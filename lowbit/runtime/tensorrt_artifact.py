"""TensorRT artifacts (kind "tensorrt"): the TensorRT-ready QDQ ONNX and, once built, its engine.

    model.onnx            the QDQ graph shaped for TensorRT (symmetric int8, zero points 0)
    conformance.json      lowbit's check of it against TensorRT's Q/DQ rules
    plan.json, qparams.safetensors, report.json
    engine.plan           the serialized engine (only when it was built)
    timing.cache          TensorRT's timing cache (so a rebuild picks the same tactics)
    manifest.json         SHA-256 of every file; "tensorrt": version, GPU, compute capability, profile

Loading picks the runner: an engine that matches this machine's TensorRT and GPU runs on TensorRT; an
engine that does not raises (naming the mismatch and the rebuild call); an artifact without an engine
(``export_only``) runs its ONNX on ONNX Runtime CPU, as does ``lowbit.load(dir, engine="onnxruntime")``.
Loading needs only the runtime, never the compiler.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowbit.errors import ArtifactError, InputError, LowbitError
from lowbit.runtime import artifact
from lowbit.runtime.engines import OrtRunner
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.onnx_artifact import (
    MODEL_FILE,
    base_manifest,
    check_onnx_file,
    report_engine,
    write_files,
)
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import Plan
from lowbit.runtime.tensorrt_engine import ENGINE_FILE, TIMING_CACHE_FILE, TensorRTRunner

KIND = "tensorrt"
TARGET = "tensorrt-int8"
CONFORMANCE_FILE = "conformance.json"
EXPORT_ONLY_NOTE = "engine not built ({why}): calls run the TensorRT-ready ONNX on ONNX Runtime CPU"
ENGINES = ("tensorrt", "onnxruntime")


def make_tensorrt_compiled(target: str, model_dir: Path, signature: Signature, plan: Plan, report: Report,
                           state: dict[str, Any], threads: int, engine: str | None = None) -> CompiledModel:
    """A CompiledModel over ``model_dir``: the engine when ``state["tensorrt"]`` has one (and ``engine`` is
    not "onnxruntime"), else ONNX Runtime CPU on the ONNX."""
    if engine is not None and engine not in ENGINES:
        raise InputError(f"engine={engine!r}: a TensorRT artifact runs on one of {', '.join(ENGINES)}")
    meta = state["tensorrt"]
    use_engine = bool(meta.get("engine_file")) and engine != "onnxruntime"
    if engine == "tensorrt" and not meta.get("engine_file"):
        raise ArtifactError(f"{model_dir}: holds no TensorRT engine ({meta.get('not_built', 'export only')}); "
                            f"build one: lowbit.backends.tensorrt.rebuild_engine({str(model_dir)!r})")
    if use_engine:
        runner: Any = TensorRTRunner(model_dir, signature, meta)
        note = f"TensorRT {meta.get('tensorrt_version')} on {meta.get('gpu_name')}; kernels from the engine inspector"
    else:
        runner = OrtRunner(model_dir / MODEL_FILE, signature, threads)
        why = meta.get("not_built") or ("engine='onnxruntime'" if meta.get("engine_file") else "export_only")
        note = EXPORT_ONLY_NOTE.format(why=why)
    report_engine(report, runner, state["weights"], state["macs"], note=note)
    compiled = CompiledModel(target, runner, signature, plan, report, save_tensorrt_artifact,
                             options={"threads": threads, "engine": runner.engine})
    compiled.state = {**state, "model_dir": model_dir, "runner": runner, "engine": runner.engine}
    return compiled


def save_tensorrt_artifact(compiled: CompiledModel, directory: Path) -> None:
    meta = dict(compiled.state["tensorrt"])
    extra = (CONFORMANCE_FILE, TIMING_CACHE_FILE) + ((ENGINE_FILE,) if meta.get("engine_file") else ())
    manifest = {**base_manifest(compiled, KIND), "engine": "tensorrt" if meta.get("engine_file") else None,
                "tensorrt": meta}
    artifact.write_artifact(directory, lambda tmp: write_files(compiled, tmp, extra), manifest)


def load_tensorrt_artifact(directory: str | os.PathLike[str], manifest: Mapping[str, Any], *, threads: int = 2,
                           engine: str | None = None, **_: Any) -> CompiledModel:
    """Load a verified kind "tensorrt" artifact (``read_manifest`` has checked every hash)."""
    d = Path(directory)
    if manifest.get("kind") != KIND or not (d / MODEL_FILE).is_file():
        raise ArtifactError(f"{d}: not a TensorRT artifact (kind={manifest.get('kind')!r})")
    if manifest.get("target") != TARGET:
        raise ArtifactError(f"{d}/manifest.json: kind 'tensorrt' but target {manifest.get('target')!r}")
    try:
        meta = dict(manifest["tensorrt"])
        signature = Signature.from_json(manifest["signature"])
        state = {"opset": manifest["opset"], "weights": dict(manifest["weights"]),
                 "macs": {k: int(v) for k, v in manifest["macs"].items()}, "tensorrt": meta}
    except KeyError as e:
        raise ArtifactError(f"{d}/manifest.json: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{d}/manifest.json: malformed ({type(e).__name__}: {e})") from e
    if meta.get("engine_file") not in (None, ENGINE_FILE) or (meta.get("engine_file") and ENGINE_FILE not in
                                                              manifest.get("files", {})):
        raise ArtifactError(f"{d}/manifest.json: engine_file {meta.get('engine_file')!r} is not this artifact's "
                            f"hashed {ENGINE_FILE}")
    check_onnx_file(d, MODEL_FILE, manifest)  # before ONNX Runtime (a C++ parser) opens it
    plan = artifact.parse(d, "plan.json", Plan.from_json)
    report = artifact.parse(d, "report.json", Report.from_json)
    state["qparams"] = artifact.load_tensors(d, "qparams.safetensors")
    try:
        return make_tensorrt_compiled(TARGET, d, signature, plan, report, state, threads, engine)
    except (LowbitError, ImportError):
        raise
    except Exception as e:  # ONNX Runtime's / TensorRT's own errors on a model they refuse
        raise ArtifactError(f"{d}: the engine refused the artifact ({type(e).__name__}: {e})") from e
