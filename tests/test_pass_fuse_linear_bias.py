"""fuse_linear_bias: matmul/addmm/bias-less linear + constant add become one linear; exact to 1e-5 relative."""

import torch
from torch import nn

from lowbit.passes import Canonicalize, FuseLinearBias

from helpers import call_flat, count, rel_err, run_passes

aten = torch.ops.aten


class Matmuls(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 16))  # [K, N] like a Conv1D of GPT-2
        self.b1 = nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(16, 12))
        self.b2 = nn.Parameter(torch.randn(12))
        self.lin = nn.Linear(12, 6, bias=False)
        self.b3 = nn.Parameter(torch.randn(6))
        self.w4 = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        y = torch.matmul(x, self.w1) + self.b1
        y = torch.addmm(self.b2, torch.relu(y), self.w2)
        y = self.lin(y) + self.b3
        return torch.mm(y, self.w4)


def test_fuse_linear_bias_turns_every_pattern_into_linear():
    m = Matmuls().eval()
    x = torch.randn(5, 8)
    gm, pm, _ = run_passes(m, (x,), [Canonicalize(), FuseLinearBias()])
    assert pm.records[1].stats == {"matmul_to_linear": 3, "bias_fused": 3}
    assert count(gm, aten.linear.default) == 4
    assert count(gm, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.add.Tensor) == 0
    x2 = torch.randn(9, 8)
    assert rel_err(call_flat(gm, x2), m(x2)) < 1e-5


def test_add_of_a_runtime_tensor_is_not_fused():
    class RuntimeBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x, b):
            return self.lin(x) + b

    m = RuntimeBias().eval()
    x, b = torch.randn(3, 4), torch.randn(3, 4)
    gm, pm, _ = run_passes(m, (x, b), [FuseLinearBias()])
    assert pm.records[0].stats == {} and count(gm, aten.add.Tensor) == 1
    assert torch.equal(call_flat(gm, x, b), m(x, b))
