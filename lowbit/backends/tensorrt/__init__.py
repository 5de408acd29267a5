"""The tensorrt-int8 target: TensorRT-ready QDQ ONNX (export, rules, conformance) and the engine build.

``rebuild_engine(dir)`` builds or rebuilds a saved artifact's engine from its bundled ONNX.
"""

from lowbit.backends.tensorrt.build import rebuild_engine

__all__ = ["rebuild_engine"]
