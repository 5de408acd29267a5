"""The CNN benchmark: a small ResNet trained here on scikit-learn's digits, then every CPU engine.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, 0..16), scaled to [0, 1], normalised, upsampled
to 32x32 with bilinear interpolation; a fixed split (``TEST_SIZE`` images, stratified, seed 0) so the test
set is a whole number of batches of 32. Training: Adam, fixed seed, a few epochs; FP32 test accuracy
must reach 97 % (checked and printed). Rows score top-1 accuracy on the whole test split; calibration
batches come from the training split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from harness import BuildContext, RowSpec
from peers import DEFAULT_LOWBIT_ROWS, LowbitRow, Workload, standard_rows
from torch import nn

BATCH = 32
TEST_SIZE = 384  # 12 batches of 32
MIN_ACCURACY = 0.97


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
    """conv, BN, ReLU, residual adds, pooling, dropout and a linear head (as tests/models.py)."""

    def __init__(self, in_ch: int = 1, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.layer3 = Block(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> scale the input's channels."""

    def __init__(self, ch: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + hardswish, squeeze-excite,
    1x1 project + BN, and a residual add when the shapes allow."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int = 1, se: bool = True) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False),
                                nn.BatchNorm2d(expand), nn.Hardswish())
        self.se = SqueezeExcite(expand, max(8, expand // 4)) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


#: (expand channels, output channels, stride, squeeze-excite) per inverted-residual block
MOBILENET_BLOCKS = ((64, 24, 2, False), (72, 24, 1, False), (96, 40, 2, True), (120, 40, 1, True),
                    (160, 48, 1, True), (192, 48, 1, True), (288, 96, 2, True), (384, 96, 1, True))


class MobileNet(nn.Module):
    """A MobileNetV2/V3-style net: stem conv (stride 2) + BN + hardswish, inverted residual blocks, a 1x1 conv
    + BN + hardswish, global average pool and a linear head."""

    def __init__(self, in_ch: int = 1, classes: int = 10, stem: int = 16,
                 blocks: Sequence[tuple[int, int, int, bool]] = MOBILENET_BLOCKS, last: int = 256) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.Hardswish())
        layers, cin = [], stem
        for expand, cout, stride, se in blocks:
            layers.append(InvertedResidual(cin, expand, cout, stride, se))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.last = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics for a random-weight model (the speed workload; the tests' models, so
    folding is really tested), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(size: int = 32, test_size: int = TEST_SIZE, seed: int = 0) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=d.target)
    return DigitsData(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te])


def make_model(arch: str = "resnet", width: int = 16) -> nn.Module:
    """``resnet``: SmallResNet; ``mobilenet``: MobileNet (both for the 1-channel digits)."""
    if arch == "resnet":
        return SmallResNet(width=width)
    if arch == "mobilenet":
        return MobileNet(in_ch=1)
    raise ValueError(f"unknown CNN architecture {arch!r}")


def train(data: DigitsData, *, epochs: int = 5, width: int = 16, seed: int = 0, lr: float = 3e-3,
          arch: str = "resnet", log=print) -> tuple[nn.Module, float]:
    """Adam, batch 32, fixed seed; returns the eval-mode model and its FP32 test accuracy."""
    torch.manual_seed(seed)
    model = make_model(arch, width).to(memory_format=torch.channels_last)  # faster conv backward on CPU
    x_train = data.x_train.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(data.y_train) // BATCH))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(data.y_train), generator=g)
        for i in range(0, len(perm), BATCH):
            j = perm[i:i + BATCH]
            loss = nn.functional.cross_entropy(model(x_train[j]), data.y_train[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model.eval(), data)
        log(f"  epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, FP32 test top-1 {100 * acc:.2f} %")
    log(f"  trained in {time.perf_counter() - t0:.1f} s")
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, accuracy(model, data)


def accuracy(fn, data: DigitsData) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.y_test), BATCH):
            correct += int((fn(data.x_test[i:i + BATCH]).argmax(-1) == data.y_test[i:i + BATCH]).sum())
    return correct / len(data.y_test)


def batches(x: torch.Tensor, n: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = [{"x": x[i:i + BATCH]} for i in range(0, len(x) - BATCH + 1, BATCH)]
    return out if n is None else out[:n]


def workload(model: nn.Module, name: str = "cnn") -> Workload:
    return Workload(
        name=name,
        model=model,
        input_names=["x"],
        output=lambda o: o,
        export_module=lambda: model,
        onnx_dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}},
        ort_optimizer=None,
        nncf_model_type=None,
        lowbit_dynamic_shapes=None,
    )


def setup(*, quick: bool, n_cal: int, epochs: int | None = None, arch: str = "resnet", seed: int = 0,
          log=print) -> dict[str, Any]:
    """Data, trained model, calibration/test batches and the scoring function (top-1 and the SQNR of the row's
    logits against FP32 eager's). ``seed`` draws the train/test split and the training run (0: the main table)."""
    data = load_data(seed=seed)
    model, acc = train(data, epochs=epochs or 5, arch=arch, seed=seed, log=log)
    log(f"{arch} FP32 test top-1: {100 * acc:.2f} % on {len(data.y_test)} test images")
    if acc < MIN_ACCURACY and not quick:
        raise RuntimeError(f"CNN FP32 accuracy {acc:.4f} < {MIN_ACCURACY}: the training recipe regressed")
    test = batches(data.x_test)
    labels = [data.y_test[i * BATCH:(i + 1) * BATCH] for i in range(len(test))]

    with torch.no_grad():
        ref = [model(**b) for b in test]

    def score(fn) -> dict[str, float]:
        outs = [fn(b).float() for b in test]
        correct = sum(int((o.argmax(-1) == y).sum()) for o, y in zip(outs, labels, strict=True))
        return {"top1": correct / sum(len(y) for y in labels), "sqnr_db": sqnr_db(ref, outs)}

    return {"data": data, "model": model, "fp32_top1": acc, "cal": batches(data.x_train, n_cal), "test": test,
            "score": score}


def sqnr_db(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) over all batches (the FP32 eager logits are ``ref``)."""
    r, o = torch.cat([t.flatten() for t in ref]).double(), torch.cat([t.flatten() for t in out]).double()
    noise = float(((r - o) ** 2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(float((r ** 2).sum()) / noise)


def specs(model: nn.Module, *, threads: int, n_cal: int,
          lowbit_rows: Sequence[LowbitRow] = DEFAULT_LOWBIT_ROWS, name: str = "cnn") -> list[RowSpec]:
    # quantize_dynamic only quantizes MatMul/Gemm-like ops: it does not apply to a conv net
    return standard_rows(workload(model, name), threads=threads, n_cal=n_cal, lowbit_rows=lowbit_rows,
                         dynamic_quant=False)


def context(cal, example, workdir, threads, stages) -> BuildContext:
    return BuildContext(calibration=cal, example=example, workdir=workdir, threads=threads, stages=stages)
