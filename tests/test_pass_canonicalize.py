"""canonicalize: dropout, identities, no-ops and dead code go; constant subgraphs fold; numerics identical."""

import torch
from torch import nn

from lowbit.passes import Canonicalize

from helpers import call_flat, count, run_passes

aten = torch.ops.aten


class Messy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        unused = x * 3 + 1  # noqa: F841 - dead code
        wt = self.w.t() * 2.0  # constant subgraph
        y = self.drop(x).clone()
        y = y * 1
        y = y.reshape(y.shape[0], 6)  # the batch dim is symbolic: a real view, kept
        y = y.to(torch.float32)  # same dtype: a no-op
        return torch.matmul(y, wt.t()) + 0


def test_canonicalize_removes_noops_dead_code_and_folds_constants():
    m = Messy().eval()
    x = torch.randn(3, 6)
    gm, pm, _ = run_passes(m, (x,), [Canonicalize()])
    stats = pm.records[0].stats
    assert count(gm, aten.dropout.default, aten.clone.default, aten._to_copy.default, aten.to.dtype) == 0
    assert count(gm, aten.mul.Tensor) == 0  # x*3 was dead, y*1 a no-op, w.t()*2 folded
    assert count(gm, aten.add.Tensor) == 0  # +1 was dead, +0 a no-op
    assert count(gm, aten.t.default) == 0
    assert stats["constants_folded"] >= 1 and stats["noops_removed"] >= 4 and stats["dead_removed"] >= 2
    x2 = torch.randn(5, 6)  # another batch size: the dynamic dim survived
    assert torch.equal(call_flat(gm, x2), m(x2))


def test_canonicalize_keeps_dynamic_reshapes():
    class Flatten(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1) * 2

    gm, _, _ = run_passes(Flatten(), (torch.randn(2, 3, 4),), [Canonicalize()])
    assert count(gm, aten.reshape.default, aten.view.default) == 1
    x = torch.randn(7, 3, 4)
    assert torch.equal(call_flat(gm, x), x.reshape(7, -1) * 2)
