"""Engine runners for ONNX artifacts (ONNX Runtime, OpenVINO) and the proof that INT8 really runs.

A runner takes the flat input tensors and returns torch tensors. ``int8_layers()`` reports, per layer,
the kernel the engine executes for the node that does the layer's multiply-accumulates (its *MAC node*)
and whether that kernel computes in integers. It reads what runs, never what was asked for:

- ONNX Runtime: the graph ORT actually runs (its optimized model, written once at session creation).
  The MAC node is the first compute node reached from the layer's weight through its DequantizeLinear
  and data-movement ops (Transpose, Reshape); a Conv that ORT left fed by DequantizeLinear outputs
  runs in float and reads ``Conv``, int8 False.
- OpenVINO: the runtime graph of the compiled model that serves the compile example's shape (the
  static one when there is one), read after one inference, when every primitive is chosen. The MAC
  node is the executed Convolution / FullyConnected / MatMul that holds the layer's ONNX compute node
  among its ``originalLayersNames``; its kernel is ``layerType:primitiveType`` (oneDNN's name, e.g.
  ``brgconv_avx512_dw_I8`` or ``brgconv_avx512_1x1_bf16``). Integer means the primitive computes in
  I8 *and* the node's real input element types are u8/i8 activations with i8/u8 weights;
  ``runtimePrecision`` alone is not evidence (it names the input precision, not the kernel), nor is
  another node that merely lists the layer's name (a fused quantize of the next layer).

ONNX node names carry the layer: the weight DQ is ``<layer>/weight_dq`` and its consumer
``<layer>/<OpType>``; float layers are found from their weight initializer the same way.
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
#: ONNX ops a layer's weight passes through before its compute node (dequantized, transposed, reshaped)
WEIGHT_PATH_OPS = {"DequantizeLinear", "Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
#: ONNX ops (standard and ORT's fused/contrib ones) that do a layer's multiply-accumulates
ONNX_MAC_OPS = ORT_INT8_OPS | {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm",
                               "NhwcConv", "QLinearConvTranspose", "Attention", "MultiHeadAttention"}
#: OpenVINO runtime-graph layer types that do a layer's multiply-accumulates
OV_MAC_TYPES = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                "FullyConnectedCompressed", "GatherCompressed"}


def _layer_of(node_name: str) -> str | None:
    if "/" not in node_name:
        return None
    layer, _, tail = node_name.partition("/")
    return layer if tail and not tail.startswith("weight_dq") else None


def mac_nodes(model: Any, layers_by_weight: Mapping[str, str]) -> dict[str, Any]:
    """layer -> the ONNX node that does its multiply-accumulates: from the weight initializer, through
    DequantizeLinear and data-movement ops, the first compute node (else the first other consumer)."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: dict[str, Any] = {}
    for weight, layer in layers_by_weight.items():
        frontier, seen, others = [weight], set(), []
        found = None
        while frontier and found is None:
            for n in consumers.get(frontier.pop(0), []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op_type in WEIGHT_PATH_OPS:
                    frontier.extend(n.output)
                elif n.op_type in ONNX_MAC_OPS:
                    found = n
                    break
                else:
                    others.append(n)
        node = found if found is not None else (others[0] if others else None)
        if node is not None:
            out[layer] = node
    return out


class OrtRunner:
    engine = "onnxruntime"
    autograd_free = True  # numpy in, numpy out: no autograd graph to switch off

    def __init__(self, model_path: str | os.PathLike[str], signature: Signature, threads: int = 2) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendNotAvailable("target 'onnxruntime-int8' needs onnxruntime: pip install onnxruntime") from e
        self.signature = signature
        self.model_path = Path(model_path)
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
        """layer -> the node of ORT's optimized graph that does its MACs. Found from the weight; where ORT
        rewrote the weight (a float Conv in the NCHWc layout reads a reordered copy), from the original compute
        node's other initializers (its bias) or the producer of its output, behind layout ops."""
        import onnx

        optimized = onnx.load(str(self.optimized_path), load_external_data=False)
        found = mac_nodes(optimized, layers_by_weight)
        missing = {w: layer for w, layer in layers_by_weight.items()
                   if layer not in found or found[layer].op_type not in ONNX_MAC_OPS}
        if not missing:
            return found
        original = mac_nodes(onnx.load(str(self.model_path), load_external_data=False), missing)
        inits = {t.name for t in optimized.graph.initializer}
        producers = {o: n for n in optimized.graph.node for o in n.output}
        for layer, node in original.items():
            by_init = [n for n in optimized.graph.node if n.op_type in ONNX_MAC_OPS
                       and any(i in inits and i in n.input for i in node.input[2:])]
            src = producers.get(node.output[0]) if node.output else None
            while src is not None and src.op_type in ("ReorderOutput", "Transpose") and src.input:
                src = producers.get(src.input[0])
            hit = by_init[0] if by_init else (src if src is not None and src.op_type in ONNX_MAC_OPS else None)
            if hit is not None:
                found[layer] = hit
        return found

    def int8_layers(self, weights: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per layer (``{layer: weight initializer}``): the op ORT runs for its MACs, whether it computes in
        integers, and the weights it reads. A layer ORT left as float Conv/MatMul reads that op, int8 False."""
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
    time for static shapes (about 7% faster on MiniLM-L6 8 x 128); any other shape runs the dynamic one.
    ``inference_precision="f32"`` keeps the float ops in f32 (OpenVINO's CPU default is bf16 where the CPU
    has it): the differential test compares the integer kernels without bf16 rounding on top."""

    engine = "openvino"
    autograd_free = True  # numpy in, numpy out: no autograd graph to switch off

    def __init__(self, model_path: str | os.PathLike[str], signature: Signature, threads: int = 2,
                 static_shapes: Sequence[Sequence[int]] | None = None, inference_precision: str | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise BackendNotAvailable(
                'target \'openvino-int8\' needs OpenVINO: pip install "lowbit[openvino]"') from e
        self.signature = signature
        self.model_path = Path(model_path)
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if inference_precision is not None:  # "f32": float ops in f32, not bf16 (the CPU default where it has bf16)
            config["INFERENCE_PRECISION_HINT"] = inference_precision
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

    def serving(self) -> Any:
        """The compiled model that serves calls of the compile example's shape (the static one if any)."""
        return self.static if self.static is not None else self.compiled

    def _runtime_ops(self) -> list[Any]:
        """The serving model's runtime graph, after one inference when its input shapes are static: OpenVINO
        chooses some primitives at the first inference (a FullyConnected reads ``undef_I8`` before it)."""
        compiled = self.serving()
        if not getattr(self, "_warmed", False) and all(i.get_partial_shape().is_static for i in compiled.inputs):
            request = compiled.create_infer_request()
            for i, port in enumerate(compiled.inputs):
                dtype = port.get_element_type().to_dtype()
                request.set_input_tensor(i, self._ov.Tensor(np.zeros(list(port.get_shape()), dtype=dtype)))
            try:
                request.infer()
                self._warmed = True
            except RuntimeError:  # an input zeros cannot be (none known): report what is chosen so far
                pass
        return list(compiled.get_runtime_model().get_ordered_ops())

    @staticmethod
    def _info(op: Any) -> dict[str, Any]:
        info = op.get_rt_info()

        def get(key: str, default: str) -> str:
            return info[key].astype(str) if key in info else default

        return {"names": [n.strip() for n in get("originalLayersNames", "").split(",") if n.strip()],
                "kind": get("layerType", op.get_type_name()), "precision": get("runtimePrecision", "?"),
                "primitive": get("primitiveType", ""),
                "types": [i.get_element_type().get_type_name() for i in op.inputs()]}

    def _executed(self) -> Iterator[tuple[str, str, str]]:
        """(original ONNX node names, layer type, runtime precision) of each node the serving model runs."""
        for op in self._runtime_ops():
            i = self._info(op)
            yield ",".join(i["names"]), i["kind"], i["precision"]

    def int8_layers(self, weights: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per layer (``{layer: weight initializer}``): the executed MAC node's ``layerType:primitiveType``,
        its compute precision, whether it computes in integers (an I8 primitive reading u8/i8 activations and
        i8/u8 weights), and the element type of the weights it reads (``int4`` when OpenVINO kept a 4-bit
        weight compressed and decompresses it in the FullyConnected kernel)."""
        import onnx

        onnx_nodes = mac_nodes(onnx.load(str(self.model_path), load_external_data=False),
                               {w: layer for layer, w in weights.items()})
        ops = [self._info(op) for op in self._runtime_ops()]
        ops = [i for i in ops if i["kind"] not in ("Const", "Reorder", "Input", "Parameter", "Output", "Result")]
        out: dict[str, dict[str, Any]] = {}
        for layer in weights:
            node = onnx_nodes.get(layer)
            name = node.name if node is not None else f"{layer}/"
            named = [i for i in ops if any(n == name or n.startswith(name.rstrip("/") + "/") for n in i["names"])]
            if not named:  # the compute node renamed: any executed node of the layer's own names
                named = [i for i in ops if any(_layer_of(n) == layer for n in i["names"])]
            mac = next((i for i in named if i["kind"] in OV_MAC_TYPES), named[0] if named else None)
            out[layer] = self._entry(mac)
        return out

    @staticmethod
    def _entry(mac: Mapping[str, Any] | None) -> dict[str, Any]:
        if mac is None:
            return {"kernel": "?", "int8": False, "weights": "?", "precision": "?"}
        primitive = mac["primitive"]
        tail = primitive.rsplit("_", 1)[-1].lower() if "_" in primitive else ""
        if primitive.startswith(("undef", "unknown")) or tail not in ("i8", "u8", "bf16", "f16", "f32", "fp32"):
            precision = mac["precision"]  # no primitive chosen yet: the node's own precision
        else:
            precision = {"u8": "i8", "fp32": "f32"}.get(tail, tail)
        types = mac["types"]
        act = types[0] if types else "?"
        weight = types[1] if len(types) > 1 else "?"
        return {"kernel": f"{mac['kind']}:{primitive or mac['precision']}",
                "int8": precision in OV_INT8_PRECISIONS and act in ("u8", "i8") and weight in ("i8", "u8"),
                "precision": precision,
                "weights": {"i4": "int4", "u4": "uint4", "i8": "int8", "u8": "uint8"}.get(
                    weight, "float" if weight in ("f32", "bf16", "f16") else weight)}

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
