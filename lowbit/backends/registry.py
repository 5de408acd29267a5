"""Target name -> backend. Backends are imported on first use, so optional runtimes stay optional."""

from __future__ import annotations

import importlib

from lowbit.backends.base import Backend
from lowbit.errors import LowbitError

#: target -> "module:Class"
TARGETS: dict[str, str] = {
    "torch": "lowbit.backends.torch.backend:TorchBackend",
    "onnxruntime-int8": "lowbit.backends.onnx.backend:OnnxRuntimeBackend",
    "openvino-int8": "lowbit.backends.onnx.backend:OpenVinoBackend",
    "triton": "lowbit.backends.triton.backend:TritonBackend",
    "tensorrt-int8": "lowbit.backends.tensorrt.backend:TensorRTBackend",
}


class UnknownTargetError(LowbitError, ValueError):
    pass


def get_backend(target: str) -> Backend:
    try:
        path = TARGETS[target]
    except KeyError:
        raise UnknownTargetError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}") from None
    module, cls = path.split(":")
    backend: Backend = getattr(importlib.import_module(module), cls)()
    return backend

