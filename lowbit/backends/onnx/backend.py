"""The ONNX QDQ targets: ``onnxruntime-int8`` and ``openvino-int8`` share the exported graph and differ in
the engine that runs it (and the graph shaping each engine's fusions want)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx

from lowbit.backends.onnx.export import OPSET, export_onnx
from lowbit.compiler import meta
from lowbit.compiler.capture import Captured
from lowbit.compiler.graph import annotated_nodes, layer_macs
from lowbit.compiler.pass_manager import Pass, PassContext
from lowbit.errors import BackendNotAvailable
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.onnx_artifact import load_onnx_artifact, make_compiled, write_model

ATTENTION_OPSET = 23  # the standard Attention op


def float_layer_weights(gm: fx.GraphModule, model: onnx.ModelProto) -> dict[str, str]:
    """layer -> weight initializer of each layer the plan keeps in float: the engine report names the kernel
    those run too (the ONNX exporter keeps a float weight's attribute name as the initializer's)."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, str] = {}
    for node in annotated_nodes(gm):
        w = node.args[1] if len(node.args) > 1 else None
        if node.meta[meta.SPEC].scheme == "float" and isinstance(w, fx.Node) and w.op == "get_attr":
            name = str(w.target)
            for candidate in (name, name.replace(".", "_")):
                if candidate in inits:
                    out[node.meta[meta.LAYER]] = candidate
                    break
    return out


class OnnxBackend:
    name = "onnx"
    engine = "onnxruntime"
    module = "onnxruntime"
    extra: str | None = None
    #: static W8A8 runs as integer kernels; weight-only W8A16 as DQ-only weights; float carries no Q/DQ
    schemes = frozenset({"w8a8", "w8a16", "w4a16", "float"})
    #: relative cost per MAC (planner). Estimates for x86 VNNI CPUs, to be replaced by measured ones: int8
    #: MatMul ~2x fp32; W8A16 is DQ(weight) -> fp32 MatMul, a little slower than float
    scheme_costs = {"w8a8": 1.0, "float": 2.0, "w8a16": 2.2}
    #: also compile the engine for the example's exact input shapes (used for calls of those shapes)
    specialize_example_shape = False
    #: export fused attention as plain MatMul/Softmax (the engine's own MHA pattern), not the Attention op
    attention_as_matmuls = False
    #: quantize the query/key projections' outputs so the engine runs Q K^T in int8
    quantize_attention_scores = False

    def check_available(self) -> None:
        if importlib.util.find_spec(self.module) is None:
            hint = f'pip install "lowbit[{self.extra}]"' if self.extra else f"pip install {self.module}"
            raise BackendNotAvailable(f"target {self.name!r} needs the {self.module} package: {hint}")

    def lowering_passes(self, options: dict[str, Any]) -> list[Pass]:
        from lowbit.backends.onnx.attention import FuseAttention

        # exported as is, SDPA becomes MatMul/Softmax plus NaN guards that neither engine fuses: emit the
        # standard Attention op (ORT runs one fused kernel) or OpenVINO's MHA pattern (attention_as_matmuls)
        return [FuseAttention()] if options.get("fuse_attention", True) else []

    def build(self, gm: fx.GraphModule, ctx: PassContext, captured: Captured, options: dict[str, Any]) -> CompiledModel:
        signature = ctx.notes["signature"]
        layers = ctx.notes.get("layers", {})
        weight_layers = {v["weight_attr"]: k for k, v in layers.items() if "weight_attr" in v}
        from lowbit.backends.onnx.attention import CUSTOM_TRANSLATIONS, MATMUL_TRANSLATIONS

        uses_attention = any(n.target is torch.ops.lowbit.attention.default for n in gm.graph.nodes)
        translations = MATMUL_TRANSLATIONS if self.attention_as_matmuls else CUSTOM_TRANSLATIONS
        opset = ATTENTION_OPSET if uses_attention and not self.attention_as_matmuls else OPSET
        model, info = export_onnx(gm, signature, weight_layers, translations, opset,
                                  engine_rules=(lambda m: self.engine_rules(m, options))
                                  if options.get("engine_rules", True) else None)
        flat = [t for t in torch.utils._pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(t, torch.Tensor)]
        macs = {k: v for k, v in layer_macs(gm, flat).items() if k in info["weights"]}
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-onnx-")
        model_dir = Path(tmp.name)
        write_model(model, model_dir / "model.onnx")
        report = ctx.notes["report"]
        report.sections["onnx_export"] = {"opset": opset, **info["rules"], "problems": info["problems"]}
        state = {"engine": self.engine, "opset": opset, "weights": info["weights"], "macs": macs,
                 "float_weights": float_layer_weights(gm, model),
                 "qparams": {k: v for k, v in ctx.notes.get("qparams", {}).items()}, "tmp": tmp}
        if self.specialize_example_shape and options.get("specialize_example_shape", True):
            state["static_shapes"] = [list(t.shape) for t in flat]
        compiled = make_compiled(self.name, self.engine, model_dir, signature, ctx.plan, report, state,
                                 int(options.get("threads", 2)))
        compiled.graph_module = gm
        return compiled

    def engine_rules(self, model: onnx.ModelProto, options: dict[str, Any] | None = None) -> dict[str, int]:
        """Rewrites for this engine only, after the shared QDQ export (none for the standard-op engines)."""
        return {}

    def save(self, compiled: CompiledModel, directory: Path) -> None:
        compiled.save(directory)

    def load(self, directory: Path, manifest: dict[str, Any], **kwargs: Any) -> CompiledModel:
        kwargs.pop("model", None)
        return load_onnx_artifact(directory, manifest, **kwargs)


class OnnxRuntimeBackend(OnnxBackend):
    name = "onnxruntime-int8"
    engine = "onnxruntime"
    module = "onnxruntime"
    #: ORT fuses DQ -> Conv (-> Relu) -> Q into QLinearConv only with the output quantized
    quantize_conv_outputs = True
    #: squeeze-excite products x * gate with int8 operands and output (QLinearMul), pools reading int8
    #: (QLinearGlobalAveragePool, after ort_rules.reduce_mean_to_global_pool)
    quantize_gating = True
    #: residual adds of int8 feature maps, in and out: ORT's QDQ rule "2DQ" runs them as QLinearAdd
    quantize_residual_adds = True
    #: hardswish as x * Q(hardsigmoid(x)) on a fixed [0, 1] grid (ORT has no integer hardswish; the product runs
    #: as QLinearMul, the gate as QLinearAdd after ort_rules.hardsigmoid_as_qlinear_add)
    quantize_hardswish_gate = True

    def engine_rules(self, model: onnx.ModelProto, options: dict[str, Any] | None = None) -> dict[str, int]:
        """Integer MatMuls with the bias inside; weight-only linears as MatMulNBits. A causal LM's step graph
        (``decode_graph``) runs its 8-bit weight-only linears as MatMulNBits with int8 activations too: at
        M = 1 a linear reads its weights once, and the float path re-reads them dequantized (3.5x slower
        on SmolLM2's decode step); elsewhere an 8-bit weight-only layer keeps float activations (often a
        layer the planner promoted because its activations do not survive int8). Spatial means as
        GlobalAveragePool and hardswish's quantized gate as an integer add (ort_rules), so both run int8."""
        from lowbit.backends.onnx.ort_rules import (
            fuse_matmul_integer_to_float,
            hardsigmoid_as_qlinear_add,
            reduce_mean_to_global_pool,
        )
        from lowbit.backends.onnx.weight_only import to_matmul_nbits

        eight_bit = bool((options or {}).get("decode_graph", False))
        return {**to_matmul_nbits(model, eight_bit=eight_bit), **fuse_matmul_integer_to_float(model),
                **reduce_mean_to_global_pool(model), **hardsigmoid_as_qlinear_add(model)}


class OpenVinoBackend(OnnxBackend):
    name = "openvino-int8"
    engine = "openvino"
    module = "openvino"
    extra = "openvino"
    specialize_example_shape = True
    # OpenVINO fuses MatMul/Softmax/MatMul into one MHA kernel, int8 when Q and K arrive quantized (as
    # NNCF quantizes them): about 3% faster on MiniLM-L6 than the Attention op in bf16, at the same cosine
    attention_as_matmuls = True
    quantize_attention_scores = True
    # int8 in and out of every conv and residual add (as NNCF quantizes a CNN): OpenVINO then runs a
    # residual block as convs alone, the add and ReLU fused into the conv as a sum post-op writing int8
    quantize_conv_outputs = True
    quantize_residual_adds = True
    # activations the CPU plugin fuses into a conv as a post-op (NNCF's LINEAR_ACTIVATIONS pattern): the conv's
    # output quantizer goes after them, and conv + hardswish + FakeQuantize run as one int8 conv
    post_op_activations = ("hardswish", "hardsigmoid", "sigmoid", "silu")
    # squeeze-excite x * gate between quantizers (an int8 eltwise subgraph) and ReduceMean on int8 input
    quantize_gating = True

    def engine_rules(self, model: onnx.ModelProto, options: dict[str, Any] | None = None) -> dict[str, int]:
        """Around two OpenVINO 2026.4 defects (ov_rules): a strided 1x1 conv's padding as a Pad of its quantized
        input (the conv's output shape is wrong with the padding inside); a ReduceMean without keepdims as one
        with them and a Squeeze (its mean into a quantized MatMul runs at ~15 dB)."""
        from lowbit.backends.onnx.ov_rules import keep_reduced_dims, pad_strided_pointwise_convs

        return {**pad_strided_pointwise_convs(model), **keep_reduced_dims(model)}
