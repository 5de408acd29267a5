"""The qparam oracle: exact values, degenerate ranges, and agreement with the quantized_decomposed ops."""

import math

import pytest
import torch

from lowbit.runtime.qparams import (
    EPS,
    choose_qparams,
    dequantize,
    dequantize_weight,
    fake_quantize,
    fake_quantize_per_tensor,
    quantize,
    quantize_per_token,
    quantize_weight,
    sqnr,
)
from lowbit.runtime.spec import QuantSpec

qd = torch.ops.quantized_decomposed
SYM = QuantSpec("int8", True, "per_tensor", narrow=True)
ASYM = QuantSpec("uint8", False, "per_tensor")


def test_symmetric_scale_is_absmax_over_qmax():
    s, z = choose_qparams(torch.tensor(-2.54), torch.tensor(1.0), SYM)
    assert s.item() == pytest.approx(2.54 / 127, rel=1e-7) and z.item() == 0


def test_asymmetric_range_includes_zero_exactly():
    s, z = choose_qparams(torch.tensor(0.5), torch.tensor(3.0), ASYM)  # range forced to [0, 3]
    assert s.item() == pytest.approx(3.0 / 255, rel=1e-7) and z.item() == 0
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), ASYM)
    q = quantize(torch.tensor([0.0]), s, z, ASYM)
    assert dequantize(q, s, z, ASYM).item() == 0.0  # zero is exactly representable


@pytest.mark.parametrize("spec", [SYM, ASYM, QuantSpec("int8", False, "per_tensor")])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_or_zero_range_gives_finite_positive_scale(spec, value):
    s, z = choose_qparams(torch.tensor(value), torch.tensor(value), spec)
    assert math.isfinite(s.item()) and s.item() > 0
    assert spec.qmin <= z.item() <= spec.qmax
    y = fake_quantize(torch.full((4,), value), s, z, spec)
    assert torch.isfinite(y).all()
    assert y.sub(value).abs().max() <= max(s.item(), EPS)


def test_round_trip_error_is_at_most_half_a_step():
    x = torch.randn(1000)
    s, z = choose_qparams(x.min(), x.max(), ASYM)
    assert (fake_quantize(x, s, z, ASYM) - x).abs().max() <= s.item() / 2 + 1e-7


def test_per_tensor_matches_quantized_decomposed():
    x = torch.randn(64) * 3
    s, z = choose_qparams(x.min(), x.max(), ASYM)
    ours = quantize(x, s, z, ASYM)
    theirs = qd.quantize_per_tensor.default(x, float(s), int(z), 0, 255, torch.uint8)
    assert torch.equal(ours, theirs)


def test_per_channel_weight_matches_quantized_decomposed():
    w = torch.randn(8, 5) * torch.arange(1, 9).unsqueeze(1)
    spec = QuantSpec("int8", True, "per_channel", axis=0, narrow=True)
    q, s, z = quantize_weight(w, spec)
    assert q.dtype == torch.int8 and s.shape == (8,) and q.abs().max() <= 127
    ours = dequantize_weight(q, s, z, spec)
    theirs = qd.dequantize_per_channel.default(q, s, z, 0, -127, 127, torch.int8)
    assert torch.equal(ours, theirs)
    assert sqnr(w, ours) > 38  # int8 per-channel on Gaussian rows: about 40 dB


def test_group_weight_matches_quantized_decomposed_and_beats_per_channel():
    w = torch.randn(16, 256)
    w[:, 5] *= 20  # an outlier column hurts whole rows, but only one group each
    g = QuantSpec("int4", True, "per_group", group_size=64)
    q, s, z = quantize_weight(w, g)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (16, 4)
    ours = dequantize_weight(q, s, z, g)
    theirs = qd.dequantize_per_channel_group.default(q, s, z, -8, 7, torch.int8, 64, torch.float32)
    assert torch.equal(ours, theirs)
    ch = QuantSpec("int4", True, "per_channel", axis=0)
    assert sqnr(w, ours) > sqnr(w, dequantize_weight(*quantize_weight(w, ch), ch)) + 3


def test_group_size_must_divide_input_features():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(torch.randn(4, 100), QuantSpec("int4", True, "per_group", group_size=64))


def test_per_token_matches_quantized_decomposed():
    x = torch.randn(3, 7, 32)
    x[1, 2] = 0.0  # an all-zero token must not divide by zero
    q, s = quantize_per_token(x)
    s2, z2 = qd.choose_qparams_per_token.default(x, torch.int8)
    assert torch.allclose(s, s2.float())
    assert torch.equal(q, qd.quantize_per_token.default(x, s2, z2, -128, 127, torch.int8))
    assert torch.isfinite(s).all() and (s > 0).all()


def test_sqnr_values():
    x = torch.randn(1000)
    assert sqnr(x, x) == math.inf
    assert sqnr(x, x + 0.1 * x) == pytest.approx(20.0, abs=1e-6)


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="signed dtype"):
        QuantSpec("uint8", True)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec("int4", True, "per_group")


@pytest.mark.parametrize("scale,zp,qmin,qmax", [(0.05, 128, 0, 255), (0.0123456, 0, -128, 127), (1 / 3, 5, 0, 255),
                                                (7.1e-4, -3, -128, 127)])
def test_fast_fake_quantize_equals_torch_bit_for_bit(scale, zp, qmin, qmax):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 96, generator=g) * 200 * scale  # clamps at both ends
    x.view(-1)[:2048] = (torch.randint(-300, 300, (2048,), generator=g).float() + 0.5) * scale  # ties
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert torch.equal(fake_quantize_per_tensor(x, scale, zp, qmin, qmax), expected)
