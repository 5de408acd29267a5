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


def _cnn():
    """benchmarks/cnn.py, where the CNN building blocks live (imported on first use: it pulls in the benchmark
    harness)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cnn

    return cnn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is really tested (benchmarks/cnn.py's)."""
    return _cnn().randomize_bn(model, seed)


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


class TinyMobileNet(nn.Module):
    """A MobileNetV2/V3-style CNN: conv stem + BN + hardswish, two inverted residual blocks (the first with a
    residual add), global average pooling and a linear head."""

    def __init__(self, in_ch: int = 3, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish())
        block = _cnn().InvertedResidual  # 1x1 expand x4 + ReLU6, depthwise + hardswish, squeeze-excite, project
        self.b1 = block(width, 4 * width, width)
        self.b2 = block(width, 4 * width, 24, stride=2)
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def tiny_mobilenet(seed: int = 0) -> nn.Module:
    """benchmarks/cnn.py's MobileNet cut to two inverted-residual blocks (the second with squeeze-excite and a
    residual add), 3 input channels, random weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    model = _cnn().MobileNet(in_ch=3, stem=16, blocks=((32, 16, 1, False), (48, 16, 1, True)), last=32)
    return randomize_bn(model, seed)


def mobilenet_cal(n: int = 4) -> list[tuple[torch.Tensor]]:
    """``n`` seeded calibration batches of 4 x 3 x 32 x 32 for tiny_mobilenet."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(n)]
