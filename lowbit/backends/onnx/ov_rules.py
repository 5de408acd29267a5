"""OpenVINO-only rewrites around two defects of its CPU plugin (2026.4), each the same numbers in another form.
``tests/test_backend_onnx.py`` holds both reproducers: when the engine gets one right without its rule, remove it.

``pad_strided_pointwise_convs``: a strided 1x1 conv's zero padding moves onto its quantized input. OpenVINO 2026.4's CPU plugin gets the output shape of a quantized ``Conv(kernel 1x1, stride > 1, pads > 0)``
wrong (``DQ -> Conv(1x1, strides 2, pads 1)`` on [3, 8, 12, 15] returns [3, 16, 10, 12], not [3, 16, 9, 11];
the float graph on the same engine and ONNX Runtime are right). The same conv without pads is right, so the
padding becomes an explicit ``Pad`` of the quantized tensor with its zero point, the value that dequantizes to
exactly 0.0:

    Q(x) -> DQ(s, zp) -> Conv(1x1, strides, pads p)
      ==>  Q(x) -> Pad(p, value zp) -> DQ(s, zp) -> Conv(1x1, strides, pads 0)

The same numbers (DQ(pad(q, zp)) = pad(DQ(q), 0)); OpenVINO runs the Pad on u8 and the conv as before.

``keep_reduced_dims``: ``ReduceMean(keepdims=0)`` whose output reaches a quantized MatMul (a transformer's mean
over tokens into its head: ``LN -> ReduceMean -> Q/DQ -> MatMul``) runs at ~15 dB against float on OpenVINO
(~40 dB on ONNX Runtime and the torch reference), in f32 as in bf16. With the reduced dims kept and squeezed
after, it runs right:

    ReduceMean(x, axes, keepdims=0)  ==>  Squeeze(ReduceMean(x, axes, keepdims=1), axes)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.onnx.qdq_rules import Graph, node_attr, set_node_attr, toposort


def _padded_pointwise_conv(g: Graph, conv: onnx.NodeProto,
                           prod: dict[str, onnx.NodeProto]) -> tuple[onnx.NodeProto, list[int]] | None:
    """(input DQ, pads) of a quantized strided 1x1 conv with zero padding, else None."""
    kernel = list(node_attr(conv, "kernel_shape") or [])
    strides = list(node_attr(conv, "strides") or [])
    pads = [int(p) for p in node_attr(conv, "pads") or []]
    auto_pad = node_attr(conv, "auto_pad", b"NOTSET")
    if not kernel or any(k != 1 for k in kernel) or not any(s > 1 for s in strides) or not any(pads) \
            or auto_pad not in (b"NOTSET", "NOTSET"):
        return None
    dq = prod.get(conv.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in g.init:
        return None
    zp = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
    scale = g.array(dq.input[1])
    if zp is None or zp.size != 1 or scale is None or scale.size != 1:
        return None  # the padding value must be one code: per-tensor activations
    return dq, pads


def pad_strided_pointwise_convs(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every quantized strided 1x1 conv with pads as an explicit Pad of its quantized input."""
    g = Graph(model)
    prod, cons = g.producers(), g.consumers()
    fired = 0
    for conv in list(g.g.node):
        if conv.op_type != "Conv":
            continue
        found = _padded_pointwise_conv(g, conv, prod)
        if found is None:
            continue
        dq, pads = found
        half = len(pads) // 2
        rank_pads = [0, 0, *pads[:half], 0, 0, *pads[half:]]  # [N, C, spatial...] begins, then ends
        pads_name = g.add_initializer(np.array(rank_pads, dtype=np.int64), f"{conv.name or 'conv'}_input_pads")
        padded = g.unique(f"{dq.input[0]}_padded")
        zp = dq.input[2] if len(dq.input) > 2 else ""
        idx = list(g.g.node).index(dq)
        g.g.node.insert(idx, helper.make_node("Pad", [dq.input[0], pads_name, zp], [padded], mode="constant",
                                              name=f"{conv.name or padded}/Pad"))
        if len(cons.get(dq.output[0], [])) > 1:  # another reader keeps the unpadded DQ
            own = helper.make_node("DequantizeLinear", [padded, *dq.input[1:]], [g.unique(f"{padded}_dq")],
                                   name=f"{conv.name or padded}/input_dq")
            for a in dq.attribute:
                own.attribute.append(a)
            g.g.node.insert(idx + 1, own)
            conv.input[0] = own.output[0]
        else:
            dq.input[0] = padded
            stale = [v for v in g.g.value_info if v.name == dq.output[0]]  # its shape grew by the padding
            for v in stale:
                g.g.value_info.remove(v)
        set_node_attr(conv, "pads", [0] * len(pads))
        fired += 1
    if fired:
        toposort(g)
    return {"pad_strided_pointwise_convs": fired} if fired else {}


def keep_reduced_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every ``ReduceMean(keepdims=0)`` with constant axes as ``keepdims=1`` and a Squeeze of those axes."""
    g = Graph(model)
    fired = 0
    for rm in list(g.g.node):
        if rm.op_type != "ReduceMean" or int(node_attr(rm, "keepdims", 1)) or len(rm.input) < 2 or not rm.input[1]:
            continue
        axes = g.array(rm.input[1])
        if axes is None or axes.size == 0:
            continue
        set_node_attr(rm, "keepdims", 1)
        out = rm.output[0]
        rm.output[0] = g.unique(f"{out}_kept")
        idx = list(g.g.node).index(rm)
        g.g.node.insert(idx + 1, helper.make_node("Squeeze", [rm.output[0], rm.input[1]], [out],
                                                  name=f"{rm.name or out}/Squeeze"))
        fired += 1
    return {"keep_reduced_dims": fired} if fired else {}
