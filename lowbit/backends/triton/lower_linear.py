"""Rewrite each quantized ``aten.linear`` (fake-quant after lower_qdq) into a call of a Triton kernel op.

Patterns (after lower_qdq), and what each becomes:

* w8a8 (static): ``linear(dequantize_per_tensor(quantize_per_tensor(x)), dequantize_per_channel(Wq))``
  -> ``a, s = lowbit.quantize_per_tensor_int8(x); lowbit.w8a8_linear(a, s, Wq, w_scale, bias')``.
  The static scale is broadcast to one scale per row and the per-token GEMM runs unchanged; uint8 codes
  are shifted by 128 into int8 and the shift is folded into the bias:
  ``bias' = bias + s_x * w_scale[n] * (128 - zero_point) * sum_k Wq[n, k]``.
* w8a8_dynamic: ``linear(dequantize_per_token(quantize_per_token(x, choose_qparams_per_token(x))), ...)``
* w8a8_llm_int8: ``linear(add(dequantize_per_token(...(x - x_o)), x_o), ...)`` -> ``lowbit::llm_int8_linear``
  -> ``a, s = lowbit.quantize_per_token(x); lowbit.w8a8_linear(a, s, Wq, w_scale, bias)``.
* w8a16 / w4a16: ``linear(x, dequantize_per_channel[_group](Wq))`` ->
  ``lowbit.weight_only_linear(x, Wq (int4: packed two per byte), scales, zeros, bias, bits, group_size)``.

One quantizer node is made per distinct input and shared by its consumers (Q, K and V quantize their
common input once). What the kernels cannot run keeps its fake-quant torch ops, with the reason in
``ctx.notes["triton"]["fallbacks"]``: convolutions, per-group W8A8 weights, weight zero points on signed
codes, group sizes other than 32/64/128/K, odd K for int4. Which kernel runs each layer goes to
``ctx.notes["triton"]["kernels"]`` (the report's "triton" section).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lowbit.backends.triton.ops import OPS, int8_offset
from lowbit.compiler import meta
from lowbit.compiler.graph import (
    QUANTIZABLE,
    annotated_nodes,
    attr_tensor,
    constant_node,
    delete_unused_attrs,
)
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.runtime.reference import SUPPORTED_GROUP_SIZES, pack_int4

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


@dataclass(frozen=True)
class Fallback:
    """Why a layer keeps its fake-quant torch ops: the failed check, in words."""

    reason: str


@dataclass(frozen=True)
class QuantWeight:
    """A linear weight as stored after lower_qdq, in the kernels' terms."""

    q_node: fx.Node  # the get_attr of the codes
    q: torch.Tensor  # int8 / uint8 codes [N, K] (int4 unpacked)
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor | None  # int32 [N, K // group_size], None when all zero
    group_size: int  # K when there is one scale per output channel
    bits: int


def match_weight(gm: fx.GraphModule, dq: Any, bits: int) -> QuantWeight | Fallback:
    """The weight codes and scales behind a ``weight_dq`` node, or why they are not usable."""
    if not (isinstance(dq, fx.Node) and dq.meta.get(meta.QROLE) == "weight_dq"):
        return Fallback("the weight is not read through a weight dequantize node")
    q = attr_tensor(gm, dq.args[0])
    if q is None or q.ndim != 2:
        return Fallback("the weight codes are not a 2-D graph constant")
    n, k = q.shape
    if dq.target == qd.dequantize_per_tensor.default:
        scales = torch.full((n, 1), float(dq.args[1]), dtype=torch.float32)
        zeros = torch.full((n, 1), int(dq.args[2]), dtype=torch.int32)
        group = k
    elif dq.target == qd.dequantize_per_channel.default:
        s, z = attr_tensor(gm, dq.args[1]), attr_tensor(gm, dq.args[2])
        if s is None or int(dq.args[3]) != 0:
            return Fallback("per-channel weight scales are not along the output axis")
        scales = s.float().reshape(n, 1)
        zeros = (z if z is not None else torch.zeros(n)).to(torch.int32).reshape(n, 1)
        group = k
    elif dq.target == qd.dequantize_per_channel_group.default:
        s, z = attr_tensor(gm, dq.args[1]), attr_tensor(gm, dq.args[2])
        group = int(dq.args[6])
        if s is None or k % group:
            return Fallback(f"group size {group} does not divide K={k}")
        scales = s.float().reshape(n, k // group)
        zeros = (z if z is not None else torch.zeros(n, k // group)).to(torch.int32).reshape(n, k // group)
    else:
        return Fallback(f"weight dequantize {dq.target} has no kernel")
    if not bool(zeros.any()):
        if q.dtype != torch.int8:
            return Fallback("unsigned weight codes with zero points all 0")
        return QuantWeight(dq.args[0], q, scales.contiguous(), None, group, bits)
    if q.dtype != torch.uint8:
        return Fallback("signed weight codes with non-zero zero points (the kernels take zero points only "
                     "with unsigned codes)")
    return QuantWeight(dq.args[0], q, scales.contiguous(), zeros.contiguous(), group, bits)


def _linear_bias(layer: fx.Node) -> Any:
    if len(layer.args) > 2:
        return layer.args[2]
    return layer.kwargs.get("bias")


def _call(graph: fx.Graph, target: Any, args: tuple[Any, ...], role: str) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta[meta.QROLE] = role
    return node


def _erase_dead_chain(graph: fx.Graph, node: Any) -> None:
    """Erase ``node`` if nothing uses it, then its inputs that became dead (q/dq chains, constants)."""
    stack = [node]
    erased: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in erased or n.users or n.op in ("placeholder", "output"):
            continue
        if n.op == "call_function" and n.meta.get(meta.QROLE) is None:
            continue  # only lowering's own nodes are collected here
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


class LowerQuantizedLinear(Pass):
    """Quantized linear layers -> ``lowbit::`` kernel ops; see the module docstring for the patterns."""

    name = "lower_quantized_linear"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        notes = ctx.notes.setdefault("triton", {"kernels": {}, "fallbacks": {}})
        kernels: dict[str, str] = notes["kernels"]
        fallbacks: dict[str, str] = notes["fallbacks"]
        stats = {"w8a8_linear": 0, "weight_only_linear": 0, "quantizers": 0, "fallbacks": 0}
        quantizers: dict[Any, tuple[fx.Node, fx.Node]] = {}  # (kind, input, qparams) -> (codes, scales)
        for layer in list(annotated_nodes(gm)):
            spec = layer.meta[meta.SPEC]
            name = layer.meta[meta.LAYER]
            if not spec.quantized:
                kernels[name] = "aten.linear (float)" if layer.target == aten.linear.default else "float"
                continue
            if layer.target != aten.linear.default:
                fallbacks[name] = f"{QUANTIZABLE.get(layer.target, layer.target)}: no Triton kernel; runs as " \
                                  "fake-quant torch ops"
                stats["fallbacks"] += 1
                continue
            if spec.activation is None:
                outcome = self._weight_only(gm, layer, spec)
            else:
                outcome = self._w8a8(gm, layer, spec, quantizers, stats)
            if isinstance(outcome, Fallback):
                fallbacks[name] = f"{outcome.reason}; runs as fake-quant torch ops"
                stats["fallbacks"] += 1
                continue
            kernels[name] = outcome
            stats["w8a8_linear" if spec.activation is not None else "weight_only_linear"] += 1
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})

    # -- weight-only: W8A16 / W4A16 -------------------------------------------------------------------
    def _weight_only(self, gm: fx.GraphModule, layer: fx.Node, spec: Any) -> str | Fallback:
        bits = spec.weight.bits
        w = match_weight(gm, layer.args[1], bits)
        if isinstance(w, Fallback):
            return w
        k = w.q.shape[1]
        if not (w.group_size in SUPPORTED_GROUP_SIZES or w.group_size == k):
            return Fallback(f"group size {w.group_size}: the weight-only kernel takes {SUPPORTED_GROUP_SIZES} or K={k}")
        if bits == 4 and k % 2:
            return Fallback(f"K={k} is odd: int4 codes are packed two per byte along K")
        qweight = pack_int4(w.q) if bits == 4 else w.q
        name = layer.meta[meta.LAYER]
        q_node = constant_node(gm, f"{name}_qweight", qweight, layer) if bits == 4 else w.q_node
        s_node = constant_node(gm, f"{name}_scales", w.scales, layer)
        z_node = constant_node(gm, f"{name}_zeros", w.zeros, layer) if w.zeros is not None else None
        args = (layer.args[0], q_node, s_node, z_node, _linear_bias(layer), bits, w.group_size)
        self._replace(gm, layer, OPS["weight_only_linear"], args)
        group = f"group {w.group_size}" + (" = K, one scale per channel" if w.group_size == k else "")
        packed = "int4 packed 2/byte" if bits == 4 else "int8"
        return f"weight_only_gemm ({packed}, {group}{', zero points' if w.zeros is not None else ''})"

    # -- W8A8: static per-tensor or dynamic per-token activations -------------------------------------
    def _w8a8(self, gm: fx.GraphModule, layer: fx.Node, spec: Any, quantizers: dict[Any, tuple[fx.Node, fx.Node]],
              stats: dict[str, int]) -> str | Fallback:
        w = match_weight(gm, layer.args[1], spec.weight.bits)
        if isinstance(w, Fallback):
            return w
        if w.bits != 8 or w.zeros is not None or w.group_size != w.q.shape[1]:
            return Fallback("the W8A8 GEMM takes symmetric int8 weights with one scale per output channel")
        w_scale = w.scales.reshape(-1)
        bias = _linear_bias(layer)
        x_dq = layer.args[0]
        graph = gm.graph
        if not isinstance(x_dq, fx.Node):
            return Fallback("the input is not a graph node")
        role = x_dq.meta.get(meta.QROLE)
        if spec.activation.outlier_threshold is not None:  # LLM.int8(): x' = DQ(Q(x - x_o)) + x_o
            outliers = x_dq.args[1] if role == "llm_int8_join" else None
            if not (isinstance(outliers, fx.Node) and outliers.meta.get(meta.QROLE) == "llm_int8_outliers"):
                return Fallback("the input is not LLM.int8()'s outlier decomposition")
            name = layer.meta[meta.LAYER]
            ws_node = constant_node(gm, f"{name}_w_scale", w_scale.contiguous(), layer)
            self._replace(gm, layer, OPS["llm_int8_linear"],
                          (outliers.args[0], w.q_node, ws_node, bias, float(spec.activation.outlier_threshold)))
            return "llm_int8 (quantize_per_token kernel + w8a8_gemm on inliers, float outlier columns)"
        if spec.activation.dynamic:
            if role != "token_dq" or x_dq.target != qd.dequantize_per_token.default:
                return Fallback("the input is not read through a per-token dequantize")
            q_node = x_dq.args[0]
            if not (isinstance(q_node, fx.Node) and q_node.target == qd.quantize_per_token.default):
                return Fallback("the per-token dequantize does not read a quantize_per_token")
            x = q_node.args[0]
            key: tuple[Any, ...] = ("token", x)
            what = "quantize_per_token kernel + w8a8_gemm"
            quantize: tuple[Any, tuple[Any, ...]] = (OPS["quantize_per_token"], (x,))
        else:
            if role != "act_dq" or x_dq.target != qd.dequantize_per_tensor.default:
                return Fallback("the input is not read through a per-tensor dequantize")
            q_node, scale, zp, qmin, qmax, _ = x_dq.args
            if not (isinstance(q_node, fx.Node) and q_node.target == qd.quantize_per_tensor.default):
                return Fallback("the per-tensor dequantize does not read a quantize_per_tensor")
            x = q_node.args[0]
            offset = int8_offset(int(qmin))
            if offset != int(zp):
                b = attr_tensor(gm, bias) if bias is not None else torch.zeros(w.q.shape[0])
                if b is None:
                    return Fallback("the bias is computed at run time, so the zero-point correction cannot be folded in")
                wsum = w.q.to(torch.float64).sum(dim=1)
                folded = b.double() + float(scale) * w_scale.double() * (offset - int(zp)) * wsum
                bias = constant_node(gm, f"{layer.meta[meta.LAYER]}_bias_zp", folded.float(), layer)
            key = ("tensor", x, float(scale), int(zp), int(qmin), int(qmax))
            what = "w8a8_gemm (static per-tensor activation, scale broadcast per row)"
            quantize = (OPS["quantize_per_tensor_int8"], (x, float(scale), int(zp), int(qmin), int(qmax)))
        if key not in quantizers:
            with graph.inserting_before(layer):  # layers are visited in order: this is the first consumer
                qnode = _call(graph, *quantize, "triton_act_q")
                a = _call(graph, operator.getitem, (qnode, 0), "triton_act_codes")
                s = _call(graph, operator.getitem, (qnode, 1), "triton_act_scale")
            quantizers[key] = (a, s)
            stats["quantizers"] += 1
        a, s = quantizers[key]
        name = layer.meta[meta.LAYER]
        ws_node = constant_node(gm, f"{name}_w_scale", w_scale.contiguous(), layer)
        val = layer.meta.get("val")
        out_dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        self._replace(gm, layer, OPS["w8a8_linear"], (a, s, w.q_node, ws_node, bias, out_dtype))
        return what

    @staticmethod
    def _replace(gm: fx.GraphModule, layer: fx.Node, target: Any, args: tuple[Any, ...]) -> None:
        graph = gm.graph
        with graph.inserting_before(layer):
            new = graph.call_function(target, args)
        for k in (meta.LAYER, meta.SPEC, "nn_module_stack", "val"):
            if k in layer.meta:
                new.meta[k] = layer.meta[k]
        old_inputs = list(layer.all_input_nodes)
        layer.replace_all_uses_with(new)
        graph.erase_node(layer)
        for n in old_inputs:
            _erase_dead_chain(graph, n)

    def postconditions(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        problems = [f"call_module node {n.name} ({n.target}) is left in the graph"
                    for n in gm.graph.nodes if n.op == "call_module"]
        fallbacks = ctx.notes.get("triton", {}).get("fallbacks", {})
        for layer in annotated_nodes(gm):
            name = layer.meta[meta.LAYER]
            if layer.target == aten.linear.default and layer.meta[meta.SPEC].quantized and name not in fallbacks:
                problems.append(f"layer {name}: quantized linear was neither lowered nor given a fallback reason")
        return problems
