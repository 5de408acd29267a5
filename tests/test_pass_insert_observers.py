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
