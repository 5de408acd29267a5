"""Quantization parameter math: the oracle for passes, ONNX output and kernels.

Affine quantization maps a real x to an integer q in [qmin, qmax]:

    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    x' = (q - zero_point) * scale

Symmetric specs fix zero_point = 0 and scale = absmax / qmax (with ``signed_scale``: the value of largest
magnitude divided by qmin, so it lands exactly on the most negative code, as llama.cpp's Q4_0). Asymmetric specs stretch [min(lo, 0),
max(hi, 0)] over the whole integer range, so 0.0 is exactly representable (padding and ReLU zeros stay
exact). A zero or constant range gives scale = EPS (finite, positive), never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed.*

from lowbit.runtime.spec import QuantSpec

EPS = float(torch.finfo(torch.float32).eps)
PER_TOKEN_EPS = 1e-5  # quantized_decomposed.choose_qparams_per_token clamps absmax at 1e-5


def choose_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) from an observed range; vectors for per-channel ranges."""
    min_val = torch.as_tensor(min_val, dtype=torch.float64)
    max_val = torch.as_tensor(max_val, dtype=torch.float64)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if spec.symmetric and spec.signed_scale:
        # the value of largest magnitude lands on qmin: scale = that value / qmin, negative for a positive one
        signed = torch.where(-min_neg >= max_pos, min_neg, max_pos)
        scale = signed / spec.qmin
        magnitude = torch.clamp(scale.abs(), min=EPS)
        scale = torch.where(scale < 0, -magnitude, magnitude)
        return scale.to(torch.float32), torch.zeros_like(scale).to(torch.int32)
    if spec.symmetric:
        # assumes a signed dtype (checked by QuantSpec); qmax is the largest positive code
        amax = torch.maximum(-min_neg, max_pos)
        scale = amax / spec.qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (max_pos - min_neg) / float(spec.qmax - spec.qmin)
        scale = torch.clamp(scale, min=EPS)
        zero_point = spec.qmin - torch.round(min_neg / scale)
        zero_point = torch.clamp(zero_point, spec.qmin, spec.qmax)
    scale = torch.clamp(scale, min=EPS)
    return scale.to(torch.float32), zero_point.to(torch.int32)


def _bcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of x."""
    if t.ndim == 0 or axis is None:
        return t
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float -> integer codes (stored as int8 / uint8; int4 codes are stored unpacked in int8)."""
    axis = spec.axis if spec.granularity == "per_channel" else None
    s = _bcast(torch.as_tensor(scale, dtype=torch.float32), x, axis)
    z = _bcast(torch.as_tensor(zero_point, dtype=torch.int32), x, axis)
    q = torch.clamp(torch.round(x.float() / s) + z, spec.qmin, spec.qmax)
    return q.to(torch.uint8 if spec.dtype == "uint8" else torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    axis = spec.axis if spec.granularity == "per_channel" else None
    s = _bcast(torch.as_tensor(scale, dtype=torch.float32), q, axis)
    z = _bcast(torch.as_tensor(zero_point, dtype=torch.int32), q, axis)
    return (q.to(torch.int32) - z).float() * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec).to(x.dtype)


def fake_quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """The numbers of ``torch.fake_quantize_per_tensor_affine`` (``x * float32(1 / scale)``, rounded half to
    even), in place on one temporary: about 5x faster on CPU, where that op also builds a gradient mask."""
    inv = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))
    y = x * inv
    return y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(float(scale))


# --------------------------------------------------------------------------------------------------
# Weights: symmetric or asymmetric, per tensor / per output channel / per group along the input axis
# --------------------------------------------------------------------------------------------------


def weight_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max of a weight at the spec's granularity (per group: shape [out, in // group])."""
    w = w.detach().float()
    if spec.granularity == "per_tensor":
        return w.min(), w.max()
    if spec.granularity == "per_channel":
        flat = w.transpose(0, spec.axis or 0).reshape(w.shape[spec.axis or 0], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values
    if spec.granularity == "per_group":
        g = _grouped(w, spec)
        return g.min(dim=-1).values, g.max(dim=-1).values
    raise ValueError(f"weights cannot be quantized {spec.granularity}")


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # assumes groups run along the last axis and the weight is 2-D [out, in] (a linear)
    gs = int(spec.group_size or 0)
    if w.ndim != 2 or w.shape[1] % gs:
        raise ValueError(
            f"group-wise quantization needs a 2-D weight whose input size is a multiple of the group size "
            f"{gs}; got shape {tuple(w.shape)}"
        )
    return w.reshape(w.shape[0], w.shape[1] // gs, gs)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight with its own min/max: returns (codes, scale, zero_point)."""
    lo, hi = weight_range(w, spec)
    scale, zp = choose_qparams(lo, hi, spec)
    return weight_codes(w, scale, zp, spec), scale, zp


def weight_codes(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A weight's integer codes under given qparams (per tensor, per channel or per group)."""
    if spec.granularity == "per_group":
        g = _grouped(w.detach().float(), spec)
        q = torch.clamp(torch.round(g / scale[..., None]) + zero_point[..., None], spec.qmin, spec.qmax)
        return q.reshape(w.shape).to(torch.uint8 if spec.dtype.startswith("u") else torch.int8)
    return quantize(w.detach(), scale, zero_point, spec)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "per_group":
        g = _grouped(q.to(torch.int32), spec)
        return ((g - zero_point[..., None]).float() * scale[..., None]).reshape(q.shape)
    return dequantize(q, scale, zero_point, spec)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per token (per row of the last axis): codes and scales [..., 1].

    scale = max(absmax(row), 1e-5) / 127 (the quantized_decomposed convention); codes in [-128, 127].
    """
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=PER_TOKEN_EPS) / 127.0
    q = torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)
    return q, scale


def llm_int8_split(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s outlier decomposition: (inliers, outliers), ``x = inliers + outliers``; the outliers are the
    input columns (last axis) where any |x| over all tokens exceeds ``threshold``."""
    mask = x.detach().abs().amax(dim=tuple(range(x.ndim - 1))) > threshold
    outliers = x * mask.to(x.dtype)
    return x - outliers, outliers


def fake_quantize_llm_int8(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-token int8 on the inlier columns, the outlier columns exact (the reference of ``w8a8_llm_int8``)."""
    inliers, outliers = llm_int8_split(x, threshold)
    q, scale = quantize_per_token(inliers)
    return (q.float() * scale).to(x.dtype) + outliers


# --------------------------------------------------------------------------------------------------
# Error metrics
# --------------------------------------------------------------------------------------------------


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - test|^2); inf if equal."""
    ref = reference.detach().double().flatten()
    return sqnr_db(ref.pow(2).sum().item(), (ref - test.detach().double().flatten()).pow(2).sum().item())


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) from summed energies (inf with no noise, -inf with no signal)."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(reference: torch.Tensor, test: torch.Tensor) -> float:
    a = reference.detach().double().flatten()
    b = test.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
