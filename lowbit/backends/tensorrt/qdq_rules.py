"""TensorRT-specific rewrite rules on the exported QDQ graph (after the shared ones in onnx/qdq_rules.py).

Each rule is pattern -> check -> rewrite; a failed check gives a reason (what the report prints).

- ``quantize_residual_add``: TensorRT's Q/DQ placement advice for residual networks: quantize the
  *residual* input of an elementwise Add that follows a quantized convolution, so the Add fuses into the
  convolution (the conv then writes int8 when its consumer quantizes). The pattern

      Add(Conv(DQ(Q(x)), DQ(W)), r)      where r already feeds a QuantizeLinear Q_r

  becomes ``Add(Conv(...), DQ_r(Q_r(r)))``: a new DQ reads the existing quantizer of ``r`` (its scale was
  calibrated for the layer that reads ``r``), so no new range is invented. Where ``r`` has no quantizer
  (e.g. it is another conv's float output: a ResNet downsample branch) the check fails with that reason
  and TensorRT runs the Add unfused after the conv. NVIDIA's ModelOpt ONNX quantizer places residual
  Q/DQ the same way (``build_non_residual_input_map``).
"""

from __future__ import annotations

import onnx
from onnx import helper

from lowbit.backends.onnx.qdq_rules import Graph, toposort

FUSABLE_PRODUCERS = {"Conv"}


def _quantized_conv(g: Graph, node: onnx.NodeProto | None, prod: dict[str, onnx.NodeProto]) -> bool:
    """A Conv whose input and weight are both read through DequantizeLinear (an int8 conv in TensorRT)."""
    if node is None or node.op_type not in FUSABLE_PRODUCERS or len(node.input) < 2:
        return False
    x, w = prod.get(node.input[0]), prod.get(node.input[1])
    return (x is not None and x.op_type == "DequantizeLinear" and w is not None
            and w.op_type == "DequantizeLinear" and w.input[0] in g.init)


def _residual_quantizer(g: Graph, add: onnx.NodeProto, conv_side: int,
                        cons: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | str:
    """The QuantizeLinear already reading the Add's other (residual) input, or why there is none."""
    r = add.input[1 - conv_side]
    if r in g.init:
        return f"Add {add.name}: the other input {r!r} is a constant (a bias, not a residual)"
    q = next((u for u in cons.get(r, []) if u is not None and u.op_type == "QuantizeLinear"), None)
    if q is None:
        return (f"Add {add.name}: residual input {r!r} has no calibrated quantizer (it is only read in "
                "float); TensorRT runs this Add after the conv")
    return q


def quantize_residual_add(g: Graph) -> tuple[int, list[str]]:
    """Give the residual input of a conv -> Add a DQ of its existing quantizer. Returns (fired, skips)."""
    prod, cons = g.producers(), g.consumers()
    fired, skips = 0, []
    for add in list(g.g.node):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        sides = [i for i in (0, 1) if _quantized_conv(g, prod.get(add.input[i]), prod)]
        if not sides:
            continue  # not an Add after a quantized conv
        src = {i: prod.get(add.input[1 - i]) for i in sides}
        if any(s is not None and s.op_type == "DequantizeLinear" for s in src.values()):
            continue  # the residual is quantized already
        found: onnx.NodeProto | str = ""
        for conv_side in sides:
            found = _residual_quantizer(g, add, conv_side, cons)
            if not isinstance(found, str):
                break
        if isinstance(found, str):
            skips.append(found)
            continue
        residual = add.input[1 - conv_side]
        if len([u for u in cons[add.input[conv_side]] if u is not None]) != 1:
            skips.append(f"Add {add.name}: the conv output feeds other nodes too, so the Add cannot fuse into it")
            continue
        q = found
        dq = helper.make_node("DequantizeLinear", [q.output[0], *q.input[1:]], [g.unique(f"{residual}_residual_dq")],
                              name=g.unique(f"{add.name}/residual_dq"))
        dq.attribute.extend(a for a in q.attribute if a.name == "axis")
        add.input[1 - conv_side] = dq.output[0]
        g.g.node.insert(list(g.g.node).index(add), dq)
        fired += 1
    toposort(g)
    return fired, skips


def apply_trt_rules(model: onnx.ModelProto, *, residual_qdq: bool = True) -> tuple[dict[str, int], list[str]]:
    """Run the TensorRT rules in place on an exported QDQ model: (stats, reasons for matches left alone)."""
    g = Graph(model)
    stats: dict[str, int] = {}
    notes: list[str] = []
    if residual_qdq:
        stats["quantize_residual_add"], skips = quantize_residual_add(g)
        notes += skips
    return stats, notes
