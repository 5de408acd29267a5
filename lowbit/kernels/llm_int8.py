"""LLM.int8() mixed-precision decomposition (Dettmers et al., 2022).

    O      = { j : max_m |X[m, j]| > threshold }                       (outlier columns)
    X_in   = X with the columns in O set to 0
    Y      = W8A8(X_in, W_q) + X[:, O] @ W[:, O].T + bias

``W8A8`` quantises ``X_in`` per token with :mod:`lowbit.kernels.quantize_per_token` and multiplies
it with the per-channel int8 weight in :mod:`lowbit.kernels.w8a8_gemm` (float32 epilogue, bias
fused). The few outlier columns, whose magnitude would otherwise blow up every per-token scale,
go through a float32 matmul with the float weight's columns (``weight`` if given, otherwise
``W_q * w_scale``). Both parts are summed in float32 and rounded to X's dtype once.

Outliers are zeroed in X rather than removed: the int8 GEMM then keeps its contiguous ``[N, K]``
weight and only the ``|O|`` outlier columns of W are gathered, as bitsandbytes does.

There is no dedicated Triton kernel here: this module is the host-side composition of the two
kernels above, and it is where the data-dependent part (which columns are outliers) is decided.
"""

from __future__ import annotations

import math

import torch

from lowbit.kernels import KernelInputError, check_tensor
from lowbit.kernels.quantize_per_token import quantize_per_token
from lowbit.kernels.w8a8_gemm import w8a8_linear

__all__ = ["llm_int8_linear"]

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def llm_int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: float = 6.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLM.int8() linear layer: ``x @ W.T + bias`` with outlier columns of x kept in float.

    Args:
        x: float16, bfloat16 or float32 ``[M, K]``; the output is ``[M, N]`` in the same dtype.
        w_q: int8 ``[N, K]`` weight quantised per output channel (symmetric).
        w_scale: float32 ``[N]``.
        bias: optional ``[N]`` in float16, bfloat16 or float32.
        threshold: a column is an outlier when any ``|x[:, j]| > threshold`` (6.0 in the paper);
            ``math.inf`` disables the float path.
        weight: optional float ``[N, K]`` original weight for the outlier columns; without it
            they use the dequantised ``w_q * w_scale``.

    Finding the outliers syncs with the device once (the outlier count sets a shape).
    """
    # ---- check constraints ----
    x = check_tensor("x", x, dtypes=X_DTYPES, shape=(None, None))
    m, k = x.shape
    w_q = check_tensor("w_q", w_q, dtypes=(torch.int8,), shape=(None, k), device=x.device)
    n = w_q.shape[0]
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,), shape=(n,), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, dtypes=X_DTYPES, shape=(n,), device=x.device)
    if weight is not None:
        check_tensor("weight", weight, dtypes=X_DTYPES, shape=(n, k), device=x.device, contiguous=False)
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise KernelInputError("threshold", "a non-negative number", threshold)

    # ---- find outlier columns, split x ----
    cols = torch.nonzero((x.abs() > threshold).any(dim=0)).flatten()
    x_in = x
    if cols.numel() > 0:
        x_in = x.clone()
        x_in[:, cols] = 0

    # ---- int8 part: per-token quantisation kernel -> W8A8 GEMM kernel (float32, bias fused) ----
    a_q, a_scale = quantize_per_token(x_in)
    y = w8a8_linear(a_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)

    # ---- float part: gathered outlier columns, float32 matmul ----
    if cols.numel() > 0:
        if weight is not None:
            w_out = weight[:, cols].to(torch.float32)
        else:
            w_out = w_q[:, cols].to(torch.float32) * w_scale[:, None]
        y += x[:, cols].to(torch.float32) @ w_out.T
    return y.to(x.dtype)
