"""LLM.int8() decomposition (lowbit.kernels.llm_int8) against the reference.

Tolerances. The int8 half is bit-exact up to its float32 epilogue (per-token codes and the int32
accumulator are exact, the epilogue uses the reference's order) and the outlier half is the same
float32 matmul as the reference's, so kernel and reference differ by float32 rounding before the
final cast and by at most one ulp of x's dtype after it: float32 rtol 1e-5 / atol 1e-5,
float16 rtol 2**-10 / atol 1e-3, bfloat16 rtol 2**-7 / atol 1e-2.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (optional extra lowbit[triton])")

from lowbit.kernels import KernelInputError  # noqa: E402
from lowbit.kernels.llm_int8 import llm_int8_linear  # noqa: E402
from lowbit.runtime.reference import llm_int8_linear_ref, quantize_per_channel_ref  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-2},
}
OUTLIER_COLUMNS = [3, 17, 50]


def _problem(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x with a few large-magnitude columns (as in LLM activations), and a per-channel int8 weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, OUTLIER_COLUMNS] *= 20.0
    w = torch.randn(n, k, generator=g) / k**0.5
    w_q, w_scale = quantize_per_channel_ref(w)
    bias = torch.randn(n, generator=g)
    return x.to(dtype).to(DEVICE), w.to(DEVICE), w_q.to(DEVICE), w_scale.to(DEVICE), bias.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("m", [1, 5, 33], ids=lambda m: f"M{m}")
def test_llm_int8_matches_reference(dtype: torch.dtype, m: int) -> None:
    x, _, w_q, w_scale, bias = _problem(m, 40, 64, dtype)
    out = llm_int8_linear(x, w_q, w_scale, bias)
    expected = llm_int8_linear_ref(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (m, 40)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_llm_int8_uses_the_float_weight_for_outliers() -> None:
    x, w, w_q, w_scale, bias = _problem(5, 16, 96, torch.float32)
    out = llm_int8_linear(x, w_q, w_scale, bias, weight=w)
    torch.testing.assert_close(
        out, llm_int8_linear_ref(x, w_q, w_scale, bias, weight=w), **TOLERANCES[torch.float32]
    )


@pytest.mark.parametrize("threshold", [math.inf, 0.0], ids=["no-outliers", "all-outliers"])
def test_llm_int8_threshold_extremes(threshold: float) -> None:
    """inf: pure W8A8 path; 0: every nonzero column is an outlier and the int8 part sees zeros."""
    x, _, w_q, w_scale, bias = _problem(5, 16, 64, torch.float32)
    out = llm_int8_linear(x, w_q, w_scale, bias, threshold=threshold)
    expected = llm_int8_linear_ref(x, w_q, w_scale, bias, threshold=threshold)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    if threshold == 0.0:  # float path only: exactly x @ (w_q * w_scale).T + bias
        dense = x @ (w_q.float() * w_scale[:, None]).T + bias
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_llm_int8_outliers_improve_on_plain_w8a8() -> None:
    """The point of the decomposition: outliers kept in float cut the error against the float layer."""
    x, w, w_q, w_scale, _ = _problem(33, 40, 64, torch.float32, seed=3)
    exact = x @ w.T
    mixed = llm_int8_linear(x, w_q, w_scale, weight=w)
    plain = llm_int8_linear(x, w_q, w_scale, weight=w, threshold=math.inf)
    err_mixed = (mixed - exact).norm() / exact.norm()
    err_plain = (plain - exact).norm() / exact.norm()
    assert err_mixed < 0.02 and err_mixed < err_plain / 2


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cpu", reason="bad-input cases are written for CPU tensors")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"x": torch.zeros(4, 64, dtype=torch.int8)},
            r"x\.dtype: expected one of float16, bfloat16, float32",
        ),
        ({"x": torch.zeros(64, 4).t()}, r"x\.is_contiguous\(\)"),
        ({"w_q": torch.zeros(16, 64)}, r"w_q\.dtype: expected int8, got float32"),
        ({"w_q": torch.zeros(16, 32, dtype=torch.int8)}, r"w_q\.shape\[1\]: expected 64"),
        (
            {"w_q": torch.zeros(16, 64, dtype=torch.int8, device="meta")},
            r"w_q\.device: expected cpu, got meta",
        ),
        ({"w_scale": torch.ones(8)}, r"w_scale\.shape\[0\]: expected 16"),
        ({"w_scale": torch.ones(16, dtype=torch.float16)}, r"w_scale\.dtype: expected float32"),
        ({"bias": torch.zeros(16, dtype=torch.int32)}, r"bias\.dtype"),
        ({"weight": torch.zeros(16, 63)}, r"weight\.shape\[1\]: expected 64"),
        ({"threshold": -1.0}, r"threshold: expected a non-negative number, got -1\.0"),
        ({"threshold": math.nan}, r"threshold: expected a non-negative number, got nan"),
    ],
    ids=[
        "x_dtype",
        "x_noncontig",
        "w_dtype",
        "w_shape",
        "w_device",
        "scale_shape",
        "scale_dtype",
        "bias_dtype",
        "weight_shape",
        "threshold_negative",
        "threshold_nan",
    ],
)
def test_llm_int8_rejects_bad_input(overrides: dict, message: str) -> None:
    call = {"x": torch.zeros(4, 64), "w_q": torch.zeros(16, 64, dtype=torch.int8), "w_scale": torch.ones(16)}
    with pytest.raises(KernelInputError, match=message):
        llm_int8_linear(**(call | overrides))
