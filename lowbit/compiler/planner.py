"""Automatic mixed precision: the cheapest per-layer plan that meets a fidelity target.

**Choices.** Per layer: ``w8a8`` (static activations), ``w8a8_dynamic`` (per token), ``w8a16``,
``w4a16/g128|g64|g32``, ``float`` -- those the target's engine runs (``Backend.schemes``), that fit the
layer (group sizes that divide, per-token only on linears) and that ``QuantConfig.plan_schemes`` allows.
From least to most accurate they are ranked ``w4a16/g128 < g64 < g32 < w8a8 < w8a8_dynamic < w8a16 <
float``; a layer starts at its configured scheme (``QuantConfig.scheme``, default w8a8) and may only move
up. Layers an override names keep their scheme.

**Cost.** Each backend tables a relative cost per multiply-accumulate per scheme (``scheme_costs``; for
the CPU engines w8a8 1.0, w8a8_dynamic 1.15, float 2.0, w8a16 2.2, w4a16 2.5 -- estimates until measured
ones replace them). A plan's cost is sum(cost[scheme] * MACs) / sum(MACs) over the planned layers.

**Search (greedy, lazy).** Evaluate the starting plan on the probe (``lowbit.compiler.sensitivity``:
fake-quant with the calibrated scales, toggled per layer). If it misses the target, measure every
layer's sensitivity, then repeatedly promote the (layer, option) with the largest fidelity gain per unit
of extra cost: a candidate's gain is estimated by its float gain from the sensitivity table until it is
measured against the current plan; the top candidate is measured, and accepted once it stays on top
with a measured gain. Every accepted plan is an evaluated plan, so the final plan's fidelity is
measured, not predicted. No candidate left below the target raises ``FidelityError`` with the best plan
found and its fidelity.

**Default.** ``QuantConfig()`` is SmoothQuant with ``smoothquant_alpha="auto"`` plus this planner with
``target_sqnr_db=18``. Why: on MiniLM-L6 (32 calibration batches of 8 x 128) the error sits in a few
layers with channel outliers (FFN2 of the first layers, whose input is a GELU output). Per-layer-searched
SmoothQuant removes most of it while every layer stays static int8 -- the fastest path on every engine,
and on OpenVINO / ONNX Runtime the only int8 path for those layers (no per-token int8 there; a float
FFN2 costs ~2x and more). It lifts the output SQNR on the calibration batches from ~15 dB to ~20.5 dB
(embedding cosine 0.9938 -> 0.998 mean on openvino-int8); alpha 0.5 everywhere makes MiniLM *worse*
(0.986), the search picks 0.8-1.0 there. The 18 dB default target is then a floor with margin: a model
SmoothQuant cannot fix (MiniLM without it: ~15 dB) gets its worst layers promoted -- to ``w8a8_dynamic``
where the engine runs per-token int8 (torch, triton), else to ``float`` -- while a model that meets it
costs one evaluation (two probe forwards per fidelity batch) and no sensitivity analysis. Raise the target
for more fidelity at the cost the table says; ``target_sqnr_db=None`` switches planning off.

The pass ``PlanPrecision`` runs the search after ``calibrate`` (it needs the calibrated ranges) and
rewrites the specs it changed: a layer leaving static w8a8 loses its observer edge, so ``lower_qdq``
places no Q/DQ there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import QUANTIZABLE, annotated_nodes, attr_tensor, layer_macs, observer_of
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.sensitivity import (
    FLOAT,
    FunctionFidelity,
    PerplexityFidelity,
    Probe,
    Sensitivity,
    SqnrFidelity,
    analyze,
    fidelity_batches,
    option_of,
    option_spec,
    scheme_of,
)
from lowbit.config import QuantConfig
from lowbit.errors import PlanError
from lowbit.passes.annotate import engine_spec, layer_problem
from lowbit.runtime.spec import LayerSpec, Plan

#: options from least to most accurate; a layer only moves up this ladder
LADDER = ("w4a16/g128", "w4a16/g64", "w4a16/g32", "w8a8", "w8a8_dynamic", "w8a8_llm_int8", "w8a16", "float")
#: relative cost per multiply-accumulate on CPU engines (oneDNN / ORT / OpenVINO, AVX-512 VNNI).
#: Estimates, to be replaced by measured ones: int8 GEMM ~2x fp32; per-token quantization adds a
#: dynamic quantize per row; weight-only schemes dequantize to fp32 before an fp32 GEMM.
CPU_SCHEME_COSTS: Mapping[str, float] = {
    "w8a8": 1.0, "w8a8_dynamic": 1.15, "float": 2.0, "w8a16": 2.2, "w4a16": 2.5,
}


class FidelityError(PlanError):
    """No plan the target can run meets the fidelity target; ``.plan`` and ``.fidelity`` hold the best."""

    def __init__(self, message: str, plan: Plan, fidelity: float) -> None:
        super().__init__(message)
        self.plan = plan
        self.fidelity = fidelity


@dataclass
class Choice:
    """One layer's place in the search: where it starts, where it may go, what its MACs weigh."""

    start: str
    candidates: tuple[str, ...]  # options above start, in ladder order
    macs: int
    pinned: bool = False


@dataclass
class SearchResult:
    options: dict[str, str]
    fidelity: float
    target: float
    cost: float
    start_fidelity: float
    evaluations: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: Sensitivity | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.options.values():
            out[o] = out.get(o, 0) + 1
        return out


def plan_cost(options: Mapping[str, str], choices: Mapping[str, Choice], costs: Mapping[str, float]) -> float:
    """sum(cost[scheme] * MACs) / sum(MACs): 1.0 is every layer at cost 1.0 (w8a8 on CPU)."""
    total = sum(max(c.macs, 1) for c in choices.values())
    return sum(costs.get(scheme_of(options[k]), 2.0) * max(c.macs, 1) for k, c in choices.items()) / total


def search(probe: Probe, choices: Mapping[str, Choice], costs: Mapping[str, float],
           fidelity: SqnrFidelity | FunctionFidelity, *, full_sensitivity: bool = False,
           spec_for: Callable[[str, str], LayerSpec] | None = None, progress: bool | str = True) -> SearchResult:
    """Greedy promotion until ``fidelity(probe) >= fidelity.target``; raises FidelityError if it cannot.

    The sensitivity table is measured when the start plan misses the target (float gains only), or in
    full (with each layer alone) when ``full_sensitivity``. ``spec_for(layer, option)`` builds the specs
    of the plan a FidelityError carries (default: the option's specs under a default QuantConfig)."""
    current = {k: c.start for k, c in choices.items()}
    macs = {k: c.macs for k, c in choices.items()}
    sens = None
    if full_sensitivity:  # the analysis measures the start plan too
        sens = analyze(probe, current, fidelity, macs, full=True, progress=progress)
        f, evals = sens.all_quantized, sens.evaluations
    else:
        probe.set(current)
        f, evals = fidelity(probe), 1
        if f < fidelity.target:
            sens = analyze(probe, current, fidelity, macs, full=False, base=f, progress=progress)
            evals += sens.evaluations
    start_f = f
    steps: list[dict[str, Any]] = []
    best = (f, dict(current))
    if f >= fidelity.target:
        return SearchResult(current, f, fidelity.target, plan_cost(current, choices, costs), start_f, evals,
                            steps, sens)
    assert sens is not None
    estimate: dict[tuple[str, str], float] = {}
    for k, g in sens.gains().items():
        for o in choices[k].candidates:
            estimate[(k, o)] = g  # float's gain bounds what any promotion of k can recover
    measured_at: dict[tuple[str, str], int] = {}  # plan version a candidate's gain was measured against
    values: dict[tuple[str, str], float] = {}  # fidelity of the current plan with that candidate applied
    version = 0

    def extra_cost(k: str, o: str) -> float:
        c = choices[k]
        return (costs.get(scheme_of(o), 2.0) - costs.get(scheme_of(current[k]), 2.0)) * max(c.macs, 1)

    def ratio(key: tuple[str, str]) -> float:
        gain = estimate.get(key, 0.0)
        dc = extra_cost(*key)
        if dc <= 0:
            return math.inf if gain > 0 else gain
        return gain / dc

    while f < fidelity.target:
        cands = [(k, o) for k, c in choices.items() if not c.pinned for o in c.candidates
                 if LADDER.index(o) > LADDER.index(current[k])]
        if not cands:
            break
        cands.sort(key=ratio, reverse=True)
        top = cands[0]
        if measured_at.get(top) != version:
            probe.set({**current, top[0]: top[1]})
            value = fidelity(probe)
            evals += 1
            estimate[top] = value - f if not (math.isinf(value) and math.isinf(f)) else 0.0
            measured_at[top] = version
            values[top] = value
            if value > best[0]:
                best = (value, {**current, top[0]: top[1]})
            continue
        k, o = top
        value = values[top]
        steps.append({"layer": k, "from": current[k], "to": o, "fidelity": value,
                      "extra_cost": extra_cost(k, o) / sum(max(c.macs, 1) for c in choices.values())})
        current[k] = o
        f = value
        version += 1
    probe.set(current)
    if f < fidelity.target:
        if spec_for is None:
            def spec_for(layer: str, option: str) -> LayerSpec:
                return LayerSpec(FLOAT) if option == FLOAT else option_spec(option, QuantConfig())
        best_f, best_options = best
        plan_counts: dict[str, int] = {}
        for o in best_options.values():
            plan_counts[o] = plan_counts.get(o, 0) + 1
        allowed = sorted({o for c in choices.values() for o in (c.start, *c.candidates)})
        raise FidelityError(
            f"no plan reaches the fidelity target {_fmt(fidelity.target)} {fidelity.unit} ({fidelity.metric}) "
            f"with the schemes allowed here ({', '.join(allowed)}): the best plan found reaches "
            f"{_fmt(best_f)} {fidelity.unit} with {plan_counts} (all-quantized: {_fmt(start_f)}). Lower the target, "
            "allow more schemes (QuantConfig.plan_schemes), unpin layers in overrides, or choose a target that "
            "runs more schemes. The best plan is in this error's .plan",
            Plan({k: spec_for(k, v) for k, v in best_options.items()}), best_f,
        )
    return SearchResult(current, f, fidelity.target, plan_cost(current, choices, costs), start_f, evals, steps, sens)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------


def layer_choices(gm: fx.GraphModule, ctx: PassContext, probe: Probe, macs: Mapping[str, int],
                  costs: Mapping[str, float]) -> dict[str, Choice]:
    """Where each layer starts and which options it may take on this target."""
    config: QuantConfig = ctx.config or QuantConfig()
    allowed = set(config.plan_schemes) if config.plan_schemes is not None else None
    out: dict[str, Choice] = {}
    for node in annotated_nodes(gm):
        name = node.meta[meta.LAYER]
        spec: LayerSpec = node.meta[meta.SPEC]
        start = option_of(spec)
        op = QUANTIZABLE[node.target]
        weight = attr_tensor(gm, node.args[1])
        shape = tuple(weight.shape) if weight is not None else ()
        cfg = config.for_layer(name)
        cands: list[str] = []
        if start in LADDER and not config.pins(name):
            for o in LADDER[LADDER.index(start) + 1:]:
                if allowed is not None and scheme_of(o) not in allowed:
                    continue
                if o == "w8a8" and not probe.layers[name].observed:
                    continue
                if layer_problem(option_spec(o, cfg) if o != FLOAT else LayerSpec(FLOAT), op, shape, ctx) is None:
                    cands.append(o)
        out[name] = Choice(start, undominated(cands, costs), int(macs.get(name, 0)),
                           pinned=config.pins(name) or start not in LADDER)
    return out


def undominated(options: Sequence[str], costs: Mapping[str, float]) -> tuple[str, ...]:
    """Drop an option when a more accurate one costs no more (w8a16 at 2.2 next to float at 2.0)."""
    def cost(o: str) -> float:
        return costs.get(scheme_of(o), math.inf)

    return tuple(o for i, o in enumerate(options) if all(cost(p) > cost(o) for p in options[i + 1:]))


class PlanPrecision(Pass):
    """Search the cheapest plan meeting the fidelity target and rewrite the specs it changes."""

    name = "plan_precision"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        wanted = config.plans_automatically or config.sensitivity
        if not wanted or ctx.notes.get("user_plan") or ctx.qparams is not None:
            return PassResult(gm, {})
        batches = fidelity_batches(ctx, config.fidelity_batches)
        if not batches:
            ctx.notes.setdefault("warnings", []).append("plan_precision: no calibration data to measure fidelity on")
            return PassResult(gm, {})
        probe = Probe(gm, config)
        macs = layer_macs(probe.gm, batches[0])  # on the probe: running gm would feed its observers again
        costs = ctx.notes.get("scheme_costs") or CPU_SCHEME_COSTS
        choices = layer_choices(gm, ctx, probe, macs, costs)
        fid: SqnrFidelity | FunctionFidelity | PerplexityFidelity
        if isinstance(config.target_ppl_increase, (int, float)) and config.fidelity_fn is None:
            fid = PerplexityFidelity(probe, batches, float(config.target_ppl_increase), ctx.input_names,
                                     reference=ctx.notes.get("float_outputs"))
        elif config.fidelity_fn is not None:
            fid = FunctionFidelity(
                probe, config.fidelity_fn, config.fidelity_tolerance, ctx.notes["signature"],
                float_value=ctx.notes.get("float_fidelity"))
        else:
            target = config.target_sqnr_db if config.target_sqnr_db is not None else -math.inf  # sensitivity only
            # the float model's outputs as quantize_embeddings found them, before its int8 tables: the
            # fidelity of every plan then counts their error too (the graph's own float run would not)
            fid = SqnrFidelity(probe, batches, target, reference=ctx.notes.get("float_outputs"))
        if not config.plans_automatically:  # sensitivity only
            fid.target = -math.inf
        result = search(probe, choices, costs, fid, full_sensitivity=config.sensitivity,
                        spec_for=lambda layer, option: self._spec(gm, ctx, layer, option), progress=ctx.progress)
        if result.sensitivity is not None:
            ctx.notes["sensitivity"] = result.sensitivity
        changed = self._apply(gm, ctx, result.options)
        ctx.notes["fidelity_measure"] = fid  # compile measures the built engine on the same batches and target
        ctx.notes["plan_search"] = {
            "metric": fid.metric, "target": fid.target, "fidelity": result.fidelity,
            "start_fidelity": result.start_fidelity, "float_value": fid.float_value,
            "relative_cost": result.cost, "start_cost": plan_cost({k: c.start for k, c in choices.items()}, choices, costs),
            "evaluations": result.evaluations, "fidelity_batches": len(batches), "steps": result.steps,
            "counts": result.counts(),
        }
        if isinstance(fid, PerplexityFidelity):  # the figures a person reads: perplexities, not their ratio
            ctx.notes["plan_search"].update(
                target_ppl_increase=config.target_ppl_increase, float_ppl=fid.float_ppl,
                ppl=fid.float_ppl / result.fidelity, start_ppl=fid.float_ppl / result.start_fidelity)
        stats = {"evaluations": result.evaluations}
        for o in (result.options[k] for k in changed):
            stats[f"promoted_to_{o}"] = stats.get(f"promoted_to_{o}", 0) + 1
        return PassResult(gm, stats)

    @staticmethod
    def _spec(gm: fx.GraphModule, ctx: PassContext, layer: str, option: str) -> LayerSpec:
        """The spec annotate would write for this layer and option on this target."""
        config: QuantConfig = ctx.config or QuantConfig()
        node = next(n for n in annotated_nodes(gm) if n.meta[meta.LAYER] == layer)
        if option == option_of(node.meta[meta.SPEC]):
            return node.meta[meta.SPEC]
        spec = LayerSpec(FLOAT) if option == FLOAT else option_spec(option, config.for_layer(layer))
        return engine_spec(spec, QUANTIZABLE[node.target], ctx, layer)

    def _apply(self, gm: fx.GraphModule, ctx: PassContext, options: Mapping[str, str]) -> list[str]:
        """Write the new specs; detach observers from layers that no longer take static activations."""
        changed = []
        full = dict(ctx.plan.layers) if ctx.plan is not None else {}
        for node in list(annotated_nodes(gm)):
            name = node.meta[meta.LAYER]
            old: LayerSpec = node.meta[meta.SPEC]
            if options.get(name, option_of(old)) == option_of(old):
                continue
            spec = self._spec(gm, ctx, name, options[name])
            _detach_observers(gm, node, name, old, spec)
            node.meta[meta.SPEC] = spec
            full[name] = spec
            changed.append(name)
        ctx.plan = Plan(full)
        gm.recompile()
        return changed

    def postconditions(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        problems = []
        for node in annotated_nodes(gm):
            spec = node.meta[meta.SPEC]
            x = node.args[0]
            # observed *as this layer's input*: an observer another layer placed there (the previous conv's
            # output, a residual add's) may stay in front of a float or weight-only layer
            name = node.meta[meta.LAYER]
            observed = observer_of(gm, x) is not None and f"{name}:input" in x.meta.get(meta.OBSERVES, [])
            static = spec.activation is not None and not spec.activation.dynamic
            if observed != static:
                problems.append(f"layer {node.meta[meta.LAYER]}: scheme {spec.scheme} but its input is "
                                f"{'' if observed else 'not '}observed")
        return problems


def _detach_observers(gm: fx.GraphModule, node: fx.Node, name: str, old: LayerSpec, new: LayerSpec) -> None:
    """Take ``node`` off the observers its old spec needed and the new one does not."""
    graph = gm.graph

    def drop(obs_node: fx.Node, role: str, users: Sequence[fx.Node]) -> None:
        for u in users:
            u.replace_input_with(obs_node, obs_node.args[0])
        roles = obs_node.meta.get(meta.OBSERVES, [])
        if f"{name}:{role}" in roles:
            roles.remove(f"{name}:{role}")
        if not obs_node.users:
            target = str(obs_node.target)
            graph.erase_node(obs_node)
            delattr(gm, target)

    x = node.args[0]
    old_static = old.activation is not None and not old.activation.dynamic
    new_static = new.activation is not None and not new.activation.dynamic
    if old_static and not new_static and isinstance(x, fx.Node) and x.op == "call_module":
        drop(x, "input", [node])
    if old.output is not None and new.output is None:
        for obs in list(node.users) + [u for a in node.users for u in a.users]:
            if obs.op == "call_module" and f"{name}:output" in obs.meta.get(meta.OBSERVES, []):
                # layers whose own input role shares this observer keep reading it
                keep = {r.rsplit(":", 1)[0] for r in obs.meta[meta.OBSERVES] if r.endswith(":input")}
                drop(obs, "output", [u for u in obs.users if u.meta.get(meta.LAYER) not in keep])
                break
