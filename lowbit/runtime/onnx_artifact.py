"""ONNX artifacts: model.onnx (external data above 2 GB), plan.json, qparams.safetensors (scales and zero
points), report.json and a manifest with a SHA-256 of every file. Loading needs only the runtime and the
engine, never the compiler."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import onnx
import torch

import lowbit
from lowbit.errors import ArtifactError, BackendNotAvailable
from lowbit.runtime import artifact
from lowbit.runtime.engines import RUNNERS, int8_share, make_runner
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import Plan

EXTERNAL_DATA_BYTES = 2 * 1024**3
MODEL_FILE = "model.onnx"
ONNX_TARGETS = ("onnxruntime-int8", "openvino-int8")  # the targets whose artifacts are kind "onnx"


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Save an ONNX model; weights go to an external data file when the protobuf would pass 2 GB."""
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def report_engine(report: Report, runner: Any, weights: Mapping[str, str], macs: Mapping[str, int],
                  float_weights: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """The proof that int8 runs: per quantized layer the kernel the engine executes and its MACs, the int8
    share of the MACs, into ``report.sections["engine"]`` and the report's per-layer rows; the kernels of
    the layers kept in float (``float_weights``) under ``float_layers``."""
    layers = runner.int8_layers(weights)
    for layer, v in layers.items():
        v["macs"] = int(macs.get(layer, 0))
    section = {"engine": runner.engine, "int8_share": int8_share(layers, macs), "layers": layers, **extra}
    if float_weights:
        section["float_layers"] = runner.int8_layers(float_weights)
        layers = {**section["float_layers"], **layers}
    if hasattr(runner, "attention_kernels"):
        section["attention_kernels"] = runner.attention_kernels()
    report.sections["engine"] = section
    for row in report.layers:
        k = layers.get(row["layer"])
        if k is not None:
            row["kernel"], row["int8"] = k["kernel"], k["int8"]
            if "weights" in k:
                row["weights"] = k["weights"]
    return section


def make_compiled(target: str, engine: str, model_dir: Path, signature: Signature, plan: Plan, report: Report,
                  state: dict[str, Any], threads: int) -> CompiledModel:
    engine_options = {"static_shapes": state["static_shapes"]} if state.get("static_shapes") else {}
    runner = make_runner(engine, model_dir / MODEL_FILE, signature, threads, **engine_options)
    report_engine(report, runner, state["weights"], state["macs"], state.get("float_weights"))
    compiled = CompiledModel(target, runner, signature, plan, report, save_onnx_artifact,
                             options={"threads": threads, "engine": engine})
    compiled.state = {**state, "model_dir": model_dir, "runner": runner}
    return compiled


def save_onnx_artifact(compiled: CompiledModel, directory: Path) -> None:
    state = compiled.state
    manifest = {**base_manifest(compiled, "onnx"), "engine": state["engine"],
                "static_shapes": state.get("static_shapes")}
    artifact.write_artifact(directory, lambda tmp: write_files(compiled, tmp), manifest)


def write_files(compiled: CompiledModel, tmp: Path, extra: tuple[str, ...] = ()) -> None:
    """What every ONNX-based artifact holds: the model (and its external data), the files named in
    ``extra`` from the build directory, plan.json, qparams.safetensors and report.json."""
    state = compiled.state
    for f in Path(state["model_dir"]).iterdir():
        if f.name.startswith(MODEL_FILE) or f.name in extra:
            shutil.copyfile(f, tmp / f.name)
    artifact.write_json(tmp / "plan.json", compiled.plan)
    artifact.save_tensors(tmp / "qparams.safetensors", artifact_qparams(state.get("qparams")))
    artifact.write_json(tmp / "report.json", compiled.report.to_json())


def artifact_qparams(qparams: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """What qparams.safetensors holds: every scale and zero point, not the weights' int8 codes, which
    model.onnx holds already (re-applying the qparams to the float model recomputes the same codes)."""
    kept = {k: v for k, v in (qparams or {}).items() if not k.endswith(".weight.q")}
    return kept or {"_empty": torch.zeros(0)}


def base_manifest(compiled: CompiledModel, kind: str) -> dict[str, Any]:
    """The manifest fields every ONNX-based artifact shares (the writer adds the file hashes)."""
    state, sig = compiled.state, compiled.signature
    return {
        "lowbit_version": lowbit.__version__,
        "target": compiled.target,
        "kind": kind,
        "opset": state["opset"],
        "signature": sig.to_json(),
        "inputs": [s.to_json() for s in sig.inputs],
        "outputs": sig.outputs,
        "dynamic_dims": {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in sig.inputs},
        "weights": state["weights"],
        "float_weights": state.get("float_weights", {}),
        "macs": state["macs"],
    }


def load_onnx_artifact(directory: str | os.PathLike[str], manifest: Mapping[str, Any], *, threads: int = 2,
                       **_: Any) -> CompiledModel:
    d = Path(directory)
    if manifest.get("kind") != "onnx" or not (d / MODEL_FILE).is_file():
        raise ArtifactError(f"{d}: not an ONNX artifact (kind={manifest.get('kind')!r})")
    if manifest.get("target") not in ONNX_TARGETS:
        raise ArtifactError(f"{d}/manifest.json: target {manifest.get('target')!r} does not write ONNX artifacts "
                            f"(those do: {', '.join(ONNX_TARGETS)})")
    try:
        signature = Signature.from_json(manifest["signature"])
        state = {"engine": manifest["engine"], "opset": manifest["opset"], "weights": dict(manifest["weights"]),
                 "macs": {k: int(v) for k, v in manifest["macs"].items()},
                 "float_weights": dict(manifest.get("float_weights") or {})}
    except KeyError as e:
        raise ArtifactError(f"{d}/manifest.json: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{d}/manifest.json: malformed ({type(e).__name__}: {e})") from e
    if state["engine"] not in RUNNERS:
        raise ArtifactError(f"{d}/manifest.json: unknown engine {state['engine']!r}; known: {', '.join(RUNNERS)}")
    check_onnx_file(d, MODEL_FILE, manifest)  # before the engine (a C++ parser) opens it
    plan = artifact.parse(d, "plan.json", Plan.from_json)
    report = artifact.parse(d, "report.json", Report.from_json)
    state["qparams"] = artifact.load_tensors(d, "qparams.safetensors")
    static = manifest.get("static_shapes")
    if static is not None:
        if not (isinstance(static, list) and all(isinstance(s, list) and all(isinstance(n, int) and n > 0 for n in s)
                                                 for s in static) and len(static) == len(signature.inputs)):
            raise ArtifactError(f"{d}/manifest.json: static_shapes must be one list of positive ints per input")
        state["static_shapes"] = static
    try:
        return make_compiled(manifest["target"], state["engine"], d, signature, plan, report, state, threads)
    except (ArtifactError, BackendNotAvailable):
        raise
    except Exception as e:  # the engine's own parser and checks (ORT's Fail / InvalidGraph, OpenVINO's errors)
        raise ArtifactError(f"{d / MODEL_FILE}: {state['engine']} refused the model ({type(e).__name__}: {e})") from e


# -- checks before an engine opens the model ------------------------------------------------------------

ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 16: "bfloat16"}


def check_onnx_file(directory: Path, name: str, manifest: Mapping[str, Any]) -> onnx.ModelProto:
    """Refuse an ONNX file of an artifact before any engine opens it (engines are C++ parsers that follow
    external-data paths): it must be listed in the (verified) manifest, parse as a model, keep every
    external-data location a file of this artifact that the manifest lists (so hashed, and inside the
    directory: no absolute path, no ``..``, no symlink out), and take the signature's inputs."""
    path = artifact.inside(directory, name)
    listed = manifest.get("files") or {}
    if name not in listed:
        raise ArtifactError(f"{path}: not listed in the manifest (an unverified model is not loaded)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{path}: cannot be read as an ONNX model ({type(e).__name__}: {e})") from e
    if not model.HasField("graph") or not model.opset_import:
        raise ArtifactError(f"{path}: an ONNX model without a graph or opset imports")
    base = PurePosixPath(name).parent
    for tensor in _tensors(model.graph, list(model.functions)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        where = f"{path}: tensor {tensor.name!r} has its data in {location!r}"
        try:
            rel = base / location
            if PurePosixPath(location).is_absolute() or os.path.isabs(location):
                raise ArtifactError("an absolute path")
            artifact.inside(directory, rel.as_posix(), "external data")
        except ArtifactError as e:
            raise ArtifactError(f"{where}, outside the artifact directory: refused ({e})") from None
        if rel.as_posix() not in listed:
            raise ArtifactError(f"{where}, which is not listed in the manifest: refused (unverified data)")
    signature = manifest.get("signature")
    if name == MODEL_FILE and isinstance(signature, Mapping):
        _check_inputs(path, model, signature)
    return model


def _tensors(graph: onnx.GraphProto, functions: list[onnx.FunctionProto]) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers, sparse ones, node attributes, subgraphs, functions."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    nodes = list(graph.node) + [n for f in functions for n in f.node]
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g, [])


def _check_inputs(path: Path, model: onnx.ModelProto, signature: Mapping[str, Any]) -> None:
    """The graph's inputs must be the signature's, by name, dtype and rank."""
    inits = {t.name for t in model.graph.initializer}
    graph = [(i.name, ONNX_DTYPES.get(i.type.tensor_type.elem_type, str(i.type.tensor_type.elem_type)),
              len(i.type.tensor_type.shape.dim)) for i in model.graph.input if i.name not in inits]
    try:
        sig = [(s["name"], s["dtype"], len(s["shape"])) for s in signature["inputs"]]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path.parent / artifact.MANIFEST}: malformed signature ({type(e).__name__}: {e})") from e
    if graph != sig:
        raise ArtifactError(f"{path}: the graph takes inputs {graph} (name, dtype, rank) but the manifest's "
                            f"signature says {sig}")
