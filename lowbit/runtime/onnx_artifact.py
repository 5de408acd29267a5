"""ONNX artifacts: model.onnx (external data above 2 GB), plan.json, qparams.safetensors, report.json and a
manifest with a SHA-256 of every file. Loading needs only the runtime and the engine, never the compiler."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch

import lowbit
from lowbit.errors import ArtifactError
from lowbit.runtime import artifact
from lowbit.runtime.engines import int8_share, make_runner
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import Plan

EXTERNAL_DATA_BYTES = 2 * 1024**3
MODEL_FILE = "model.onnx"


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Save an ONNX model; weights go to an external data file when the protobuf would pass 2 GB."""
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def engine_section(runner: Any, weights: Mapping[str, str], macs: Mapping[str, int]) -> dict[str, Any]:
    layers = runner.int8_layers(weights)
    for layer, v in layers.items():
        v["macs"] = int(macs.get(layer, 0))
    return {"engine": runner.engine, "int8_share": int8_share(layers, macs), "layers": layers}


def make_compiled(target: str, engine: str, model_dir: Path, signature: Signature, plan: Plan, report: Report,
                  state: dict[str, Any], threads: int) -> CompiledModel:
    runner = make_runner(engine, model_dir / MODEL_FILE, signature, threads)
    section = engine_section(runner, state["weights"], state["macs"])
    report.sections["engine"] = section
    for row in report.layers:
        k = section["layers"].get(row["layer"])
        if k is not None:
            row["kernel"], row["int8"] = k["kernel"], k["int8"]
    compiled = CompiledModel(target, runner, signature, plan, report, save_onnx_artifact,
                             options={"threads": threads, "engine": engine})
    compiled.state = {**state, "model_dir": model_dir, "runner": runner}
    return compiled


def save_onnx_artifact(compiled: CompiledModel, directory: Path) -> None:
    state = compiled.state
    src: Path = state["model_dir"]

    def write(tmp: Path) -> None:
        for f in src.iterdir():
            if f.name.startswith(MODEL_FILE):
                shutil.copyfile(f, tmp / f.name)
        artifact.write_json(tmp / "plan.json", compiled.plan)
        artifact.save_tensors(tmp / "qparams.safetensors", state.get("qparams") or {"_empty": torch.zeros(0)})
        artifact.write_json(tmp / "report.json", compiled.report.to_json())

    manifest = {
        "lowbit_version": lowbit.__version__,
        "target": compiled.target,
        "kind": "onnx",
        "engine": state["engine"],
        "opset": state["opset"],
        "signature": compiled.signature.to_json(),
        "inputs": [s.to_json() for s in compiled.signature.inputs],
        "outputs": compiled.signature.outputs,
        "dynamic_dims": {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
                         for s in compiled.signature.inputs},
        "weights": state["weights"],
        "macs": state["macs"],
    }
    artifact.write_artifact(directory, write, manifest)


def load_onnx_artifact(directory: str | os.PathLike[str], manifest: Mapping[str, Any], *, threads: int = 2,
                       **_: Any) -> CompiledModel:
    d = Path(directory)
    if manifest.get("kind") != "onnx" or not (d / MODEL_FILE).is_file():
        raise ArtifactError(f"{d}: not an ONNX artifact (kind={manifest.get('kind')!r})")
    try:
        signature = Signature.from_json(manifest["signature"])
        plan = Plan.from_json(artifact.load_json(d, "plan.json"))
        report = Report.from_json(artifact.load_json(d, "report.json"))
        state = {"engine": manifest["engine"], "opset": manifest["opset"], "weights": dict(manifest["weights"]),
                 "macs": {k: int(v) for k, v in manifest["macs"].items()},
                 "qparams": artifact.load_tensors(d, "qparams.safetensors")}
    except KeyError as e:
        raise ArtifactError(f"{d}/manifest.json: missing field {e.args[0]!r}") from e
    return make_compiled(manifest["target"], manifest["engine"], d, signature, plan, report, state, threads)
