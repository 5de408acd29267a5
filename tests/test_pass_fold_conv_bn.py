"""fold_conv_bn: conv1d/conv2d + BN and linear + BN1d fold into the weights; exact to 1e-5 relative."""

import pytest
import torch
from torch import nn

from lowbit.passes import Canonicalize, FoldConvBatchNorm

from helpers import call_flat, count, rel_err, run_passes
from models import randomize_bn

aten = torch.ops.aten
BN = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv2d(8, 6, 3, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.b3 = nn.BatchNorm1d(5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))  # [N, 8, 16]
        y = y.reshape(y.shape[0], 8, 4, 4)
        y = self.b2(self.c2(y)).mean((2, 3))
        return self.b3(self.fc(y))


def test_fold_conv_bn_folds_all_three_patterns_exactly():
    m = randomize_bn(ConvBN())
    x = torch.randn(4, 3, 16)
    gm, pm, _ = run_passes(m, (x,), [Canonicalize(), FoldConvBatchNorm()])
    assert pm.records[1].stats == {"bn_folded": 3}
    assert count(gm, *BN) == 0
    assert not any("running_mean" in n for n, _ in gm.named_buffers())  # the BN state is gone
    for batch in (2, 7):
        xb = torch.randn(batch, 3, 16)
        assert rel_err(call_flat(gm, xb), m(xb)) < 1e-5


def test_bn_after_a_shared_conv_output_is_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return self.bn(y) + y  # folding would change the second use of y

    m = randomize_bn(Shared())
    x = torch.randn(2, 3, 5, 5)
    gm, pm, _ = run_passes(m, (x,), [FoldConvBatchNorm()])
    assert pm.records[0].stats == {} and count(gm, *BN) == 1
    assert torch.allclose(call_flat(gm, x), m(x))


def test_training_mode_batch_norm_is_not_folded():
    from lowbit.passes.fold_conv_bn import fold_weights

    w, b = fold_weights(torch.ones(2, 1, 1, 1), None, torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.0]),
                        torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), 1.0)
    assert w.flatten().tolist() == [1.0, 1.0]  # 2 / sqrt(3 + 1)
    assert b.tolist() == pytest.approx([-0.5, 0.0])  # (0 - 1) * 1 + 0.5


def test_bn_after_a_one_argument_op_is_left_alone():
    # found by the random-graph differential test (tests/fuzz_regressions/): the pass read the weight
    # argument of whatever fed the BN, and a hardswish/relu has none (IndexError)
    m = randomize_bn(nn.Sequential(nn.Linear(4, 6), nn.Hardswish(), nn.BatchNorm1d(6)))
    x = torch.randn(3, 4)
    gm, pm, _ = run_passes(m, (x,), [FoldConvBatchNorm()])
    assert pm.records[0].stats == {} and count(gm, *BN) == 1
    assert torch.allclose(call_flat(gm, x), m(x))
