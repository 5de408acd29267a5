"""QuantConfig: what the user asks for. The annotate pass turns it into one frozen LayerSpec per layer."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lowbit.errors import QuantConfigError
from lowbit.runtime.observers import METHODS
from lowbit.runtime.spec import SCHEMES, LayerSpec, QuantSpec, scheme_spec

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
#: how weights are rounded: round to nearest, GPTQ's error feedback, AWQ's scales and clipping, or both
WEIGHT_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
#: the default fidelity target of the automatic plan (see lowbit/compiler/planner.py for why this value)
DEFAULT_TARGET_SQNR_DB = 18.0


@dataclass(frozen=True)
class QuantConfig:
    """Quantization settings.

    Default: W8A8 -- symmetric int8 weights per output channel, int8 activations per tensor (stored as
    asymmetric uint8, the x86 u8s8 fast path of oneDNN and ONNX Runtime), calibrated by min/max -- after
    SmoothQuant with a per-layer searched alpha, and with layers promoted to more accurate schemes only
    if the outputs fall below 18 dB SQNR (why these defaults: ``lowbit/compiler/planner.py``).

    ``overrides`` maps a module-path pattern (fnmatch, e.g. ``"encoder.layer.*.output.dense"``) to
    ``"skip"`` (keep float), a scheme name (``"w8a16"``), or a dict of QuantConfig fields for that layer
    (``{"scheme": "w4a16", "group_size": 64}``, ``{"smoothquant_alpha": 0.8}``). The last matching pattern
    wins. A layer an override names is pinned: the automatic plan does not change its scheme.

    SmoothQuant (``lowbit/passes/smooth_quant.py``): ``smoothquant`` switches it on, ``smoothquant_alpha``
    is the migration strength in [0, 1] or ``"auto"`` (searched per layer).

    Automatic mixed precision (``lowbit/compiler/planner.py``): with a fidelity target, layers whose
    quantization costs too much are promoted from ``scheme`` to more accurate schemes the target runs
    (``w8a8_dynamic``, ``w8a16``, ``float``), cheapest gain first, until the target is met. The target
    is ``target_sqnr_db`` (SQNR of the model outputs against float on ``fidelity_batches`` calibration
    batches; None switches planning off) or, when given, ``fidelity_fn(model) -> float`` (higher is
    better; ``model`` is called like the original) within ``fidelity_tolerance`` of its float value.
    ``plan_schemes`` restricts the schemes the planner may choose. ``sensitivity=True`` computes the
    full per-layer sensitivity table (report section, ``sensitivity.png`` in the dump directory) even
    when the plan needs no search. ``embeddings="int8"`` stores large embedding tables as int8 with a
    scale per row (``lowbit/passes/quantize_embeddings.py``); ``"float"`` keeps them as they are.
    Calibration is read more than once (statistics, ranges, fidelity): a one-shot iterator is turned into
    a list.

    Weights (``lowbit/passes/gptq.py``, ``lowbit/passes/awq.py``): ``weight_symmetric=False`` gives
    weight-only layers asymmetric weights (uint4 / uint8 with a zero point); symmetric int4 uses the full
    [-8, 7] range. ``weight_method`` rounds the weights of weight-only layers (``w4a16``, ``w8a16``):
    ``"rtn"`` (round to nearest), ``"gptq"`` (error feedback through the inputs' Hessian, true-sequential),
    ``"awq"`` (activation-aware scales folded into the previous op, then a clipping search) or
    ``"awq+gptq"``. ``gptq_damp`` is GPTQ's dampening (a fraction of the Hessian's mean diagonal),
    ``gptq_block_size`` its lazy-update block, ``gptq_act_order`` whether columns go in order of decreasing
    Hessian diagonal (groups stay static: no run-time permutation). ``output_layer_scheme`` is the scheme
    of a causal LM's output projection (``lm_head``) when ``scheme`` is ``w4a16`` (NNCF and llama.cpp keep
    it 8-bit too); None gives it ``scheme`` like every other layer.

    Language models: ``target_ppl_increase`` (e.g. 0.01) is the planner's fidelity target as a relative
    perplexity increase over float, measured on the fidelity batches' next-token predictions (their
    ``input_ids``); for a causal LM (a model with ``generate``) it replaces the SQNR target by default
    (``target_ppl_increase=0.01``, unless ``target_sqnr_db`` is set to something other than its default),
    and the default plan starts from ``w8a8_dynamic`` where the target runs it (``scheme`` left at w8a8).
    ``llm_int8_threshold`` is the outlier threshold of the ``w8a8_llm_int8`` scheme (LLM.int8()).

    ``bias_correction`` (``lowbit/passes/bias_correction.py``) adds the mean output shift that rounding an int8
    weight causes back into the layer's bias, from the calibration inputs' per-channel means (W8A8 layers
    with a bias: convs after BN folding, encoder linears).
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
    smoothquant: bool = True
    smoothquant_alpha: float | str = "auto"
    target_sqnr_db: float | None = DEFAULT_TARGET_SQNR_DB
    fidelity_fn: Callable[[Callable[..., Any]], float] | None = field(default=None, compare=False, repr=False)
    fidelity_tolerance: float = 0.01
    fidelity_batches: int = 2
    plan_schemes: tuple[str, ...] | None = None
    sensitivity: bool = False
    embeddings: str = "int8"
    weight_symmetric: bool = True
    weight_method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    awq_grid: int = 20
    output_layer_scheme: str | None = "w8a16"
    target_ppl_increase: float | str | None = "auto"
    llm_int8_threshold: float = 6.0
    bias_correction: bool = True

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
        if self.embeddings not in ("int8", "float"):
            raise QuantConfigError(f"QuantConfig.embeddings must be 'int8' or 'float'; got {self.embeddings!r}")
        if self.group_size not in (32, 64, 128, 256):
            raise QuantConfigError(f"QuantConfig.group_size must be 32, 64, 128 or 256; got {self.group_size}")
        if self.weight_method not in WEIGHT_METHODS:
            raise QuantConfigError(
                f"QuantConfig.weight_method must be one of {', '.join(WEIGHT_METHODS)}; got {self.weight_method!r}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise QuantConfigError(f"QuantConfig.gptq_damp must be in (0, 1); got {self.gptq_damp}")
        if self.gptq_block_size < 1:
            raise QuantConfigError(f"QuantConfig.gptq_block_size must be >= 1; got {self.gptq_block_size}")
        if self.awq_grid < 2:
            raise QuantConfigError(f"QuantConfig.awq_grid must be >= 2; got {self.awq_grid}")
        if self.output_layer_scheme is not None and self.output_layer_scheme not in SCHEMES:
            raise QuantConfigError(f"QuantConfig.output_layer_scheme must be None or one of {', '.join(SCHEMES)}; "
                                   f"got {self.output_layer_scheme!r}")
        ppl = self.target_ppl_increase
        if ppl is not None and ppl != "auto" and not (isinstance(ppl, (int, float)) and ppl >= 0):
            raise QuantConfigError(f"QuantConfig.target_ppl_increase must be a fraction >= 0 (0.01 is 1%), None or "
                                   f"'auto'; got {ppl!r}")
        if not self.llm_int8_threshold > 0:
            raise QuantConfigError(f"QuantConfig.llm_int8_threshold must be > 0; got {self.llm_int8_threshold}")
        alpha = self.smoothquant_alpha
        if alpha != "auto" and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
            raise QuantConfigError(f"QuantConfig.smoothquant_alpha must be in [0, 1] or 'auto'; got {alpha!r}")
        if self.target_sqnr_db is not None and not isinstance(self.target_sqnr_db, (int, float)):
            raise QuantConfigError(f"QuantConfig.target_sqnr_db must be a number of dB or None; got {self.target_sqnr_db!r}")
        if self.fidelity_fn is not None and not callable(self.fidelity_fn):
            raise QuantConfigError("QuantConfig.fidelity_fn must be callable: fidelity_fn(model) -> float")
        if self.fidelity_tolerance < 0:
            raise QuantConfigError(f"QuantConfig.fidelity_tolerance must be >= 0; got {self.fidelity_tolerance}")
        if self.fidelity_batches < 1:
            raise QuantConfigError(f"QuantConfig.fidelity_batches must be >= 1; got {self.fidelity_batches}")
        if self.plan_schemes is not None:
            object.__setattr__(self, "plan_schemes", tuple(self.plan_schemes))
            bad = [s for s in self.plan_schemes if s not in SCHEMES]
            if bad:
                raise QuantConfigError(f"QuantConfig.plan_schemes: unknown scheme(s) {bad}; known: {', '.join(SCHEMES)}")
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

    def pins(self, name: str) -> bool:
        """Whether an override fixes this layer's scheme (the automatic plan leaves it alone)."""
        for pattern, value in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern) and (isinstance(value, str) or "scheme" in value):
                return True
        return False

    @property
    def plans_automatically(self) -> bool:
        """Whether a fidelity target is set, so compile searches a mixed-precision plan."""
        return (self.fidelity_fn is not None or self.target_sqnr_db is not None
                or isinstance(self.target_ppl_increase, (int, float)))

    def for_model(self, causal_lm: bool) -> QuantConfig:
        """Resolve ``target_ppl_increase="auto"``: 1% for a causal LM whose SQNR target was left at its
        default (perplexity, not output SQNR, is what an LLM's quality follows), None otherwise."""
        if self.target_ppl_increase != "auto":
            return self
        if causal_lm and self.target_sqnr_db == DEFAULT_TARGET_SQNR_DB and self.fidelity_fn is None:
            return replace(self, target_ppl_increase=0.01, target_sqnr_db=None)
        return replace(self, target_ppl_increase=None)

    def layer_spec(self, name: str) -> LayerSpec:
        cfg = self.for_layer(name)
        spec = scheme_spec(
            cfg.scheme,
            weight_granularity=cfg.weight_granularity,
            group_size=cfg.group_size,
            activation_symmetric=cfg.activation_symmetric,
            weight_symmetric=cfg.weight_symmetric,
            outlier_threshold=cfg.llm_int8_threshold,
        )
        if cfg.quantize_outputs and spec.scheme == "w8a8":
            spec = LayerSpec(spec.scheme, spec.weight, spec.activation, output=spec.activation)
        return spec

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable fields (``fidelity_fn`` is code, not data: it is not kept)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "fidelity_fn"}
        d["overrides"] = dict(self.overrides)
        d["plan_schemes"] = list(self.plan_schemes) if self.plan_schemes is not None else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QuantConfig:
        # a config saved before ``embeddings`` existed was compiled with float tables: keep them so; one saved
        # before ``output_layer_scheme`` gave the output projection the config's scheme
        return cls(**{"embeddings": "float", "output_layer_scheme": None, "target_ppl_increase": None, **d})


__all__ = ["QuantConfig", "QuantSpec"]
