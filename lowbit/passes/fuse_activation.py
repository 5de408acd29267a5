"""Mark conv/linear + relu/relu6/hardtanh groups, so a layer's output is quantized after its ReLU.

Quantizing between the layer and its ReLU wastes half the integer range on values the ReLU zeroes and
breaks the integer kernels' fused epilogue. The pass rewrites nothing; it records on the layer
``meta[FUSED_ACT] = relu_node_name`` and on the activation ``meta[FUSED_INTO] = layer_node_name``.
insert_observers then places any output observer after the activation.
"""

from __future__ import annotations

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import FUSABLE_ACTIVATIONS, QUANTIZABLE
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten


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
        fused = 0
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in QUANTIZABLE or len(node.users) != 1:
                continue
            act = next(iter(node.users))
            if _is_relu_like(act) and act.args[0] is node:
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
