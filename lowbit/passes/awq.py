"""AWQ: activation-aware weight quantization (Lin et al., 2023; after the paper and AutoAWQ).

A few input channels carry much larger activations than the rest; their weight columns matter most. AWQ
scales those columns up before rounding (less relative rounding error where it counts) and the activations
down by the same factor, folded into the op before the linears -- SmoothQuant's exact rewrite
(``lowbit/passes/smooth_quant.py``: the same groups, fold targets and ``_apply``)::

    y = (x diag(1/s)) (W diag(s))^T                        exact in float; then W diag(s) is quantized

    s = mean|x|^a / mean|w|^(1-a),  normalised by sqrt(max(s) min(s))     (mean|w|: per column, each
                                                                           group scaled to its own max)

``a`` is searched on a grid of ``awq_grid`` points in [0, 1) (and "no scale") against the error of the group's
outputs under the quantized weights, on sampled calibration rows. Where ``1/s`` cannot fold into the previous
op (an RMSNorm/LayerNorm weight, a previous linear's rows, the gated product of Llama's MLP), the group is not
scaled: AWQ adds no op. Grouped-query attention's value -> output mapping has no one-to-one channel fold and is
skipped, as in AutoAWQ.

Then the **clipping search**, per linear except the query and key projections (their outputs meet in the
attention scores, where clipping hurts most): for each output channel and group the clipping threshold
``max|w| * (1 - i / awq_grid)``, i < awq_grid / 2, that minimises the group's output error on the sampled
rows; the weight is clamped to it, so round-to-nearest then takes its range from the clipped weight.

The pass runs on the float graph after SmoothQuant, for the linears whose configured scheme is weight-only
4-bit and whose ``weight_method`` is ``"awq"`` or ``"awq+gptq"`` (GPTQ then rounds the scaled, clipped weights).
The factors go to the qparams (``<layer>.awq_scale``), so re-applying an artifact folds the same scales.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from lowbit.compiler.graph import (
    assign_layer_names,
    attr_tensor,
    constant_node,
    delete_unused_attrs,
    output_projections,
)
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.patterns import feeds_attention_scores
from lowbit.config import QuantConfig
from lowbit.passes.annotate import config_spec
from lowbit.passes.calibrate import collect_node_statistics
from lowbit.passes.smooth_quant import Group, SmoothQuant, _fold_target, fake_quantize_weight
from lowbit.runtime.progress import bar_disabled
from lowbit.runtime.qparams import dequantize_weight, quantize_weight, sqnr
from lowbit.runtime.spec import QuantSpec

aten = torch.ops.aten
SAMPLE_ROWS = 512  # calibration rows (tokens) the scale search evaluates on, strided over the batches
CLIP_ROWS = 256  # of those, the rows the clipping search evaluates on (it runs per output channel and group)
CLIP_ROW_CHUNK = 128  # output channels per step of the clipping search (bounds its memory)


class _AbsMean:
    """Per group input: the mean |x| per channel and a few rows of every batch for the scale search."""

    def __init__(self, groups: dict[str, Group]) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {k: [] for k in groups}

    def record(self, name: str, value: torch.Tensor, batch: int) -> None:
        rows = value.float().reshape(-1, value.shape[-1])
        self.abs_sum[name] = self.abs_sum.get(name, 0) + rows.abs().sum(0)
        self.rows[name] = self.rows.get(name, 0) + rows.shape[0]
        self.samples[name].append(rows[:: max(1, rows.shape[0] // 64)][:64].clone())


def weight_column_mean(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """mean over output rows of |w| / max|w| within each quantization group: per input column [in]."""
    a = w.detach().float().abs()
    if spec.granularity == "per_group" and spec.group_size:
        g = a.reshape(a.shape[0], -1, int(spec.group_size))
        a = (g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(a.shape)
    else:
        a = a / a.amax(1, keepdim=True).clamp(min=1e-12)
    return a.mean(0)


def search_scale(x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], specs: list[QuantSpec],
                 grid: int) -> tuple[torch.Tensor | None, float | None, float, float]:
    """The best s on the grid for these linears reading ``x`` [n, in] (None: no scaling is best).
    Returns (s, ratio, error with s, error without)."""
    refs = [x @ w.t() for w in weights]
    norm = sum(float(r.pow(2).sum()) for r in refs)
    w_mean = torch.stack([weight_column_mean(w, sp) for w, sp in zip(weights, specs, strict=True)]).mean(0)

    def error(s: torch.Tensor | None) -> float:
        total = 0.0
        for w, sp, ref in zip(weights, specs, refs, strict=True):
            wq = fake_quantize_weight(w if s is None else w * s, sp)
            out = (x if s is None else x / s) @ wq.t()
            total += float((out - ref).pow(2).sum())
        return total / max(norm, 1e-30)

    base = error(None)
    best: tuple[float, float | None, torch.Tensor | None] = (base, None, None)
    for i in range(grid):
        ratio = i / grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        err = error(s)
        if err < best[0]:
            best = (err, ratio, s)
    return best[2], best[1], best[0], base


def search_clip(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, grid: int) -> tuple[torch.Tensor, float]:
    """Clamp each (output channel, group) of ``w`` [out, in] to the threshold that minimises that group's
    share of the output error on ``x`` [n, in]; returns (clipped weight, mean shrink)."""
    gs = int(spec.group_size or w.shape[1]) if spec.granularity == "per_group" else w.shape[1]
    rows, cols = w.shape
    x = x[:: max(1, x.shape[0] // CLIP_ROWS)][:CLIP_ROWS]
    xg = x.reshape(x.shape[0], cols // gs, gs).transpose(0, 1).contiguous()  # [G, n, gs]
    out = w.clone()
    shrinks = []
    for r0 in range(0, rows, CLIP_ROW_CHUNK):
        wg = w[r0:r0 + CLIP_ROW_CHUNK].reshape(-1, cols // gs, gs)  # [o, G, gs]
        ref = torch.bmm(xg, wg.permute(1, 2, 0).contiguous())  # [G, n, o]
        amax = wg.abs().amax(-1, keepdim=True)  # [o, G, 1]
        best_err = torch.full(amax.shape[:2], math.inf)
        best_max = amax.clone()
        for i in range(max(1, grid // 2)):
            m = amax * (1 - i / grid)
            cur = torch.clamp(wg, -m, m)
            q = fake_quantize_weight(cur.reshape(-1, cols), spec).reshape(cur.shape)
            err = (torch.bmm(xg, q.permute(1, 2, 0).contiguous()) - ref).pow(2).mean(1).t()  # [o, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], m, best_max)
        out[r0:r0 + CLIP_ROW_CHUNK] = torch.clamp(wg, -best_max, best_max).reshape(-1, cols)
        shrinks.append((best_max / amax.clamp(min=1e-12)).reshape(-1))
    return out, float(torch.cat(shrinks).mean())


class AWQ(Pass):
    name = "awq"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        layers = assign_layer_names(gm)
        heads = output_projections(gm) if ctx.notes.get("causal_lm") else set()
        specs: dict[str, QuantSpec] = {}
        by_input: dict[fx.Node, Group] = {}
        for name, node in layers.items():
            if node.target is not aten.linear.default or not isinstance(node.args[0], fx.Node):
                continue
            cfg = config.for_layer(name)
            spec = config_spec(config, name, node in heads)
            if "awq" not in cfg.weight_method.split("+") or spec.scheme != "w4a16" or spec.weight is None:
                continue
            if ctx.plan is not None and name in ctx.plan.layers and ctx.plan.layers[name].scheme != "w4a16":
                continue
            specs[name] = spec.weight
            g = by_input.setdefault(node.args[0], Group(node.args[0], [], []))
            g.layers.append(node)
            g.names.append(name)
        groups = []
        for g in by_input.values():
            g.fold, g.fold_node, g.why_explicit = _fold_target(gm, g)
            groups.append(g)
        if not groups:
            return PassResult(gm, {})
        report: dict[str, dict[str, Any]] = ctx.notes.setdefault("awq", {})
        methods: dict[str, str] = ctx.notes.setdefault("weight_methods", {})
        qparams: dict[str, torch.Tensor] = ctx.notes.setdefault("qparams", {})
        stats = {"layers_scaled": 0, "layers_clipped": 0, "groups_not_foldable": 0}
        if ctx.qparams is not None:  # re-applying: the stored factors, folded the same way; codes are stored
            for g in groups:
                s = ctx.qparams.get(f"{g.names[0]}.awq_scale")
                if s is not None and g.fold != "explicit rescale":
                    SmoothQuant._apply(gm, g, s.float())
                    for name in g.names:
                        qparams[f"{name}.awq_scale"] = s.float().clone()
            delete_unused_attrs(gm)
            gm.recompile()
            return PassResult(gm, {})
        if ctx.calibration is None:
            ctx.notes.setdefault("warnings", []).append("awq: no calibration data: weights rounded to nearest")
            return PassResult(gm, {})
        by_name = {g.x.name: g for g in groups}
        interp = _AbsMean(by_name)
        collect_node_statistics(gm, ctx, by_name, interp.record, "lowbit awq statistics")
        no_clip = {n for n, node in layers.items() if feeds_attention_scores(node)}
        for g in tqdm(groups, desc="lowbit awq scales and clipping", unit="group", leave=False,
                      disable=bar_disabled(ctx.progress)):
            key = g.x.name
            if key not in interp.rows:
                continue
            x_mean = interp.abs_sum[key] / interp.rows[key]
            x = torch.cat(interp.samples[key])
            x = x[:: max(1, x.shape[0] // SAMPLE_ROWS)][:SAMPLE_ROWS]
            weights = [attr_tensor(gm, n.args[1]).detach().float() for n in g.layers]
            lspecs = [specs[n] for n in g.names]
            s, ratio = None, None
            if g.fold == "explicit rescale":
                stats["groups_not_foldable"] += 1
                err = base = math.nan
            else:
                s, ratio, err, base = search_scale(x, x_mean, weights, lspecs, config.awq_grid)
            if s is not None:
                SmoothQuant._apply(gm, g, s)
                for name in g.names:
                    qparams[f"{name}.awq_scale"] = s.clone()
                stats["layers_scaled"] += len(g.layers)
                x = x / s
            folded = f"not scaled: {g.why_explicit}" if g.fold == "explicit rescale" else g.fold
            for node, name, spec, w_float in zip(g.layers, g.names, lspecs, weights, strict=True):
                entry: dict[str, Any] = {"ratio": ratio, "folded_into": folded, "error": err,
                                         "error_unscaled": base, "group": g.names}
                methods[name] = "awq"
                current = attr_tensor(gm, node.args[1])  # scaled by s when the group was
                w = current.detach().float()
                if name not in no_clip:
                    w, entry["mean_clip"] = search_clip(x, w, spec, config.awq_grid)
                    node.replace_input_with(node.args[1], constant_node(gm, f"{name}_awq_clipped",
                                                                        w.to(current.dtype), node, node.args[1]))
                    stats["layers_clipped"] += 1
                # what round-to-nearest will make of it, against the weight before clipping (scaled: exact)
                ref = w_float * s if s is not None else w_float
                entry["weight_sqnr_db"] = sqnr(ref, dequantize_weight(*quantize_weight(w, spec), spec))
                ctx.notes.setdefault("weight_sqnr", {})[name] = entry["weight_sqnr_db"]
                report[name] = entry
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})
