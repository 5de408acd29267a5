"""Per-token quantisation kernel (lowbit.kernels.quantize_per_token) against the reference.

No tolerance is needed: the kernel divides with correct rounding and rounds half to even with
exact float ops, so both ``q`` and ``scale`` must equal the reference bit for bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (optional extra lowbit[triton])")

from lowbit.kernels import KernelInputError  # noqa: E402
from lowbit.kernels import quantize_per_token as mod  # noqa: E402
from lowbit.kernels.quantize_per_token import quantize_per_token  # noqa: E402
from lowbit.runtime.reference import quantize_per_token_ref  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_matches_reference(x: torch.Tensor) -> None:
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (x.shape[0],)
    assert torch.equal(q.cpu(), q_ref.cpu())
    assert torch.equal(scale.cpu(), scale_ref.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k"), [(1, 64), (5, 96), (33, 64), (1, 50), (7, 1)])
def test_quantize_per_token_matches_reference_exactly(dtype: torch.dtype, m: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * 4).to(dtype).to(DEVICE)
    _assert_matches_reference(x)


def test_quantize_per_token_rounds_ties_to_even() -> None:
    # scale is exactly 1.0 (absmax 127), so x / scale hits every .5 tie
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    q, scale = quantize_per_token(ties[None, :].to(DEVICE))
    assert scale.item() == 1.0
    assert q.cpu()[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]


def test_quantize_per_token_zero_row_and_saturation() -> None:
    x = torch.zeros(3, 40)
    x[1, 7] = -3.0  # the row's absmax is negative: maps to -127
    x[2] = torch.linspace(-1, 1, 40)
    q, scale = quantize_per_token(x.to(DEVICE))
    assert q.cpu()[0].abs().sum().item() == 0 and scale[0].item() == pytest.approx(1e-5 / 127)
    assert q.cpu()[1, 7].item() == -127
    assert q.cpu()[2].min().item() == -127 and q.cpu()[2].max().item() == 127
    _assert_matches_reference(x.to(DEVICE))


def test_quantize_per_token_row_longer_than_one_block() -> None:
    """K above the interpreter's 1024-element block: both sweeps loop and mask the tail."""
    x = torch.randn(2, 1500, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x[1, 1400] = 50.0  # absmax sits in the second block
    _assert_matches_reference(x)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 70),
    log_scale=st.floats(-6, 3),  # keeps float16 finite: non-finite inputs are out of contract
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_quantize_per_token_property(m: int, k: int, log_scale: float, dtype: torch.dtype, seed: int) -> None:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 10.0**log_scale
    _assert_matches_reference(x.to(dtype).to(DEVICE))


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    class _LaunchSpy:
        def __init__(self, kernel: object) -> None:
            self.fn = kernel

        def __getitem__(self, grid: object) -> None:
            raise AssertionError("kernel launched despite invalid input")

    for name in ("_quantize_per_token_kernel", "_quantize_per_token_autotuned"):
        monkeypatch.setattr(mod, name, _LaunchSpy(getattr(mod, name)))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (
            torch.zeros(4, 8, dtype=torch.int8),
            r"x\.dtype: expected one of float16, bfloat16, float32, got int8",
        ),
        (torch.zeros(4, 8, dtype=torch.float64), r"x\.dtype: .* got float64"),
        (torch.zeros(8), r"x\.dim\(\): expected 2, got 1"),
        (torch.zeros(2, 4, 8), r"x\.dim\(\): expected 2, got 3"),
        (torch.zeros(8, 4).t(), r"x\.is_contiguous\(\): expected True"),
        (torch.zeros(0, 8), r"x\.shape: expected no zero-sized dimension"),
    ],
    ids=["int8", "float64", "1d", "3d", "noncontig", "empty"],
)
def test_quantize_per_token_rejects_bad_input(no_launch: None, x: torch.Tensor, message: str) -> None:
    with pytest.raises(KernelInputError, match=message):
        quantize_per_token(x)
