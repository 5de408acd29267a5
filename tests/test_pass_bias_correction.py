"""Bias correction (lowbit/passes/bias_correction.py): the mean output shift of the weights' rounding, exactly.

Tolerances: the shift formula against a brute-force mean of the error's output, 1e-9 relative (float64); on a
compiled model, the mean output error over the calibration rows falls to under a fifth of the uncorrected one
(what remains is the activations' rounding, zero-mean up to the calibration sample).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.passes.bias_correction import output_shift


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_output_shift_is_the_mean_of_the_errors_output(groups):
    g = torch.Generator().manual_seed(0)
    error = torch.randn(16, 16 // groups, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(5, 16, 9, 11, generator=g, dtype=torch.float64) + torch.linspace(-2, 2, 16)[:, None, None]
    brute = nn.functional.conv2d(x, error, groups=groups).mean((0, 2, 3))  # no padding: every window is whole
    # the window sees the input's channel means at every tap: the same as the mean over the valid positions up to
    # the borders; without padding and with a per-channel constant shift the two agree exactly on the mean input
    mean = x.mean((0, 2, 3))
    assert torch.allclose(output_shift(error, mean, groups), nn.functional.conv2d(
        mean.view(1, 16, 1, 1).expand(1, 16, 3, 3), error, groups=groups).flatten(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(output_shift(error, mean, groups), brute, rtol=0.05, atol=0.05 * float(brute.abs().max()))
    lin = torch.randn(8, 16, generator=g, dtype=torch.float64)
    rows = torch.randn(100, 16, generator=g, dtype=torch.float64) + 1.0
    assert torch.allclose(output_shift(lin, rows.mean(0)), (rows @ lin.t()).mean(0), rtol=1e-9, atol=1e-12)


def _mean_error(model, q, batches):
    with torch.no_grad():
        return torch.cat([q(*b) - model(*b) for b in batches]).mean(0).abs().max()


def test_corrected_linear_has_no_mean_output_shift_and_the_artifact_reapplies_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(64, 64, generator=g) + 3.0,) for _ in range(4)]  # inputs far from zero mean
    cfg = dict(target_sqnr_db=None, smoothquant=False)
    plain = lowbit.compile(model, cal[0], calibration=cal, progress=False,
                           config=lowbit.QuantConfig(bias_correction=False, **cfg))
    fixed = lowbit.compile(model, cal[0], calibration=cal, progress=False, config=lowbit.QuantConfig(**cfg))
    assert fixed.report.passes and set(fixed.report.sections["bias_correction"]) == {"0", "2"}
    before, after = _mean_error(model, plain, cal), _mean_error(model, fixed, cal)
    assert after < 0.2 * before, (float(after), float(before))
    fixed.save(tmp_path / "a")
    again = lowbit.load(tmp_path / "a", model=model)
    x = cal[0][0]
    assert torch.equal(again(x), fixed(x))
