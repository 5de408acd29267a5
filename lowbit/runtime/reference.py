"""Pure-PyTorch reference implementations of lowbit's kernels: the oracle.

Every Triton kernel in :mod:`lowbit.kernels` has a function here computing the same math with
plain tensor ops, in float32 (or exact integers) on any device. Tests compare kernels against these
functions, the benchmark's ``--check`` does too, and compiler passes may call them to simulate a
lowered layer without Triton. Nothing here imports Triton.

Conventions shared with the kernels (and stated once, here):

* Linear layout: activations ``x`` are ``[M, K]``, weights are ``[N, K]`` (``nn.Linear``:
  out_features x in_features), outputs are ``[M, N]``.
* Symmetric int8: ``q = clamp(round_half_even(x / s), -127, 127)``; -128 is never produced so that
  the grid is symmetric around zero.
* Group-wise weights: the group runs along K; scales are ``[N, K // group_size]``; a group size of
  ``K`` means one scale per output channel. Dequantisation is ``w = (q - z) * s`` in float32.
* Asymmetric weights store unsigned codes (``uint8``: 0..255 for 8 bit, 0..15 for 4 bit) and
  ``uint8`` zero points shaped like the scales; symmetric weights store signed codes in ``int8``
  (-127..127 for 8 bit, -8..7 for 4 bit) and have no zero points.
* int4 packing: two codes per byte along K, low nibble = even k:
  ``byte = (q[2i] & 0xF) | (q[2i + 1] << 4)``; packed tensors are ``uint8 [N, K // 2]``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_GROUP_SIZES",
    "apply_activation",
    "dequantize_groupwise",
    "int8_gemm_ref",
    "llm_int8_linear_ref",
    "outlier_columns",
    "pack_int4",
    "quantize_per_channel_ref",
    "quantize_per_token_ref",
    "quantize_weight_groupwise",
    "unpack_int4",
    "w8a8_linear_ref",
    "weight_only_linear_ref",
]

SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
"""Group sizes along K for weight-only quantisation; ``K`` itself (per channel) is also accepted."""

ACTIVATIONS: tuple[str | None, ...] = (None, "relu", "gelu")
"""Epilogue activations; ``"gelu"`` is the exact erf form, not the tanh approximation."""

INT8_QMAX = 127
# floor on a row's absmax so an all-zero row gets a finite scale; 1e-5 as in torch's
# quantized_decomposed.choose_qparams_per_token and lowbit.runtime.qparams.quantize_per_token
PER_TOKEN_EPS = 1e-5
_FP16_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal): a zero scale would divide by zero


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_group_size(k: int, group_size: int) -> None:
    _require(
        group_size in SUPPORTED_GROUP_SIZES or group_size == k,
        f"group_size: expected one of {SUPPORTED_GROUP_SIZES} or K={k} (per channel), got {group_size}",
    )
    _require(k % group_size == 0, f"K: expected a multiple of group_size={group_size}, got {k}")


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Apply an epilogue activation in the tensor's dtype (float32 in the references)."""
    if activation is None:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return 0.5 * y * (1.0 + torch.erf(y * (1.0 / math.sqrt(2.0))))
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------------------------
# int8 x int8 GEMM (kernel: lowbit.kernels.w8a8_gemm)
# ----------------------------------------------------------------------------------------------
def int8_gemm_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` for int8 ``a [M, K]`` and ``w [N, K]``, returned as int32 ``[M, N]``.

    On CPU the product is an int64 matmul. CUDA has no integer matmul, so there it is a float64
    matmul, which is still exact: every product is an integer with ``|.| <= 2**14`` and every
    partial sum an integer below ``K * 2**14 < 2**53``, so no rounding happens in any order.
    """
    _require(
        a.dtype == torch.int8 and w.dtype == torch.int8, f"expected int8 inputs, got {a.dtype}, {w.dtype}"
    )
    _require(a.dim() == 2 and w.dim() == 2 and a.shape[1] == w.shape[1], f"bad shapes {a.shape}, {w.shape}")
    # assumes K * 128 * 128 < 2**31, i.e. K < 131072, so the int32 accumulator cannot overflow
    _require(a.shape[1] < 2**17, f"K={a.shape[1]} could overflow an int32 accumulator")
    if a.device.type == "cpu":
        return (a.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32)
    return (a.to(torch.float64) @ w.to(torch.float64).T).to(torch.int32)


def w8a8_linear_ref(
    a_q: torch.Tensor,
    w_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``act(acc * a_scale[m] * w_scale[n] + bias[n])`` with ``acc = a_q @ w_q.T`` in int32.

    The epilogue runs in float32 in exactly the kernel's order (``(acc * a_scale) * w_scale``) and
    is rounded to ``out_dtype`` once at the end.
    """
    # assumes symmetric quantization (no zero points) for both operands
    acc = int8_gemm_ref(a_q, w_q).to(torch.float32)
    y = acc * a_scale.to(torch.float32)[:, None] * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return apply_activation(y, activation).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Dynamic per-token quantisation (kernel: lowbit.kernels.quantize_per_token)
# ----------------------------------------------------------------------------------------------
def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row of ``x [M, K]``.

    ``scale[m] = max(absmax(x[m]), 1e-5) / 127`` and ``q = clamp(round_half_even(x / scale), -127,
    127)``, computed in float32 with correctly rounded division. Returns ``(q int8 [M, K], scale
    float32 [M])``.
    """
    # assumes symmetric quantization; assumes axis == 0 (one scale per row / token)
    _require(
        x.dim() == 2 and x.is_floating_point(), f"expected a 2-D float tensor, got {x.dtype} {tuple(x.shape)}"
    )
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=1).clamp(min=PER_TOKEN_EPS) / INT8_QMAX
    q = torch.round(xf / scale[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)  # round: half to even
    return q, scale


def quantize_per_channel_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each output channel (row) of a weight ``w [N, K]``.

    Same math as :func:`quantize_per_token_ref` (a weight row is to N what a token is to M); this
    is the weight format ``w8a8_linear`` and ``llm_int8_linear`` expect: ``int8 [N, K]`` and a
    float32 scale ``[N]``.
    """
    return quantize_per_token_ref(w)


# ----------------------------------------------------------------------------------------------
# Group-wise weight quantisation, int4 packing (kernel: lowbit.kernels.weight_only_gemm)
# ----------------------------------------------------------------------------------------------
def quantize_weight_groupwise(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantise ``w [N, K]`` to ``bits`` (8 or 4) with one scale per ``group_size`` run along K.

    Returns ``(q [N, K], scales float16 [N, K // group_size], zeros)``:

    * symmetric: ``s = absmax / qmax`` (qmax 127 or 7), ``q = clamp(round(w / s), -qmax - 1,
      qmax)`` stored as int8, ``zeros = None``;
    * asymmetric: the range ``[min(w, 0), max(w, 0)]`` maps onto ``0 .. 2**bits - 1``;
      ``s = (hi - lo) / qmax``, ``z = clamp(round(-lo / s), 0, qmax)``, ``q = clamp(round(w / s) +
      z, 0, qmax)``; q and zeros are uint8.

    ``group_size=None`` means per channel (``group_size = K``). The scale is rounded to float16
    *before* q is computed so that ``dequantize_groupwise`` inverts the rounding with the very scale
    it will use. 4-bit codes come back unpacked; pass them through :func:`pack_int4` for the kernel.
    """
    _require(bits in (4, 8), f"bits: expected 4 or 8, got {bits}")
    _require(
        w.dim() == 2 and w.is_floating_point(), f"expected a 2-D float weight, got {w.dtype} {tuple(w.shape)}"
    )
    n, k = w.shape
    group_size = k if group_size is None else group_size
    _check_group_size(k, group_size)

    wg = w.to(torch.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (wg.abs().amax(dim=2) / qmax).clamp(min=_FP16_MIN_SCALE).to(torch.float16)
        s = scale.to(torch.float32)[:, :, None]
        q = torch.round(wg / s).clamp(-qmax - 1, qmax).to(torch.int8)
        return q.reshape(n, k), scale, None

    qmax = 2**bits - 1
    lo = wg.amin(dim=2).clamp(max=0.0)
    hi = wg.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=_FP16_MIN_SCALE).to(torch.float16)
    s = scale.to(torch.float32)
    zero = torch.round(-lo / s).clamp(0, qmax)
    q = (torch.round(wg / s[:, :, None]) + zero[:, :, None]).clamp(0, qmax).to(torch.uint8)
    return q.reshape(n, k), scale, zero.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: ``byte = (q[2i] & 0xF) | (q[2i+1] << 4)``.

    ``q`` is int8 with values in -8..7 (symmetric) or uint8 with values in 0..15 (asymmetric);
    the last dimension must be even. Returns uint8 with half the last dimension.
    """
    _require(q.shape[-1] % 2 == 0, f"last dim: expected an even size, got {q.shape[-1]}")
    if q.dtype == torch.int8:
        _require(bool(((q >= -8) & (q <= 7)).all()), "int8 codes must lie in -8..7 to pack as int4")
    elif q.dtype == torch.uint8:
        _require(bool((q <= 15).all()), "uint8 codes must lie in 0..15 to pack as uint4")
    else:
        raise ValueError(f"q.dtype: expected int8 or uint8, got {q.dtype}")
    q16 = q.to(torch.int16) & 0xF  # two's-complement low nibble for negative codes
    return (q16[..., 0::2] | (q16[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K // 2]`` -> codes ``[..., K]``.

    ``signed=True`` sign-extends each nibble (``(v ^ 8) - 8``) and returns int8 in -8..7;
    ``signed=False`` returns uint8 in 0..15.
    """
    _require(packed.dtype == torch.uint8, f"packed.dtype: expected uint8, got {packed.dtype}")
    p16 = packed.to(torch.int16)
    codes = torch.stack((p16 & 0xF, p16 >> 4), dim=-1).flatten(-2)  # low nibble first = even k
    if signed:
        return ((codes ^ 8) - 8).to(torch.int8)
    return codes.to(torch.uint8)


def dequantize_groupwise(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]`` in float32, for *unpacked* codes."""
    _require(q.dim() == 2 and scales.dim() == 2, f"expected 2-D q and scales, got {q.shape}, {scales.shape}")
    n, k = q.shape
    _check_group_size(k, group_size)
    _require(
        tuple(scales.shape) == (n, k // group_size),
        f"scales: expected {(n, k // group_size)}, got {tuple(scales.shape)}",
    )
    qg = q.to(torch.float32).reshape(n, k // group_size, group_size)
    if zeros is not None:
        _require(
            zeros.shape == scales.shape, f"zeros: expected {tuple(scales.shape)}, got {tuple(zeros.shape)}"
        )
        qg = qg - zeros.to(torch.float32)[:, :, None]
    return (qg * scales.to(torch.float32)[:, :, None]).reshape(n, k)


def weight_only_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequantize(qweight).T + bias`` in float32, rounded to ``x.dtype``.

    ``qweight`` is in the kernel's storage format: ``[N, K]`` codes for 8 bit, packed ``uint8
    [N, K // 2]`` for 4 bit (signed nibbles when ``zeros is None``).
    """
    if bits == 4:
        q = unpack_int4(qweight, signed=zeros is None)
    elif bits == 8:
        q = qweight
    else:
        raise ValueError(f"bits: expected 4 or 8, got {bits}")
    w = dequantize_groupwise(q, scales, zeros, group_size)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# LLM.int8() mixed decomposition (kernel: lowbit.kernels.llm_int8)
# ----------------------------------------------------------------------------------------------
def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted int64 indices of the columns of ``x [M, K]`` holding any ``|x| > threshold``."""
    return torch.nonzero((x.abs() > threshold).any(dim=0)).flatten()


def llm_int8_linear_ref(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: float = 6.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLM.int8(): outlier columns of ``x`` in float, everything else in int8.

    ``y = W8A8(x_in) + x[:, O] @ W[:, O].T`` where ``O`` are the outlier columns, ``x_in`` is ``x``
    with those columns zeroed (so they neither contribute nor inflate the per-token scales),
    ``W8A8`` is per-token int8 activations times per-channel int8 weights (``w_q [N, K]``,
    ``w_scale float32 [N]``) and ``W[:, O]`` is ``weight`` when given, else ``w_q * w_scale``.
    Both parts and the bias are summed in float32 and rounded to ``x.dtype`` once.
    """
    # assumes symmetric quantization of both x (per token) and the weight (per output channel)
    cols = outlier_columns(x, threshold)
    x_in = x.clone()
    x_in[:, cols] = 0
    a_q, a_scale = quantize_per_token_ref(x_in)
    y = w8a8_linear_ref(a_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    if cols.numel() > 0:
        if weight is not None:
            w_out = weight[:, cols].to(torch.float32)
        else:
            w_out = w_q[:, cols].to(torch.float32) * w_scale.to(torch.float32)[:, None]
        y = y + x[:, cols].to(torch.float32) @ w_out.T
    return y.to(x.dtype)
