"""fuse_activation: conv/linear + relu/relu6/hardtanh(0, x) groups (and, on engines that fuse them, conv + hardswish /
hardsigmoid); output quantizers go after the activation. Also the squeeze-excite placement insert_observers
writes from it."""

import torch
from torch import nn

from lowbit.compiler import meta
from lowbit.config import QuantConfig
from lowbit.passes import Annotate, Calibrate, FuseActivation, InsertObservers
from lowbit.passes.insert_observers import observer_nodes

from helpers import call_flat, count, run_passes


def engine_notes(target: str) -> dict:
    """The engine choices compile() puts in ctx.notes for ``target`` (lowbit.compiler.pipeline)."""
    from lowbit.backends.registry import get_backend

    backend = get_backend(target)
    return {"target": target, "post_op_activations": tuple(getattr(backend, "post_op_activations", ())),
            "quantize_gating": getattr(backend, "quantize_gating", False)}

aten = torch.ops.aten


class Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        y = nn.functional.relu6(self.fc1(y))
        y = nn.functional.gelu(self.fc2(y))  # not a ReLU: not fused
        return self.fc3(y)


def test_fuse_activation_marks_relu_groups_only():
    m = Acts().eval()
    gm, pm, _ = run_passes(m, (torch.randn(2, 3, 6, 6),), [FuseActivation()])
    assert pm.records[0].stats == {"activations_fused": 2}
    fused = {n.name: n.meta.get(meta.FUSED_ACT) for n in gm.graph.nodes if n.meta.get(meta.FUSED_ACT)}
    assert set(fused) == {"conv2d", "linear"}
    assert count(gm, aten.gelu.default) == 1
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(call_flat(gm, x), m(x))  # marking changes no numerics


def test_output_observers_sit_after_the_relu():
    m = Acts().eval()
    x = torch.randn(2, 3, 6, 6)
    cfg = QuantConfig(quantize_outputs=True)
    gm, _, _ = run_passes(m, (x,), [FuseActivation(), Annotate(), InsertObservers(), Calibrate()],
                          config=cfg, calibration=[(x,)])
    out_obs = [n for n, _ in observer_nodes(gm) if any(o.endswith(":output") for o in n.meta[meta.OBSERVES])]
    observed = {n.args[0].name for n in out_obs}
    assert {"relu", "relu6"} <= observed  # fused layers: observed after their ReLU ...
    assert not {"conv2d", "linear"} & observed  # ... never between the layer and the ReLU
    assert {"linear_1", "linear_2"} <= observed  # unfused layers (before GELU, the head): at their output
    assert torch.equal(call_flat(gm, x), m(x))  # observers are identities


class ConvSE(nn.Module):
    """conv + hardswish, then a squeeze-excite gate: mean -> conv -> relu -> conv -> hardsigmoid -> x * gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = nn.functional.hardswish(self.conv(x))
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.project(y * gate)


def test_engine_post_op_activations_fuse_on_openvino_only():
    """openvino-int8 fuses hardswish / hardsigmoid into the conv before them (NNCF's LINEAR_ACTIVATIONS);
    onnxruntime-int8 fuses ReLU-like activations only (QLinearConv has no hardswish)."""
    m = ConvSE().eval()
    x = torch.randn(2, 3, 8, 8)
    for target, fused in (("openvino-int8", {"conv2d": "hardswish", "conv2d_1": "relu", "conv2d_2": "hardsigmoid"}),
                          ("onnxruntime-int8", {"conv2d_1": "relu"})):
        gm, _, _ = run_passes(m, (x,), [FuseActivation()], notes=engine_notes(target))
        assert {n.name: n.meta[meta.FUSED_ACT] for n in gm.graph.nodes if n.meta.get(meta.FUSED_ACT)} == fused


def test_squeeze_excite_product_is_quantized_in_and_out():
    """With quantized conv outputs (both ONNX targets), the gate product reads two quantized operands and the
    mean reads the feature map through the quantizer the product reads it through; observers are identities."""
    m = ConvSE().eval()
    x = torch.randn(2, 3, 8, 8)
    for target, new in (("onnxruntime-int8", 2), ("openvino-int8", 0)):
        gm, pm, _ = run_passes(m, (x,), [FuseActivation(), Annotate(), InsertObservers(), Calibrate()],
                               calibration=[(x,)], notes={**engine_notes(target), "quantize_conv_outputs": True})
        stats = pm.records[2].stats
        assert stats["gating_muls_quantized"] == 1
        (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
        assert all(a.op == "call_module" for a in mul.args), mul.args  # both operands read through observers
        (mean,) = [n for n in gm.graph.nodes if n.target is aten.mean.dim]
        assert mean.args[0].op == "call_module" and mean.args[0] in mul.args
        roles = [o for n, _ in observer_nodes(gm) for o in n.meta[meta.OBSERVES] if o.endswith((":gate", ":gate_input"))]
        assert len(roles) == new  # ORT: hardswish and hardsigmoid run unfused, so their outputs get quantizers
        assert torch.equal(call_flat(gm, x), m(x))
