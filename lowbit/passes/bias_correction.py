"""Bias correction: remove the mean output shift that rounding a layer's weights causes.

Rounding a weight ``W`` to its int8 grid leaves an error ``E = W - DQ(Q(W))``; the layer then computes
``DQ(Q(W)) x = W x - E x``. Over the calibration data the error's output has mean ``E mean(x)``, a per-output-
channel shift the rounding puts into every output, which the next layers carry on (a depthwise conv has 9 weights
per channel: a few rounding errors in one direction move that channel's whole feature map). Adding it to the bias
removes it:

    b' = b + E mean(x)        (conv: E summed over its kernel window, per group; linear: E @ mean(x))

``mean(x)`` is the per-input-channel mean of the layer's float input over the calibration batches (one more
statistic of the calibration stream; a conv's border positions, which see zero padding, are counted like the
rest). This is NNCF's FastBiasCorrection and AIMET's empirical bias correction for the weight term; a layer's
activation rounding is zero-mean and needs none.

Applies to layers with int8 weights and quantized activations (the CNN and encoder schemes) that have a bias
(after Conv+BN folding every such conv has one). Weight-only layers are left to GPTQ and AWQ, which minimise
the output error themselves. The corrections are stored (``<layer>.bias_correction``), so re-applying an
artifact corrects exactly as the compile did. ``QuantConfig(bias_correction=False)`` turns it off. It runs after
the plan: the planner's figures are measured without it, the engine's fidelity check with it. On the digits
MobileNet it raises the logits' SQNR against float by 0.0-0.7 dB per engine (benchmarks/results/cpu_mobilenet.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import annotated_nodes, attr_tensor, constant_node, delete_unused_attrs
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.config import QuantConfig
from lowbit.passes.calibrate import collect_node_statistics
from lowbit.runtime.qparams import dequantize_weight, quantize_weight

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv2d.default)


def corrected_layers(gm: fx.GraphModule, config: QuantConfig) -> list[fx.Node]:
    """Layers with int8 weights, quantized activations and a constant bias that only they read."""
    out = []
    for node in annotated_nodes(gm):
        spec = node.meta[meta.SPEC]
        if spec.weight is None or spec.activation is None or spec.weight.bits != 8:
            continue
        if not config.for_layer(node.meta[meta.LAYER]).bias_correction:
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if not isinstance(bias, fx.Node) or bias.op != "get_attr" or len(bias.users) != 1 \
                or attr_tensor(gm, bias) is None or not isinstance(node.args[0], fx.Node):
            continue
        out.append(node)
    return out


class _InputMeans:
    """The per-channel means of the layers' inputs (channel dim 1 for a conv, the last dim for a linear)."""

    def __init__(self, inputs: dict[str, int]) -> None:
        self.inputs = inputs  # input node name -> its channel dim
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def record(self, name: str, value: torch.Tensor, batch: int) -> None:
        if not value.is_floating_point():
            return
        x = value.double().movedim(self.inputs[name], -1)
        x = x.reshape(-1, x.shape[-1])
        self.sums[name] = self.sums.get(name, 0) + x.sum(0)
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def mean(self, name: str) -> torch.Tensor | None:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else None


def weight_error(w: torch.Tensor, spec: Any) -> torch.Tensor:
    """``W - DQ(Q(W))`` with the codes lower_qdq gives a W8A8 weight (GPTQ and AWQ round weight-only layers only)."""
    q, scale, zp = quantize_weight(w, spec)
    return w.double() - dequantize_weight(q, scale, zp, spec).double()


def output_shift(error: torch.Tensor, mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``E mean(x)`` per output channel: a linear's ``E`` [out, in] times the mean; a conv's [out, in / groups,
    *window] summed over its window, within each group."""
    if error.ndim > 2:
        per_in = error.flatten(2).sum(-1)  # [out, in / groups]
        out_ch, in_g = per_in.shape
        means = mean.view(groups, in_g, 1)
        return torch.bmm(per_in.view(groups, out_ch // groups, in_g), means).flatten()
    return error @ mean


class BiasCorrection(Pass):
    name = "bias_correction"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        layers = corrected_layers(gm, config)
        if not layers:
            return PassResult(gm, {})
        qparams: dict[str, torch.Tensor] = ctx.notes.setdefault("qparams", {})
        if ctx.qparams is not None:  # re-applying an artifact: its corrections, or none
            shifts = {n: ctx.qparams.get(f"{n.meta[meta.LAYER]}.bias_correction") for n in layers}
        else:
            if ctx.calibration is None:
                return PassResult(gm, {})
            inputs = {n.args[0].name: (1 if n.target in CONVS else -1) for n in layers}
            interp = _InputMeans(inputs)
            collect_node_statistics(gm, ctx, inputs, interp.record, "lowbit bias correction statistics")
            shifts = {}
            for n in layers:
                mean = interp.mean(n.args[0].name)
                w = attr_tensor(gm, n.args[1])
                if mean is None or w is None:
                    continue
                groups = int(n.args[6]) if n.target in CONVS and len(n.args) > 6 else 1
                error = weight_error(w.detach(), n.meta[meta.SPEC].weight)
                shifts[n] = output_shift(error, mean, groups).float()
        report: dict[str, dict[str, float]] = ctx.notes.setdefault("bias_correction", {})
        done = 0
        for n, shift in shifts.items():
            if shift is None:
                continue
            name = n.meta[meta.LAYER]
            b = attr_tensor(gm, n.args[2])
            if shift.shape != b.shape:
                continue
            new_b = constant_node(gm, f"{name}_bias_corrected", (b.detach() + shift.to(b.dtype)), n, n.args[2])
            n.replace_input_with(n.args[2], new_b)
            qparams[f"{name}.bias_correction"] = shift.detach().clone()
            report[name] = {"shift_absmax": float(shift.detach().abs().max()), "bias_absmax": float(b.detach().abs().max())}
            done += 1
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {"biases_corrected": done} if done else {})
