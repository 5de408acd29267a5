"""Capture a model with torch.export into an ATen-level FX GraphModule.

The batch dimension (dim 0) of every tensor input is dynamic by default; other dims (sequence length)
come from ``dynamic_shapes``, given per argument name as ``{dim_index: "name"}`` (or a torch ``Dim``).
The same name in two inputs is one symbol.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from lowbit.compiler import meta
from lowbit.errors import CaptureError


@dataclass
class Captured:
    gm: fx.GraphModule
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    input_names: list[str]  # one per graph placeholder, in order
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {dim: symbol name}
    dim_bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tuple is positional arguments, a dict keyword arguments, a lone tensor one positional argument."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def without_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """A Hugging Face model whose config has ``use_cache`` returns its key/value cache (a ``DynamicCache``
    object torch.export cannot flatten) beside the logits; one compiled forward over a whole sequence needs no
    cache, so ``use_cache`` is off while lowbit captures and runs the model, and restored after."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if not old:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = old


#: inputs of a causal LM whose dim 1 is the sequence
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def sequence_dynamic_shapes(model: torch.nn.Module, example_inputs: Any) -> dict[str, dict[int, str]]:
    """``{input: {1: "seq"}}`` for the sequence inputs among ``example_inputs``: a causal LM compiled from an
    example of one length is called on prompts and windows of every length."""
    args, kwargs = split_inputs(example_inputs)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return {}
    return {name: {1: "seq"} for name, value in bound.arguments.items()
            if name in SEQUENCE_INPUTS and isinstance(value, torch.Tensor) and value.ndim >= 2}


def _dim(name: str, cache: dict[str, Dim], bounds: dict[str, tuple[int, int | None]]) -> Dim:
    if name not in cache:
        lo, hi = bounds.get(name, (1, None))
        cache[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
    return cache[name]


def build_dynamic_shapes(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    user: Mapping[str, Any] | None,
    bounds: Mapping[str, tuple[int, int | None]] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[int, str]]]:
    """torch.export's ``dynamic_shapes`` keyed by argument name, with dim 0 of every tensor named 'batch'."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"example_inputs do not match {type(model).__name__}.forward: {e}") from e
    user = normalize_dynamic_shapes(user, list(bound.arguments))
    cache: dict[str, Dim] = {}
    bounds = dict(bounds or {})
    shapes: dict[str, Any] = {}
    named: dict[str, dict[int, str]] = {}
    for name, value in bound.arguments.items():
        if not isinstance(value, torch.Tensor):
            shapes[name] = None
            continue
        dims: dict[int, str] = {0: "batch"} if value.ndim > 0 else {}
        for d, sym in (user.get(name) or {}).items():
            if not -value.ndim <= d < value.ndim:
                raise CaptureError(f"dynamic_shapes[{name!r}] marks dim {d}, but {name!r} has {value.ndim} dims")
            d = d % value.ndim
            if sym is None or sym is Dim.STATIC:
                dims.pop(d, None)
            elif sym is Dim.AUTO or sym is Dim.DYNAMIC:
                # one symbol per position across inputs (ids and mask share their sequence dim, as models need)
                dims[d] = dims.get(d, f"dim{d}")
            else:
                dims[d] = sym.__name__ if isinstance(sym, Dim) else str(sym)
                if isinstance(sym, Dim):
                    bounds.setdefault(sym.__name__, (sym.min, sym.max if sym.max < 2**62 else None))
        named[name] = dims
        shapes[name] = {d: _dim(s, cache, bounds) for d, s in dims.items()} or None
    return shapes, named


def normalize_dynamic_shapes(user: Any, names: list[str]) -> dict[str, dict[int, Any]]:
    """Every form torch.export takes -> {input name: {dim: Dim | str | None | Dim.AUTO/DYNAMIC/STATIC}}.

    Top level: a dict by input name, or a tuple/list by position (the forward's arguments in signature order, as
    torch.export binds them). Per input: a dict {dim: spec}, or a tuple/list with one spec per dim (None:
    static). A missing input or a None entry keeps lowbit's default (dim 0 is the dynamic 'batch').
    ``Dim.AUTO`` / ``Dim.DYNAMIC`` make a dim dynamic under one symbol per position (``dim1`` in every input that
    marks its dim 1 so), ``Dim.STATIC`` keeps it static."""
    if user is None:
        return {}
    if isinstance(user, Mapping):
        keys = list(user)
        if any(not isinstance(k, str) for k in keys):
            raise CaptureError(f"dynamic_shapes is keyed by input name, or is a tuple in input order; got keys "
                               f"{keys!r} (a mix of positions and names is ambiguous): use one form")
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise CaptureError(f"dynamic_shapes names {unknown}, which are not among the example inputs "
                               f"{sorted(names)}")
        items = dict(user)
    elif isinstance(user, (tuple, list)):
        if len(user) > len(names):
            raise CaptureError(f"dynamic_shapes has {len(user)} positional entries but the example has "
                               f"{len(names)} inputs {names}")
        items = dict(zip(names, user, strict=False))
    else:
        raise CaptureError(f"dynamic_shapes must be a dict by input name or a tuple in input order, got "
                           f"{type(user).__name__}")
    out: dict[str, dict[int, Any]] = {}
    for name, spec in items.items():
        if spec is None:
            continue
        if isinstance(spec, Mapping):
            if any(not isinstance(d, int) for d in spec):
                raise CaptureError(f"dynamic_shapes[{name!r}]: dims are ints, got keys {list(spec)!r}")
            out[name] = dict(spec)
        elif isinstance(spec, (tuple, list)):
            out[name] = {d: sym for d, sym in enumerate(spec)}  # None at a position: that dim static
        else:
            raise CaptureError(f"dynamic_shapes[{name!r}]: expected {{dim: Dim}} or one entry per dim, got "
                               f"{type(spec).__name__}")
    return out


_HINTS = [
    (r"specializ|Constraints violated|not in range|inferred to be a constant", (
        "a dimension marked dynamic was specialised by the model's code. Give an example batch (and "
        "sequence length) of at least 2, or leave that dimension static with dynamic_shapes={name: {dim: None}}"
    )),
    (r"data.dependent|Could not guard on data-dependent|GuardOnDataDependentSymNode", (
        "the model branches on tensor values; rewrite the branch with torch.cond or make it depend on shapes"
    )),
    (r"Unsupported|graph break|not supported", (
        "rewrite the offending line with tensor operations torch.export can trace, or wrap it in a "
        "torch.library custom op"
    )),
]


def _explain(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "site-packages/torch" not in f.filename and "lowbit/compiler" not in f.filename]
    where = ""
    m = re.search(r'File "([^"]+)", line (\d+)[^\n]*\n\s*(.+)', text)
    if m:
        where = f"\n  at {m.group(1)}:{m.group(2)}: {m.group(3).strip()}"
    elif frames:
        f = frames[-1]
        where = f"\n  at {f.filename}:{f.lineno}: {f.line}"
    hint = next((h for pat, h in _HINTS if re.search(pat, text)), "see the torch.export message above")
    first = "\n".join(text.strip().splitlines()[:12])
    return f"{first}{where}\n  fix: {hint}"


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    dynamic_shapes: Mapping[str, Any] | tuple[Any, ...] | list[Any] | None = None,
    dim_bounds: Mapping[str, tuple[int, int | None]] | None = None,
) -> Captured:
    """torch.export the model (eval mode) and return its module graph. Raises CaptureError on failure."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"lowbit compiles torch.nn.Module instances, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    model = model.eval()
    shapes, named = build_dynamic_shapes(model, args, kwargs, dynamic_shapes, dim_bounds)
    args, kwargs = _widen_unit_dims(model, args, kwargs, named)
    with without_kv_cache(model):
        key = _cache_key(model, args, kwargs, dynamic_shapes, dim_bounds)
        hit = _CACHE.get(key) if key is not None else None
        if hit is not None:
            _CACHE.move_to_end(key)
            ep, shapes, named = hit
        else:
            ep, shapes, named = _export(model, args, kwargs, shapes, named, dynamic_shapes, dim_bounds)
            if key is not None:
                _remember(model, key, (ep, shapes, named))
    return _captured(ep, args, kwargs, shapes, named)


# -- the capture cache -------------------------------------------------------------------------------------------
# Compiling one model for several targets (or re-planning after the engine check) captures the same program each
# time: ~15 s of torch.export for SmolLM2-135M. The ExportedProgram of a capture is kept while its model lives
# (at most CACHE_SIZE of them) and reused when the same model object, in the same state, is captured with inputs
# of the same structure, shapes and dtypes and the same dynamic shapes. "The same state": every parameter and
# buffer the same tensor object at the same version (an in-place update bumps it), every submodule of the same
# class and forward with the same plain attributes, hooks and config. Each call gets its own GraphModule
# (``ep.module()``: a fresh graph; the weights are the model's, as on a first capture). LOWBIT_CAPTURE_CACHE=0
# turns it off.
CACHE_SIZE = 4
_CACHE: OrderedDict[tuple[Any, ...], tuple[Any, dict[str, Any], dict[str, dict[int, str]]]] = OrderedDict()


def _remember(model: torch.nn.Module, key: tuple[Any, ...], value: tuple[Any, ...]) -> None:
    try:  # dropped with its model: the cache never keeps a model's weights alive on its own
        weakref.finalize(model, _CACHE.pop, key, None)
    except TypeError:
        return
    _CACHE[key] = value
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)


def _plain(value: Any) -> Any:
    """A comparable stand-in for a module attribute: the value itself when it is plain data, else its identity
    (a hook dict by its hooks, an object with ``to_dict`` such as a Hugging Face config by its contents)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)) and len(value) <= 64:
        return (type(value).__name__, tuple(_plain(v) for v in value))
    if isinstance(value, (set, frozenset)) and len(value) <= 64 and all(isinstance(v, str) for v in value):
        return ("set", tuple(sorted(value)))
    if isinstance(value, dict) and all(callable(v) for v in value.values()):  # hooks
        return ("hooks", tuple(id(v) for v in value.values()))
    if isinstance(value, dict) and len(value) <= 64 and all(isinstance(k, (str, int)) for k in value):
        # by contents: torch.export swaps some of a Hugging Face model's dicts (its tp/pp plans, tied-weight
        # keys) for equal copies, which by identity would make every capture of such a model a miss
        return ("dict", tuple((k, _plain(v)) for k, v in value.items()))
    if isinstance(value, weakref.ref) and isinstance(value(), torch.nn.Module):  # a wrapper's model (decode)
        return ("ref", _module_state(value()))
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, torch.nn.Module):
        try:
            return ("config", json.dumps(to_dict(), sort_keys=True, default=str))
        except (TypeError, ValueError):
            pass
    return (type(value).__qualname__, id(value))


def _module_state(m: torch.nn.Module) -> tuple[Any, ...]:
    """A module's class, forward, mode and plain attributes (not its children, parameters or buffers)."""
    return (type(m), id(type(m).forward), m.training,
            tuple((k, _plain(v)) for k, v in vars(m).items()
                  if k not in ("_parameters", "_buffers", "_modules", "training")))


def _cache_key(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any,
               dim_bounds: Any) -> tuple[Any, ...] | None:
    if os.environ.get("LOWBIT_CAPTURE_CACHE", "1") == "0":
        return None
    try:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        inputs = tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else ("value", repr(t))
                       for t in leaves)
        modules = tuple((name, *_module_state(m)) for name, m in model.named_modules())
        tensors = tuple((name, id(t), t._version, tuple(t.shape), t.dtype)
                        for name, t in (*model.named_parameters(), *model.named_buffers()))
        return (id(model), torch.get_default_dtype(), str(spec), inputs, repr(dynamic_shapes), repr(dim_bounds),
                modules, tensors)
    except Exception:  # something in the model that cannot be fingerprinted: no caching
        return None


def _widen_unit_dims(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     named: Mapping[str, Mapping[int, str]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """torch.export specialises a dimension of size 1 to the constant 1, so an example of batch 1 (the usual
    LLM case) could not be dynamic: every dynamic dim of size 1 is repeated to 2 for the capture (the model
    sees the same rows twice), and the captured graph takes any size."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    positions = {name: i for i, name in enumerate(list(bound.arguments)[:len(args)])}
    args, kwargs = list(args), dict(kwargs)  # the example's own form: keywords stay keywords
    for name, dims in named.items():
        value = bound.arguments.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        for d in dims:
            if value.shape[d] == 1:
                value = torch.cat([value, value], dim=d)
        if name in kwargs:
            kwargs[name] = value
        elif name in positions:
            args[positions[name]] = value
    return tuple(args), kwargs


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], shapes: dict[str, Any],
            named: dict[str, dict[int, str]], dynamic_shapes: Mapping[str, Any] | None,
            dim_bounds: Mapping[str, tuple[int, int | None]] | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    bounds = dict(dim_bounds or {})
    ep = None
    for attempt in range(2):
        try:
            with torch.no_grad():
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
            break
        except Exception as e:  # torch.export raises many types; all are capture failures to the user
            fixes = _suggested_bounds(str(e)) if attempt == 0 else {}
            if not fixes:
                raise CaptureError(f"torch.export could not capture {type(model).__name__}:\n{_explain(e)}") from e
            # e.g. the position table only admits seq <= 512: take torch's suggested bounds and export again
            bounds.update(fixes)
            shapes, named = build_dynamic_shapes(model, args, kwargs, dynamic_shapes, bounds)
    assert ep is not None
    return ep, shapes, named


def _captured(ep: Any, args: tuple[Any, ...], kwargs: dict[str, Any], shapes: dict[str, Any],
              named: dict[str, dict[int, str]]) -> Captured:
    gm = ep.module()
    # flat tensors in, flat tensors out: lowbit's Signature does the (un)flattening and the input checks
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()  # the pytree input check; Signature checks inputs instead
    gm.recompile()
    for node in gm.graph.nodes:
        node.meta[meta.CREATED_BY] = "capture"
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    return Captured(gm, args, kwargs, names, named, _bounds_of(shapes))


def _suggested_bounds(message: str) -> dict[str, tuple[int, int | None]]:
    """Parse torch.export's "Suggested fixes: seq = Dim('seq', max=64)" lines into symbol bounds."""
    if "Suggested fixes" not in message:
        return {}
    out: dict[str, tuple[int, int | None]] = {}
    for m in re.finditer(r"(\w+) = Dim\('(\w+)'((?:, (?:min|max)=\d+)*)\)", message):
        lo = re.search(r"min=(\d+)", m.group(3))
        hi = re.search(r"max=(\d+)", m.group(3))
        out[m.group(2)] = (max(int(lo.group(1)), 1) if lo else 1, int(hi.group(1)) if hi else None)
    return out


def _bounds_of(shapes: Any) -> dict[str, tuple[int, int | None]]:
    """symbol -> (min, max) of the Dims in a dynamic_shapes structure (max None when unbounded)."""
    out: dict[str, tuple[int, int | None]] = {}
    for dims in (shapes or {}).values():
        for d in (dims or {}).values() if isinstance(dims, dict) else ():
            if isinstance(d, Dim):
                hi = d.max if d.max is not None and d.max < 2**62 else None
                out[d.__name__] = (max(int(d.min or 1), 1), int(hi) if hi is not None else None)
    return out


#: ops an index input may pass through on its way to a lookup, without changing its values
_VALUE_PRESERVING = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.unsqueeze.default,
                     torch.ops.aten.squeeze.dim, torch.ops.aten.flatten.using_ints, torch.ops.aten._to_copy.default,
                     torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.expand.default,
                     torch.ops.aten.slice.Tensor, torch.ops.aten.alias.default}


def index_ranges(gm: fx.GraphModule, input_names: list[str]) -> dict[str, tuple[int, int]]:
    """Integer inputs that reach an ``embedding`` as its indices (directly or through views and copies):
    input name -> ``[0, rows)`` of the smallest table they index. Out of range, an engine's Gather reads out of
    bounds or fails with its own error; lowbit checks these bounds before every call (signature.value_ranges)."""
    out: dict[str, tuple[int, int]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, input_names, strict=False):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.is_floating_point() or val.dtype == torch.bool:
            continue
        rows: list[int] = []
        frontier, seen = [node], set()
        while frontier:
            n = frontier.pop()
            for user in n.users:
                if user in seen or user.op != "call_function":
                    continue
                seen.add(user)
                if user.target is torch.ops.aten.embedding.default and len(user.args) > 1 and user.args[1] is n:
                    table = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
                    if isinstance(table, torch.Tensor) and isinstance(table.shape[0], int):
                        rows.append(int(table.shape[0]))
                elif user.target in _VALUE_PRESERVING and user.args and user.args[0] is n:
                    frontier.append(user)
        if rows:
            out[name] = (0, min(rows))
    return out
