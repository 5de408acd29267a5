"""insert_observers: one observer per (producer, spec); Q/K/V share it; dynamic and weight-only get none."""

import torch
from torch import nn

from lowbit.compiler import meta
from lowbit.config import QuantConfig
from lowbit.passes import Annotate, InsertObservers
from lowbit.passes.insert_observers import observer_nodes

from helpers import call_flat, run_passes


class QKV(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        return self.ffn(self.out(a) + x)


def test_qkv_share_one_observer():
    m = QKV().eval()
    x = torch.randn(2, 5, 32)
    gm, pm, _ = run_passes(m, (x,), [Annotate(), InsertObservers()])
    obs = observer_nodes(gm)
    assert pm.records[1].stats == {"observers": 3, "inputs_observed": 5}
    shared = [n for n, _ in obs if len(n.meta[meta.OBSERVES]) == 3]
    assert len(shared) == 1 and sorted(shared[0].meta[meta.OBSERVES]) == ["k:input", "q:input", "v:input"]
    assert torch.equal(call_flat(gm, x), m(x))


def test_dynamic_and_weight_only_layers_get_no_observer():
    cfg = QuantConfig(overrides={"q": "w8a8_dynamic", "k": "w8a16", "v": "w4a16", "out": "skip", "ffn": "skip"})
    gm, pm, _ = run_passes(QKV().eval(), (torch.randn(2, 5, 32),), [Annotate(), InsertObservers()],
                           config=QuantConfig(group_size=32, overrides=cfg.overrides))
    assert observer_nodes(gm) == [] and pm.records[1].stats == {}


def test_residual_blocks_quantized_in_and_out_without_double_quantizers(cnn):
    """With conv outputs and residual adds quantized (openvino-int8): each residual add reads two
    quantizers and its output is quantized once; no observer observes another of the same spec; the
    planner's probe keeps the residual quantizers on even with every layer in float."""
    from lowbit.compiler.graph import observer_of as _observer
    from lowbit.compiler.sensitivity import Probe
    from lowbit.passes import Calibrate, Canonicalize, FoldConvBatchNorm, FuseActivation
    from lowbit.runtime.qparams import sqnr

    from models import cnn_cal

    cal = cnn_cal(4)
    passes = [Canonicalize(), FoldConvBatchNorm(), FuseActivation(), Annotate(), InsertObservers(), Calibrate()]
    gm, pm, _ = run_passes(cnn, cal[0], passes, calibration=cal,
                           notes={"quantize_conv_outputs": True, "quantize_residual_adds": True})
    assert pm.records[4].stats["residual_adds_quantized"] == 2
    for node, obs in observer_nodes(gm):
        inner = _observer(gm, node.args[0])
        assert inner is None or inner.spec != obs.spec, f"{node.name} re-quantizes {node.args[0].name}"
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 2 and all(_observer(gm, a) is not None for add in adds for a in add.args[:2])
    roles = [r for n, _ in observer_nodes(gm) for r in n.meta[meta.OBSERVES]]
    assert sum(r.endswith(":residual") for r in roles) == 1  # the last block's output (into the pool)
    probe = Probe(gm, QuantConfig())
    probe.set({})  # every layer float: only the residual-add output quantizer is left
    x = cal[1][0]
    with torch.no_grad():
        ref, out = cnn(x), probe(x)[0]
    assert 30.0 < sqnr(ref, out) < 70.0, sqnr(ref, out)  # int8 error (float rounding alone: > 100 dB)
