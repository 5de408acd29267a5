"""The ``lowbit::`` custom ops a target="triton" graph calls; each wraps one Triton host wrapper.

=================================  ===============================================================
op                                 runs
=================================  ===============================================================
``lowbit::quantize_per_token``     ``kernels.quantize_per_token``: x -> (int8 codes, scale per row)
``lowbit::quantize_per_tensor_int8``  torch ops (elementwise, no kernel): static codes recentred to
                                   int8, the per-tensor scale broadcast to one per row
``lowbit::w8a8_linear``            ``kernels.w8a8_gemm.w8a8_linear``: int8 x int8 GEMM, scales and
                                   bias in the epilogue
``lowbit::weight_only_linear``     ``kernels.weight_only_gemm.weight_only_linear``: W8A16 / W4A16
``lowbit::llm_int8_linear``        ``kernels.llm_int8.llm_int8_linear``: LLM.int8() (the two kernels
                                   above on the inlier columns, the outlier columns in float)
=================================  ===============================================================

The kernels take 2-D operands; these ops reshape ``[..., K]`` inputs to ``[M, K]`` around the kernel
call and the result back to ``[..., N]``. Triton itself is imported on the first call (the kernel
modules read ``TRITON_INTERPRET`` then), so registering the ops does not need it. Each op has a fake
(meta) implementation, so graphs holding them can be traced again.
"""

from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

import lowbit.runtime.qparams  # noqa: F401  registers torch.ops.quantized_decomposed.*

Tensor = torch.Tensor


def _rows(x: Tensor) -> Tensor:
    """``[..., K]`` -> contiguous ``[M, K]``, the layout every kernel takes."""
    return x.reshape(-1, x.shape[-1]).contiguous()


# --------------------------------------------------------------------------------------------------
# Activation quantizers
# --------------------------------------------------------------------------------------------------


@custom_op("lowbit::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 per token: ``scale = max(absmax(row), 1e-5) / 127``, ``q = round(x / scale)``.

    Returns ``(q int8 [..., K], scale float32 [...])``.
    """
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)
    from lowbit.kernels.quantize_per_token import quantize_per_token as kernel

    q, scale = kernel(_rows(x))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


@register_fake("lowbit::quantize_per_token")
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def int8_offset(quant_min: int) -> int:
    """What static codes are shifted by to fit int8: 128 for unsigned codes (0..255), 0 for signed."""
    return 128 if quant_min >= 0 else 0


@custom_op("lowbit::quantize_per_tensor_int8", mutates_args=())
def quantize_per_tensor_int8(x: Tensor, scale: float, zero_point: int, quant_min: int,
                             quant_max: int) -> tuple[Tensor, Tensor]:
    """Static per-tensor quantization in the W8A8 GEMM's operand format.

    ``q = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)`` exactly as
    ``quantized_decomposed.quantize_per_tensor`` computes it, then ``a = q - offset`` as int8 (offset
    ``int8_offset(quant_min)``: 128 for uint8 codes) and the scale repeated once per row. The GEMM then
    computes ``sum_k (q - offset) * w``; the caller's bias carries ``scale * w_scale * (offset -
    zero_point) * sum_k w`` so the result is ``sum_k (q - zero_point) * w`` scaled, as dequantized.
    Returns ``(a int8 [..., K], scale float32 [...])``.
    """
    dtype = torch.uint8 if quant_min >= 0 else torch.int8
    q = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)
    a = (q.to(torch.int16) - int8_offset(quant_min)).to(torch.int8)
    return a, torch.full(x.shape[:-1], scale, dtype=torch.float32, device=x.device)


@register_fake("lowbit::quantize_per_tensor_int8")
def _(x: Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# GEMMs
# --------------------------------------------------------------------------------------------------


@custom_op("lowbit::w8a8_linear", mutates_args=())
def w8a8_linear(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """``(a @ w.T) * a_scale[..., None] * w_scale + bias``: int8 ``a [..., K]``, scale per row ``[...]``,
    int8 ``w [N, K]`` with ``w_scale float32 [N]``; exact int32 accumulation, float32 epilogue."""
    n = w.shape[0]
    if a.numel() == 0:
        return torch.zeros((*a.shape[:-1], n), dtype=out_dtype, device=a.device)
    from lowbit.kernels.w8a8_gemm import w8a8_linear as kernel

    y = kernel(_rows(a), w, a_scale.reshape(-1).contiguous(), w_scale, bias, out_dtype=out_dtype)
    return y.reshape(*a.shape[:-1], n)


@register_fake("lowbit::w8a8_linear")
def _(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
      out_dtype: torch.dtype) -> Tensor:
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=out_dtype)


@custom_op("lowbit::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                       bits: int, group_size: int) -> Tensor:
    """``x @ ((q - z) * s).T + bias`` with the weight dequantized group-wise inside the kernel.

    ``qweight`` is int8 ``[N, K]`` (8 bit, signed), uint8 ``[N, K]`` (8 bit with ``zeros``) or packed
    uint8 ``[N, K // 2]`` (4 bit); ``scales`` / ``zeros`` are ``[N, K // group_size]``.
    """
    n = qweight.shape[0]
    if x.numel() == 0:
        return torch.zeros((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    from lowbit.kernels.weight_only_gemm import weight_only_linear as kernel

    y = kernel(_rows(x), qweight, scales, zeros, bits=bits, group_size=group_size, bias=bias)
    return y.reshape(*x.shape[:-1], n)


@register_fake("lowbit::weight_only_linear")
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None, bits: int,
      group_size: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@custom_op("lowbit::llm_int8_linear", mutates_args=())
def llm_int8_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """LLM.int8(): ``kernels.llm_int8.llm_int8_linear`` -- per-token int8 GEMM on the inlier columns of ``x``
    [..., K], the outlier columns (any |x| > threshold) in float against the dequantized int8 weight."""
    n = w.shape[0]
    if x.numel() == 0:
        return torch.zeros((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    from lowbit.kernels.llm_int8 import llm_int8_linear as kernel

    y = kernel(_rows(x), w, w_scale, bias, threshold=threshold)
    return y.reshape(*x.shape[:-1], n)


@register_fake("lowbit::llm_int8_linear")
def _(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


#: the op overloads this module registers, by the kernel they run (for counting them in graphs)
OPS = {
    "quantize_per_token": torch.ops.lowbit.quantize_per_token.default,
    "quantize_per_tensor_int8": torch.ops.lowbit.quantize_per_tensor_int8.default,
    "w8a8_linear": torch.ops.lowbit.w8a8_linear.default,
    "weight_only_linear": torch.ops.lowbit.weight_only_linear.default,
    "llm_int8_linear": torch.ops.lowbit.llm_int8_linear.default,
}
