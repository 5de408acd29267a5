"""Run a serialized TensorRT engine on torch CUDA tensors (TensorRT >= 10, imported lazily).

An engine only runs where it was built: the same TensorRT version and the same GPU model (TensorRT's
default; engines are not portable across versions or devices). ``check_engine_environment`` compares the
artifact's engine manifest with this machine and names every mismatch, with the call that rebuilds the
engine from the ONNX bundled next to it.

The runner follows TensorRT 10's name-based I/O API: ``set_input_shape`` and ``set_tensor_address`` per
I/O tensor, then ``execute_async_v3`` on torch's current CUDA stream, so the work is ordered with the
caller's own torch kernels; outputs are torch CUDA tensors allocated by torch (no host sync).
"""

from __future__ import annotations

import json
import os
import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import (
    ArtifactError,
    BackendUnavailable,
    EngineError,
    EngineMismatchError,
    InputError,
)
from lowbit.runtime.signature import Signature

ENGINE_FILE = "engine.plan"
TIMING_CACHE_FILE = "timing.cache"


def rebuild_call(directory: str | os.PathLike[str]) -> str:
    """The exact call that rebuilds an artifact's engine from its bundled ONNX (needs TensorRT and a GPU)."""
    return f"lowbit.backends.tensorrt.rebuild_engine({os.fspath(directory)!r})"


def ort_call(directory: str | os.PathLike[str]) -> str:
    """The call that runs an artifact's TensorRT-ready ONNX on ONNX Runtime CPU instead of its engine."""
    return f"lowbit.load({os.fspath(directory)!r}, engine='onnxruntime')"


def gpu_environment() -> dict[str, str]:
    """This machine's TensorRT version, GPU name and compute capability (what an engine is tied to).

    Raises BackendUnavailable when TensorRT or a CUDA GPU is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable("TensorRT is not installed (pip install tensorrt)") from e
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    dev = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(dev)
    return {"tensorrt_version": str(trt.__version__), "gpu_name": torch.cuda.get_device_name(dev),
            "compute_capability": f"{major}.{minor}"}


def check_engine_environment(directory: str | os.PathLike[str], meta: Mapping[str, Any]) -> None:
    """Raise unless the engine described by ``meta`` (the artifact manifest's "tensorrt" section) can run
    here: BackendUnavailable without TensorRT or a GPU, EngineMismatchError on another TensorRT version or
    GPU. Both messages give the rebuild call."""
    built = (f"TensorRT {meta.get('tensorrt_version')} on {meta.get('gpu_name')} "
             f"(compute capability {meta.get('compute_capability')})")
    fix = (f"rebuild it from the bundled ONNX on this machine: {rebuild_call(directory)}; or run the ONNX on "
           f"ONNX Runtime CPU: {ort_call(directory)}")
    try:
        here = gpu_environment()
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{Path(directory) / ENGINE_FILE}: the engine was built with {built}, but {e}; "
                                 f"{fix}") from e
    labels = {"tensorrt_version": "TensorRT version", "gpu_name": "GPU", "compute_capability": "compute capability"}
    mismatches = [f"{label} {here[k]!r} here, {meta.get(k)!r} in the engine" for k, label in labels.items()
                  if str(meta.get(k)) != here[k]]
    if mismatches:
        raise EngineMismatchError(f"{Path(directory) / ENGINE_FILE} was built with {built} and cannot run here: "
                                  f"{'; '.join(mismatches)}. TensorRT engines run only on the TensorRT version "
                                  f"and GPU they were built for: {fix}")


def check_profile(profile: Mapping[str, Any], signature: Signature, flat: Sequence[torch.Tensor]) -> None:
    """InputError naming the input, dim and range when a shape falls outside the engine's profile."""
    shapes = profile.get("shapes", {})
    for sig, t in zip(signature.inputs, flat, strict=True):
        p = shapes.get(sig.name)
        if p is None:
            continue
        for i, (got, lo, hi) in enumerate(zip(t.shape, p["min"], p["max"], strict=True)):
            if not lo <= got <= hi:
                sym = sig.shape[i] if isinstance(sig.shape[i], str) else None
                fix = (f"; compile with profiles={{{sym!r}: (min, opt, max)}} to cover it" if sym else "")
                raise InputError(f"input {sig.name!r} dim {i}{f' ({sym})' if sym else ''} is {got}, outside the "
                                 f"engine's optimization profile [{lo}, {hi}]{fix}")


class TensorRTRunner:
    """Deserializes ``engine.plan`` and runs it; takes and returns torch tensors (CPU inputs are copied to
    the GPU; outputs stay on the GPU)."""

    engine = "tensorrt"

    def __init__(self, directory: str | os.PathLike[str], signature: Signature, meta: Mapping[str, Any]) -> None:
        d = Path(directory)
        check_engine_environment(d, meta)
        import tensorrt as trt

        self._trt = trt
        self.signature = signature
        self.profile = dict(meta.get("profile") or {})
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.cuda_engine = self.runtime.deserialize_cuda_engine((d / ENGINE_FILE).read_bytes())
        if self.cuda_engine is None:
            raise ArtifactError(f"{d / ENGINE_FILE}: TensorRT could not deserialize the engine (see its log); "
                                f"rebuild it: {rebuild_call(d)}")
        self.context = self.cuda_engine.create_execution_context()
        # an execution context holds one call's shapes and addresses: concurrent calls each take an idle one from
        # this pool (or create one), so one loaded engine serves any number of threads
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle.put(self.context)
        names = [self.cuda_engine.get_tensor_name(i) for i in range(self.cuda_engine.num_io_tensors)]
        self.input_names = [n for n in names if self.cuda_engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        want_in, want_out = [s.name for s in signature.inputs], list(signature.outputs)
        if sorted(self.input_names) != sorted(want_in) or sorted(self.output_names) != sorted(want_out):
            raise ArtifactError(f"{d / ENGINE_FILE}: engine I/O {self.input_names} -> {self.output_names} does not "
                                f"match the signature {want_in} -> {want_out}; rebuild it: {rebuild_call(d)}")
        self.dtypes = {n: _torch_dtype(trt, self.cuda_engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, flat: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        check_profile(self.profile, self.signature, flat)
        try:
            context = self._idle.get_nowait()
        except queue.Empty:
            context = self.cuda_engine.create_execution_context()
        try:
            return self._run(context, flat)
        finally:
            self._idle.put(context)

    def _run(self, context: Any, flat: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        feeds = []  # kept alive until enqueued; the caching allocator orders their reuse on this stream
        for sig, t in zip(self.signature.inputs, flat, strict=True):
            x = t.to(device=self.device, dtype=self.dtypes[sig.name]).contiguous()
            context.set_input_shape(sig.name, tuple(x.shape))
            context.set_tensor_address(sig.name, x.data_ptr())
            feeds.append(x)
        outs = []
        for name in self.signature.outputs:
            y = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT's execute_async_v3 failed (see the TensorRT log above)")
        return outs

    def int8_layers(self, weights: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per layer, the engine layer that runs it and whether its input is Int8, from the engine inspector
        (built with detailed profiling verbosity; inspected at the profile's opt shapes, since formats are
        "N/A due to dynamic shapes" otherwise). Layers the inspector does not name report "?"."""
        try:
            for name, shapes in self.profile.get("shapes", {}).items():  # formats are known only for shapes
                self.context.set_input_shape(name, tuple(shapes["opt"]))
            inspector = self.cuda_engine.create_engine_inspector()
            inspector.execution_context = self.context
            info = json.loads(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))
            rows = [r for r in info.get("Layers", []) if isinstance(r, dict)]
        except Exception:  # the inspector's output is informational; never fail a load on it
            rows = []
        out: dict[str, dict[str, Any]] = {}
        for layer in weights:
            row = next((r for r in rows if f"{layer}/" in str(r.get("Name", ""))), None)
            if row is None:
                out[layer] = {"kernel": "?", "int8": False}
                continue
            formats = " ".join(str(t.get("Format/Datatype", "")) for t in row.get("Inputs", []) if isinstance(t, dict))
            out[layer] = {"kernel": str(row.get("LayerType", "?")), "int8": "int8" in formats.lower()}
        return out


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """A TensorRT DataType as a torch dtype (through numpy: ``trt.nptype``)."""
    return torch.from_numpy(np.empty(0, dtype=trt.nptype(dtype))).dtype
