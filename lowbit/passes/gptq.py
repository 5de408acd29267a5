"""GPTQ: round a weight-only layer's weights column by column, feeding each column's rounding error forward
into the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022;
after IST-DASLab/gptq and llm-compressor's GPTQModifier).

For a linear ``y = x W^T`` and its calibration inputs ``X`` [n, in]::

    H = 2/n X^T X  (+ damp I,  damp = gptq_damp * mean(diag H))         the layer's loss is tr(dW H dW^T)
    for each column j (in act order: decreasing diag H, when asked):
        q_j   = quant(w_j)                                                 with its group's scale and zero point
        e_j   = (w_j - q_j) / [H^-1]_jj                                    ([H^-1] as its upper Cholesky factor)
        w_k  -= e_j [H^-1]_jk      for the columns k after j               (lazily, 128 columns at a time)

- **Dead columns** (an input channel that is always 0: ``H_jj = 0``) get ``H_jj = 1`` and a zero weight.
- **Dampening** starts at ``gptq_damp`` (1% of the mean diagonal); if the Cholesky factorisation still fails
  it is raised tenfold (to at most 100%), and the report says so.
- **Groups are static**: the groups of ``group_size`` consecutive input channels stay where they are even in
  act order, so every backend runs the result with no run-time permutation (``g_idx``). A group's scale and
  zero point come from the error-updated weights of its columns when its first column (in processing order)
  is reached -- as the reference does, with the columns of later lazy blocks as updated at the block's start.
- **True-sequential**: the Hessian of a layer is accumulated from inputs computed by the layers before it as
  already quantized (``stream_layerwise``), one layer at a time: the peak memory is the model, the live
  activations of the calibration batches, and one Hessian.

The pass rounds the layers whose spec quantizes weights only (``w4a16``, ``w8a16``) and whose config asks for
``weight_method="gptq"`` (or ``"awq+gptq"``, after the awq pass). It leaves each weight on its quantization
grid and records the scales and zero points in ``ctx.notes['weight_qparams']``, so ``lower_qdq`` emits
exactly GPTQ's codes. Re-applying an artifact (``ctx.qparams``) uses the stored codes and runs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import annotated_nodes, attr_tensor, constant_node, delete_unused_attrs
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.config import QuantConfig
from lowbit.errors import CalibrationError
from lowbit.passes.calibrate import stream_layerwise
from lowbit.runtime.qparams import choose_qparams, sqnr, weight_range
from lowbit.runtime.spec import QuantSpec

aten = torch.ops.aten
MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQResult:
    weight: torch.Tensor  # the rounded weight, dequantized (float32, on the grid of scale / zero_point)
    scale: torch.Tensor  # per group [out, in // group], per channel [out] or per tensor []
    zero_point: torch.Tensor
    loss: float  # sum over columns of (w - q)^2 / [H^-1]_jj^2 / 2: the layer's output error GPTQ estimates
    damp: float  # the dampening fraction that made H positive definite
    dead_columns: int


def _quant(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round one column (or block of columns) [out, k] to the grid and dequantize; scale/zp broadcast [out, 1]."""
    q = torch.clamp(torch.round(w / scale) + zp, spec.qmin, spec.qmax)
    return (q - zp) * scale


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising ``damp`` tenfold while the
    factorisation fails. Returns (factor, damp used)."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    while True:
        try:
            lower = torch.linalg.cholesky(h + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            if damp >= MAX_DAMP:
                raise
            damp = min(damp * 10, MAX_DAMP)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True) -> GPTQResult:
    """GPTQ on one weight [out, in] with the Hessian [in, in] of its inputs (2/n X^T X); see the module doc.

    Per-group specs get static groups along the input axis; per-channel and per-tensor specs take their
    qparams from the whole weight before rounding (as the reference does without groups)."""
    w = weight.detach().float().clone()  # the column loop in float32, as the reference; the factor in float64
    h = hessian.detach().double().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    grouped = spec.granularity == "per_group"
    gs = int(spec.group_size or cols) if grouped else cols
    if grouped and cols % gs:
        raise ValueError(f"in_features {cols} is not a multiple of group size {gs}")
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    hinv64, damp = inverse_hessian_factor(h, damp)
    hinv = hinv64.float()
    position = torch.empty_like(perm)
    position[perm] = torch.arange(cols)  # original column -> processing position

    n_groups = cols // gs if grouped else 1
    scales: list[torch.Tensor | None] = [None] * n_groups
    zps: list[torch.Tensor | None] = [None] * n_groups
    if not grouped:  # one set of qparams for the whole weight, from the weight as it is
        lo, hi = weight_range(w.float(), spec)
        s, z = choose_qparams(lo, hi, spec)
        scales[0], zps[0] = s, z.float()
    q_all = torch.zeros_like(w)
    loss = torch.zeros(rows, dtype=torch.float64)  # accumulated in float64: 10^4 small terms
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs if grouped else 0
            if scales[g] is None:  # the group's first column: qparams from its columns as updated so far
                pos = position[g * gs:(g + 1) * gs]
                current = torch.where((pos >= i1) & (pos < i2), w1[:, (pos - i1).clamp(0, i2 - i1 - 1)], w[:, pos])
                s, z = choose_qparams(current.amin(1), current.amax(1), spec)
                scales[g], zps[g] = s, z.float()
            s, z = scales[g], zps[g]
            s_col = s if s.ndim else s.expand(rows)  # type: ignore[union-attr]
            z_col = z if z.ndim else z.expand(rows)  # type: ignore[union-attr]
            x = w1[:, i]
            q = _quant(x[:, None], s_col[:, None], z_col[:, None], spec)[:, 0]
            d = hinv1[i, i]
            q_all[:, i1 + i] = q
            loss += ((x - q) ** 2 / d ** 2 / 2).double()
            e = (x - q) / d
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = q_all[:, position]  # back to the original column order
    if grouped:
        scale = torch.stack([s for s in scales if s is not None], dim=1).float()  # type: ignore[misc]
        zero_point = torch.stack([z for z in zps if z is not None], dim=1).to(torch.int32)  # type: ignore[misc]
    else:
        scale, zero_point = scales[0].float(), zps[0].to(torch.int32)  # type: ignore[union-attr]
    return GPTQResult(out.float(), scale, zero_point, float(loss.sum()), damp, int(dead.sum()))


class HessianAccumulator:
    """H = 2/n sum_b X_b^T X_b over the rows of every batch, in float32, updated as a running mean."""

    def __init__(self, layer: str, columns: int) -> None:
        self.layer = layer
        self.h = torch.zeros(columns, columns, dtype=torch.float32)
        self.rows = 0

    def add(self, x: torch.Tensor, batch: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        self.h *= self.rows / (self.rows + n)
        self.rows += n
        x = math.sqrt(2.0 / self.rows) * x
        self.h.addmm_(x.t(), x)
        if not math.isfinite(float(self.h.diagonal().sum())):  # a NaN/Inf anywhere in x reaches the diagonal
            raise CalibrationError(f"gptq: layer {self.layer!r}: calibration batch {batch} gives non-finite inputs "
                                   "(NaN/Inf): its Hessian is not finite")

    def finish(self) -> torch.Tensor:
        if self.rows < self.h.shape[0]:
            raise CalibrationError(
                f"gptq: layer {self.layer!r} saw {self.rows} calibration tokens, fewer than its {self.h.shape[0]} "
                "input features: its Hessian is singular. Give more calibration data (tokens >= in_features)")
        return self.h


def gptq_layers(gm: fx.GraphModule, config: QuantConfig) -> list[fx.Node]:
    """The linears GPTQ rounds: weight-only specs whose (per-layer) config asks for it."""
    out = []
    for node in annotated_nodes(gm):
        spec = node.meta[meta.SPEC]
        if (node.target is aten.linear.default and spec.weight is not None and spec.activation is None
                and "gptq" in config.for_layer(node.meta[meta.LAYER]).weight_method.split("+")):
            out.append(node)
    return out


class GPTQ(Pass):
    name = "gptq"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        layers = gptq_layers(gm, config)
        if not layers or ctx.qparams is not None:  # re-applying: lower_qdq takes the stored codes
            return PassResult(gm, {})
        if ctx.calibration is None:
            raise CalibrationError("weight_method 'gptq' needs calibration data: pass calibration=[batch, ...]")
        chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = ctx.notes.setdefault("weight_qparams", {})
        methods: dict[str, str] = ctx.notes.setdefault("weight_methods", {})
        report: dict[str, dict[str, Any]] = ctx.notes.setdefault("gptq", {})
        stats = {"layers_gptq": 0, "damp_raised": 0, "dead_columns": 0}

        shared: dict[fx.Node, HessianAccumulator] = {}  # q/k/v (gate/up) read one input: one Hessian

        def visit(node: fx.Node, xs: list[torch.Tensor]) -> None:
            name = node.meta[meta.LAYER]
            spec: QuantSpec = node.meta[meta.SPEC].weight
            w = attr_tensor(gm, node.args[1])
            assert w is not None
            x_node = node.args[0]
            acc = shared.get(x_node)  # type: ignore[arg-type]
            if acc is None:
                shared.clear()  # the previous input's layers are done: one Hessian alive at a time
                acc = shared[x_node] = HessianAccumulator(name, w.shape[1])  # type: ignore[index]
                for b, x in enumerate(xs):
                    acc.add(x, b)
            h = acc.finish()
            try:
                res = gptq_quantize(w, h, spec, block_size=config.gptq_block_size, damp=config.gptq_damp,
                                    act_order=config.gptq_act_order)
            except torch.linalg.LinAlgError as e:
                raise CalibrationError(f"gptq: layer {name!r}: the Hessian is not positive definite even with "
                                       f"{MAX_DAMP:.0%} dampening ({e})") from e
            except ValueError as e:
                raise CalibrationError(f"gptq: layer {name!r}: {e}") from e
            new_w = constant_node(gm, f"{name}_gptq_weight", res.weight.to(w.dtype), node)
            node.replace_input_with(node.args[1], new_w)
            chosen[f"{name}.weight"] = (res.scale, res.zero_point)
            methods[name] = "+".join([*([methods[name]] if methods.get(name, "rtn") != "rtn" else []), "gptq"])
            report[name] = {"loss": res.loss, "damp": res.damp, "dead_columns": res.dead_columns,
                            "tokens": acc.rows, "weight_sqnr_db": sqnr(w, res.weight)}
            ctx.notes.setdefault("weight_sqnr", {})[name] = report[name]["weight_sqnr_db"]
            stats["layers_gptq"] += 1
            stats["dead_columns"] += res.dead_columns
            if res.damp > config.gptq_damp:
                stats["damp_raised"] += 1
                ctx.notes.setdefault("warnings", []).append(
                    f"gptq: layer {name!r}: Cholesky failed at dampening {config.gptq_damp:g}; used {res.damp:g}")

        stream_layerwise(gm, ctx, layers, visit, "lowbit gptq")
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})
