"""Drop the ``_guards_fn`` module call torch.export leaves at the top of a graph.

It re-checks input shapes on every call; lowbit's Signature checks the same shapes (with the dynamic
dims' bounds) before a graph runs, and a graph artifact holds no modules, so the guard goes.
"""

from __future__ import annotations

from torch import fx

from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.runtime.graph_io import GUARDS_FN


class DropExportGuards(Pass):
    name = "drop_export_guards"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        dropped = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target == GUARDS_FN and not node.users:
                gm.graph.erase_node(node)
                dropped += 1
        if dropped:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, {"guards_dropped": dropped} if dropped else {})

    def postconditions(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        return [f"{n.name} is still in the graph" for n in gm.graph.nodes
                if n.op == "call_module" and n.target == GUARDS_FN]
