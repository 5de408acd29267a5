"""The checkpoint view of a compiled model: every parameter of the original model under its own name, as the
compiled graph computes with it.

A serving engine's checkpoint (compressed-tensors, GGUF) is the original model's parameters with some linears'
weights replaced by integer codes and scales. The compiled graph holds exactly that, under other names:

- a **quantized linear** (the plan says so) is its codes, scales and zero points in the qparams
  (``<layer>.weight.q`` / ``.scale`` / ``.zero_point``), keyed by the layer's module path, which is the
  module's name in the model;
- a **float parameter** the passes left alone is a ``get_attr`` of its own name (torch.export keeps the
  model's parameter paths);
- a parameter a pass **rewrote** (SmoothQuant's and AWQ's exact folds into an RMSNorm weight or a previous
  linear's rows, AWQ's clipping) or **encoded** (an embedding table as int8 rows and row scales) is a new
  buffer whose origin the pass recorded (``constant_node(..., derives=)`` in ``gm.meta[PARAM_SOURCES]``).

Tied parameters (an ``lm_head`` sharing the embedding table) are one tensor in the graph; each alias takes the
value its own module computes with (the embedding lookup reads int8 rows, the output projection its own
quantized copy). A parameter the graph changed without recording where it went (Conv+BN folding) or an
inserted op no checkpoint holds (SmoothQuant's explicit rescale) is an ExportError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from lowbit.errors import ExportError
from lowbit.runtime.spec import LayerSpec, QuantSpec

#: GraphModule.meta key: {buffer name: {"param": parameter of the captured model, "kind": "value" |
#: "int8_rows" | "row_scale"}} (written by lowbit.compiler.graph.constant_node; lowbit.compiler.meta re-exports it)
PARAM_SOURCES = "lowbit_param_sources"


@dataclass(frozen=True)
class ModelSource:
    """What an export needs to know of the model that was compiled (kept on the compiled model)."""

    config: Any  # the Hugging Face config (PretrainedConfig) or None
    params: dict[str, tuple[int, ...]]  # state_dict names -> shapes (parameters and persistent buffers)
    aliases: dict[str, tuple[str, ...]]  # name -> every name sharing its storage (itself included)
    modules: dict[str, str]  # module name -> class name ("Linear", "Embedding", "LlamaRMSNorm")

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSource:
        state = model.state_dict(keep_vars=True)
        by_storage: dict[tuple[int, int], list[str]] = {}
        for name, t in state.items():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), []).append(name)
        aliases = {name: tuple(group) for group in by_storage.values() for name in group}
        return cls(getattr(model, "config", None), {k: tuple(v.shape) for k, v in state.items()}, aliases,
                   {name: type(m).__name__ for name, m in model.named_modules() if name})

    def module_of(self, param: str) -> str:
        return self.modules.get(param.rsplit(".", 1)[0], "")


@dataclass
class QuantizedLinear:
    """A linear's weight as the compiled model holds it: ``w = (codes - zero_point) * scale`` (per tensor, per
    output channel, or per group of ``spec.group_size`` input columns), codes unpacked in int8/uint8."""

    name: str
    scheme: str
    spec: QuantSpec
    codes: torch.Tensor  # [out, in]
    scale: torch.Tensor  # [] | [out] | [out, in / group]
    zero_point: torch.Tensor  # same shape as scale
    activation: QuantSpec | None = None
    input_scale: torch.Tensor | None = None  # static activations: the per-tensor input qparams
    input_zero_point: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        q = self.codes.to(torch.float64)
        s, z = self.scale.to(torch.float64), self.zero_point.to(torch.float64)
        if self.spec.granularity == "per_group":
            g = int(self.spec.group_size or 0)
            return ((q.unflatten(-1, (-1, g)) - z[..., None]) * s[..., None]).flatten(-2).float()
        if self.spec.granularity == "per_channel":
            return ((q - z[:, None]) * s[:, None]).float()
        return ((q - z) * s).float()


@dataclass
class CheckpointView:
    tensors: dict[str, torch.Tensor]  # float parameters by the model's own names
    quantized: dict[str, QuantizedLinear]  # by module name (its weight is <name>.weight)
    source: ModelSource
    int8_embeddings: set[str] = field(default_factory=set)  # parameters the graph reads as int8 rows
    tokenizer: Any = None


def checkpoint_view(compiled: Any) -> CheckpointView:
    """The compiled model's parameters under the original model's names (see the module docstring)."""
    gm: fx.GraphModule | None = getattr(compiled, "graph_module", None)
    source: ModelSource | None = getattr(compiled, "source", None)
    if gm is None or source is None:
        raise ExportError(
            "export needs the compiled graph and the model it came from: call it on the model lowbit.compile() "
            "returned (or on lowbit.load(dir, model=...) of a target='torch' recipe); an engine artifact loaded "
            "on its own holds the engine's graph only")
    _refuse_inserted_ops(compiled)
    plan = {name: LayerSpec.from_json(spec, name) for name, spec in compiled.plan.get("layers", {}).items()}
    qparams: dict[str, torch.Tensor] = compiled.state.get("qparams", {})
    quantized = {name: _quantized_linear(name, spec, qparams, source) for name, spec in plan.items()
                 if spec.quantized and spec.weight is not None}

    recorded: dict[str, dict[str, str]] = gm.meta.get(PARAM_SOURCES, {})
    tensors: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        attr = str(node.target)
        rec = recorded.get(attr, {"param": attr, "kind": "value"})
        if rec["param"] not in source.aliases:
            continue  # a constant of the graph (folded rotary tables, a dummy cache slot), not a parameter
        value = _attr(gm, attr)
        if rec["kind"] in ("int8_rows", "row_scale"):
            rows.setdefault(_alias(source, rec["param"], "Embedding"), {})[rec["kind"]] = value
            continue
        for user in node.users:
            embedding = user.op == "call_function" and user.target is torch.ops.aten.embedding.default
            name = _alias(source, rec["param"], "Embedding" if embedding else None)
            if name.rsplit(".", 1)[0] in quantized and name.endswith(".weight"):
                continue  # read through its quantized layer (a graph still holding it float is the same layer)
            tensors[name] = value.detach()
    int8 = set()
    for name, parts in rows.items():
        if set(parts) != {"int8_rows", "row_scale"}:
            raise ExportError(f"parameter {name!r}: the graph holds its int8 rows without their scales")
        tensors[name] = parts["int8_rows"].float() * parts["row_scale"].float()
        int8.add(name)
    missing = [p for p in source.params if p not in tensors and not _is_quantized_weight(p, quantized)]
    untied = [p for p in missing if not any(a in tensors or _is_quantized_weight(a, quantized)
                                            for a in source.aliases[p])]
    if untied:
        raise ExportError(f"parameter {untied[0]!r} ({len(untied)} in all) is not in the compiled graph under its "
                          "name or a recorded rewrite (a fold that left no record, e.g. Conv+BatchNorm): this "
                          "model cannot be exported as a checkpoint of its own parameters")
    return CheckpointView(tensors, quantized, source, int8, getattr(compiled, "tokenizer", None))


def _refuse_inserted_ops(compiled: Any) -> None:
    for layer, sq in compiled.report.sections.get("smooth_quant", {}).items():
        if sq.get("alpha") is not None and str(sq.get("folded_into", "")).startswith("explicit"):
            raise ExportError(
                f"layer {layer!r}: its SmoothQuant factors are an explicit rescale (a mul inserted before the "
                "linear, since the op before it cannot absorb them); a checkpoint of the model's own parameters "
                f"cannot hold it. Compile with overrides={{{layer!r}: {{'smoothquant': False}}}} (or smoothquant=False)")


def _quantized_linear(name: str, spec: LayerSpec, qparams: dict[str, torch.Tensor],
                      source: ModelSource) -> QuantizedLinear:
    kind = source.modules.get(name)
    if kind != "Linear":
        what = f"a {kind}" if kind else "not a module of the model (a layer called twice, or a graph-level matmul)"
        raise ExportError(f"layer {name!r} is {what}: checkpoint export writes quantized nn.Linear layers only")
    try:
        q, s, z = (qparams[f"{name}.weight.{k}"] for k in ("q", "scale", "zero_point"))
    except KeyError as e:
        raise ExportError(f"layer {name!r}: the compiled model holds no {e.args[0]!r}") from e
    act = spec.activation
    x_s = x_z = None
    if act is not None and not act.dynamic:
        x_s, x_z = qparams.get(f"{name}.input.scale"), qparams.get(f"{name}.input.zero_point")
        if x_s is None:
            raise ExportError(f"layer {name!r}: static activation qparams {name}.input.scale are missing")
    return QuantizedLinear(name, spec.scheme, spec.weight, q, s, z, act, x_s, x_z)


def _alias(source: ModelSource, param: str, module_kind: str | None) -> str:
    """The name among ``param``'s tied aliases whose module is of ``module_kind`` (None: not an Embedding)."""
    names = source.aliases.get(param, (param,))
    if len(names) == 1:
        return names[0]
    fits = [n for n in names if (source.module_of(n) == module_kind if module_kind else
                                 source.module_of(n) != "Embedding")]
    return fits[0] if fits else param


def _is_quantized_weight(param: str, quantized: dict[str, QuantizedLinear]) -> bool:
    module, _, leaf = param.rpartition(".")
    return leaf == "weight" and module in quantized


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
