"""QuantConfig: what the user asks for. The annotate pass turns it into one frozen LayerSpec per layer."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import QuantConfigError
from lowbit.runtime.observers import METHODS
from lowbit.runtime.spec import SCHEMES, LayerSpec, QuantSpec, scheme_spec

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True)
class QuantConfig:
    """Quantization settings.

    Default: W8A8 -- symmetric int8 weights per output channel, int8 activations per tensor (stored as
    asymmetric uint8, the x86 u8s8 fast path of oneDNN and ONNX Runtime), calibrated by min/max.

    ``overrides`` maps a module-path pattern (fnmatch, e.g. ``"encoder.layer.*.output.dense"``) to
    ``"skip"`` (keep float), a scheme name (``"w8a16"``), or a dict of QuantConfig fields for that layer
    (``{"scheme": "w4a16", "group_size": 64}``). The last matching pattern wins.
    """

    scheme: str = "w8a8"
    calibration: str = "minmax"
    percentile: float = 99.99
    weight_granularity: str = "per_channel"
    group_size: int = 128
    activation_symmetric: bool = False
    quantize_outputs: bool = False
    histogram_bins: int = 2048
    overrides: Mapping[str, Any] = field(default_factory=dict)
    target_sqnr_db: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantConfigError(f"QuantConfig.scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        if self.calibration not in METHODS:
            raise QuantConfigError(
                f"QuantConfig.calibration must be one of {', '.join(METHODS)}; got {self.calibration!r}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise QuantConfigError(f"QuantConfig.percentile must be in (50, 100]; got {self.percentile}")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise QuantConfigError(
                f"QuantConfig.weight_granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}; "
                f"got {self.weight_granularity!r}"
            )
        if self.group_size not in (32, 64, 128, 256):
            raise QuantConfigError(f"QuantConfig.group_size must be 32, 64, 128 or 256; got {self.group_size}")
        for pattern, value in self.overrides.items():
            self._override_config(pattern, value)  # validates eagerly

    def _override_config(self, pattern: str, value: Any) -> QuantConfig:
        if value == "skip":
            value = {"scheme": "float"}
        elif isinstance(value, str):
            value = {"scheme": value}
        if not isinstance(value, Mapping):
            raise QuantConfigError(f"override {pattern!r}: expected 'skip', a scheme name or a dict; got {value!r}")
        bad = set(value) - set(self.__dataclass_fields__) - {"scheme"}
        if bad or "overrides" in value:
            raise QuantConfigError(f"override {pattern!r}: unknown field(s) {sorted(bad or {'overrides'})}")
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "overrides"}
        fields.update(value)
        try:
            return QuantConfig(**fields)
        except QuantConfigError as e:
            raise QuantConfigError(f"override {pattern!r}: {e}") from e

    def for_layer(self, name: str) -> QuantConfig:
        """The effective config of one layer after overrides."""
        cfg = self
        for pattern, value in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                cfg = self._override_config(pattern, value)
        return cfg

    def layer_spec(self, name: str) -> LayerSpec:
        cfg = self.for_layer(name)
        spec = scheme_spec(
            cfg.scheme,
            weight_granularity=cfg.weight_granularity,
            group_size=cfg.group_size,
            activation_symmetric=cfg.activation_symmetric,
        )
        if cfg.quantize_outputs and spec.scheme == "w8a8":
            spec = LayerSpec(spec.scheme, spec.weight, spec.activation, output=spec.activation)
        return spec

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["overrides"] = dict(self.overrides)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QuantConfig:
        return cls(**d)


__all__ = ["QuantConfig", "QuantSpec"]
