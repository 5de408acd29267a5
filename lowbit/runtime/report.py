"""The per-layer report of a compiled model: a table to read, JSON to keep."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COLUMNS = [
    ("layer", "layer"), ("op", "op"), ("scheme", "scheme"), ("smoothquant", "smooth"), ("weight_granularity", "weights"),
    ("weight_method", "method"), ("weight_sqnr_db", "w SQNR dB"), ("input_scale", "in scale"), ("input_zero_point", "in zp"),
    ("kernel", "engine kernel"), ("weights", "weights run"), ("int8", "int8"),
]


def json_safe(v: Any) -> Any:
    """A copy strict JSON can hold: non-finite floats (an all-float SQNR is inf) become "inf"/"nan"."""
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    if isinstance(v, Mapping):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def fmt(v: Any) -> str:
    """A figure as the reports print it: 4 significant digits, "inf", "-" for none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    return str(v)


@dataclass
class Report:
    target: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)  # extra tables (engines, sensitivity, ...)

    def table(self) -> str:
        cols = [c for c in COLUMNS if any(c[0] in row for row in self.layers)]
        rows = [[fmt(r.get(k)) for k, _ in cols] for r in self.layers]
        head = [h for _, h in cols]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
                 "-+-".join("-" * w for w in widths)]
        lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.layers:
            counts[r.get("scheme", "?")] = counts.get(r.get("scheme", "?"), 0) + 1
        by = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        total = sum(p.get("seconds", 0.0) for p in self.passes)
        return f"target {self.target}: {len(self.layers)} layers ({by}); passes took {total:.2f} s"

    def __str__(self) -> str:
        parts = [self.summary(), self.table()]
        fid = self.sections.get("fidelity") or {}
        if "quantized" in fid:
            parts.append(f"\nfidelity on the engine: perplexity {fmt(fid['quantized'])} against float "
                         f"{fmt(fid['float'])} ({fid['quantized'] / fid['float'] - 1:+.2%}) on {fid['on']} "
                         f"({fid['tokens']} tokens)")
        elif "sqnr_db" in fid:
            parts.append(f"\nfidelity on the engine: output SQNR {fmt(fid['sqnr_db'])} dB, cosine "
                         f"{fid['cosine']:.5f} against the float model on {fid['on']}")
        plan = self.sections.get("plan")
        if plan:
            parts.append(f"\nplan: {plan['metric']} {fmt(plan['fidelity'])} (target {fmt(plan['target'])}; "
                         f"all at the start scheme {fmt(plan['start_fidelity'])}), relative cost "
                         f"{plan['relative_cost']:.3f} (start {plan['start_cost']:.3f}), "
                         f"{plan['evaluations']} evaluations")
            engine = plan.get("engine_fidelity")
            if isinstance(engine, (int, float)):
                replans = plan.get("engine_replans") or []
                parts.append(f"plan: {plan['metric']} {fmt(engine)} on the engine (reference {fmt(plan['fidelity'])}; "
                             f"target {'met' if plan.get('engine_target_met') else 'NOT met'}"
                             + (f" after {len(replans)} re-plan(s)" if replans else "") + ")")
            if "float_ppl" in plan:
                parts.append(f"plan: perplexity {fmt(plan['ppl'])} against float {fmt(plan['float_ppl'])} "
                             f"(+{plan['ppl'] / plan['float_ppl'] - 1:.2%}; budget +{plan['target_ppl_increase']:.2%}; "
                             f"all at the start scheme {fmt(plan['start_ppl'])}) on the fidelity batches")
        embeddings = self.sections.get("embeddings")
        if embeddings and embeddings.get("tables"):
            parts.append("\nembedding tables as int8 rows: " + "; ".join(
                f"{name} {t['float_mb']:g} -> {t['int8_mb']:g} MB ({fmt(t['sqnr_db'])} dB)"
                for name, t in embeddings["tables"].items()))
        engine = self.sections.get("engine")
        if engine:
            parts.append(f"\n{engine['engine']}: {engine['int8_share']:.1%} of the quantized layers' "
                         "multiply-accumulates run in integer kernels")
            weight_only = {name: v for name, v in engine.get("layers", {}).items()
                           if str(v.get("weights", "float")).startswith(("int4", "uint4")) or
                           (v.get("weights") not in (None, "float", "?") and not v.get("int8"))}
            if weight_only:
                kinds: dict[str, int] = {}
                for v in weight_only.values():
                    kinds[f"{v['weights']} in {v['kernel']}"] = kinds.get(f"{v['weights']} in {v['kernel']}", 0) + 1
                parts.append(f"{engine['engine']}: weights kept compressed in the kernel for {len(weight_only)} layers: "
                             + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())))
            attention = engine.get("attention_kernels")
            if attention:
                int8 = sum(k.endswith((":i8", ":u8")) for k in attention)
                parts.append(f"{engine['engine']}: {int8} of {len(attention)} attention kernels compute Q K^T in int8")
            if engine.get("note"):  # e.g. tensorrt-int8 export-only: which engine really runs the calls
                parts.append(f"{engine['engine']}: {engine['note']}")
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return json_safe({"target": self.target, "layers": self.layers, "passes": self.passes,
                          "sections": self.sections})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Report:
        def unclean(v: Any) -> Any:
            if v in ("inf", "-inf", "nan"):
                return float(v)
            if isinstance(v, Mapping):
                return {k: unclean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [unclean(x) for x in v]
            return v

        return cls(d["target"], unclean(d.get("layers", [])), d.get("passes", []), d.get("sections", {}))
