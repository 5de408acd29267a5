"""Dynamic per-token (row-wise) symmetric int8 quantisation of activations.

    scale[m] = max(absmax(x[m, :]), 1e-5) / 127
    q[m, k]  = clamp(round_half_to_even(x[m, k] / scale[m]), -127, 127)      (int8)

This produces the ``a`` / ``a_scale`` operands of :func:`lowbit.kernels.w8a8_gemm.w8a8_linear`
at run time, one program per row: a first sweep over K finds the absmax, a second one quantises.
The row is read twice, but it is small (K elements) and the second read hits L2.

Division is correctly rounded (``div_rn``) and the rounding is done with exact float ops, so ``q``
matches :func:`lowbit.runtime.reference.quantize_per_token_ref` bit for bit, not approximately.
"""

from __future__ import annotations

import torch

from lowbit.kernels import check_launchable, check_tensor, import_triton, next_power_of_2, use_single_config

triton, tl = import_triton()

__all__ = ["quantize_per_token"]

IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EPS = tl.constexpr(1e-5)  # floor on absmax; must equal reference.PER_TOKEN_EPS (torch's per-token 1e-5)
_MAX_INTERPRETER_BLOCK_K = 1024


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _round_half_to_even(v):
    """Round float32 ``v`` to the nearest integer, ties to even, using only exact operations.

    ``floor`` and ``v - floor(v)`` are exact in float32, so the tie test is exact too; this avoids
    relying on a libdevice ``rint`` the interpreter lacks and on magic-number tricks that fast-math
    could reassociate.
    """
    f = tl.floor(v)
    frac = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    round_up = (frac > 0.5) | ((frac == 0.5) & f_is_odd)
    return tl.where(round_up, f + 1.0, f)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr,
    K,
    stride_xm, stride_qm,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(axis=0)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)

    # ---- sweep 1: absmax of the row in float32 ----
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.max(absmax, axis=0), _EPS), 127.0)
    tl.store(scale_ptr + row, scale)

    # ---- sweep 2: q = clamp(round_half_even(x / scale), -127, 127) ----
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_half_to_even(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)


def _configs() -> list:
    """GPU configs: the kernel is bandwidth bound, so only the row chunk and warp count vary."""
    return [
        triton.Config({"BLOCK_K": bk}, num_warps=w)
        for bk, w in ((512, 2), (1024, 4), (2048, 4), (4096, 8), (8192, 16))
    ]


_quantize_per_token_autotuned = triton.autotune(configs=_configs(), key=["K"])(_quantize_per_token_kernel)


# ----------------------------------------------------------------------------------------------
# Host wrapper: check constraints -> allocate -> grid -> launch
# ----------------------------------------------------------------------------------------------
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of ``x [M, K]`` (float16/bfloat16/float32) to int8 with its own scale.

    Returns ``(q int8 [M, K], scale float32 [M])`` with ``x ~= q * scale[:, None]``; see the module
    docstring for the exact math. An all-zero row gets ``scale = 1e-5 / 127`` and ``q = 0``; rows
    holding inf or NaN get unspecified codes (there is no meaningful scale for them).
    """
    # ---- check constraints ----
    x = check_tensor("x", x, dtypes=IN_DTYPES, shape=(None, None))
    check_launchable("x", x, _quantize_per_token_kernel)
    m, k = x.shape
    # ---- allocate ----
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    # ---- grid -> launch: one program per row ----
    args = (x, q, scale, k, x.stride(0), q.stride(0))
    if use_single_config(x, _quantize_per_token_kernel):
        _quantize_per_token_kernel[(m,)](*args, BLOCK_K=min(next_power_of_2(k), _MAX_INTERPRETER_BLOCK_K))
    else:
        _quantize_per_token_autotuned[(m,)](*args)
    return q, scale
