"""ONNX Runtime-only rewrite: a quantized linear becomes one ``com.microsoft.MatMulIntegerToFloat`` with its
bias inside.

    Q(x) -> DQ -> MatMul(., DQ(W int8 [K, N])) -> Add(., b [N])
      ==>  Q(x) -> MatMulIntegerToFloat(x_q, W, x_scale, w_scale, x_zero_point, -, b)

This is the kernel ORT's QDQ fusion picks for that pattern anyway, but the fusion leaves the bias as a
separate Add whenever no later fusion (BiasGelu, SkipLayerNormalization) swallows it: on MiniLM-L6 the
Q, K and V projections, 18 Adds, each one more pass over a [tokens, 384] float tensor. The int8
arithmetic is unchanged: ``out = (x_q - x_zp) * x_scale  @  W * w_scale + b`` in both forms; weights stay
symmetric (zero point 0, so it is left out) and may be per output column (``w_scale`` [N]).

Only ORT runs contrib ops, so this rule belongs to the onnxruntime-int8 target, never to the shared
export.

``reduce_mean_to_global_pool``: ``ReduceMean(x [N, C, H, W], axes=[2, 3], keepdims=1)`` (how the exporter
writes ``AdaptiveAvgPool2d(1)``) becomes ``GlobalAveragePool(x)``, the same mean. ORT's QDQ rules
(onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc,
``UnaryOpQDQRules``) turn DQ -> GlobalAveragePool -> Q into the int8 ``QLinearGlobalAveragePool``;
ReduceMean is in no QDQ rule and runs in float between a DQ and a Q.

``hardsigmoid_as_qlinear_add``: ORT has no integer hardswish or hardsigmoid (no QDQ rule names them).
insert_observers writes a hardswish between two uint8 quantizers as ``x * Q(hardsigmoid(x))``, the gate on the
fixed grid [0, 1] / 255 (``quantize_hardswish_gate``): the product is a QDQ ``Mul`` (rule ``2DQ``: QLinearMul),
but ``DQ -> HardSigmoid -> Q`` still runs as three float passes over the feature map. On that grid
``round(hardsigmoid(x) * 255) = round((x + 3) * 255 / 6)`` saturated to [0, 255]: an Add of 3 quantized at
scale 6/255, whose uint8 saturation is relu6's clip, gives the same codes (rule ``2DQ`` again: QLinearAdd):

    DQ(x) -> HardSigmoid(1/6, 1/2) -> Q(g; 1/255, 0)
      ==>  DQ(x), DQ(3) -> Add -> Q(g; 6/255, 0)

The codes ``g`` are read on by the same ``DQ(g; 1/255, 0)`` as before. Exact up to float rounding at a
half-code tie.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.onnx.qdq_rules import Graph, node_attr, remove_dead_nodes, toposort
from lowbit.runtime.observers import HARDSIGMOID_QPARAMS

MS_DOMAIN = "com.microsoft"


def _match(g: Graph, mm: onnx.NodeProto, prod: dict[str, onnx.NodeProto],
           cons: dict[str, list[onnx.NodeProto]]) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto | None] | str:
    """(activation DQ, weight DQ, bias Add or None) for a fusable MatMul, else the reason it is not."""
    dx, dw = prod.get(mm.input[0]), prod.get(mm.input[1])
    if dx is None or dx.op_type != "DequantizeLinear" or prod.get(dx.input[0]) is None:
        return "the activation is not dequantized from a QuantizeLinear"
    if prod[dx.input[0]].op_type != "QuantizeLinear":
        return "the activation DQ does not read a QuantizeLinear"
    if dw is None or dw.op_type != "DequantizeLinear" or dw.input[0] not in g.init:
        return "the weight is not a constant DequantizeLinear"
    w, w_scale = g.array(dw.input[0]), g.array(dw.input[1])
    if w is None or w.ndim != 2 or w_scale is None or w_scale.ndim > 1:
        return "the weight is not a 2-D tensor with a per-tensor or per-column scale"
    if w_scale.ndim == 1 and w_scale.size > 1 and int(node_attr(dw, "axis", 1)) % 2 != 1:
        return "the weight scale is not per output column (axis 1)"
    if len(dw.input) > 2 and dw.input[2]:
        zp = g.array(dw.input[2])
        if zp is None or zp.any():
            return "the weight zero point is not 0"
    x_scale = g.array(dx.input[1])
    if x_scale is None or x_scale.size != 1:
        return "the activation scale is not one constant"
    users = [u for u in cons.get(mm.output[0], []) if u is not None]
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" and len(cons[mm.output[0]]) == 1 else None
    if add is not None:
        other = [i for i in add.input if i != mm.output[0]]
        b = g.array(other[0]) if len(other) == 1 else None
        if b is None or b.ndim != 1 or b.shape[0] != w.shape[1]:
            add = None
    return dx, dw, add


def _matches(g: Graph, op_type: str, match: Any) -> Iterator[tuple[onnx.NodeProto, Any]]:
    """(node, match) for every ``op_type`` node that ``match(g, node, producers, consumers)`` accepts (a string
    is its reason not to); producers and consumers as the graph was before the first rewrite."""
    prod, cons = g.producers(), g.consumers()
    for node in list(g.g.node):
        if node.op_type == op_type:
            m = match(g, node, prod, cons)
            if not isinstance(m, str):
                yield node, m


def fuse_matmul_integer_to_float(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every matching quantized MatMul (+ bias Add) in place; returns what fired."""
    g = Graph(model)
    fused = with_bias = 0
    for mm, (dx, dw, add) in _matches(g, "MatMul", _match):
        bias = next(i for i in add.input if i != mm.output[0]) if add is not None else ""
        out = add.output[0] if add is not None else mm.output[0]
        layer = mm.name.rpartition("/")[0]
        name = f"{layer}/MatMulIntegerToFloat" if layer else g.unique(mm.name + "_int")
        zp = dx.input[2] if len(dx.input) > 2 else ""
        node = helper.make_node("MatMulIntegerToFloat", [dx.input[0], dw.input[0], dx.input[1], dw.input[1], zp, "", bias],
                                [out], name=name, domain=MS_DOMAIN)
        idx = list(g.g.node).index(mm)
        g.g.node.insert(idx, node)
        g.g.node.remove(mm)
        if add is not None:
            g.g.node.remove(add)
            with_bias += 1
        fused += 1
    if fused:
        remove_dead_nodes(g)
        g.remove_unused_initializers()
        toposort(g)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return {"matmul_integer_to_float": fused, "bias_fused": with_bias}


def _rank(g: Graph, name: str, prod: dict[str, onnx.NodeProto]) -> int | None:
    """The rank of tensor ``name`` from the exporter's value_info (through Q/DQ, which keep the shape)."""
    known = {v.name: v for v in [*g.g.value_info, *g.g.input, *g.g.output]}
    for _ in range(4):
        if name in known and known[name].type.tensor_type.HasField("shape"):
            return len(known[name].type.tensor_type.shape.dim)
        p = prod.get(name)
        if p is None or p.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            return None
        name = p.input[0]
    return None


def reduce_mean_to_global_pool(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every ReduceMean over the spatial dims of a 4-D tensor (keepdims) as GlobalAveragePool."""
    g = Graph(model)
    prod = g.producers()
    fired = 0
    for rm in list(g.g.node):
        if rm.op_type != "ReduceMean" or not int(node_attr(rm, "keepdims", 1)) or len(rm.input) < 2:
            continue
        axes = g.array(rm.input[1])
        if axes is None or _rank(g, rm.input[0], prod) != 4 or sorted(int(a) % 4 for a in axes.ravel()) != [2, 3]:
            continue
        pool = helper.make_node("GlobalAveragePool", [rm.input[0]], list(rm.output), name=rm.name)
        idx = list(g.g.node).index(rm)
        g.g.node.remove(rm)
        g.g.node.insert(idx, pool)
        fired += 1
    if fired:
        g.remove_unused_initializers()
    return {"reduce_mean_to_global_pool": fired} if fired else {}


GATE_SCALE = HARDSIGMOID_QPARAMS[0]  # the grid insert_observers quantizes hardswish's gate on


def _hardsigmoid_match(g: Graph, hs: onnx.NodeProto, prod: dict[str, onnx.NodeProto],
                       cons: dict[str, list[onnx.NodeProto]]) -> tuple[onnx.NodeProto, onnx.NodeProto] | str:
    """(input DQ, output Q) of a rewritable ``DQ -> HardSigmoid(1/6, 1/2) -> Q(1/255, 0)``, else why not."""
    alpha, beta = node_attr(hs, "alpha"), node_attr(hs, "beta")
    if alpha is None or beta is None or abs(alpha - 1.0 / 6.0) > 1e-6 or abs(beta - 0.5) > 1e-6:
        return "not hardsigmoid's (x + 3) / 6"
    dq = prod.get(hs.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in g.init:
        return "the input is not a dequantized activation"
    zp = g.array(dq.input[2] if len(dq.input) > 2 else "")
    if zp is None or zp.dtype != np.uint8 or zp.size != 1:
        return "the input is not uint8 per tensor (QLinearAdd wants the gate's type on both sides)"
    users = cons.get(hs.output[0], [])
    if len(users) != 1 or users[0] is None or users[0].op_type != "QuantizeLinear":
        return "the output is not read by exactly one QuantizeLinear"
    q = users[0]
    scale, qzp = g.array(q.input[1]), g.array(q.input[2] if len(q.input) > 2 else "")
    if scale is None or qzp is None or qzp.dtype != np.uint8 or scale.size != 1 or qzp.size != 1 \
            or int(qzp) != 0 or abs(float(scale) - GATE_SCALE) > 1e-9:
        return "the output is not quantized on the gate's grid [0, 1] / 255"
    return dq, q


def hardsigmoid_as_qlinear_add(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every matching ``DQ -> HardSigmoid -> Q(1/255, 0)`` as an integer add of 3 (see above)."""
    g = Graph(model)
    fired = 0
    consts: dict[str, str] = {}
    for hs, (_, q) in _matches(g, "HardSigmoid", _hardsigmoid_match):
        if not consts:
            consts = {
                "zero": g.add_initializer(np.array(0, dtype=np.uint8), "hardsigmoid_zero_point"),
                "three_q": g.add_initializer(np.array(1, dtype=np.uint8), "hardsigmoid_three_q"),
                "three_scale": g.add_initializer(np.array(3.0, dtype=np.float32), "hardsigmoid_three_scale"),
                "sum_scale": g.add_initializer(np.array(6.0 * GATE_SCALE, dtype=np.float32), "hardsigmoid_sum_scale"),
            }
        base = hs.name or g.unique("hardsigmoid")
        three = g.unique(f"{hs.output[0]}_three")
        idx = list(g.g.node).index(hs)
        g.g.node.remove(hs)
        g.g.node.insert(idx, helper.make_node("DequantizeLinear", [consts["three_q"], consts["three_scale"],
                                                                    consts["zero"]], [three], name=f"{base}/three_dq"))
        g.g.node.insert(idx + 1, helper.make_node("Add", [hs.input[0], three], list(hs.output), name=f"{base}/Add"))
        q.input[1] = consts["sum_scale"]
        q.input[2] = consts["zero"]
        fired += 1
    if fired:
        toposort(g)
    return {"hardsigmoid_as_qlinear_add": fired} if fired else {}
