"""Weight-only quantised GEMM (W8A16 / W4A16) with group-wise scales along K.

    W[n, k]   = (q[n, k] - z[n, k // G]) * s[n, k // G]          (z = 0 when symmetric)
    out[m, n] = sum_k x[m, k] * W[n, k] + bias[n]                 (float32 accumulation)

``x`` is float16 / bfloat16 / float32 ``[M, K]``; the output has x's dtype. Codes ``q`` are int8
``[N, K]`` (symmetric 8 bit), uint8 ``[N, K]`` (asymmetric 8 bit) or packed uint8 ``[N, K // 2]``
(4 bit, low nibble = even k; signed -8..7 without zero points, unsigned 0..15 with them); scales
are ``[N, K // G]`` (float16 normally), zero points uint8 (or int32) of the same shape. ``G`` is 32, 64, 128
or ``K`` (per channel). See :mod:`lowbit.runtime.reference` for the storage format in full.

The scale is applied per K-tile, not per element: a tile never straddles two groups (its size
divides ``G``), so ``sum_k x * (q - z) * s == s * sum_k x * (q - z)``. The integers ``q - z``
(|.| <= 255) are exact in float16 and bfloat16, so the inner product runs on tensor cores in x's
dtype without losing anything to the dequantisation.

Two kernels, picked by M:

* tiled (M > 8): the Triton-tutorial GEMM with the weight tile dequantised in registers;
* GEMV / split-K (M <= 8): decode-time shapes are bandwidth bound on W, so there are no M tiles
  (all rows in one program), the reduction over K is split over a second grid axis to put every
  SM to work, and partial sums meet in a float32 buffer through atomic adds.

4-bit tiles are unpacked without interleaving: the low nibbles multiply the even columns of x and
the high nibbles the odd columns, two dots per tile.
"""

from __future__ import annotations

import torch

from lowbit.kernels import (
    KernelInputError,
    check_launchable,
    check_tensor,
    import_triton,
    next_power_of_2,
    use_single_config,
)
from lowbit.runtime.reference import SUPPORTED_GROUP_SIZES

triton, tl = import_triton()

__all__ = ["GEMV_MAX_M", "weight_only_linear"]

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ZERO_DTYPES = (torch.uint8, torch.int32)  # int32: what lowbit.runtime.qparams.choose_qparams returns
GEMV_MAX_M = 8  # rows up to which the split-K GEMV kernel is used
_TILED_MAX_BLOCK_K = 128
_GEMV_MAX_BLOCK_K = 64
_GEMV_TILE_BUDGET = 8192  # BLOCK_M * BLOCK_K * BLOCK_N per 4 warps: the 3-D product lives in registers

_INTERPRETER_TILED = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}
_INTERPRETER_GEMV = {"BLOCK_N": 32, "SPLIT_K": 2}


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, mask_n, group, stride_sn, stride_sg, HAS_ZEROS: tl.constexpr):
    """Scale (float32) and zero point (int32, 0 when symmetric) of ``group`` for columns offs_n."""
    s = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0).to(tl.int32)
    else:
        z = tl.zeros_like(offs_n)
    return s, z


@triton.jit
def _unpack_nibbles(packed, z, HAS_ZEROS: tl.constexpr):
    """Bytes [BK/2, BN] -> (even-k codes, odd-k codes) minus zero point, as int32."""
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    if HAS_ZEROS:
        lo = lo - z[None, :]
        hi = hi - z[None, :]
    else:  # sign-extend the two's-complement nibble: 0..15 -> -8..7
        lo = (lo ^ 8) - 8
        hi = (hi ^ 8) - 8
    return lo, hi


@triton.jit
def _mma(x, w_int, DOT_FP32: tl.constexpr):
    """``x @ w_int`` in float32; w_int holds exact integers, cast to x's dtype for tensor cores."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), w_int.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(x, w_int.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Kernel 1: tiled GEMM (M > 8)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _weight_only_tiled_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, GROUP_SIZE,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_om, stride_on,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # ---- program id -> output tile (grouped ordering for L2 reuse of weight tiles) ----
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm

    # ---- main loop: dequantise a [BLOCK_K, BLOCK_N] weight tile, MMA, scale once per tile ----
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        s, z = _group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP_SIZE, stride_sn, stride_sg, HAS_ZEROS)
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            q = tl.load(
                q_ptr + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            ).to(tl.int32)
            part = _mma(x, q - z[None, :], DOT_FP32)
        else:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # packed byte index = k // 2
            mask_p = offs_p < K // 2
            packed = tl.load(
                q_ptr + offs_p[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_p[:, None] & mask_n[None, :],
                other=0,
            ).to(tl.int32)
            lo, hi = _unpack_nibbles(packed, z, HAS_ZEROS)
            x_mask = mask_m[:, None] & mask_p[None, :]
            x_even = tl.load(x_rows + (2 * offs_p)[None, :] * stride_xk, mask=x_mask, other=0.0)
            x_odd = tl.load(x_rows + (2 * offs_p + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
            part = _mma(x_even, lo, DOT_FP32) + _mma(x_odd, hi, DOT_FP32)
        acc += part * s[None, :]

    # ---- epilogue: bias, cast to x's dtype ----
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Kernel 2: GEMV / split-K (M <= 8)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _weight_only_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, GROUP_SIZE,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_om, stride_on,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    # ---- program id -> (column block, K slice); every row of x is handled by every program ----
    pid_n = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # slices are whole BLOCK_K tiles, so no tile straddles a slice or a quantisation group
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)

    # ---- main loop: broadcast-multiply-reduce on CUDA cores, scale once per tile ----
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        s, z = _group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP_SIZE, stride_sn, stride_sg, HAS_ZEROS)
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            q = tl.load(
                q_ptr + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            ).to(tl.int32)
            w = (q - z[None, :]).to(tl.float32)
            part = tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        else:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            mask_p = offs_p < K // 2
            packed = tl.load(
                q_ptr + offs_p[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_p[:, None] & mask_n[None, :],
                other=0,
            ).to(tl.int32)
            lo, hi = _unpack_nibbles(packed, z, HAS_ZEROS)
            x_mask = mask_m[:, None] & mask_p[None, :]
            x_even = tl.load(x_rows + (2 * offs_p)[None, :] * stride_xk, mask=x_mask, other=0.0).to(
                tl.float32
            )
            x_odd = tl.load(x_rows + (2 * offs_p + 1)[None, :] * stride_xk, mask=x_mask, other=0.0).to(
                tl.float32
            )
            part = tl.sum(x_even[:, :, None] * lo.to(tl.float32)[None, :, :], axis=1)
            part += tl.sum(x_odd[:, :, None] * hi.to(tl.float32)[None, :, :], axis=1)
        acc += part * s[None, :]

    # ---- epilogue: the first K slice adds the bias; slices meet in float32 via atomics ----
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.atomic_add(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Autotuning (GPU only)
# ----------------------------------------------------------------------------------------------
def _tiled_configs() -> list:
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 32, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8}, num_stages=5, num_warps=2),
    ]


def _gemv_configs() -> list:
    return [
        triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
        for bn in (16, 32, 64, 128)
        for sk in (1, 2, 4, 8, 16)
        for w, st in ((4, 3), (8, 2))
    ]


def _prune_gemv(configs: list, named_args: dict, **kwargs: object) -> list:
    """Drop configs whose 3-D product tile would spill, and splits with less than one tile each."""
    block_m, block_k = int(kwargs["BLOCK_M"]), int(kwargs["BLOCK_K"])
    k_tiles = triton.cdiv(int(named_args["K"]), block_k)
    kept = [
        c
        for c in configs
        if block_m * block_k * c.kwargs["BLOCK_N"] <= _GEMV_TILE_BUDGET * c.num_warps // 4
        and c.kwargs["SPLIT_K"] <= k_tiles
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]))]


_TUNING_KEY = ["M", "N", "K", "GROUP_SIZE", "BITS", "HAS_ZEROS"]
_tiled_autotuned = triton.autotune(configs=_tiled_configs(), key=_TUNING_KEY)(_weight_only_tiled_kernel)
_gemv_autotuned = triton.autotune(
    configs=_gemv_configs(),
    key=_TUNING_KEY,
    reset_to_zero=["out_ptr"],  # benchmarking re-runs the atomics; start each run from zero
    prune_configs_by={"early_config_prune": _prune_gemv},
)(_weight_only_gemv_kernel)


# ----------------------------------------------------------------------------------------------
# Host wrapper: check constraints -> allocate -> grid -> launch
# ----------------------------------------------------------------------------------------------
def _check_inputs(
    x: object,
    qweight: object,
    scales: object,
    zeros: object,
    bias: object,
    bits: object,
    group_size: object,
) -> tuple[int, int, int]:
    """Validate every argument against the storage format; returns (M, N, K)."""
    x = check_tensor("x", x, dtypes=X_DTYPES, shape=(None, None))
    check_launchable("x", x, _weight_only_tiled_kernel)
    m, k = x.shape
    if bits not in (4, 8):
        raise KernelInputError("bits", "4 or 8", bits)
    if not isinstance(group_size, int) or not (group_size in SUPPORTED_GROUP_SIZES or group_size == k):
        raise KernelInputError(
            "group_size", f"one of {SUPPORTED_GROUP_SIZES} or K={k} (per channel)", group_size
        )
    if k % group_size != 0:
        raise KernelInputError("x.shape[1] (K)", f"a multiple of group_size={group_size}", k)
    if bits == 4 and k % 2 != 0:
        raise KernelInputError("x.shape[1] (K)", "even (4-bit codes are packed two per byte along K)", k)

    has_zeros = zeros is not None
    if bits == 8:
        q_dtype = torch.uint8 if has_zeros else torch.int8  # asymmetric codes are unsigned
        qweight = check_tensor("qweight", qweight, dtypes=(q_dtype,), shape=(None, k), device=x.device)
    else:
        qweight = check_tensor(
            "qweight", qweight, dtypes=(torch.uint8,), shape=(None, k // 2), device=x.device
        )
    n = qweight.shape[0]
    groups = k // group_size
    check_tensor("scales", scales, dtypes=SCALE_DTYPES, shape=(n, groups), device=x.device)
    if has_zeros:
        check_tensor("zeros", zeros, dtypes=ZERO_DTYPES, shape=(n, groups), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, dtypes=X_DTYPES, shape=(n,), device=x.device)
    return m, n, k


def weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W = (q - z) * s`` dequantised group-wise inside the kernel.

    Args:
        x: float16, bfloat16 or float32 ``[M, K]``; the output is ``[M, N]`` in the same dtype.
        qweight: int8 ``[N, K]`` (bits=8, symmetric), uint8 ``[N, K]`` (bits=8, with ``zeros``) or
            packed uint8 ``[N, K // 2]`` (bits=4), as made by
            :func:`lowbit.runtime.reference.quantize_weight_groupwise` (+ ``pack_int4``).
        scales: ``[N, K // group_size]`` (float16 normally; bfloat16 / float32 accepted).
        zeros: optional ``[N, K // group_size]`` zero points (asymmetric codes), uint8 or int32.
        bits: 8 or 4.
        group_size: 32, 64, 128, or K for one scale per output channel; must divide K.
        bias: optional ``[N]``, added in float32.
        path: ``"auto"`` (GEMV for M <= 8, tiled otherwise), ``"tiled"`` or ``"gemv"``.

    Accumulation is float32; zero-point values are trusted (not range-checked, to avoid a sync).
    """
    # ---- check constraints ----
    m, n, k = _check_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    if path not in ("auto", "tiled", "gemv"):
        raise KernelInputError("path", "'auto', 'tiled' or 'gemv'", repr(path))
    use_gemv = path == "gemv" or (path == "auto" and m <= GEMV_MAX_M)
    if use_gemv and m > GEMV_MAX_M:
        raise KernelInputError("x.shape[0] (M)", f"<= {GEMV_MAX_M} for path='gemv'", m)

    has_zeros = zeros is not None
    dummy = scales  # never dereferenced: HAS_ZEROS / HAS_BIAS constexprs remove the loads
    operands = (x, qweight, scales, zeros if has_zeros else dummy, bias if bias is not None else dummy)
    flags = {"BITS": bits, "HAS_ZEROS": has_zeros, "HAS_BIAS": bias is not None}
    single = use_single_config(x, _weight_only_tiled_kernel)

    if use_gemv:
        # ---- allocate: float32 partial-sum target for the split-K atomics ----
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        args = (*operands, acc, m, n, k, group_size, *_strides(x, qweight, scales, acc))
        flags |= {"BLOCK_M": next_power_of_2(m), "BLOCK_K": _block_k(group_size, k, _GEMV_MAX_BLOCK_K)}
        # ---- grid -> launch ----
        if single:
            c = _INTERPRETER_GEMV
            _weight_only_gemv_kernel[(triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])](*args, **flags, **c)
        else:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
            _gemv_autotuned[grid](*args, **flags)
        return acc.to(x.dtype)

    # ---- allocate ----
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (*operands, out, m, n, k, group_size, *_strides(x, qweight, scales, out))
    flags |= {"BLOCK_K": _block_k(group_size, k, _TILED_MAX_BLOCK_K), "DOT_FP32": _dot_in_fp32(x, single)}
    # ---- grid -> launch ----
    if single:
        c = _INTERPRETER_TILED
        _weight_only_tiled_kernel[(triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)](
            *args, **flags, **c
        )
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tiled_autotuned[grid](*args, **flags)
    return out


def _strides(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor
) -> tuple[int, ...]:
    # zeros share the scales' shape and are contiguous too, so they reuse the scale strides
    return (x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), out.stride(0), out.stride(1))  # fmt: skip


def _block_k(group_size: int, k: int, cap: int) -> int:
    """A K tile size (power of two, >= 32 for 4-bit dots) that never straddles two groups.

    Supported group sizes are powers of two, so ``min(G, cap)`` divides G. With one group per
    channel (``G == K`` of any size) every tile lies in group 0 and the tail is masked, so ``cap``.
    """
    if group_size == k and group_size not in SUPPORTED_GROUP_SIZES:
        return cap
    return min(group_size, cap)


def _dot_in_fp32(x: torch.Tensor, single_config: bool) -> bool:
    """float32 x needs an IEEE fp32 dot (not TF32) to match the reference to float32 accuracy.

    bfloat16 under the interpreter also goes through float32: Triton 3.9's interpreter multiplies
    bfloat16 tiles as their raw uint16 bit patterns. The cast is exact, so results are unchanged.
    """
    return x.dtype == torch.float32 or (
        single_config and x.device.type == "cpu" and x.dtype == torch.bfloat16
    )
