"""The input/output signature of a compiled model: flatten user inputs, check them, rebuild outputs.

Inputs are checked before anything runs, so a wrong shape or dtype gives a message naming the input
(and the calibration batch) instead of an engine's stack trace. Dynamic dims carry a symbol name; the
same name in two inputs must have the same size in one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from lowbit.errors import InputError

DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)}


_DTYPE_NAMES = {d: name for name, d in DTYPES.items()}


def _call_key(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    return tuple((t.dtype, t.shape) for t in tensors)


def dtype_name(d: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(d)
    return name if name is not None else str(d).replace("torch.", "")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A CPU float32/float64 tensor is checked with numpy, on the calling thread: torch's
    parallel ``isfinite`` leaves its OpenMP workers spinning after the check, and on a small CPU they then take
    the cores from the engine the call runs next (OpenVINO at 2 threads: 58 ms a call instead of 18 ms for a
    MobileNet at 8 x 3 x 224 x 224)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class TensorSig:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a str is a dynamic dim's symbol

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Signature:
    inputs: list[TensorSig]
    keywords: list[str] | None  # the example's keyword names, or None when inputs are positional
    num_positional: int
    outputs: list[str]  # output leaf names
    output_kind: str = "tuple"  # "tensor" | "tuple" | "list" | "dict"
    output_keys: list[str] = field(default_factory=list)
    dim_bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    #: integer inputs that index a table (token ids into an embedding): input name -> [lo, hi) of valid values,
    #: checked on every call (an engine's Gather reads out of bounds, or fails with its own error, otherwise)
    value_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: (dtype, shape) per input of calls already checked and accepted: a repeat skips the checks (a call
    #: right after an engine ran finds Python's caches cold, where the full checks cost ~15 us)
    _accepted: dict[tuple[Any, ...], None] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_example(
        cls, args: Sequence[Any], kwargs: Mapping[str, Any], input_names: Sequence[str],
        dynamic: Mapping[str, Mapping[int, str]], example_out: Any,
        dim_bounds: Mapping[str, tuple[int, int | None]] | None = None,
        value_ranges: Mapping[str, tuple[int, int]] | None = None,
    ) -> Signature:
        leaves = [x for x in pytree.tree_leaves((tuple(args), dict(kwargs)))]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if len(tensors) != len(input_names):
            raise InputError(f"the example inputs hold {len(tensors)} tensors but the graph takes {len(input_names)}")
        top_names = list(kwargs) if kwargs else [f"args_{i}" for i in range(len(args))]
        sigs = []
        for name, t in zip(input_names, tensors, strict=True):
            dims = dynamic.get(name) or (dynamic.get(top_names[len(sigs)]) if len(sigs) < len(top_names) else None) or {}
            shape = tuple(dims.get(i, int(s)) for i, s in enumerate(t.shape))
            sigs.append(TensorSig(name, dtype_name(t.dtype), shape))
        kind, keys, n_out = _output_structure(example_out)
        return cls(sigs, list(kwargs) if kwargs else None, len(args), [f"output_{i}" for i in range(n_out)],
                   kind, keys, dict(dim_bounds or {}), dict(value_ranges or {}))

    # -- flattening and checking -------------------------------------------------------------------
    def flatten(self, inputs: Any, *, error: type[Exception] = InputError, where: str = "input",
                check_finite: bool = False) -> list[torch.Tensor]:
        """A batch given as a tuple, dict or lone tensor -> the graph's flat tensor list, checked."""
        if isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
        return self.flatten_call(args, kwargs, error=error, where=where, check_finite=check_finite)

    def flatten_call(self, args: Sequence[Any], kwargs: Mapping[str, Any], *, error: type[Exception] = InputError,
                     where: str = "input", check_finite: bool = False) -> list[torch.Tensor]:
        if not check_finite:
            seen = self._seen_call(args, kwargs)
            if seen is not None:
                self.check_values(seen, error=error, where=where)
                return seen
        if self.keywords is not None:
            if len(args) > len(self.keywords):
                raise error(f"{where}: expected at most {len(self.keywords)} inputs {self.keywords}, got {len(args)}")
            named = dict(zip(self.keywords, args, strict=False))
            dup = set(named) & set(kwargs)
            if dup:
                raise error(f"{where}: input(s) {sorted(dup)} given twice")
            named.update(kwargs)
            missing = [k for k in self.keywords if k not in named]
            extra = [k for k in named if k not in self.keywords]
            if missing or extra:
                raise error(f"{where}: expected inputs {self.keywords}; missing {missing}, unexpected {extra}")
            values = [named[k] for k in self.keywords]
        else:
            if kwargs:
                raise error(f"{where}: the model was compiled with positional inputs; got keywords {sorted(kwargs)}")
            values = list(args)
            if len(values) != self.num_positional:
                raise error(f"{where}: expected {self.num_positional} positional inputs, got {len(values)}")
        values = [torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for v in values]
        if len(values) == len(self.inputs) and all(type(v) is torch.Tensor for v in values):
            leaves = values  # the common call: one plain tensor per input, nothing nested to walk
        else:
            leaves = [x for x in pytree.tree_leaves(values) if isinstance(x, torch.Tensor)]
        if len(leaves) != len(self.inputs):
            raise error(f"{where}: expected {len(self.inputs)} tensors {[s.name for s in self.inputs]}, got {len(leaves)}")
        self.check(leaves, error=error, where=where, check_finite=check_finite)
        self.check_values(leaves, error=error, where=where)
        if leaves is values and len(self._accepted) < 64:
            self._accepted[_call_key(leaves)] = None
        return leaves

    def _seen_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor] | None:
        """The flat inputs of a call made of plain tensors (all by keyword, or all positional) whose dtypes
        and shapes were accepted before; None for any other call (it takes the full checks)."""
        if self.keywords is not None:
            if args or len(kwargs) != len(self.keywords):
                return None
            values = [kwargs.get(k) for k in self.keywords]
        elif kwargs:
            return None
        else:
            values = list(args)
        if not all(type(v) is torch.Tensor for v in values) or _call_key(values) not in self._accepted:
            return None
        return values

    def check(self, tensors: Sequence[torch.Tensor], *, error: type[Exception] = InputError,
              where: str = "input", check_finite: bool = False) -> None:
        sizes: dict[str, tuple[int, str]] = {}
        for sig, t in zip(self.inputs, tensors, strict=True):
            if not isinstance(t, torch.Tensor):
                raise error(f"{where}: input {sig.name!r} must be a tensor or numpy array, got {type(t).__name__}")
            if dtype_name(t.dtype) != sig.dtype:
                raise error(f"{where}: input {sig.name!r} has dtype {dtype_name(t.dtype)}, expected {sig.dtype}")
            if t.ndim != len(sig.shape):
                raise error(f"{where}: input {sig.name!r} has shape {tuple(t.shape)}, expected rank "
                            f"{len(sig.shape)} like {self.describe(sig)}")
            for i, (got, want) in enumerate(zip(t.shape, sig.shape, strict=True)):
                if isinstance(want, int):
                    if got != want:
                        raise error(f"{where}: input {sig.name!r} has shape {tuple(t.shape)}; dim {i} must be "
                                    f"{want} (expected {self.describe(sig)})")
                    continue
                lo, hi = self.dim_bounds.get(want, (1, None))
                if got < lo or (hi is not None and got > hi):
                    allowed = f"{want} in [{lo}, {hi}]" if hi is not None else f"{want} >= {lo}"
                    raise error(f"{where}: input {sig.name!r} dim {i} ({want}) is {got}, outside the range the model "
                                f"was compiled for: {allowed} (set by compile(dynamic_shapes=...); recompile with "
                                f"other bounds to accept it)")
                if want in sizes and sizes[want][0] != got:
                    raise error(f"{where}: dim {want!r} is {got} in {sig.name!r} but {sizes[want][0]} in "
                                f"{sizes[want][1]!r}")
                sizes[want] = (int(got), sig.name)
            if check_finite and t.is_floating_point() and not all_finite(t):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise error(f"{where}: input {sig.name!r} contains {bad}")

    def check_values(self, tensors: Sequence[torch.Tensor], *, error: type[Exception] = InputError,
                     where: str = "input") -> None:
        """Every call: index inputs within their table, float inputs finite. The first bad position, its value and
        the valid range. NaN/Inf are refused because a quantizer maps NaN to an arbitrary code (the float model
        would propagate it; the quantized one would return finite garbage)."""
        for sig, t in zip(self.inputs, tensors, strict=True):
            if t.is_floating_point():
                if t.numel() and not all_finite(t):
                    pos = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
                    raise error(f"{where}: input {sig.name!r} holds {float(t[pos])} at position {list(pos)}; "
                                "a quantized model takes finite values only")
                continue
            bounds = self.value_ranges.get(sig.name)
            if bounds is None or t.numel() == 0:
                continue
            lo, hi = bounds
            small, big = torch.aminmax(t)
            if int(small) < lo or int(big) >= hi:
                pos = tuple(int(i) for i in ((t < lo) | (t >= hi)).nonzero()[0])
                raise error(f"{where}: input {sig.name!r} holds {int(t[pos])} at position {list(pos)}, outside "
                            f"[{lo}, {hi}) (the rows of the table it indexes)")

    @staticmethod
    def describe(sig: TensorSig) -> str:
        return f"{sig.dtype}[{', '.join(str(d) for d in sig.shape)}]"

    # -- outputs -----------------------------------------------------------------------------------
    def unflatten(self, outs: Sequence[torch.Tensor]) -> Any:
        outs = list(outs)
        if self.output_kind == "tensor":
            return outs[0]
        if self.output_kind == "dict":
            return dict(zip(self.output_keys, outs, strict=True))
        if self.output_kind == "list":
            return outs
        return tuple(outs)

    # -- serialisation -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "keywords": self.keywords,
            "num_positional": self.num_positional,
            "outputs": self.outputs,
            "output_kind": self.output_kind,
            "output_keys": self.output_keys,
            "dim_bounds": {k: list(v) for k, v in self.dim_bounds.items()},
            "value_ranges": {k: list(v) for k, v in self.value_ranges.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Signature:
        """Raises KeyError / TypeError / ValueError on a malformed signature (an artifact's loader names
        the file)."""
        for s in d["inputs"]:
            if s["dtype"] not in DTYPES or not all(isinstance(x, (int, str)) for x in s["shape"]):
                raise ValueError(f"input {s.get('name')!r}: dtype {s['dtype']!r} / shape {s['shape']!r} is not a "
                                 f"tensor signature (dtypes: {', '.join(DTYPES)})")
        return cls(
            inputs=[TensorSig(s["name"], s["dtype"], tuple(s["shape"])) for s in d["inputs"]],
            keywords=d["keywords"],
            num_positional=d["num_positional"],
            outputs=list(d["outputs"]),
            output_kind=d["output_kind"],
            output_keys=list(d.get("output_keys", [])),
            dim_bounds={k: (v[0], v[1]) for k, v in d.get("dim_bounds", {}).items()},
            value_ranges={k: (int(v[0]), int(v[1])) for k, v in d.get("value_ranges", {}).items()},
        )

    def example_tensors(self, sizes: Mapping[str, int] | None = None) -> list[torch.Tensor]:
        """Zero tensors of this signature (dynamic dims at ``sizes`` or 2), e.g. for tracing."""
        sizes = dict(sizes or {})
        return [torch.zeros([d if isinstance(d, int) else sizes.get(d, 2) for d in s.shape],
                            dtype=DTYPES[s.dtype]) for s in self.inputs]


def _output_structure(out: Any) -> tuple[str, list[str], int]:
    """(kind, keys, number of leaves). A Hugging Face ModelOutput becomes a tuple of its tensors."""
    if isinstance(out, torch.Tensor):
        return "tensor", [], 1
    if type(out) is dict:
        if all(isinstance(v, torch.Tensor) for v in out.values()):
            return "dict", list(out), len(out)
    if type(out) is list and all(isinstance(v, torch.Tensor) for v in out):
        return "list", [], len(out)
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if hasattr(out, "to_tuple"):  # transformers.ModelOutput
        leaves = [x for x in out.to_tuple() if isinstance(x, torch.Tensor)]
    return "tuple", [], len(leaves)
