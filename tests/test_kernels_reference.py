"""The pure-PyTorch oracle (lowbit.runtime.reference) and the kernel package's Triton-free parts.

Nothing here needs Triton: these tests pin down the math every kernel is compared against, the
int4 storage layout, and the errors raised when Triton is missing or an input is refused.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import (
    KernelInputError,
    TritonUnavailableError,
    check_launchable,
    check_tensor,
    import_triton,
)
from lowbit.runtime import reference as ref

# ----------------------------------------------------------------------------------------------
# int4 packing
# ----------------------------------------------------------------------------------------------


def test_pack_int4_layout_low_nibble_is_even_k() -> None:
    signed = torch.tensor([[1, 2, -1, -8]], dtype=torch.int8)
    assert ref.pack_int4(signed).tolist() == [[0x21, 0x8F]]
    unsigned = torch.tensor([[15, 0, 3, 12]], dtype=torch.uint8)
    assert ref.pack_int4(unsigned).tolist() == [[0x0F, 0xC3]]


@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_roundtrip_every_nibble_pair(signed: bool) -> None:
    values = torch.arange(-8, 8) if signed else torch.arange(0, 16)
    pairs = torch.cartesian_prod(values, values)  # all 256 (even, odd) pairs
    q = pairs.reshape(1, -1).to(torch.int8 if signed else torch.uint8)
    packed = ref.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    assert torch.equal(ref.unpack_int4(packed, signed=signed), q)
    assert torch.equal(ref.pack_int4(ref.unpack_int4(packed, signed=signed)), packed)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), half_k=st.integers(1, 40), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_property(n: int, half_k: int, signed: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lo, hi, dtype = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, (n, 2 * half_k), generator=g).to(dtype)
    assert torch.equal(ref.unpack_int4(ref.pack_int4(q), signed=signed), q)


def test_pack_int4_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match="-8..7"):
        ref.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="0..15"):
        ref.pack_int4(torch.tensor([[16, 0]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        ref.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


# ----------------------------------------------------------------------------------------------
# Group-wise weight quantisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_quantize_weight_groupwise_roundtrip_error(
    bits: int, symmetric: bool, group_size: int | None
) -> None:
    """Rounding to the grid moves a weight by at most half a step (the scale), never more."""
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(0))
    q, scales, zeros = ref.quantize_weight_groupwise(w, bits=bits, group_size=group_size, symmetric=symmetric)
    g = 128 if group_size is None else group_size
    assert scales.dtype == torch.float16 and scales.shape == (24, 128 // g)
    if symmetric:
        assert q.dtype == torch.int8 and zeros is None
        assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    else:
        assert q.dtype == torch.uint8 and zeros is not None and zeros.dtype == torch.uint8
        assert int(q.max()) <= 2**bits - 1 and zeros.shape == scales.shape
    w_hat = ref.dequantize_groupwise(q, scales, zeros, g)
    step = scales.to(torch.float32).repeat_interleave(g, dim=1)
    # half a step plus fp32 slack; asymmetric: the rounded zero point can add up to another half step
    bound = step * (0.5 if symmetric else 1.0) + 1e-6
    assert bool(((w - w_hat).abs() <= bound).all())


def test_quantize_weight_groupwise_rejects_bad_group_size() -> None:
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="group_size"):
        ref.quantize_weight_groupwise(w, bits=8, group_size=48)
    with pytest.raises(ValueError, match="multiple of group_size=64"):
        ref.quantize_weight_groupwise(w, bits=4, group_size=64)


# ----------------------------------------------------------------------------------------------
# Per-token quantisation and the int8 GEMM oracle
# ----------------------------------------------------------------------------------------------


def test_quantize_per_token_ref_rounds_half_to_even_and_handles_zero_rows() -> None:
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5], [0.0] * 6])
    q, scale = ref.quantize_per_token_ref(x)
    assert q[0].tolist() == [127, 2, -4, 0, 0, 2]  # scale is exactly 1.0 for this row
    assert scale[0].item() == 1.0
    assert q[1].tolist() == [0] * 6 and scale[1].item() == pytest.approx(1e-5 / 127)


def test_int8_gemm_ref_is_exact_at_the_extremes() -> None:
    k = 4096
    a = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((3, k), -128, dtype=torch.int8)
    w[1] = 127
    out = ref.int8_gemm_ref(a, w)
    assert out.dtype == torch.int32
    assert out[:, 0].tolist() == [k * 128 * 128] * 2 and out[:, 1].tolist() == [-k * 128 * 127] * 2


def test_llm_int8_ref_without_outliers_is_w8a8() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 64, generator=g), torch.randn(16, 64, generator=g)
    w_q, w_s = ref.quantize_per_channel_ref(w)
    a_q, a_s = ref.quantize_per_token_ref(x)
    y = ref.llm_int8_linear_ref(x, w_q, w_s, threshold=float("inf"))
    assert torch.equal(y, ref.w8a8_linear_ref(a_q, w_q, a_s, w_s))


def test_activation_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="activation"):
        ref.apply_activation(torch.zeros(2), "swish")


# ----------------------------------------------------------------------------------------------
# Errors of the kernel package that need no Triton
# ----------------------------------------------------------------------------------------------


def test_kernel_input_error_names_argument_expected_and_actual() -> None:
    with pytest.raises(KernelInputError) as info:
        check_tensor("a", torch.zeros(2, 2), dtypes=(torch.int8,))
    assert str(info.value) == "a.dtype: expected int8, got float32"
    assert isinstance(info.value, ValueError) and info.value.argument == "a.dtype"


def test_check_tensor_reports_shape_contiguity_and_device() -> None:
    with pytest.raises(KernelInputError, match=r"w\.shape\[1\]: expected 8"):
        check_tensor("w", torch.zeros(4, 6), shape=(None, 8))
    with pytest.raises(KernelInputError, match=r"x\.is_contiguous\(\): expected True"):
        check_tensor("x", torch.zeros(4, 6).t())
    with pytest.raises(KernelInputError, match=r"s\.device: expected cpu, got meta"):
        check_tensor("s", torch.zeros(4, device="meta"), device=torch.device("cpu"))
    with pytest.raises(KernelInputError, match="no zero-sized dimension"):
        check_tensor("x", torch.zeros(0, 6), shape=(None, 6))


def test_cpu_tensor_for_compiled_kernel_is_refused() -> None:
    def compiled_kernel() -> None: ...

    with pytest.raises(KernelInputError, match="TRITON_INTERPRET=1"):
        check_launchable("x", torch.zeros(2), compiled_kernel)


def test_missing_triton_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    with pytest.raises(TritonUnavailableError, match=r'pip install "lowbit\[triton\]"') as info:
        import_triton()
    assert isinstance(info.value, ImportError)

    monkeypatch.delitem(sys.modules, "lowbit.kernels.w8a8_gemm", raising=False)
    with pytest.raises(ImportError, match=r'pip install "lowbit\[triton\]"'):
        import lowbit.kernels.w8a8_gemm  # noqa: F401


def test_package_and_reference_import_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import lowbit.kernels, lowbit.runtime.reference\n"
        "assert 'triton' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
