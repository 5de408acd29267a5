"""Observers: streaming state, degenerate inputs, and each calibration method's defining property."""

import math

import numpy as np
import pytest
import torch

from lowbit.runtime.observers import (
    METHODS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from lowbit.runtime.qparams import fake_quantize
from lowbit.runtime.spec import QuantSpec

ASYM = QuantSpec("uint8", False, "per_tensor")
SYM = QuantSpec("int8", True, "per_tensor")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", [ASYM, SYM])
@pytest.mark.parametrize("value", [0.0, 2.5])
def test_zero_and_constant_activations_give_finite_positive_scales(method, spec, value):
    obs = make_observer(spec, method)
    for _ in range(3):
        obs(torch.full((4, 16), value))
    scale, zp = obs.calculate_qparams()
    assert math.isfinite(scale) and scale > 0 and spec.qmin <= zp <= spec.qmax


@pytest.mark.parametrize("method", METHODS)
def test_unobserved_observer_gives_finite_scale(method):
    scale, _ = make_observer(ASYM, method).calculate_qparams()
    assert math.isfinite(scale) and scale > 0


def test_minmax_streams_exactly():
    batches = [torch.randn(8, 32) * (i + 1) for i in range(10)]
    obs = MinMaxObserver(ASYM)
    for b in batches:
        obs(b)
    allx = torch.cat(batches)
    assert obs.min_val == allx.min().item() and obs.max_val == allx.max().item()


def test_histogram_doubling_keeps_every_count_and_bounded_memory():
    obs = HistogramObserver(ASYM, bins=256)
    n = 0
    for i in range(12):
        x = torch.randn(100) * (2.0 ** i)  # the range grows ~4000x: many doublings
        obs(x)
        n += x.numel()
    assert obs.hist.sum() == pytest.approx(n)
    assert obs.hist.size == 256  # memory does not grow with batches
    assert obs.radius >= max(abs(obs.min_val), abs(obs.max_val))


def test_histogram_matches_one_shot_histogram_when_range_is_fixed():
    x = torch.randn(5000)
    obs = HistogramObserver(ASYM, bins=512)
    obs(torch.tensor([-4.0, 4.0]))
    for chunk in x.clamp(-4, 4).split(1000):
        obs(chunk)
    ref = np.histogram(torch.cat([torch.tensor([-4.0, 4.0]), x.clamp(-4, 4)]).numpy(), bins=512, range=(-4, 4))[0]
    assert np.abs(obs.hist - ref).sum() <= 4  # bin-edge rounding between histc and numpy only


def _gaussian_with_outliers(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50_000, generator=g)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 38.0, -39.0])
    return x


def test_percentile_clips_outliers():
    x = _gaussian_with_outliers()
    obs = PercentileObserver(ASYM, percentile=99.9)
    obs(x)
    lo, hi = obs.select_range()
    assert 2.5 < hi < 5.0 and -5.0 < lo < -2.5


def test_entropy_threshold_is_inside_the_outlier_range():
    x = _gaussian_with_outliers()
    obs = EntropyObserver(SYM)
    obs(x)
    lo, hi = obs.select_range()
    assert hi < 30.0 and lo == -hi


def _err(obs, x, spec):
    s, z = obs.calculate_qparams()
    return (fake_quantize(x, torch.tensor(s), torch.tensor(z), spec) - x).pow(2).mean().item()


@pytest.mark.parametrize("spec", [ASYM, SYM])
def test_mse_never_loses_to_minmax_and_wins_on_long_tails(spec):
    # a few far outliers: clipping them costs more than it saves, so MSE keeps (nearly) the full range
    x = _gaussian_with_outliers()
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse(x)
    mm(x)
    assert _err(mse, x, spec) <= _err(mm, x, spec) * 1.001
    # a long thin tail (Student-t, 2 dof): clipping wins
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((200_000,))
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse(x)
    mm(x)
    assert _err(mse, x, spec) < 0.85 * _err(mm, x, spec)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown calibration method"):
        make_observer(ASYM, "magic")
