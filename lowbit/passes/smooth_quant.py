"""SmoothQuant: move activation outliers into the weights, exactly, before anything is quantized.

For a linear ``y = x W^T + b`` and one positive factor ``s_j`` per input channel j::

    y = (x diag(1/s)) (W diag(s))^T + b                       (exact in real arithmetic)

    s_j = clamp(max|X_j|^alpha / max|W_j|^(1 - alpha), 1e-5, 1e5)

``max|X_j|`` is the absmax of input channel j over the calibration batches, ``max|W_j|`` the absmax of
weight column j. ``alpha`` moves quantization difficulty from the activations (a few channels 100x
larger than the rest ruin a per-tensor activation scale) to the weights (per output channel, so a scaled
column costs little): alpha = 1 flattens the activations completely, alpha = 0 the weights.
Linears reading the same activation (Q, K and V) share one ``s``: ``max|W_j|`` is then the max over
their columns.

Where ``1/s`` goes (the report says which, per layer):

- ``layer_norm``: into the LayerNorm's gamma and beta (``LN(x) * g/s + b/s``), when the LayerNorm's
  output feeds only the smoothed linears (a pre-LN block). ``rms_norm``: likewise into an RMSNorm's weight
  (Llama's ``weight * x * rsqrt(mean(x^2) + eps)``: a mul by a per-channel constant). A LayerNorm that also feeds a residual add
  (BERT's post-LN blocks) is left alone: folding would change the residual stream.
- ``linear``: into the previous linear's output rows and bias, when its output (possibly through a
  ReLU: ``relu(z / s) = relu(z) / s`` for ``s > 0``, or as a factor of a gated product: ``a * (z / s) =
  (a * z) / s``, Llama's ``silu(gate) * up``) feeds only the smoothed linears; or, for the
  attention-output projection, into the value projection's rows: attention mixes tokens, not channels,
  so ``softmax(QK^T) (V / s) = (softmax(QK^T) V) / s`` per channel (lowbit/compiler/patterns.py).
- ``explicit rescale``: everywhere else (a GELU output, an attention context, a LayerNorm with a
  residual): a constant ``x * (1/s)`` is inserted before the linears. The activation quantizer follows
  the mul, so the QDQ engines see ``LN -> Mul -> Q -> DQ -> MatMul``; OpenVINO folds the Mul into the
  preceding op, as for NNCF's SmoothQuant.

``alpha`` comes from ``QuantConfig.smoothquant_alpha`` (per layer through ``overrides``), or, with
``"auto"`` (the default), from a search over alpha in 0, 0.1, ..., 1 (and "not smoothed") that minimises
that layer's output error under fake-quant W8A8 against float, on 256 strided rows of each of the first
two calibration batches; the static activation range after smoothing is exact from the per-channel
statistics (``min_j(lo_j / s_j)``, ``max_j(hi_j / s_j)``). Why auto: with per-channel int8 weights a
scaled weight column costs little, so MiniLM-L6's layers want alpha 0.8-1.0; alpha 0.5 everywhere leaves
its FFN2 outliers and lowers the embedding cosine (0.9938 -> 0.986), auto raises it to 0.998.

Only linear layers configured (or planned) to quantize their activations (``w8a8``, ``w8a8_dynamic``)
are smoothed; weight-only and float layers gain nothing (a layer the automatic plan later moves to float
stays smoothed, which is exact). Statistics come from streaming the calibration batches once
through the graph. Calibrate iterates them again: a one-shot iterator is materialised into a list here
(once), so give a re-iterable (a list, or an object whose ``__iter__`` starts over) to keep streaming.
The factors are stored in ``ctx.notes['qparams']`` (``<layer>.smooth_scale``), so an artifact re-applied
with ``ctx.qparams`` smooths exactly as the original compile did, without calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import (
    assign_layer_names,
    attr_tensor,
    constant_node,
    delete_unused_attrs,
    module_path,
)
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.patterns import attention_value_source
from lowbit.config import QuantConfig
from lowbit.passes.calibrate import calibration_batches, collect_node_statistics
from lowbit.runtime.qparams import (
    choose_qparams,
    dequantize_weight,
    fake_quantize_per_tensor,
    quantize_per_token,
    quantize_weight,
    weight_range,
)
from lowbit.runtime.spec import LayerSpec, QuantSpec

aten = torch.ops.aten

SCALE_MIN, SCALE_MAX = 1e-5, 1e5
AUTO_GRID = tuple(round(0.1 * i, 1) for i in range(11))
AUTO_SAMPLE_BATCHES = 2  # calibration batches whose rows the alpha search evaluates on
AUTO_SAMPLE_ROWS = 256  # rows kept per batch and group for the search (strided: many sequences, bounded cost)
SMOOTHED_SCHEMES = ("w8a8", "w8a8_dynamic")  # the schemes that quantize a linear's input activations


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), clamped to [1e-5, 1e5]; channels that never fire
    (max|X_j| = 0) get s = 1 so dead channels stay as they are."""
    a = act_absmax.double().clamp(min=1e-12)
    w = weight_absmax.double().clamp(min=1e-12)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(SCALE_MIN, SCALE_MAX)
    s = torch.where(act_absmax > 0, s, torch.ones_like(s))
    return s.float()


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize a weight: one fused op for per-channel (the search runs it 12 times per layer),
    the qparam oracle otherwise."""
    if spec.granularity == "per_channel":
        lo, hi = weight_range(w, spec)
        scale, zp = choose_qparams(lo, hi, spec)
        return torch.fake_quantize_per_channel_affine(w, scale, zp, spec.axis or 0, spec.qmin, spec.qmax)
    return dequantize_weight(*quantize_weight(w, spec), spec)


# --------------------------------------------------------------------------------------------------
# Groups: the linears that read one activation, and where their 1/s can go
# --------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """Linears reading one activation ``x``; they share one smoothing vector."""

    x: fx.Node
    layers: list[fx.Node]
    names: list[str]
    alpha: float | str | None = None  # None: not smoothed
    fold: str = "explicit rescale"  # "layer_norm", "linear" or "explicit rescale"
    fold_node: fx.Node | None = None
    why_explicit: str = ""
    lo: torch.Tensor | None = None  # per-channel min / max of x over the calibration batches
    hi: torch.Tensor | None = None
    sample: list[torch.Tensor] = field(default_factory=list)  # rows of x for the alpha search

    @property
    def absmax(self) -> torch.Tensor:
        assert self.lo is not None and self.hi is not None
        return torch.maximum(self.lo.abs(), self.hi.abs())


def _sole_attr_use(gm: fx.GraphModule, node: fx.Node | None) -> bool:
    """A get_attr whose tensor no other get_attr node reads (so rewriting it changes nothing else)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    same = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
    return len(same) == 1 and len(node.users) == 1


def norm_scale(gm: fx.GraphModule, x: fx.Node) -> fx.Node | None:
    """The weight of an RMSNorm-style ``mul(weight, y)`` (either order): a 1-D constant over the channels of
    ``x`` that only this mul reads; None if ``x`` is not such a product."""
    if not (x.op == "call_function" and x.target is aten.mul.Tensor and len(x.args) == 2):
        return None
    val = x.meta.get("val")
    for a, other in (x.args, x.args[::-1]):
        t = attr_tensor(gm, a) if isinstance(a, fx.Node) else None
        if (t is not None and t.ndim == 1 and isinstance(other, fx.Node) and isinstance(val, torch.Tensor)
                and t.shape[0] == val.shape[-1] and _sole_attr_use(gm, a)):
            return a
    return None


def _fold_target(gm: fx.GraphModule, group: Group) -> tuple[str, fx.Node | None, str]:
    """Where 1/s can go for this group: (kind, producer node, why not folded)."""
    x = group.x
    if set(x.users) != set(group.layers):
        others = sorted(u.name for u in x.users if u not in group.layers)
        return "explicit rescale", None, f"{x.name} also feeds {', '.join(others[:3])}"
    if x.op == "call_function" and x.target is aten.layer_norm.default:
        w = x.args[2] if len(x.args) > 2 else None
        b = x.args[3] if len(x.args) > 3 else None
        if _sole_attr_use(gm, w) and (b is None or _sole_attr_use(gm, b)):
            return "layer_norm", x, ""
        return "explicit rescale", None, f"LayerNorm {x.name} has no own affine parameters"
    scale = norm_scale(gm, x)
    if scale is not None:  # RMSNorm (Llama): weight * normalized(x), the weight a per-channel constant
        return "rms_norm", x, ""
    prod, through = x, ""
    value = attention_value_source(x)
    if value is not None:  # an attention context: 1/s goes into the value projection's rows
        prod, through = value, " (the value projection of the attention feeding it)"
        if len(prod.users) != 1:
            return "explicit rescale", None, f"value {prod.name} feeds more than its attention"
    elif x.op == "call_function" and x.target is aten.relu.default and isinstance(x.args[0], fx.Node):
        prod, through = x.args[0], " through its relu"
        if len(prod.users) != 1:
            return "explicit rescale", None, f"{prod.name} feeds more than the relu"
    elif x.op == "call_function" and x.target is aten.mul.Tensor and len(x.args) == 2:
        # a gated product (Llama's MLP: silu(gate(h)) * up(h)): (a * z) / s = a * (z / s), into the linear z
        factors = [a for a in x.args if isinstance(a, fx.Node) and a.target is aten.linear.default
                   and len(a.users) == 1 and a.args[0] is not None]
        if factors:
            prod, through = factors[-1], " through the gated product"
    if prod.op == "call_function" and prod.target is aten.linear.default:
        w = prod.args[1]
        b = prod.args[2] if len(prod.args) > 2 else None
        if _sole_attr_use(gm, w) and (b is None or _sole_attr_use(gm, b)):
            return "linear", prod, ""
        return "explicit rescale", None, f"linear {prod.name}{through} shares its weight"
    return "explicit rescale", None, f"{x.name} ({getattr(x.target, '__name__', x.target)}) cannot absorb a scale"


class _ChannelRanges:
    """Per-channel min/max (and a few rows, for alpha="auto") of the groups' inputs."""

    def __init__(self, groups: dict[str, Group], sample: set[str]) -> None:
        self.groups = groups
        self.sample = sample

    def record(self, name: str, value: torch.Tensor, batch: int) -> None:
        g = self.groups[name]
        rows = value.float().reshape(-1, value.shape[-1])
        lo, hi = rows.amin(0), rows.amax(0)
        g.lo = lo if g.lo is None else torch.minimum(g.lo, lo)
        g.hi = hi if g.hi is None else torch.maximum(g.hi, hi)
        if name in self.sample and batch < AUTO_SAMPLE_BATCHES:
            stride = max(1, rows.shape[0] // AUTO_SAMPLE_ROWS)
            g.sample.append(rows[::stride][:AUTO_SAMPLE_ROWS].clone())


def reiterable(calibration: Iterable[Any]) -> Iterable[Any]:
    """The calibration batches in a form that can be iterated twice: a one-shot iterator becomes a list."""
    if isinstance(calibration, Iterable) and iter(calibration) is not calibration:
        return calibration
    return list(calibration_batches(calibration))  # an error midway names the batch


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------


class SmoothQuant(Pass):
    name = "smooth_quant"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        layers = assign_layer_names(gm)
        groups = self._groups(gm, ctx, config, layers)
        report: dict[str, dict[str, Any]] = ctx.notes.setdefault("smooth_quant", {})
        if not groups:
            return PassResult(gm, {})
        stored = ctx.qparams
        if stored is not None:  # re-applying an artifact: use its factors, or smooth nothing
            factors = {id(g): stored.get(f"{g.names[0]}.smooth_scale") for g in groups}
            groups = [g for g in groups if factors[id(g)] is not None]
            for g in groups:
                g.alpha = "stored"  # the artifact keeps the factors, not how they were chosen
            if not groups:
                return PassResult(gm, {})
        else:
            if ctx.calibration is None:
                ctx.notes.setdefault("warnings", []).append(
                    "smooth_quant: no calibration data, so no statistics: nothing was smoothed")
                return PassResult(gm, {})
            ctx.calibration = reiterable(ctx.calibration)
            self._collect(gm, ctx, groups)
            factors = {id(g): self._factors(gm, g, config) for g in groups}
        qparams: dict[str, torch.Tensor] = ctx.notes.setdefault("qparams", {})
        stats = {"layers_smoothed": 0, "folded_layer_norm": 0, "folded_rms_norm": 0, "folded_linear": 0,
                 "explicit_rescales": 0}
        for g in groups:
            s = factors[id(g)]
            if s is None:  # auto search chose "not smoothed"
                for name in g.names:
                    report[name] = {"alpha": None, "folded_into": "not smoothed (auto search)", "group": g.names}
                continue
            s = torch.as_tensor(s, dtype=torch.float32)
            where = self._apply(gm, g, s)
            for name in g.names:
                qparams[f"{name}.smooth_scale"] = s.clone()  # one tensor per key: safetensors refuses shared ones
                report[name] = {
                    "alpha": g.alpha, "folded_into": where, "group": g.names,
                    "scale_min": float(s.min()), "scale_max": float(s.max()),
                    **({"why_not_folded": g.why_explicit} if g.fold == "explicit rescale" else {}),
                    **({"act_absmax": float(g.absmax.max()),
                        "act_absmax_smoothed": float((g.absmax / s).max())} if g.lo is not None else {}),
                }
            stats["layers_smoothed"] += len(g.layers)
            stats[{"layer_norm": "folded_layer_norm", "rms_norm": "folded_rms_norm",
                   "linear": "folded_linear"}.get(g.fold, "explicit_rescales")] += 1
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})

    # -- which linears, grouped by input ------------------------------------------------------------
    @staticmethod
    def _groups(gm: fx.GraphModule, ctx: PassContext, config: QuantConfig, layers: dict[str, fx.Node]) -> list[Group]:
        plan = ctx.plan
        by_input: dict[fx.Node, Group] = {}
        for name, node in layers.items():
            if node.target is not aten.linear.default or not isinstance(node.args[0], fx.Node):
                continue
            w = attr_tensor(gm, node.args[1])
            if w is None or w.ndim != 2:
                continue
            cfg = config.for_layer(name)
            # the config's scheme or a given plan's: the same groups whether a plan is searched (it starts
            # from the config) or re-applied, so re-applying a plan reproduces the smoothing exactly
            planned = plan.layers[name].scheme if plan is not None and name in plan.layers else None
            if not cfg.smoothquant or (cfg.scheme not in SMOOTHED_SCHEMES and planned not in SMOOTHED_SCHEMES):
                continue
            x = node.args[0]
            if x not in by_input:
                by_input[x] = Group(x, [], [], alpha=cfg.smoothquant_alpha)
            by_input[x].layers.append(node)
            by_input[x].names.append(name)
        groups = list(by_input.values())
        for g in groups:
            g.fold, g.fold_node, g.why_explicit = _fold_target(gm, g)
        return groups

    # -- statistics ---------------------------------------------------------------------------------
    @staticmethod
    def _collect(gm: fx.GraphModule, ctx: PassContext, groups: list[Group]) -> None:
        by_name = {g.x.name: g for g in groups}
        sample = {g.x.name for g in groups if g.alpha == "auto"}
        assert ctx.calibration is not None
        ranges = _ChannelRanges(by_name, sample)
        collect_node_statistics(gm, ctx, by_name, ranges.record, "lowbit smooth_quant statistics")

    # -- factors ------------------------------------------------------------------------------------
    @staticmethod
    def _weight_absmax(gm: fx.GraphModule, g: Group) -> torch.Tensor:
        cols = [attr_tensor(gm, n.args[1]).detach().float().abs().amax(0) for n in g.layers]
        return torch.stack(cols).amax(0)

    def _factors(self, gm: fx.GraphModule, g: Group, config: QuantConfig) -> torch.Tensor | None:
        if g.lo is None:  # the activation was never seen (a branch no batch reached)
            g.alpha = None
            return None
        w_absmax = self._weight_absmax(gm, g)
        if g.alpha != "auto":
            return smoothing_factors(g.absmax, w_absmax, float(g.alpha))  # type: ignore[arg-type]
        best: tuple[float, float | None] = (math.inf, None)
        candidates: list[float | None] = [None, *AUTO_GRID]
        x = torch.cat(g.sample)
        refs = [x @ attr_tensor(gm, n.args[1]).detach().float().t() for n in g.layers]
        for alpha in candidates:
            s = None if alpha is None else smoothing_factors(g.absmax, w_absmax, alpha)
            err = self._layer_error(gm, g, x, refs, s, config)
            if err < best[0] - 1e-12:
                best = (err, alpha)
        g.alpha = best[1]
        return None if best[1] is None else smoothing_factors(g.absmax, w_absmax, best[1])

    @staticmethod
    def _layer_error(gm: fx.GraphModule, g: Group, x: torch.Tensor, refs: list[torch.Tensor],
                     s: torch.Tensor | None, config: QuantConfig) -> float:
        """Sum over the group's linears of ||fq-W8A8(layer) - float(layer)||^2 / ||float(layer)||^2 on the
        sampled rows ``x`` (``refs``: the float outputs, bias left out), with the layer's own scheme
        (static per-tensor or per-token activations)."""
        assert g.lo is not None and g.hi is not None
        ones = torch.ones_like(g.lo)
        s = ones if s is None else s
        xs = x / s
        total = 0.0
        fq: dict[Any, torch.Tensor] = {}  # the fake-quantized input per activation spec (Q/K/V share one)
        for node, name, ref in zip(g.layers, g.names, refs, strict=True):
            spec: LayerSpec = config.layer_spec(name)
            w = attr_tensor(gm, node.args[1]).detach().float()
            ws = w * s
            wq = fake_quantize_weight(ws, spec.weight) if spec.weight else ws
            act = spec.activation
            if act not in fq:
                if act is not None and act.dynamic:
                    q, scale = quantize_per_token(xs)
                    fq[act] = q.float() * scale
                elif act is not None:
                    lo, hi = float((g.lo / s).min()), float((g.hi / s).max())
                    scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), act)
                    fq[act] = fake_quantize_per_tensor(xs, float(scale), int(zp), act.qmin, act.qmax)
                else:
                    fq[act] = xs
            out = fq[act] @ wq.t()
            total += float(torch.linalg.vector_norm(out - ref) ** 2 / (torch.linalg.vector_norm(ref) ** 2).clamp(min=1e-30))
        return total

    # -- rewrite ------------------------------------------------------------------------------------
    @staticmethod
    def _apply(gm: fx.GraphModule, g: Group, s: torch.Tensor) -> str:
        """Scale the group's weight columns by s and put 1/s where g.fold says; returns the report text."""
        for node, name in zip(g.layers, g.names, strict=True):
            w = attr_tensor(gm, node.args[1])
            new_w = constant_node(gm, f"{name}_smoothed_weight", (w.detach() * s).to(w.dtype), node, node.args[1])
            node.replace_input_with(node.args[1], new_w)
        inv = (1.0 / s.double()).float()
        prod = g.fold_node
        if g.fold == "layer_norm" and prod is not None:
            args = list(prod.args)
            for i in (2, 3):
                if i < len(args) and isinstance(args[i], fx.Node):
                    t = attr_tensor(gm, args[i])
                    args[i] = constant_node(gm, f"{args[i].target}_smoothed", (t.detach() * inv).to(t.dtype), prod,
                                            args[i])
            prod.args = tuple(args)
            return f"layer_norm {module_path(prod) or prod.name}"
        if g.fold == "rms_norm" and prod is not None:
            i = next(i for i, a in enumerate(prod.args) if norm_scale(gm, prod) is a)
            t = attr_tensor(gm, prod.args[i])
            args = list(prod.args)
            args[i] = constant_node(gm, f"{prod.args[i].target}_smoothed", (t.detach() * inv).to(t.dtype), prod,
                                    prod.args[i])
            prod.args = tuple(args)
            return f"rms_norm {module_path(prod) or prod.name}"
        if g.fold == "linear" and prod is not None:
            w = attr_tensor(gm, prod.args[1])
            args = list(prod.args)
            args[1] = constant_node(gm, f"{prod.args[1].target}_smoothed_rows", (w.detach() * inv[:, None]).to(w.dtype), prod,
                                    prod.args[1])
            if len(args) > 2 and isinstance(args[2], fx.Node):
                b = attr_tensor(gm, args[2])
                args[2] = constant_node(gm, f"{args[2].target}_smoothed", (b.detach() * inv).to(b.dtype), prod, args[2])
            prod.args = tuple(args)
            return f"linear {prod.meta.get(meta.LAYER, prod.name)}"
        c = constant_node(gm, f"{g.names[0]}_smooth_inv_scale", inv, g.layers[0])
        with gm.graph.inserting_after(c):
            mul = gm.graph.call_function(aten.mul.Tensor, (g.x, c))
        mul.meta["val"] = g.x.meta.get("val")
        for node in g.layers:
            node.replace_input_with(g.x, mul)
        return "explicit rescale"
