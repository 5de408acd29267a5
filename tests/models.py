"""Small models the tests compile: a ResNet-style CNN and a tiny Hugging Face BERT (random weights)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


class SmallResNet(nn.Module):
    """conv, BN, ReLU, residual adds, pooling, dropout and a linear head."""

    def __init__(self, in_ch: int = 1, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def tiny_bert(seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=4 * hidden, max_position_embeddings=64)
    return BertModel(cfg).eval()


class ReluMLP(nn.Module):
    """fc1 -> ReLU -> fc2: the smallest model with a fused activation between two quantized layers."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def cnn_cal(n: int = 6) -> list[tuple[torch.Tensor]]:
    """``n`` seeded calibration batches of 8 x 1 x 16 x 16 for SmallResNet."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 16, 16, generator=g),) for _ in range(n)]


def bert_batch(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}

class ChannelOutlier(nn.Module):
    """Three linears; ``mid``'s input has one channel 200x the rest (a planted outlier): a per-tensor int8
    scale leaves the other channels a handful of levels; only a float (or w8a16) ``mid`` fixes that."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.mid, self.last = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.first.weight[0] *= 200.0
            self.first.bias[0] = 0.0
            self.mid.weight[:, 0] /= 200.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.mid(torch.relu(self.first(x)))))


class SqueezeExcite(nn.Module):
    """x * gate(fc2(relu(fc1(mean(x))))): MobileNetV3's channel gating."""

    def __init__(self, ch: int, reduce: int = 4, gate: type[nn.Module] = nn.Hardsigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(ch, ch // reduce, 1)
        self.fc2 = nn.Conv2d(ch // reduce, ch, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU6, 3x3 depthwise + BN + hardswish, squeeze-excite, 1x1 project + BN, residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4, se: bool = True) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.Hardswish())
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    """A MobileNetV2/V3-style CNN: conv stem + BN + hardswish, two inverted residual blocks (the first with a
    residual add), global average pooling and a linear head."""

    def __init__(self, in_ch: int = 3, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish())
        self.b1 = InvertedResidual(width, width)
        self.b2 = InvertedResidual(width, 24, stride=2)
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def tiny_mobilenet(seed: int = 0) -> nn.Module:
    """benchmarks/cnn.py's MobileNet cut to two inverted-residual blocks (the second with squeeze-excite and a
    residual add), 3 input channels, random weights and BatchNorm statistics, eval mode."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cnn import MobileNet
    from cnn import randomize_bn as randomize_bn2d

    torch.manual_seed(seed)
    model = MobileNet(in_ch=3, stem=16, blocks=((32, 16, 1, False), (48, 16, 1, True)), last=32)
    return randomize_bn2d(model, seed)


def mobilenet_cal(n: int = 4) -> list[tuple[torch.Tensor]]:
    """``n`` seeded calibration batches of 4 x 3 x 32 x 32 for tiny_mobilenet."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(n)]
