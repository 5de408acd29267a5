"""Issue 7, part 2: bad calibration data.

Rejected, each with a CalibrationError naming the batch (and the input) before compile() returns, so no
artifact can be written: an empty iterable or iterator, a zero-size batch, NaN, Inf, the wrong dtype,
the wrong shape, an iterable that is not one, and a generator that raises midway.

Accepted, with finite positive scales (and finite SmoothQuant factors) for every calibrator (minmax,
percentile, entropy, mse): all-zero data, constant data, and data whose first batch is all zeros. The
compiled model then follows the float model on data like its calibration data (SQNR >= MIN_SQNR_DB) and
stays finite on other data.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime.observers import METHODS
from lowbit.runtime.qparams import sqnr

from helpers import capture_cache, one_torch_thread

FEATURES = 8
ROWS = 64  # rows per calibration batch: enough for the histogram calibrators to see a distribution


class Tiny(nn.Module):
    """A conv (per-channel weights, static activations) feeding two linears through a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * FEATURES, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x.unsqueeze(1))).flatten(1)
        return self.fc2(torch.relu(self.fc1(y)))


FIGURES: Counter = Counter()
WORST: dict[str, float] = {}
#: SQNR floor vs the float model on data like the calibration data (measured: all-zero and constant
#: data >= 60 dB, first-batch-zero >= 31 dB, its worst being entropy, which clips the Gaussian tails)
MIN_SQNR_DB = 25.0


@pytest.fixture(scope="module", autouse=True)
def summary():
    """The suite's one-line summary, printed after its last test (visible with pytest -s)."""
    t0 = time.perf_counter()
    with capture_cache(), one_torch_thread():  # torch.export once per example shape: the data is what varies
        yield
    print(f"\n[calibration] bad data rejected with CalibrationError: {FIGURES['rejected']}/"
          f"{len(REJECTED) * len(CONFIGS)} ({len(REJECTED)} cases x {len(CONFIGS)} configs); degenerate data "
          f"accepted with finite scales: {FIGURES['compiles']}/{len(DEGENERATE) * len(METHODS)} "
          f"({len(DEGENERATE)} kinds x {len(METHODS)} calibrators), {FIGURES['scales checked']} activation "
          f"scales finite and > 0; worst SQNR vs float "
          f"{', '.join(f'{k} {v:.1f} dB' for k, v in WORST.items())}; "
          f"{time.perf_counter() - t0:.1f} s")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def example() -> tuple[torch.Tensor]:
    return (torch.randn(2, FEATURES),)


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ROWS, FEATURES, generator=g),) for _ in range(n)]


def with_value(i: int, value: float) -> list[tuple[torch.Tensor]]:
    out = batches(4)
    out[i][0][1, 3] = value
    return out


def raises_midway():
    yield from batches(2)
    raise OSError("the calibration shard on disk is unreadable")


# name -> (calibration, the message it must give)
REJECTED = {
    "empty list": ([], r"calibration is empty"),
    "empty iterator": (iter([]), r"calibration is empty"),
    "zero-size batch": ([(torch.randn(4, FEATURES),), (torch.randn(0, FEATURES),)],
                        r"calibration batch 1: input 'x' dim 0 \(batch\) is 0, outside the range .*: batch >= 1"),
    "NaN": (with_value(2, float("nan")), r"calibration batch 2: input 'x' contains NaN"),
    "Inf": (with_value(3, float("inf")), r"calibration batch 3: input 'x' contains Inf"),
    "-Inf": (with_value(0, float("-inf")), r"calibration batch 0: input 'x' contains Inf"),
    "wrong dtype": (batches(1) + [(torch.randn(4, FEATURES, dtype=torch.float64),)],
                    r"calibration batch 1: input 'x' has dtype float64, expected float32"),
    "integer dtype": ([(torch.ones(4, FEATURES, dtype=torch.int64),)],
                      r"calibration batch 0: input 'x' has dtype int64, expected float32"),
    "wrong shape": (batches(2) + [(torch.randn(4, FEATURES + 1),)],
                    r"calibration batch 2: input 'x' has shape \(4, 9\); dim 1 must be 8"),
    "wrong rank": ([(torch.randn(4, 2, FEATURES),)], r"calibration batch 0: input 'x' has shape \(4, 2, 8\), expected rank 2"),
    "wrong structure": ([(torch.randn(4, FEATURES), torch.randn(4, FEATURES))],
                        r"calibration batch 0: expected 1 positional inputs, got 2"),
    "not iterable": (5, r"calibration must be an iterable of batches"),
    "generator raising midway": (None, r"calibration batch 2: the calibration iterable raised OSError: the "
                                       r"calibration shard on disk is unreadable"),
}

CONFIGS = {
    # the default (SmoothQuant with a searched alpha, automatic plan) reads calibration more than once
    "default": lambda method: lowbit.QuantConfig(calibration=method),
    # without them the batches stream once, straight into the observers
    "streaming": lambda method: lowbit.QuantConfig(calibration=method, smoothquant=False, target_sqnr_db=None),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(REJECTED))
def test_bad_calibration_is_a_typed_error_before_anything_is_written(model, case, config, tmp_path, monkeypatch):
    calibration, message = REJECTED[case]
    if case == "generator raising midway":
        calibration = raises_midway()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOWBIT_DUMP_DIR", raising=False)
    out = tmp_path / "artifact"
    with pytest.raises(lowbit.CalibrationError, match=message):
        lowbit.compile(model, example(), calibration=calibration, config=CONFIGS[config]("minmax"),
                       progress=False).save(out)
    assert list(tmp_path.iterdir()) == [], "compile() wrote files before refusing its calibration data"
    FIGURES["rejected"] += 1


def _degenerate(kind: str) -> list[tuple[torch.Tensor]]:
    if kind == "all-zero":
        return [(torch.zeros(ROWS, FEATURES),) for _ in range(3)]
    if kind == "constant":
        return [(torch.full((ROWS, FEATURES), 0.75),) for _ in range(3)]
    assert kind == "first-batch-zero"
    return [(torch.zeros(ROWS, FEATURES),)] + batches(3, seed=5)


DEGENERATE = ["all-zero", "constant", "first-batch-zero"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("data", DEGENERATE)
def test_degenerate_but_valid_data_gives_finite_scales(model, data, method):
    cal = _degenerate(data)
    q = lowbit.compile(model, example(), calibration=iter(cal), config=lowbit.QuantConfig(calibration=method),
                       progress=False)
    qparams = q.state["qparams"]
    scales = {k: v for k, v in qparams.items() if k.endswith(".scale")}
    assert len(scales) >= 3, sorted(qparams)  # conv, fc1 and fc2 inputs are observed
    for k, v in qparams.items():
        assert torch.isfinite(v.double()).all(), f"{k} = {v}"
        if k.endswith((".scale", ".smooth_scale")):
            assert (v > 0).all(), f"{k} = {v}"
        if k.endswith(".zero_point"):  # uint8 activations, int8 weights
            assert ((v >= -128) & (v <= 255)).all(), f"{k} = {v}"
    like = torch.cat([b[0] for b in cal[-2:]])
    out = q(like)
    assert torch.isfinite(out).all()
    db = sqnr(model(like), out)
    assert db >= MIN_SQNR_DB, f"{data}/{method}: SQNR {db:.1f} dB on data like the calibration data"
    assert torch.isfinite(q(torch.randn(5, FEATURES) * 3)).all()
    FIGURES["compiles"] += 1
    FIGURES["scales checked"] += len(scales)
    WORST[data] = min(WORST.get(data, math.inf), db)
