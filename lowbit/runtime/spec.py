"""Quantization specs and the per-layer precision plan: frozen, JSON-serialisable data.

Policy (which layer gets which scheme) is written once as these specs; every later stage only reads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lowbit.errors import PlanError

DTYPE_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
}
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``narrow`` drops the most negative code of a signed type ([-127, 127] for int8) so that symmetric
    quantization is symmetric (TensorRT's convention for weights). ``signed_scale`` uses the whole signed
    range instead: the value of largest magnitude goes to the most negative code, ``scale = w[argmax |w|] /
    qmin`` (negative when that value is positive), as llama.cpp's Q4_0 and NNCF's INT4_SYM do: at 4 bits
    that is 16 usable levels and a step of max|w|/8 instead of 15 levels and max|w|/7. ``axis`` is the channel axis for
    per-channel; per-group groups run along the last axis (the input features of a linear).
    """

    dtype: str = "int8"
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int | None = None
    group_size: int | None = None
    dynamic: bool = False
    narrow: bool = False
    signed_scale: bool = False
    outlier_threshold: float | None = None  # LLM.int8(): input columns with any |x| above it stay float

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_RANGES:
            raise ValueError(f"QuantSpec.dtype must be one of {sorted(DTYPE_RANGES)}, got {self.dtype!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "per_group" and not self.group_size:
            raise ValueError("QuantSpec with granularity='per_group' needs a group_size")
        if self.symmetric and self.dtype.startswith("u"):
            raise ValueError(f"symmetric quantization needs a signed dtype, got {self.dtype!r}")
        if self.signed_scale and (not self.symmetric or self.narrow):
            raise ValueError("signed_scale is a convention of symmetric quantization over the full range (not narrow)")

    @property
    def qmin(self) -> int:
        lo = DTYPE_RANGES[self.dtype][0]
        return lo + 1 if (self.narrow and self.symmetric) else lo

    @property
    def qmax(self) -> int:
        return DTYPE_RANGES[self.dtype][1]

    @property
    def bits(self) -> int:
        return 4 if self.dtype.endswith("4") else 8

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QuantSpec:
        return cls(**d)

    def describe(self) -> str:
        """'int4 sym g64', 'uint4 asym g64', 'int8 sym per_channel'."""
        gran = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        return f"{self.dtype} {'sym' if self.symmetric else 'asym'} {gran}"


# --------------------------------------------------------------------------------------------------
# Schemes: the named per-layer choices a plan is made of.
# --------------------------------------------------------------------------------------------------

SCHEMES = ("w8a8", "w8a8_dynamic", "w8a8_llm_int8", "w8a16", "w4a16", "float")


@dataclass(frozen=True)
class LayerSpec:
    """The frozen decision for one quantizable layer (a linear or conv node)."""

    scheme: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    output: QuantSpec | None = None  # quantize the layer's output too (after its fused activation)

    @property
    def quantized(self) -> bool:
        return self.scheme != "float"

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "weight": self.weight.to_json() if self.weight else None,
            "activation": self.activation.to_json() if self.activation else None,
            "output": self.output.to_json() if self.output else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "") -> LayerSpec:
        """An entry of a plan. A bare ``{"scheme": "w8a16"}`` (optionally with ``"group_size"`` for w4a16)
        takes the scheme's default specs; an entry whose specs contradict its scheme is refused."""
        if not isinstance(d, Mapping) or "scheme" not in d:
            raise PlanError(f"plan entry {where!r}: expected an object with a 'scheme', got {d!r}")
        if d["scheme"] not in SCHEMES:
            raise PlanError(f"plan entry {where!r}: unknown scheme {d['scheme']!r}; known: {', '.join(SCHEMES)}")
        try:
            if not any(k in d for k in ("weight", "activation", "output")):
                return scheme_spec(d["scheme"], group_size=int(d.get("group_size", 128)))
            spec = cls(
                scheme=d["scheme"],
                weight=QuantSpec.from_json(d["weight"]) if d.get("weight") else None,
                activation=QuantSpec.from_json(d["activation"]) if d.get("activation") else None,
                output=QuantSpec.from_json(d["output"]) if d.get("output") else None,
            )
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan entry {where!r}: {e}") from e
        why = spec.inconsistency()
        if why:
            raise PlanError(f"plan entry {where!r}: {why}")
        return spec

    def inconsistency(self) -> str | None:
        """Why the weight/activation specs do not match the scheme name, or None."""
        w, a = self.weight, self.activation
        if self.scheme == "float":
            return None if w is None and a is None else "scheme 'float' quantizes nothing, but the entry gives specs"
        if w is None:
            return f"scheme {self.scheme!r} quantizes the weight, but the entry has no 'weight' spec"
        if self.scheme in ("w8a16", "w4a16") and a is not None:
            return f"scheme {self.scheme!r} is weight-only, but the entry gives an 'activation' spec"
        if self.scheme == "w4a16" and w.bits != 4:
            return f"scheme 'w4a16' needs a 4-bit weight spec, the entry gives {w.dtype}"
        if self.scheme == "w8a8" and (a is None or a.dynamic):
            return "scheme 'w8a8' needs a static 'activation' spec (dynamic per token is 'w8a8_dynamic')"
        if self.scheme == "w8a8_dynamic" and (a is None or not a.dynamic or a.outlier_threshold is not None):
            return "scheme 'w8a8_dynamic' needs a dynamic per-token 'activation' spec (no outlier threshold)"
        if self.scheme == "w8a8_llm_int8" and (a is None or not a.dynamic or a.outlier_threshold is None):
            return "scheme 'w8a8_llm_int8' needs a dynamic per-token 'activation' spec with an 'outlier_threshold'"
        return None


def scheme_spec(
    scheme: str,
    *,
    weight_granularity: str = "per_channel",
    group_size: int = 128,
    activation_symmetric: bool = False,
    weight_symmetric: bool = True,
    outlier_threshold: float = 6.0,
) -> LayerSpec:
    """Expand a scheme name into its weight and activation specs.

    Symmetric int4 weights use the full [-8, 7] range with a signed scale (``QuantSpec.signed_scale``);
    symmetric int8 weights the narrow [-127, 127] (what TensorRT and the int8 GEMMs expect). Asymmetric
    weights (``weight_symmetric=False``) are uint4 / uint8 with a zero point per group or channel; they
    are for the weight-only schemes (an integer GEMM wants symmetric weights).
    """
    if scheme == "float":
        return LayerSpec("float")
    if scheme == "w4a16":
        w4 = (QuantSpec("int4", True, "per_group", group_size=group_size, signed_scale=True) if weight_symmetric
              else QuantSpec("uint4", False, "per_group", group_size=group_size))
        return LayerSpec("w4a16", weight=w4)
    asym = not weight_symmetric and scheme == "w8a16"
    dtype, sym, narrow = ("uint8", False, False) if asym else ("int8", True, True)
    if weight_granularity == "per_group":
        w = QuantSpec(dtype, sym, "per_group", group_size=group_size, narrow=narrow)
    elif weight_granularity == "per_channel":
        w = QuantSpec(dtype, sym, "per_channel", axis=0, narrow=narrow)
    elif weight_granularity == "per_tensor":
        w = QuantSpec(dtype, sym, "per_tensor", narrow=narrow)
    else:
        raise ValueError(f"unknown weight granularity {weight_granularity!r}")
    if scheme == "w8a16":
        return LayerSpec("w8a16", weight=w)
    if scheme == "w8a8_dynamic":
        return LayerSpec("w8a8_dynamic", weight=w, activation=QuantSpec("int8", True, "per_token", dynamic=True))
    if scheme == "w8a8_llm_int8":  # LLM.int8(): per-token int8 on the inlier columns, outlier columns in float
        return LayerSpec("w8a8_llm_int8", weight=w, activation=QuantSpec(
            "int8", True, "per_token", dynamic=True, outlier_threshold=float(outlier_threshold)))
    if scheme == "w8a8":
        act = (
            QuantSpec("int8", True, "per_tensor")
            if activation_symmetric
            else QuantSpec("uint8", False, "per_tensor")
        )
        return LayerSpec("w8a8", weight=w, activation=act)
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


@dataclass
class Plan:
    """The per-layer precision plan: layer path -> LayerSpec. Editable JSON, re-applied by compile(plan=)."""

    layers: dict[str, LayerSpec] = field(default_factory=dict)
    VERSION = 1

    def to_json(self) -> dict[str, Any]:
        return {"version": self.VERSION, "layers": {k: v.to_json() for k, v in self.layers.items()}}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or not isinstance(d.get("layers"), Mapping):
            raise PlanError("a plan is an object with a 'layers' mapping of layer path -> {scheme, ...}")
        return cls({k: LayerSpec.from_json(v, where=k) for k, v in d["layers"].items()})

    @classmethod
    def coerce(cls, plan: Plan | Mapping[str, Any] | str | None) -> Plan | None:
        """Accept a Plan, its JSON dict, a JSON string or a path to a JSON file."""
        if plan is None or isinstance(plan, Plan):
            return plan
        if isinstance(plan, str):
            text = plan
            if not text.lstrip().startswith("{"):
                with open(plan, encoding="utf-8") as f:
                    text = f.read()
            try:
                plan = json.loads(text)
            except json.JSONDecodeError as e:
                raise PlanError(f"plan is not valid JSON: {e}") from e
        return cls.from_json(plan)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for spec in self.layers.values():
            out[spec.scheme] = out.get(spec.scheme, 0) + 1
        return out

    def with_layer(self, name: str, spec: LayerSpec) -> Plan:
        layers = dict(self.layers)
        layers[name] = spec
        return Plan(layers)


__all__ = ["QuantSpec", "LayerSpec", "Plan", "SCHEMES", "scheme_spec", "replace"]
