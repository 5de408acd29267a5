"""An FX graph as JSON, rebuilt without pickle: the graph half of a graph artifact.

``graph_to_json(gm)`` writes every node as ``{name, op, target, args, kwargs}``; tensors are never in
the JSON, only the names of the graph's constants (``get_attr`` targets, with dtype and shape), whose
values travel in a safetensors file and come back through ``graph_from_json(d, tensors)``.

What it can write (anything else raises ArtifactError naming the node and the argument's type):

* targets: op overloads by qualified name (``"aten.linear.default"``, ``"quantized_decomposed.
  quantize_per_tensor.default"``, ``"lowbit.w8a8_linear.default"``) and the few Python functions
  torch.export leaves for shape arithmetic (``"operator.getitem"``, ``"operator.mul"``, ...);
* arguments: None, bool, int, str, float (inf/nan tagged), lists, tuples, slices, node references,
  torch.dtype, torch.device, torch.layout, torch.memory_format;
* nodes: placeholders, get_attr, call_function, output. The ``_guards_fn`` module torch.export inserts
  to check input shapes is left out (lowbit's Signature checks inputs before a graph runs); any other
  call_module / call_method node is refused.

Symbolic shapes (``node.meta["val"]``) are not written: the rebuilt graph runs eagerly and computes
sizes from its inputs (``aten.sym_size.int``). Ops in the ``lowbit`` namespace must be registered
before ``graph_from_json`` resolves them (the backend that emitted them imports its op module).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed.*
from torch import fx

from lowbit.errors import ArtifactError

FORMAT = "lowbit.fx_graph"
VERSION = 1
GUARDS_FN = "_guards_fn"  # torch.export's input-shape guard module: dropped, Signature checks inputs

#: the Python callables torch.export leaves in ATen graphs (tuple indexing and SymInt arithmetic)
PYTHON_FUNCTIONS: dict[str, Callable[..., Any]] = {
    f"operator.{name}": getattr(operator, name)
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne",
                 "lt", "le", "gt", "ge", "and_", "or_", "not_")
}
PYTHON_FUNCTIONS.update({
    "torch.sym_max": torch.sym_max, "torch.sym_min": torch.sym_min, "torch.sym_float": torch.sym_float,
    "torch.sym_int": torch.sym_int, "torch.sym_not": torch.sym_not, "math.ceil": math.ceil,
    "math.floor": math.floor,
})
_PYTHON_NAMES = {id(fn): name for name, fn in PYTHON_FUNCTIONS.items()}

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values()
                   if isinstance(v, torch.memory_format)}
_META_TYPES = (str, int, float, bool)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def graph_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    """The graph of ``gm`` as JSON-serialisable data; tensors are named, not written (see module doc)."""
    nodes: list[dict[str, Any]] = []
    constants: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == GUARDS_FN and not node.users:
            continue
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op in ("placeholder", "get_attr"):
            entry["target"] = str(node.target)
            if node.op == "get_attr":
                value = _attr(gm, str(node.target), node)
                constants[str(node.target)] = {"dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
        elif node.op == "call_function":
            entry["target"] = _target_name(node)
        elif node.op != "output":
            raise ArtifactError(
                f"node {node.name!r}: op {node.op!r} (target {node.target!r}) cannot be written to a graph "
                "artifact; only placeholder, get_attr, call_function and output nodes can"
            )
        if node.args:
            entry["args"] = [_encode(a, node, f"args[{i}]") for i, a in enumerate(node.args)]
        if node.kwargs:
            entry["kwargs"] = {k: _encode(v, node, f"kwargs[{k!r}]") for k, v in node.kwargs.items()}
        meta = {k: v for k, v in node.meta.items() if k.startswith("lowbit_") and isinstance(v, _META_TYPES)}
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "constants": constants}


def _attr(gm: fx.GraphModule, target: str, node: fx.Node) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, torch.Tensor):
        raise ArtifactError(f"node {node.name!r}: get_attr {target!r} is a {type(obj).__name__}, not a tensor")
    return obj


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)  # "namespace.op.overload"
    name = _PYTHON_NAMES.get(id(t))
    if name is None:
        raise ArtifactError(
            f"node {node.name!r}: call target {t!r} ({type(t).__name__}) cannot be written to a graph artifact; "
            "only op overloads (aten.x.default) and the functions in graph_io.PYTHON_FUNCTIONS can"
        )
    return name


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _encode(v: Any, node: fx.Node, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": str(v)}
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, list):
        return [_encode(x, node, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, node, f"{where}[{i}]") for i, x in enumerate(v)]}
    if isinstance(v, torch.dtype):
        return {"dtype": _dtype_name(v)}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, slice):
        return {"slice": [_encode(x, node, where) for x in (v.start, v.stop, v.step)]}
    raise ArtifactError(
        f"node {node.name!r} ({node.target}): argument {where} of type {type(v).__name__} cannot be written "
        "to a graph artifact (JSON holds None, bool, int, float, str, lists, tuples, nodes, dtypes, devices, "
        "layouts and memory formats; tensors must be graph constants)"
    )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def graph_from_json(d: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule written by ``graph_to_json``; ``tensors`` maps constant names to values.

    Raises ArtifactError on an unknown format, an unresolvable target or a missing / mis-shaped constant.
    """
    if not isinstance(d, Mapping) or d.get("format") != FORMAT:
        raise ArtifactError(f"not a lowbit graph description (format {d.get('format') if isinstance(d, Mapping) else d!r})")
    if d.get("version") != VERSION:
        raise ArtifactError(f"graph description version {d.get('version')!r}; this lowbit reads version {VERSION}")
    root: dict[str, Any] = {}
    for name, info in d.get("constants", {}).items():
        if name not in tensors:
            raise ArtifactError(f"the weights have no tensor {name!r}, which the graph reads")
        t = tensors[name]
        if _dtype_name(t.dtype) != info["dtype"] or list(t.shape) != list(info["shape"]):
            raise ArtifactError(f"constant {name!r} is {_dtype_name(t.dtype)}{list(t.shape)}, the graph expects "
                                f"{info['dtype']}{list(info['shape'])}")
        root[name] = t
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in d["nodes"]:
        name, op = entry["name"], entry["op"]
        try:
            args = tuple(_decode(a, env) for a in entry.get("args", []))
            kwargs = {k: _decode(v, env) for k, v in entry.get("kwargs", {}).items()}
            if op in ("placeholder", "get_attr"):
                target: Any = entry["target"]
                if op == "get_attr" and target not in root:
                    raise ArtifactError(f"get_attr {target!r} is not among the graph's constants")
            elif op == "call_function":
                target = _resolve(entry["target"])
            elif op == "output":
                target = "output"
            else:
                raise ArtifactError(f"unsupported op {op!r}")
            node = graph.create_node(op, target, args, kwargs, name=name)
        except ArtifactError as e:
            raise ArtifactError(f"graph node {name!r}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"graph node {name!r}: malformed entry ({type(e).__name__}: {e})") from e
        node.meta.update(entry.get("meta", {}))
        env[name] = node
    try:
        graph.lint()
    except Exception as e:  # fx raises RuntimeError subclasses for malformed graphs
        raise ArtifactError(f"the rebuilt graph is malformed: {e}") from e
    gm = fx.GraphModule(root, graph)
    gm.recompile()
    return gm


def _resolve(name: str) -> Callable[..., Any]:
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    parts = name.split(".")
    if len(parts) != 3:
        raise ArtifactError(f"unknown call target {name!r}")
    ns, op, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError) as e:
        hint = " (import the module that registers lowbit's custom ops first)" if ns == "lowbit" else ""
        raise ArtifactError(f"op {name!r} is not registered in this PyTorch{hint}") from e


def _decode(v: Any, env: Mapping[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise ArtifactError(f"malformed argument {v!r}")
    (tag, x), = v.items()
    if tag == "node":
        if x not in env:
            raise ArtifactError(f"refers to node {x!r} before it is defined")
        return env[x]
    if tag == "tuple":
        return tuple(_decode(y, env) for y in x)
    if tag == "float":
        return float(x)
    if tag == "slice":
        return slice(*(_decode(y, env) for y in x))
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}.get(tag)
    if table is not None:
        if x not in table:
            raise ArtifactError(f"unknown {tag} {x!r}")
        return table[x]
    if tag == "device":
        return torch.device(x)
    raise ArtifactError(f"unknown argument tag {tag!r}")
