"""Mark conv/linear + activation groups, so a layer's output is quantized after its activation.

Quantizing between the layer and its ReLU wastes half the integer range on values the ReLU zeroes and
breaks the integer kernels' fused epilogue. The pass rewrites nothing; it records on the layer
``meta[FUSED_ACT] = activation_node_name`` and on the activation ``meta[FUSED_INTO] = layer_node_name``.
insert_observers then places any output observer after the activation.

Every target fuses relu, relu6 and clamp(0, x). A backend whose engine also fuses other activations into
the conv as a post-op lists them in ``post_op_activations`` (``ctx.notes``, from the backend) (OpenVINO: hardswish, hardsigmoid, sigmoid,
silu, as NNCF's OpenVINO pattern ``LINEAR_ACTIVATIONS`` = a linear op followed by one of
``ATOMIC_ACTIVATIONS_OPERATIONS``, nncf/openvino/hardware/fused_patterns.py): conv + hardswish + Q then
runs as one int8 conv. ONNX Runtime's QLinearConv takes no activation but Relu/Clip (its QDQ selectors
accept a redundant Clip before the Q), so there a hardswish stays between two Q/DQ pairs.
"""

from __future__ import annotations

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import FUSABLE_ACTIVATIONS, QUANTIZABLE
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten

#: activations an engine may fuse as a conv post-op, by the name a backend lists in ``post_op_activations``
POST_OP_ACTIVATIONS = {
    "hardswish": (aten.hardswish.default, aten.hardswish_.default),
    "hardsigmoid": (aten.hardsigmoid.default, aten.hardsigmoid_.default),
    "sigmoid": (aten.sigmoid.default, aten.sigmoid_.default),
    "silu": (aten.silu.default, aten.silu_.default),
}


def _is_relu_like(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in FUSABLE_ACTIVATIONS:
        return False
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        return lo == 0.0  # relu6 and clamp(0, x): still a ReLU at zero
    return True


class FuseActivation(Pass):
    name = "fuse_activation"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        post_ops = {t for name in ctx.notes.get("post_op_activations", ())
                    for t in POST_OP_ACTIVATIONS[name]}
        fused = 0
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in QUANTIZABLE or len(node.users) != 1:
                continue
            act = next(iter(node.users))
            post_op = act.op == "call_function" and act.target in post_ops and QUANTIZABLE[node.target].startswith("conv")
            if (_is_relu_like(act) or post_op) and act.args[0] is node:
                node.meta[meta.FUSED_ACT] = act.name
                act.meta[meta.FUSED_INTO] = node.name
                fused += 1
        return PassResult(gm, {"activations_fused": fused} if fused else {})


def output_node(layer: fx.Node) -> fx.Node:
    """Where a layer's output is observed: after its fused activation, if any."""
    name = layer.meta.get(meta.FUSED_ACT)
    if name:
        for user in layer.users:
            if user.name == name:
                return user
    return layer
