"""fuse_activation: conv/linear + relu/relu6/hardtanh(0, x) groups; output quantizers go after the ReLU."""

import torch
from torch import nn

from lowbit.compiler import meta
from lowbit.config import QuantConfig
from lowbit.passes import Annotate, Calibrate, FuseActivation, InsertObservers
from lowbit.passes.insert_observers import observer_nodes

from helpers import call_flat, count, run_passes

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
