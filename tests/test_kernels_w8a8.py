"""W8A8 GEMM kernel (lowbit.kernels.w8a8_gemm) against the reference, on CPU under the interpreter.

Tolerances for the dequantised output. The integer accumulator is exact and the epilogue runs in
float32 in the reference's order, so the kernel and reference agree to float32 rounding before the
final cast (GELU: erf implementations differ by a few float32 ulps). After the cast they may differ
by at most one ulp of the output dtype:

* float32: rtol 1e-5, atol 1e-6 (a few ulps; erf);
* float16: rtol 2**-10 (one ulp), atol 1e-5;
* bfloat16: rtol 2**-7 (one ulp), atol 1e-5: Triton's interpreter truncates float32 -> bfloat16
  instead of rounding to nearest even, so one-ulp differences are common on CPU (not on GPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (optional extra lowbit[triton])")

from lowbit.kernels import KernelInputError  # noqa: E402
from lowbit.kernels import w8a8_gemm as mod  # noqa: E402
from lowbit.kernels.w8a8_gemm import int8_gemm, w8a8_linear  # noqa: E402
from lowbit.runtime.reference import int8_gemm_ref, w8a8_linear_ref  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
}


def _int8(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).to(DEVICE)


def _operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed + 1)
    a, w = _int8(m, k, seed=seed), _int8(n, k, seed=seed + 2)
    # scales sized like real ones (absmax / 127 of O(1) data), so outputs are O(1..10)
    a_scale = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    w_scale = (torch.rand(n, generator=g) * 0.002 + 1e-4).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    return a, w, a_scale, w_scale, bias


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a kernel is launched: errors must be raised before any launch."""

    class _LaunchSpy:
        def __init__(self, kernel: object) -> None:
            self.fn = kernel  # keeps lowbit.kernels.is_interpreted() working

        def __getitem__(self, grid: object) -> None:
            raise AssertionError("kernel launched despite invalid input")

    for name in ("_w8a8_gemm_kernel", "_w8a8_gemm_autotuned"):
        monkeypatch.setattr(mod, name, _LaunchSpy(getattr(mod, name)))


# ----------------------------------------------------------------------------------------------
# Exact integer GEMM
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("n", [16, 40])
@pytest.mark.parametrize("k", [64, 96])
def test_int8_gemm_is_exact(m: int, n: int, k: int) -> None:
    a, w = _int8(m, k, seed=m), _int8(n, k, seed=n + k)
    out = int8_gemm(a, w)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.cpu(), int8_gemm_ref(a.cpu(), w.cpu()))


@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 50), (33, 17, 33), (2, 3, 7)])
def test_int8_gemm_masks_odd_shapes(m: int, n: int, k: int) -> None:
    """M = 1, N and K not multiples of any block size: handled by masking, still exact."""
    a, w = _int8(m, k, seed=3), _int8(n, k, seed=4)
    assert torch.equal(int8_gemm(a, w).cpu(), int8_gemm_ref(a.cpu(), w.cpu()))


def test_int8_gemm_extreme_values_do_not_overflow() -> None:
    a = torch.full((3, 160), -128, dtype=torch.int8, device=DEVICE)
    w = torch.full((17, 160), -128, dtype=torch.int8, device=DEVICE)
    w[::2] = 127
    assert torch.equal(int8_gemm(a, w).cpu(), int8_gemm_ref(a.cpu(), w.cpu()))


# ----------------------------------------------------------------------------------------------
# Fused epilogue
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_linear_matches_reference(
    out_dtype: torch.dtype, activation: str | None, with_bias: bool
) -> None:
    a, w, a_scale, w_scale, bias = _operands(33, 40, 96)
    b = bias.to(out_dtype) if with_bias else None
    out = w8a8_linear(a, w, a_scale, w_scale, b, activation=activation, out_dtype=out_dtype)
    expected = w8a8_linear_ref(a, w, a_scale, w_scale, b, activation, out_dtype)
    assert out.dtype == out_dtype and out.shape == (33, 40)
    torch.testing.assert_close(out, expected, **TOLERANCES[out_dtype])


@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 64), (5, 40, 96), (1, 40, 50)])
def test_w8a8_linear_small_and_odd_shapes(m: int, n: int, k: int) -> None:
    a, w, a_scale, w_scale, bias = _operands(m, n, k, seed=7)
    out = w8a8_linear(a, w, a_scale, w_scale, bias, activation="gelu", out_dtype=torch.float16)
    expected = w8a8_linear_ref(a, w, a_scale, w_scale, bias, "gelu", torch.float16)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float16])


# ----------------------------------------------------------------------------------------------
# Bad inputs: rejected with a named argument, before any launch
# ----------------------------------------------------------------------------------------------


def _bad_calls() -> list[tuple[str, dict, str]]:
    """(id, overrides of the valid call's arguments, expected message regex)."""
    a, w, a_scale, w_scale, bias = _operands(5, 16, 64)
    return [
        ("a_dtype", {"a": a.float()}, r"a\.dtype: expected int8, got float32"),
        ("w_dtype", {"w": w.to(torch.uint8)}, r"w\.dtype: expected int8, got uint8"),
        ("a_rank", {"a": a[0]}, r"a\.dim\(\): expected 2, got 1"),
        ("w_k", {"w": w[:, :32].contiguous()}, r"w\.shape\[1\]: expected 64"),
        ("a_noncontig", {"a": _int8(64, 5, seed=0).t()}, r"a\.is_contiguous\(\): expected True"),
        ("w_noncontig", {"w": _int8(128, 16, seed=0).t()[:, :64]}, r"w\.is_contiguous\(\)"),
        ("w_device", {"w": w.to("meta")}, r"w\.device: expected cpu, got meta"),
        ("a_scale_shape", {"a_scale": a_scale[:4]}, r"a_scale\.shape\[0\]: expected 5"),
        ("a_scale_dtype", {"a_scale": a_scale.half()}, r"a_scale\.dtype: expected float32, got float16"),
        ("w_scale_device", {"w_scale": w_scale.to("meta")}, r"w_scale\.device: expected cpu"),
        ("bias_shape", {"bias": bias[:3]}, r"bias\.shape\[0\]: expected 16"),
        ("bias_dtype", {"bias": bias.double()}, r"bias\.dtype: expected one of float16, bfloat16, float32"),
        ("activation", {"activation": "silu"}, r"activation: expected one of \(None, 'relu', 'gelu'\)"),
        ("out_dtype", {"out_dtype": torch.int32}, r"out_dtype: expected one of float16"),
    ]


@pytest.mark.skipif(DEVICE != "cpu", reason="device-mismatch cases are written for CPU tensors")
@pytest.mark.parametrize(
    ("overrides", "message"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()]
)
def test_w8a8_linear_rejects_bad_input(no_launch: None, overrides: dict, message: str) -> None:
    a, w, a_scale, w_scale, bias = _operands(5, 16, 64)
    kwargs = {"a": a, "w": w, "a_scale": a_scale, "w_scale": w_scale, "bias": bias, "activation": None}
    kwargs |= overrides
    with pytest.raises(KernelInputError, match=message):
        w8a8_linear(**kwargs)


def test_int8_gemm_rejects_bad_input(no_launch: None) -> None:
    a, w = _int8(5, 64, seed=0), _int8(16, 64, seed=1)
    with pytest.raises(KernelInputError, match=r"a\.dtype: expected int8, got float16"):
        int8_gemm(a.half(), w)
    with pytest.raises(KernelInputError, match=r"w\.shape\[1\]: expected 64"):
        int8_gemm(a, w[:, :48].contiguous())
    with pytest.raises(KernelInputError, match=r"a: expected a torch.Tensor, got ndarray"):
        int8_gemm(a.cpu().numpy(), w)
