"""Weight-only GEMM kernels (lowbit.kernels.weight_only_gemm) against the reference.

Tolerances. The codes ``q - z`` are exact in every dot dtype and both sides accumulate in float32,
so kernel and reference differ only by float32 summation order (the kernel scales per K tile; the
reference dequantises first) and then by at most one ulp of the output dtype:

* float32: rtol 1e-5, atol 1e-4 (summation order over K <= 128 terms of size ~|x| |w| ~ 1);
* float16: rtol 2**-10 (one ulp), atol 1e-3 (ulp of outputs near zero plus summation order);
* bfloat16: rtol 2**-7 (one ulp), atol 1e-2; the interpreter truncates float32 -> bfloat16.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (optional extra lowbit[triton])")

from lowbit.kernels import KernelInputError  # noqa: E402
from lowbit.kernels import weight_only_gemm as mod  # noqa: E402
from lowbit.kernels.weight_only_gemm import weight_only_linear  # noqa: E402
from lowbit.runtime.reference import (  # noqa: E402
    pack_int4,
    quantize_weight_groupwise,
    weight_only_linear_ref,
)

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.float16: {"rtol": 2**-10, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-2},
}
DTYPES = list(TOLERANCES)


def _quantized(
    n: int, k: int, *, bits: int, group_size: int, symmetric: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A random weight in the kernel's storage format: (qweight, scales, zeros)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    q, scales, zeros = quantize_weight_groupwise(w, bits=bits, group_size=group_size, symmetric=symmetric)
    qweight = pack_int4(q) if bits == 4 else q
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return move(qweight), move(scales), move(zeros)


def _check(
    m: int,
    n: int,
    k: int,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    dtype: torch.dtype,
    path: str = "auto",
    bias: bool = True,
) -> None:
    qweight, scales, zeros = _quantized(
        n, k, bits=bits, group_size=group_size, symmetric=symmetric, seed=m + n
    )
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = weight_only_linear(x, qweight, scales, zeros, bits=bits, group_size=group_size, bias=b, path=path)
    expected = weight_only_linear_ref(x, qweight, scales, zeros, bits=bits, group_size=group_size, bias=b)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


# ----------------------------------------------------------------------------------------------
# Numerics: every storage format x group size x path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 5, 33], ids=lambda m: f"M{m}")  # 1, 5: GEMV / split-K; 33: tiled
@pytest.mark.parametrize(
    ("k", "group_size"),
    [(64, 32), (64, 64), (128, 128), (96, 96)],
    ids=["K64-g32", "K64-g64", "K128-g128", "K96-per-channel"],
)
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"W{b}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_weight_only_matches_reference(m: int, k: int, group_size: int, bits: int, symmetric: bool) -> None:
    _check(m, 40, k, bits=bits, group_size=group_size, symmetric=symmetric, dtype=torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"W{b}")
def test_weight_only_activation_dtypes(dtype: torch.dtype, m: int, bits: int) -> None:
    _check(m, 16, 64, bits=bits, group_size=32, symmetric=bits == 8, dtype=dtype)


@pytest.mark.parametrize("path", ["tiled", "gemv"])
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"W{b}")
def test_weight_only_paths_agree(path: str, bits: int) -> None:
    """Both kernels are correct for the same small-M problem (auto would pick GEMV for M=5)."""
    _check(5, 40, 128, bits=bits, group_size=64, symmetric=False, dtype=torch.float32, path=path)


@pytest.mark.parametrize(
    ("m", "n", "k", "group_size"),
    [(1, 40, 96, 32), (9, 17, 64, 64), (2, 3, 32, 32)],
    ids=["M1-N40", "M9-N17", "M2-N3"],
)
def test_weight_only_odd_shapes_are_masked(m: int, n: int, k: int, group_size: int) -> None:
    """M = 1, M just above the GEMV limit, N not a multiple of BLOCK_N: handled by masking."""
    for bits in (8, 4):
        _check(m, n, k, bits=bits, group_size=group_size, symmetric=False, dtype=torch.float16, bias=False)


def test_weight_only_per_channel_w8_with_k_not_a_power_of_two() -> None:
    _check(3, 16, 80, bits=8, group_size=80, symmetric=True, dtype=torch.float16)
    _check(20, 16, 80, bits=4, group_size=80, symmetric=True, dtype=torch.float16)


def test_weight_only_accepts_int32_zero_points() -> None:
    """int32 zero points (the dtype of lowbit.runtime.qparams) give the same result as uint8."""
    qweight, scales, zeros = _quantized(16, 64, bits=4, group_size=32, symmetric=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for path in ("tiled", "gemv"):
        out8 = weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=32, path=path)
        out32 = weight_only_linear(
            x, qweight, scales, zeros.to(torch.int32), bits=4, group_size=32, path=path
        )
        assert torch.equal(out8, out32)


# ----------------------------------------------------------------------------------------------
# Bad inputs: rejected with a named argument, before any launch
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    class _LaunchSpy:
        def __init__(self, kernel: object) -> None:
            self.fn = kernel

        def __getitem__(self, grid: object) -> None:
            raise AssertionError("kernel launched despite invalid input")

    for name in (
        "_weight_only_tiled_kernel",
        "_weight_only_gemv_kernel",
        "_tiled_autotuned",
        "_gemv_autotuned",
    ):
        monkeypatch.setattr(mod, name, _LaunchSpy(getattr(mod, name)))


def _valid_call(bits: int = 4, symmetric: bool = False, m: int = 5) -> dict:
    qweight, scales, zeros = _quantized(16, 64, bits=bits, group_size=32, symmetric=symmetric)
    x = torch.randn(m, 64, dtype=torch.float16, device=DEVICE)
    return {"x": x, "qweight": qweight, "scales": scales, "zeros": zeros, "bits": bits, "group_size": 32}


_BAD_CALLS = {
    "x_dtype": (
        lambda c: {"x": c["x"].to(torch.int8)},
        r"x\.dtype: expected one of float16, bfloat16, float32",
    ),
    "x_noncontig": (lambda c: {"x": torch.zeros(64, 5, dtype=torch.float16).t()}, r"x\.is_contiguous\(\)"),
    "bits": (lambda c: {"bits": 3}, r"bits: expected 4 or 8, got 3"),
    "group_size_48": (lambda c: {"group_size": 48}, r"group_size: expected one of \(32, 64, 128\) or K=64"),
    "group_size_str": (lambda c: {"group_size": "32"}, r"group_size: expected"),
    "k_not_multiple_of_group": (
        lambda c: {"x": torch.zeros(5, 96, dtype=torch.float16), "group_size": 64},
        r"x\.shape\[1\] \(K\): expected a multiple of group_size=64, got 96",
    ),
    "w4_packed_shape": (
        lambda c: {"qweight": torch.zeros(16, 64, dtype=torch.uint8)},
        r"qweight\.shape\[1\]: expected 32",
    ),
    "w4_dtype": (
        lambda c: {"qweight": c["qweight"].to(torch.int8)},
        r"qweight\.dtype: expected uint8, got int8",
    ),
    "w_noncontig": (
        lambda c: {"qweight": torch.zeros(32, 16, dtype=torch.uint8).t()},
        r"qweight\.is_contiguous\(\)",
    ),
    "w_device": (lambda c: {"qweight": c["qweight"].to("meta")}, r"qweight\.device: expected cpu, got meta"),
    "scales_shape": (
        lambda c: {"scales": c["scales"][:, :1].contiguous()},
        r"scales\.shape\[1\]: expected 2",
    ),
    "scales_dtype": (
        lambda c: {"scales": c["scales"].to(torch.int32)},
        r"scales\.dtype: expected one of float16",
    ),
    "zeros_dtype": (
        lambda c: {"zeros": c["zeros"].to(torch.int8)},
        r"zeros\.dtype: expected one of uint8, int32, got int8",
    ),
    "zeros_shape": (lambda c: {"zeros": c["zeros"][:8].contiguous()}, r"zeros\.shape\[0\]: expected 16"),
    "bias_shape": (
        lambda c: {"bias": torch.zeros(15, dtype=torch.float16)},
        r"bias\.shape\[0\]: expected 16",
    ),
    "path": (lambda c: {"path": "splitk"}, r"path: expected 'auto', 'tiled' or 'gemv'"),
    "gemv_large_m": (
        lambda c: {"x": torch.zeros(9, 64, dtype=torch.float16), "path": "gemv"},
        r"x\.shape\[0\] \(M\): expected <= 8 for path='gemv', got 9",
    ),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="bad-input cases are written for CPU tensors")
@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_weight_only_rejects_bad_input(no_launch: None, case: str) -> None:
    overrides, message = _BAD_CALLS[case]
    call = _valid_call()
    call |= overrides(call)
    with pytest.raises(KernelInputError, match=message):
        weight_only_linear(**call)


def test_weight_only_w8_storage_dtype_follows_zero_points(no_launch: None) -> None:
    """Symmetric 8-bit codes are int8; with zero points they must be unsigned (uint8)."""
    sym = _valid_call(bits=8, symmetric=True)
    with pytest.raises(KernelInputError, match=r"qweight\.dtype: expected int8, got uint8"):
        weight_only_linear(**(sym | {"qweight": sym["qweight"].to(torch.uint8)}))
    asym = _valid_call(bits=8, symmetric=False)
    with pytest.raises(KernelInputError, match=r"qweight\.dtype: expected uint8, got int8"):
        weight_only_linear(**(asym | {"qweight": asym["qweight"].to(torch.int8)}))


def test_weight_only_w4_rejects_odd_k_per_channel(no_launch: None) -> None:
    x = torch.zeros(2, 33, dtype=torch.float16)
    with pytest.raises(KernelInputError, match=r"x\.shape\[1\] \(K\): expected even"):
        weight_only_linear(
            x,
            torch.zeros(4, 16, dtype=torch.uint8),
            torch.ones(4, 1, dtype=torch.float16),
            bits=4,
            group_size=33,
        )
