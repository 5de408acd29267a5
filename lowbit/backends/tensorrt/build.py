"""Build a TensorRT engine from the TensorRT-ready QDQ ONNX (TensorRT >= 10, imported only here, lazily).

The build follows TensorRT's documented Python flow: ``trt.Builder`` -> ``create_network`` with the
``STRONGLY_TYPED`` flag (explicit quantization: the Q/DQ nodes decide where int8 runs; TensorRT's guide
says precision flags "are not required and should not be specified", and 10.12 deprecates ``INT8``) ->
``trt.OnnxParser.parse_from_file`` -> ``create_builder_config`` (workspace limit, detailed profiling
verbosity so the engine inspector can name each layer's precision) -> one optimization profile from the
dynamic dims -> the timing cache kept in the artifact (``create_timing_cache`` / ``set_timing_cache``:
rebuilds reuse the same tactic timings) -> ``build_serialized_network``.

Profiles: each dynamic dim gets (min, opt, max): min and max from the signature's ``dim_bounds``, opt the
example's size; an unbounded max becomes ``max(DEFAULT_MAX_DIM, opt)``. ``profiles={"seq": (1, 128, 512)}``
(a compile option) overrides a symbol.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import ArtifactError, BackendUnavailable, InputError, LowbitError
from lowbit.runtime import artifact
from lowbit.runtime.onnx_artifact import MODEL_FILE
from lowbit.runtime.signature import Signature
from lowbit.runtime.tensorrt_engine import ENGINE_FILE, TIMING_CACHE_FILE, gpu_environment

DEFAULT_MAX_DIM = 128
MIN_TENSORRT_MAJOR = 10  # execute_async_v3, name-based I/O and strongly typed networks


class TensorRTBuildError(LowbitError):
    """TensorRT's parser or builder refused the model (the message carries TensorRT's own errors)."""


def unavailable_reason() -> str | None:
    """Why an engine cannot be built here (no TensorRT, too old, no GPU), or None if it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt)"
    try:
        env = gpu_environment()
    except BackendUnavailable as e:
        return str(e)
    major = int(env["tensorrt_version"].split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        return f"TensorRT {env['tensorrt_version']} is older than {MIN_TENSORRT_MAJOR}.0"
    return None


def profile_shapes(signature: Signature, example: Sequence[torch.Tensor],
                   overrides: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The optimization profile: ``{"dims": {symbol: [min, opt, max]}, "shapes": {input: {min, opt, max}}}``."""
    overrides = dict(overrides or {})
    dims: dict[str, list[int]] = {}
    for sig, t in zip(signature.inputs, example, strict=True):
        for i, d in enumerate(sig.shape):
            if not isinstance(d, str) or d in dims:
                continue
            lo, hi = signature.dim_bounds.get(d, (1, None))
            opt = int(t.shape[i])
            dims[d] = [max(int(lo), 1), opt, int(hi) if hi is not None else max(DEFAULT_MAX_DIM, opt)]
    unknown = set(overrides) - set(dims)
    if unknown:
        raise InputError(f"profiles= names {sorted(unknown)}, which are not dynamic dims of this model "
                         f"(its dynamic dims: {sorted(dims)})")
    for sym, value in overrides.items():
        lo, opt, hi = (int(v) for v in value)
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"profiles[{sym!r}] = {tuple(value)}: need 1 <= min <= opt <= max")
        dims[sym] = [lo, opt, hi]
    shapes = {}
    for sig in signature.inputs:
        shapes[sig.name] = {k: [dims[d][j] if isinstance(d, str) else int(d) for d in sig.shape]
                            for j, k in enumerate(("min", "opt", "max"))}
    return {"dims": dims, "shapes": shapes}


def build_engine(model_dir: Path, profile: Mapping[str, Any], *, workspace_bytes: int | None = None) -> dict[str, Any]:
    """Build ``model_dir/engine.plan`` from ``model_dir/model.onnx`` (reading and updating
    ``model_dir/timing.cache``). Returns the engine's manifest section."""
    why = unavailable_reason()
    if why is not None:
        raise BackendUnavailable(f"building a TensorRT engine needs TensorRT and a CUDA GPU: {why}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_dir / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser refused {model_dir / MODEL_FILE}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    opt_profile = builder.create_optimization_profile()
    for name, s in profile["shapes"].items():
        opt_profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(opt_profile)
    cache_path = model_dir / TIMING_CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is refused
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {model_dir / MODEL_FILE} (see its log)")
    (model_dir / ENGINE_FILE).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {**gpu_environment(), "engine_file": ENGINE_FILE, "timing_cache": TIMING_CACHE_FILE, "profile": dict(profile),
            "strongly_typed": True, "workspace_bytes": workspace_bytes, "not_built": None}


def rebuild_engine(directory: str | os.PathLike[str], *, workspace_bytes: int | None = None) -> Path:
    """Build (or rebuild) the engine of a saved "tensorrt-int8" artifact from its bundled ONNX, in place,
    with the profile and timing cache it records. Needs TensorRT and a GPU; returns the directory."""
    d = Path(directory)
    manifest = artifact.read_manifest(d)
    if manifest.get("kind") != "tensorrt":
        raise ArtifactError(f"{d}: not a TensorRT artifact (kind={manifest.get('kind')!r})")
    meta = dict(manifest["tensorrt"])
    body = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256", "format_version")}

    def write(tmp: Path) -> None:
        for name in manifest["files"]:
            if name != ENGINE_FILE:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / name, tmp / name)
        body["tensorrt"] = build_engine(tmp, meta["profile"], workspace_bytes=workspace_bytes or meta.get("workspace_bytes"))
        body["engine"] = "tensorrt"

    return artifact.write_artifact(d, write, body)
