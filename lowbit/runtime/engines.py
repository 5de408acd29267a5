"""Engine runners for ONNX artifacts (ONNX Runtime, OpenVINO) and the proof that INT8 really runs.

A runner takes the flat input tensors and returns torch tensors. ``int8_layers()`` reports, per
quantized layer, which kernel the engine chose and whether it is an integer kernel:

- ONNX Runtime: the graph ORT actually runs (its optimized model, written once at session creation):
  the node that consumes a layer's int8 weight, directly or through its DequantizeLinear.
- OpenVINO: the compiled model's runtime graph (``get_runtime_model()``): each executed layer's
  ``runtimePrecision`` and the original ONNX nodes fused into it (``originalLayersNames``).

ONNX node names carry the layer: the weight DQ is ``<layer>/weight_dq`` and its consumer
``<layer>/<OpType>``, so both engines' reports map back to the plan's layer names.
"""

from __future__ import annotations

import os
import queue
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import BackendNotAvailable, EngineError, InputError
from lowbit.runtime.signature import Signature

ORT_INT8_OPS = {
    "MatMulIntegerToFloat", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
    "DynamicQuantizeMatMul", "QAttention", "MatMulNBits",
}
OV_INT8_PRECISIONS = {"u8", "i8"}


def _layer_of(node_name: str) -> str | None:
    if "/" not in node_name:
        return None
    layer, _, tail = node_name.rpartition("/")
    return layer if tail and not tail.startswith("weight_dq") else None


class OrtRunner:
    engine = "onnxruntime"
    autograd_free = True  # numpy in, numpy out: no autograd graph to switch off

    def __init__(self, model_path: str | os.PathLike[str], signature: Signature, threads: int = 2) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendNotAvailable("target 'onnxruntime-int8' needs onnxruntime: pip install onnxruntime") from e
        self.signature = signature
        self._tmp = tempfile.TemporaryDirectory(prefix="lowbit-ort-")
        self.optimized_path = Path(self._tmp.name) / "optimized.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.optimized_model_filepath = str(self.optimized_path)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, flat: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # InferenceSession.run is thread-safe; this runner keeps no per-call state
        feed = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(self.input_names, flat, strict=True)}
        try:
            outs = self.session.run(None, feed)
        except Exception as e:  # onnxruntime's Fail/InvalidArgument/RuntimeException are not one base class
            raise EngineError(engine_message("onnxruntime", e, self.signature, flat)) from e
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    def kernels(self, layers_by_weight: Mapping[str, str]) -> dict[str, str]:
        """layer -> the op type ORT runs for it (from the optimized graph)."""
        return {layer: node.op_type for layer, node in self._kernel_nodes(layers_by_weight).items()}

    def _kernel_nodes(self, layers_by_weight: Mapping[str, str]) -> dict[str, Any]:
        import onnx

        model = onnx.load(str(self.optimized_path), load_external_data=False)
        inits = {t.name for t in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        out: dict[str, Any] = {}
        for node in model.graph.node:
            if node.op_type in ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"):
                continue
            for name in node.input:
                src = producers.get(name)
                weight = name if name in inits else (src.input[0] if src is not None and src.op_type ==
                                                     "DequantizeLinear" and src.input[0] in inits else None)
                layer = layers_by_weight.get(weight) if weight else None
                if layer is not None:
                    out[layer] = node
        return out

    def int8_layers(self, weights: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per layer: the op ORT runs, whether it computes in integers, and the weights it reads."""
        import onnx

        nodes = self._kernel_nodes({w: layer for layer, w in weights.items()})
        out: dict[str, dict[str, Any]] = {}
        for layer in weights:
            node = nodes.get(layer)
            kind = node.op_type if node is not None else "?"
            entry: dict[str, Any] = {"kernel": kind, "int8": kind in ORT_INT8_OPS, "weights": "float"}
            if kind == "MatMulNBits":  # weight-only; int8 activations only at accuracy_level 4
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                entry["weights"] = f"int{attrs.get('bits', 4)} g{attrs.get('block_size')}"
                entry["int8"] = attrs.get("accuracy_level", 0) == 4
                entry["kernel"] = f"MatMulNBits(accuracy_level={attrs.get('accuracy_level', 0)})"
            elif kind in ORT_INT8_OPS:
                entry["weights"] = "int8"
            out[layer] = entry
        return out


class OpenVinoRunner:
    """OpenVINO CPU. With ``static_shapes`` (the compile example's input shapes), a second model compiled
    for exactly those shapes serves calls of that shape: OpenVINO plans memory and picks kernels ahead of
    time for static shapes (about 7% faster on MiniLM-L6 8 x 128); any other shape runs the dynamic one."""

    engine = "openvino"
    autograd_free = True  # numpy in, numpy out: no autograd graph to switch off

    def __init__(self, model_path: str | os.PathLike[str], signature: Signature, threads: int = 2,
                 static_shapes: Sequence[Sequence[int]] | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise BackendNotAvailable(
                'target \'openvino-int8\' needs OpenVINO: pip install "lowbit[openvino]"') from e
        self.signature = signature
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        model = core.read_model(str(model_path))
        self._ov = ov
        self.compiled = core.compile_model(model, "CPU", config)
        self.num_outputs = len(self.compiled.outputs)
        self.static_key: tuple[tuple[int, ...], ...] | None = None
        self.static = None
        if static_shapes is not None:
            model = model.clone()  # reshape a copy: the dynamic model above stays as read
            self.static_key = tuple(tuple(int(d) for d in s) for s in static_shapes)
            model.reshape({p.get_any_name(): list(s) for p, s in zip(model.inputs, self.static_key, strict=True)})
            self.static = core.compile_model(model, "CPU", config)
        # An infer request runs one inference at a time ("Infer Request is busy" otherwise): each call takes an
        # idle request from its model's pool, or creates one, and gives it back after. A compiled model is
        # thread-safe; N threads calling at once hold N requests (created on first need, then reused).
        self._idle: dict[int, queue.SimpleQueue[Any]] = {id(self.compiled): queue.SimpleQueue()}
        self._idle[id(self.compiled)].put(self.compiled.create_infer_request())
        if self.static is not None:
            self._idle[id(self.static)] = queue.SimpleQueue()
            self._idle[id(self.static)].put(self.static.create_infer_request())

    def __call__(self, flat: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        compiled = self.compiled
        if self.static is not None and tuple(tuple(t.shape) for t in flat) == self.static_key:
            compiled = self.static
        idle = self._idle[id(compiled)]
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            # OpenVINO reads our arrays in place during this synchronous call; the outputs are copied out of the
            # request's buffers, so they stay valid after the request serves another call
            for i, t in enumerate(flat):
                array = np.ascontiguousarray(t.detach().cpu().numpy())
                request.set_input_tensor(i, self._ov.Tensor(array, shared_memory=True))
            try:
                request.infer()
            except RuntimeError as e:
                raise EngineError(engine_message("openvino", e, self.signature, flat)) from e
            return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(self.num_outputs)]
        finally:
            idle.put(request)

    def _executed(self, with_types: bool = False) -> Iterator[Any]:
        """(original ONNX node names, layer type, runtime precision[, input element types]) of each node of
        the compiled model."""
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
            kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            if with_types:
                yield names, kind, prec, [i.get_element_type().get_type_name() for i in op.inputs()]
            else:
                yield names, kind, prec

    def int8_layers(self, weights: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per layer: the executed node's type and precision, whether it computes in integers (its
        activations arrive as u8/i8), and the element type of the weights it reads (``int4`` when OpenVINO
        kept a 4-bit weight compressed and decompresses it in the FullyConnected kernel)."""
        found: dict[str, dict[str, Any]] = {}
        for names, kind, prec, types in self._executed(with_types=True):
            if kind in ("Const", "Reorder", "Input", "Parameter", "Output", "Result"):
                continue
            for original in names.split(","):
                layer = _layer_of(original.strip())
                if layer in weights and (layer not in found or not found[layer]["int8"]):
                    act = types[0] if types else "?"
                    weight = types[1] if len(types) > 1 else "?"
                    found[layer] = {"kernel": f"{kind}:{prec}",
                                    "int8": prec in OV_INT8_PRECISIONS and act in ("u8", "i8"),
                                    "weights": {"i4": "int4", "u4": "uint4", "i8": "int8", "u8": "uint8"}.get(
                                        weight, "float" if weight in ("f32", "bf16", "f16") else weight)}
        return {layer: found.get(layer, {"kernel": "?", "int8": False, "weights": "?"}) for layer in weights}

    def attention_kernels(self) -> list[str]:
        """``layerType:runtimePrecision`` of each executed node that runs a softmax (the fused MHA kernels:
        ``Subgraph:i8`` when Q K^T runs as an int8 matmul)."""
        return [f"{kind}:{prec}" for names, kind, prec in self._executed() if "softmax" in names.lower()]


def engine_message(engine: str, error: BaseException, signature: Signature, flat: Sequence[torch.Tensor]) -> str:
    """An engine's failure as a lowbit message: the engine's first line (it names the node), and the inputs."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    inputs = ", ".join(f"{s.name} {t.dtype} {list(t.shape)}" for s, t in zip(signature.inputs, flat, strict=False))
    return f"{engine} failed on this call ({first}); inputs: {inputs}"


RUNNERS = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}


def make_runner(engine: str, model_path: str | os.PathLike[str], signature: Signature, threads: int = 2,
                **engine_options: Any) -> Any:
    if engine not in RUNNERS:
        raise InputError(f"unknown engine {engine!r}; known: {', '.join(RUNNERS)}")
    return RUNNERS[engine](model_path, signature, threads, **engine_options)


def int8_share(layers: Mapping[str, Mapping[str, Any]], macs: Mapping[str, int]) -> float:
    """The fraction of the quantized layers' multiply-accumulates that run in an integer kernel."""
    total = sum(macs.get(layer, 0) for layer in layers)
    done = sum(macs.get(layer, 0) for layer, v in layers.items() if v["int8"])
    return done / total if total else 0.0
