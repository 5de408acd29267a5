"""Triton kernels for low-bit linear layers, one kernel per module.

=====================  =================================================================
module                 computes
=====================  =================================================================
``w8a8_gemm``          ``int8 x int8 -> int32`` GEMM with a fused dequantise / bias /
                       activation epilogue (``int8_gemm``, ``w8a8_linear``)
``quantize_per_token`` dynamic symmetric per-row int8 quantisation of activations
``weight_only_gemm``   W8A16 / W4A16 group-wise weight-only GEMM (tiled and split-K GEMV)
``llm_int8``           LLM.int8() mixed decomposition built from the two kernels above
=====================  =================================================================

The pure-PyTorch oracle for every kernel lives in :mod:`lowbit.runtime.reference`.

Importing this package never imports Triton, so the compiler can be used without it; importing a
kernel module does (``from lowbit.kernels.w8a8_gemm import w8a8_linear``) and raises
:class:`TritonUnavailableError` when Triton is missing. Every host wrapper validates its inputs *before* launching and raises
:class:`KernelInputError` naming the argument, the expected and the actual value.

On machines without a GPU the kernels run under Triton's interpreter: set ``TRITON_INTERPRET=1``
before the first kernel module is imported (``@triton.jit`` reads it at decoration time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType

__all__ = [
    "KernelInputError",
    "TritonUnavailableError",
    "check_tensor",
    "import_triton",
]

INSTALL_HINT = 'install with `pip install "lowbit[triton]"`'


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class KernelInputError(ValueError):
    """A host wrapper rejected an argument before launching its kernel.

    The message always reads ``"<argument>: expected <expected>, got <actual>"`` so that a failing
    call says exactly which tensor to fix; the three parts are also kept as attributes for tests.
    """

    def __init__(self, argument: str, expected: object, actual: object) -> None:
        self.argument = argument
        self.expected = expected
        self.actual = actual
        super().__init__(f"{argument}: expected {expected}, got {actual}")


class TritonUnavailableError(ImportError):
    """Triton is not installed; the kernels are an optional extra."""


def import_triton() -> tuple[ModuleType, ModuleType]:
    """Return ``(triton, triton.language)`` or raise :class:`TritonUnavailableError`.

    Kernel modules call this at import time so that a missing Triton produces one actionable
    message instead of a bare ``ModuleNotFoundError`` deep inside a compiler pass.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching sys.modules
        raise TritonUnavailableError(f"lowbit's Triton kernels need Triton; {INSTALL_HINT}") from exc
    return triton, tl


# ----------------------------------------------------------------------------------------------
# Input checks shared by the host wrappers (all run before any launch)
# ----------------------------------------------------------------------------------------------
def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Validate one wrapper argument and return it typed as a tensor.

    ``shape`` entries set to ``None`` only fix the rank. ``device`` is the device of the wrapper's
    first tensor argument: kernels read raw pointers, so a tensor on another device would be read
    as garbage (or fault) instead of raising.
    """
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(name, "a torch.Tensor", type(t).__name__)
    if dtypes is not None and t.dtype not in dtypes:
        raise KernelInputError(f"{name}.dtype", _dtype_names(dtypes), str(t.dtype).removeprefix("torch."))
    if shape is not None:
        if t.dim() != len(shape):
            raise KernelInputError(f"{name}.dim()", len(shape), t.dim())
        for axis, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                expected = tuple("*" if s is None else s for s in shape)
                raise KernelInputError(f"{name}.shape[{axis}]", f"{want} (shape {expected})", tuple(t.shape))
        if any(s == 0 for s in t.shape):
            raise KernelInputError(f"{name}.shape", "no zero-sized dimension", tuple(t.shape))
    if device is not None and t.device != device:
        raise KernelInputError(f"{name}.device", str(device), str(t.device))
    if contiguous and not t.is_contiguous():
        raise KernelInputError(f"{name}.is_contiguous()", True, f"False (strides {t.stride()})")
    return t


def check_launchable(name: str, t: torch.Tensor, kernel: object) -> None:
    """Reject CPU tensors unless the kernel was built by Triton's interpreter.

    Compiled Triton kernels dereference device pointers; handing them a CPU tensor fails inside the
    driver with an unhelpful message, so say what to do instead.
    """
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise KernelInputError(
            f"{name}.device",
            "a CUDA tensor (or TRITON_INTERPRET=1 set before importing lowbit.kernels)",
            str(t.device),
        )


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    fn = getattr(kernel, "fn", kernel)  # unwrap triton.autotune
    return type(kernel).__name__ == "InterpretedFunction" or type(fn).__name__ == "InterpretedFunction"


def use_single_config(t: torch.Tensor, kernel: object) -> bool:
    """Skip autotuning under the interpreter or for CPU tensors.

    Autotuning times every config with CUDA events; under the interpreter that is both impossible
    and pointlessly slow, so the wrappers launch one fixed, small config there.
    """
    return t.device.type != "cuda" or is_interpreted(kernel)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (``tl.arange`` sizes must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
