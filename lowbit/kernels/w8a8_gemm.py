"""W8A8 GEMM: int8 activations x int8 weights with a fused dequantising epilogue.

    acc[m, n] = sum_k A[m, k] * W[n, k]                       (int8 x int8 -> exact int32)
    out[m, n] = act(acc[m, n] * a_scale[m] * w_scale[n] + bias[n])   (float32, then out dtype)

``A`` is ``int8 [M, K]`` (per-token scales ``a_scale float32 [M]``), ``W`` is ``int8 [N, K]`` in
``nn.Linear`` layout (per-channel scales ``w_scale float32 [N]``); ``act`` is none, ReLU or the
exact (erf) GELU. Keeping the scales out of the K loop is what makes this fast: the inner loop is
a pure int8 tensor-core MMA and dequantisation costs one multiply per output element.

``int8_gemm`` runs the same kernel with the epilogue switched off and returns the int32
accumulator, so the integer part can be checked for exact equality against
:func:`lowbit.runtime.reference.int8_gemm_ref`.
"""

from __future__ import annotations

import torch

from lowbit.kernels import (
    KernelInputError,
    check_launchable,
    check_tensor,
    import_triton,
    use_single_config,
)
from lowbit.runtime.reference import ACTIVATIONS

triton, tl = import_triton()

__all__ = ["int8_gemm", "w8a8_linear"]

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACTIVATION_CODE = {None: 0, "relu": 1, "gelu": 2}
_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), for the erf form of GELU

# One small config for the interpreter / CPU tensors: every program is executed in Python there,
# so fewer, larger tiles are what matters, and the minimum tl.dot tile is 16.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # ---- program id -> output tile, grouped ordering so GROUP_M row tiles share W tiles in L2 ----
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # ---- pointers: A tile [BLOCK_M, BLOCK_K], W read transposed as a [BLOCK_K, BLOCK_N] tile ----
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # ---- main loop: int8 x int8 MMA into an exact int32 accumulator; masked lanes load 0 ----
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue: dequantise with the outer product of the scales, bias, activation, cast ----
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            y = y + bias[None, :]
        if ACTIVATION == 1:
            y = tl.maximum(y, 0.0)
        elif ACTIVATION == 2:
            y = 0.5 * y * (1.0 + tl.erf(y * _INV_SQRT2))
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


def _configs() -> list:
    """GPU configs: large tiles for prefill-sized M, thin-M tiles (16/32 rows) for decode."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=3, num_warps=4),
        cfg({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=3, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=4, num_warps=4),
    ]


_w8a8_gemm_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "EPILOGUE"])(_w8a8_gemm_kernel)


# ----------------------------------------------------------------------------------------------
# Host wrappers: check constraints -> allocate -> grid -> launch
# ----------------------------------------------------------------------------------------------
def _check_operands(a: object, w: object) -> tuple[torch.Tensor, torch.Tensor]:
    a = check_tensor("a", a, dtypes=(torch.int8,), shape=(None, None))
    w = check_tensor("w", w, dtypes=(torch.int8,), shape=(None, a.shape[1]), device=a.device)
    check_launchable("a", a, _w8a8_gemm_kernel)
    return a, w


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    a_scale: torch.Tensor | None,
    w_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
) -> None:
    m, k = a.shape
    n = w.shape[0]
    epilogue = a_scale is not None
    dummy = out  # never dereferenced: the EPILOGUE / HAS_BIAS constexprs remove the loads
    args = (
        a, w, out,
        a_scale if epilogue else dummy,
        w_scale if epilogue else dummy,
        bias if bias is not None else dummy,
        m, n, k,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    flags = {"EPILOGUE": epilogue, "HAS_BIAS": bias is not None, "ACTIVATION": _ACTIVATION_CODE[activation]}
    if use_single_config(a, _w8a8_gemm_kernel):
        c = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _w8a8_gemm_kernel[grid](*args, **flags, **c)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w8a8_gemm_autotuned[grid](*args, **flags)


def int8_gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` for ``a int8 [M, K]`` and ``w int8 [N, K]``; returns ``int32 [M, N]``.

    The raw accumulator, with no epilogue: the integer half of :func:`w8a8_linear`, exposed so it
    can be compared bit for bit with the reference. Assumes ``K < 2**17`` (no int32 overflow).
    """
    # ---- check constraints ----
    a, w = _check_operands(a, w)
    if a.shape[1] >= 2**17:
        raise KernelInputError(
            "a.shape[1] (K)", "< 131072 so the int32 accumulator cannot overflow", a.shape[1]
        )
    # ---- allocate -> grid -> launch ----
    out = torch.empty((a.shape[0], w.shape[0]), dtype=torch.int32, device=a.device)
    _launch(a, w, out, None, None, None, None)
    return out


def w8a8_linear(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``act((a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias)`` as ``out_dtype [M, N]``.

    Args:
        a: int8 ``[M, K]`` activations, quantised per token (row).
        w: int8 ``[N, K]`` weight in ``nn.Linear`` layout, quantised per output channel.
        a_scale: float32 ``[M]``; w_scale: float32 ``[N]`` (symmetric: no zero points).
        bias: optional ``[N]`` in float16, bfloat16 or float32 (added in float32).
        activation: ``None``, ``"relu"`` or ``"gelu"`` (erf form).
        out_dtype: float16, bfloat16 or float32.

    The accumulation is exact int32; the epilogue is float32 and rounded once to ``out_dtype``.
    """
    # ---- check constraints ----
    a, w = _check_operands(a, w)
    m, n = a.shape[0], w.shape[0]
    if a.shape[1] >= 2**17:
        raise KernelInputError(
            "a.shape[1] (K)", "< 131072 so the int32 accumulator cannot overflow", a.shape[1]
        )
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(m,), device=a.device)
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,), shape=(n,), device=a.device)
    if bias is not None:
        check_tensor("bias", bias, dtypes=OUT_DTYPES, shape=(n,), device=a.device)
    if activation not in ACTIVATIONS:
        raise KernelInputError("activation", f"one of {ACTIVATIONS}", repr(activation))
    if out_dtype not in OUT_DTYPES:
        raise KernelInputError("out_dtype", "one of float16, bfloat16, float32", out_dtype)
    # ---- allocate -> grid -> launch ----
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    _launch(a, w, out, a_scale, w_scale, bias, activation)
    return out
