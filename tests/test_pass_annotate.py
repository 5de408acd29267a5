"""annotate: one frozen LayerSpec per layer from config, overrides or plan; bad requests name the layer."""

import dataclasses

import pytest
import torch
from torch import nn

from lowbit.compiler import meta
from lowbit.config import QuantConfig
from lowbit.errors import PlanError, QuantConfigError
from lowbit.passes import Annotate
from lowbit.runtime.spec import LayerSpec, Plan

from helpers import call_flat, run_passes


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def specs(gm):
    return {n.meta[meta.LAYER]: n.meta[meta.SPEC] for n in gm.graph.nodes if meta.SPEC in n.meta}


def test_default_is_w8a8_per_channel_weights_per_tensor_activations():
    gm, pm, ctx = run_passes(MLP().eval(), (torch.randn(2, 64),), [Annotate()])
    s = specs(gm)
    assert set(s) == {"up", "down", "head"} and pm.records[0].stats == {"layers_w8a8": 3}
    up = s["up"]
    assert up.weight.granularity == "per_channel" and up.weight.dtype == "int8" and up.weight.symmetric
    assert up.activation.granularity == "per_tensor" and not up.activation.dynamic
    with pytest.raises(dataclasses.FrozenInstanceError):
        up.scheme = "float"  # specs are frozen
    assert set(ctx.plan.layers) == {"up", "down", "head"}
    x = torch.randn(3, 64)
    m = MLP().eval()
    gm2, _, _ = run_passes(m, (torch.randn(2, 64),), [Annotate()])
    assert torch.equal(call_flat(gm2, x), m(x))  # annotation changes no numerics


def test_overrides_by_pattern():
    cfg = QuantConfig(overrides={"head": "skip", "d*": {"scheme": "w4a16", "group_size": 32}})
    gm, pm, _ = run_passes(MLP().eval(), (torch.randn(2, 64),), [Annotate()], config=cfg)
    s = specs(gm)
    assert s["head"].scheme == "float" and not s["head"].quantized
    assert s["down"].scheme == "w4a16" and s["down"].weight.group_size == 32
    assert s["up"].scheme == "w8a8"
    assert pm.records[0].stats == {"layers_w8a8": 1, "layers_w4a16": 1, "layers_float": 1}


def test_plan_wins_over_config_and_unknown_layers_are_named():
    plan = Plan({"up": LayerSpec("w8a16", weight=QuantConfig().layer_spec("up").weight)})
    gm, _, _ = run_passes(MLP().eval(), (torch.randn(2, 64),), [Annotate()], plan=plan)
    assert specs(gm)["up"].scheme == "w8a16" and specs(gm)["down"].scheme == "w8a8"
    with pytest.raises(PlanError, match="'encoder.nope'"):
        run_passes(MLP().eval(), (torch.randn(2, 64),), [Annotate()],
                   plan=Plan({"encoder.nope": LayerSpec("float")}))


def test_group_size_that_does_not_divide_is_refused_naming_the_layer():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.Linear(100, 8)

        def forward(self, x):
            return self.odd(x)

    with pytest.raises(QuantConfigError, match="'odd'.*not a multiple of group size 64"):
        run_passes(Odd().eval(), (torch.randn(2, 100),), [Annotate()], config=QuantConfig(scheme="w4a16", group_size=64))


def test_bad_config_values_are_refused():
    with pytest.raises(QuantConfigError, match="calibration"):
        QuantConfig(calibration="kl-magic")
    with pytest.raises(QuantConfigError, match="override 'x'"):
        QuantConfig(overrides={"x": {"scheme": "w3a3"}})
    with pytest.raises(PlanError, match="unknown scheme"):
        Plan.from_json({"layers": {"a": {"scheme": "int2"}}})
