"""Canonicalize: remove dropout, identity and no-op nodes and dead code; fold constant subgraphs.

Later passes match fewer shapes of the same computation: ``linear(dropout(x))`` is ``linear(x)`` in
eval mode, ``matmul(x, t(W))`` with a constant W becomes ``matmul(x, W_t)`` with W_t a constant.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lowbit.compiler.graph import add_constant, attr_tensor, delete_unused_attrs, tensor_meta
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten

#: ops that return their first input unchanged at inference
IDENTITY_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
}
#: side-effect-only checks torch.export leaves behind; meaningless for a compiled inference graph
ASSERT_OPS = {aten._assert_tensor_metadata.default}
#: ops that return their input when asked for the shape/dtype it already has
SAME_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default}
CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
#: ops never folded even with constant inputs (random or allocation-heavy)
NO_FOLD = {aten.dropout.default, aten.rand.default, aten.randn.default, aten.empty.memory_format}
FOLD_MAX_NUMEL = 1 << 24


def _is_pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.is_mutable


def _static_shape(v: torch.Tensor) -> tuple[int, ...] | None:
    # a SymInt dim is not static: int() on it would only read its example value
    dims = tuple(v.shape)
    return dims if all(type(d) is int for d in dims) else None


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    t = node.target
    if t in IDENTITY_OPS:
        return t not in (aten.dropout.default,) or not (len(node.args) > 2 and node.args[2] is True)
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    if src is None or out is None:
        return False
    if t in SAME_SHAPE_OPS:
        return _static_shape(src) is not None and _static_shape(src) == _static_shape(out)
    if t in CAST_OPS:
        return src.dtype == out.dtype and src.device == out.device and not node.kwargs.get("copy", False)
    if t in (aten.mul.Tensor, aten.div.Tensor) and len(node.args) > 1 and node.args[1] == 1:
        return src.dtype == out.dtype and src.shape == out.shape
    if t in (aten.add.Tensor, aten.sub.Tensor) and len(node.args) > 1 and node.args[1] == 0:
        return src.dtype == out.dtype and src.shape == out.shape
    return False


class Canonicalize(Pass):
    name = "canonicalize"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        stats = {"noops_removed": 0, "asserts_removed": 0, "constants_folded": 0, "dead_removed": 0}
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in ASSERT_OPS and not node.users:
                graph.erase_node(node)
                stats["asserts_removed"] += 1
            elif _is_noop(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                stats["noops_removed"] += 1
        stats["constants_folded"] = self._fold_constants(gm)
        stats["dead_removed"] = self._dce(graph)
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})

    @staticmethod
    def _dce(graph: fx.Graph) -> int:
        removed = 0
        changed = True
        while changed:
            changed = False
            for node in reversed(list(graph.nodes)):
                if node.op in ("placeholder", "output") or node.users or not _is_pure(node):
                    continue
                graph.erase_node(node)
                removed += 1
                changed = True
        return removed

    @staticmethod
    def _fold_constants(gm: fx.GraphModule) -> int:
        """Evaluate call_function nodes whose inputs are all constants; replace the largest such
        subgraphs by a single buffer. Weights read directly by a linear/conv are get_attr nodes already
        and are left alone."""
        env: dict[fx.Node, object] = {}
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                env[node] = attr_tensor(gm, node)
                continue
            if node.op != "call_function" or node.target in NO_FOLD or not _is_pure(node):
                continue
            inputs = node.all_input_nodes
            if not inputs or any(i not in env for i in inputs):
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            try:
                with torch.no_grad():
                    env[node] = node.target(*args, **kwargs)
            except Exception:  # an op that cannot run eagerly here just stays in the graph
                continue
        for node in list(gm.graph.nodes):
            value = env.get(node)
            if node.op != "call_function" or not isinstance(value, torch.Tensor) or node not in env:
                continue
            if value.numel() > FOLD_MAX_NUMEL:
                continue
            # fold only the frontier: a constant node with at least one non-constant user
            if all(u in env for u in node.users):
                continue
            name = add_constant(gm, f"_folded_{node.name}", value)
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            const.meta["val"] = value
            node.replace_all_uses_with(const, delete_user_cb=lambda u: u not in env)
            folded += 1
        return folded

    def postconditions(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        return [f"{n.name}: {n.target} is still in the graph" for n in gm.graph.nodes
                if n.op == "call_function" and n.target in (aten.dropout.default, *ASSERT_OPS)
                and not (n.target is aten.dropout.default and len(n.args) > 2 and n.args[2] is True)]
