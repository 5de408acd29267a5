"""Fuse a matmul with a constant weight and a following constant bias add into one linear.

    matmul(x, W) + b   ->  linear(x, W^T, b)        W: [K, N] constant, b: [N] constant
    addmm(b, x, W)     ->  linear(x, W^T, b)
    linear(x, W) + b   ->  linear(x, W, b)          (a bias-less linear)
    matmul(x, W)       ->  linear(x, W^T)           (no bias)

The bias then rides in the int32 accumulator of an integer GEMM instead of being a separate float add.
"""

from __future__ import annotations

import torch
from torch import fx

from lowbit.compiler.graph import attr_tensor, constant_node, delete_unused_attrs
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.mm.default}
ADDS = {aten.add.Tensor}


def _const_bias(gm: fx.GraphModule, add: fx.Node, producer: fx.Node, n_out: int) -> torch.Tensor | None:
    """The constant [N] operand of ``add`` (with alpha 1), or None."""
    if add.op != "call_function" or add.target not in ADDS or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args[0], add.args[1]
    other = b if a is producer else a if b is producer else None
    t = attr_tensor(gm, other) if isinstance(other, fx.Node) else None
    if t is None:
        return None
    t = t.squeeze()
    return t if t.ndim == 1 and t.shape[0] == n_out else None


class FuseLinearBias(Pass):
    name = "fuse_linear_bias"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        stats = {"matmul_to_linear": 0, "bias_fused": 0}
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
                bias = attr_tensor(gm, node.args[0])
                w = attr_tensor(gm, node.args[2])
                if bias is None or w is None or w.ndim != 2 or bias.squeeze().ndim != 1:
                    continue
                self._make_linear(gm, node, node.args[1], w, bias.squeeze(), replaces=node)
                stats["matmul_to_linear"] += 1
                stats["bias_fused"] += 1
            elif node.target in MATMULS:
                w = attr_tensor(gm, node.args[1])
                if w is None or w.ndim != 2:
                    continue
                add = next(iter(node.users)) if len(node.users) == 1 else None
                bias = _const_bias(gm, add, node, w.shape[1]) if add is not None else None
                self._make_linear(gm, node, node.args[0], w, bias, replaces=add if bias is not None else node)
                stats["matmul_to_linear"] += 1
                stats["bias_fused"] += int(bias is not None)
            elif node.target is aten.linear.default and (len(node.args) < 3 or node.args[2] is None):
                w = attr_tensor(gm, node.args[1])
                add = next(iter(node.users)) if len(node.users) == 1 else None
                if w is None or add is None:
                    continue
                bias = _const_bias(gm, add, node, w.shape[0])
                if bias is None:
                    continue
                b_node = constant_node(gm, f"{node.args[1].target}_bias", bias, node)
                node.args = (node.args[0], node.args[1], b_node)
                add.replace_all_uses_with(node)
                graph.erase_node(add)
                stats["bias_fused"] += 1
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and not node.users and node.target in MATMULS | ADDS | {aten.addmm.default}:
                graph.erase_node(node)
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})

    @staticmethod
    def _make_linear(
        gm: fx.GraphModule, mm: fx.Node, x: fx.Node, w: torch.Tensor, bias: torch.Tensor | None, replaces: fx.Node
    ) -> fx.Node:
        src = mm.args[2] if mm.target is aten.addmm.default else mm.args[1]
        w_node = constant_node(gm, f"{src.target}_t", w.t().contiguous(), mm)
        b_node = constant_node(gm, f"{src.target}_bias", bias, mm) if bias is not None else None
        with gm.graph.inserting_after(replaces):
            lin = gm.graph.call_function(aten.linear.default, (x, w_node, b_node))
        lin.meta.update({k: v for k, v in mm.meta.items() if k in ("nn_module_stack", "stack_trace")})
        lin.meta["val"] = replaces.meta.get("val")
        replaces.replace_all_uses_with(lin)
        return lin
