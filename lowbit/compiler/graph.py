"""Small FX helpers shared by the passes: op tables, attribute access, layer names, node creation."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.runtime.observers import Observer

aten = torch.ops.aten

#: quantizable ops -> the op kind recorded in plans and reports
QUANTIZABLE = {
    aten.linear.default: "linear",
    aten.conv1d.default: "conv1d",
    aten.conv2d.default: "conv2d",
}
#: activations that fuse into the preceding linear/conv (quantize after them, never between)
FUSABLE_ACTIVATIONS = {
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default,
}


def is_quantizable(node: fx.Node) -> bool:
    """A linear/conv whose weight is a constant attribute of the module (not a runtime tensor)."""
    return (
        node.op == "call_function"
        and node.target in QUANTIZABLE
        and isinstance(node.args[1], fx.Node)
        and node.args[1].op == "get_attr"
    )


def quantizable_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    return (n for n in gm.graph.nodes if is_quantizable(n))


def annotated_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    return (n for n in gm.graph.nodes if meta.SPEC in n.meta)


def observer_of(gm: fx.GraphModule, node: object) -> Observer | None:
    """The observer module ``node`` calls, or None if it is not an observer node."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, Observer):
            return mod
    return None


def get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor), f"get_attr {target} is not a tensor"
    return obj


def attr_tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything else."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return get_attr(gm, str(node.target))
    return None


def add_constant(gm: fx.GraphModule, prefix: str, value: torch.Tensor) -> str:
    """Register a new buffer on the root module under a fresh name; returns the attribute name."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", prefix)
    i, name = 0, base
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().contiguous(), persistent=True)
    return name


def constant_node(gm: fx.GraphModule, prefix: str, value: torch.Tensor, before: fx.Node,
                  derives: fx.Node | None = None, kind: str = "value") -> fx.Node:
    """A get_attr of a new buffer holding ``value``, inserted before ``before``. ``derives``: the get_attr of the
    model parameter this value replaces (or encodes, ``kind``), recorded in ``gm.meta[meta.PARAM_SOURCES]``
    so that a checkpoint in the model's own names can be written from the compiled graph."""
    name = add_constant(gm, prefix, value)
    if derives is not None and derives.op == "get_attr":
        sources = gm.meta.setdefault(meta.PARAM_SOURCES, {})
        origin = sources.get(str(derives.target), {}).get("param", str(derives.target))
        sources[name] = {"param": origin, "kind": kind}
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def module_path(node: fx.Node) -> str | None:
    """The module path (``encoder.layer.0.attention.self.query``) that produced this node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def assign_layer_names(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Name every quantizable node after its module path; a module called twice gets '#1', '#2'."""
    names: dict[str, fx.Node] = {}
    for node in quantizable_nodes(gm):
        base = module_path(node) or node.name
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}#{i}"
        names[name] = node
        node.meta[meta.LAYER] = name
    return names


#: ops that move or retype values without mixing channels: an output projection may reach the output through them
PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.contiguous.default,
    aten._to_copy.default, aten.to.dtype, aten.clone.default, aten.alias.default,
}


def output_projections(gm: fx.GraphModule) -> set[fx.Node]:
    """Linears whose result is a graph output, directly or through views and casts: a language model's
    ``lm_head`` (the layer that writes the logits)."""
    out: set[fx.Node] = set()
    stack: list[object] = [n.args for n in gm.graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
            continue
        if not isinstance(item, fx.Node) or item in seen:
            continue
        seen.add(item)
        if item.op == "call_function" and item.target is aten.linear.default and is_quantizable(item):
            out.add(item)
        elif item.op == "call_function" and item.target in PASS_THROUGH and item.args:
            stack.append(item.args[0])
    return out


def replace_node(old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    new.meta.setdefault("val", old.meta.get("val"))


def erase_if_dead(graph: fx.Graph, node: fx.Node) -> None:
    if isinstance(node, fx.Node) and not node.users:
        graph.erase_node(node)


def delete_unused_attrs(gm: fx.GraphModule) -> int:
    """Drop dead get_attr nodes, then the parameters and buffers no get_attr node refers to any more
    (e.g. a folded BatchNorm's)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    removed = 0
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        removed += 1
    gm.delete_all_unused_submodules()
    return removed


def layer_macs(gm: fx.GraphModule, flat_inputs: list[torch.Tensor]) -> dict[str, int]:
    """Multiply-accumulates of every annotated layer for these inputs (output elements x reduction size)."""
    macs: dict[str, int] = {}

    class _Count(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if meta.SPEC in n.meta and isinstance(out, torch.Tensor):
                w = n.args[1].meta.get("val") if isinstance(n.args[1], fx.Node) else None
                if isinstance(w, torch.Tensor):
                    k = w.shape[1] if n.target is aten.linear.default else int(torch.tensor(w.shape[1:]).prod())
                    macs[n.meta[meta.LAYER]] = macs.get(n.meta[meta.LAYER], 0) + out.numel() * int(k)
            return out

    with torch.no_grad():
        _Count(gm).run(*flat_inputs)
    return macs
