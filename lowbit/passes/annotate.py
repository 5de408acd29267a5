"""Annotate: write one frozen LayerSpec per quantizable layer from the QuantConfig or the plan.

Policy lives only here. Every later pass reads ``node.meta[SPEC]``; none consults the config again,
except ``plan_precision`` (``lowbit/compiler/planner.py``), which, when the config sets a fidelity target,
promotes layers from the specs written here to more accurate ones once calibration has measured them.
The resulting full plan (every layer, including the ones left in float) is stored in ``ctx.plan``.

A plan entry the target cannot run -- a layer the model lacks, a scheme the engine does not run, a group
size that does not divide the layer -- raises PlanError naming the entry.
"""

from __future__ import annotations

from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import QUANTIZABLE, assign_layer_names, attr_tensor, output_projections
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.patterns import attention_score_inputs
from lowbit.config import QuantConfig
from lowbit.errors import PlanError, QuantConfigError
from lowbit.passes.fuse_activation import output_node
from lowbit.runtime.spec import LayerSpec, Plan, QuantSpec, replace


def check_spec_fits(spec: LayerSpec, op: str, weight_shape: tuple[int, ...]) -> str | None:
    """Why this spec cannot apply to a layer of this op and weight shape, or None if it can."""
    w = spec.weight
    if w is None:
        return None
    if w.granularity == "per_group":
        if op != "linear":
            return f"group-wise weights are for linear layers; this is a {op}"
        if weight_shape[1] % int(w.group_size or 1):
            fit = [g for g in (32, 64, 128, 256) if weight_shape[1] % g == 0]
            return (f"in_features {weight_shape[1]} is not a multiple of group size {w.group_size} (group sizes "
                    f"that divide it: {', '.join(map(str, fit)) or 'none; use per_channel'})")
    if spec.activation is not None and spec.activation.granularity == "per_token" and op != "linear":
        return f"per-token activations are for linear layers; this is a {op}"
    return None


def layer_problem(spec: LayerSpec, op: str, weight_shape: tuple[int, ...], ctx: PassContext) -> str | None:
    """Why this spec cannot run on this layer on the compile target, or None if it can."""
    why = check_spec_fits(spec, op, weight_shape) if weight_shape else None
    supported = ctx.notes.get("supported_schemes")
    if why is None and supported is not None and spec.scheme not in supported:
        why = f"scheme {spec.scheme!r} is not supported by target {ctx.notes.get('target')!r} " \
              f"(it runs {', '.join(sorted(supported))})"
    return why


#: the output of a projection that feeds the attention scores Q K^T (query or key): int8 per tensor
SCORE_OPERAND = QuantSpec("int8", True, "per_tensor")


def engine_spec(spec: LayerSpec, op: str, ctx: PassContext, layer: str = "") -> LayerSpec:
    """The spec adjusted to what the target's engine needs to run it as integer kernels."""
    if (ctx.notes.get("quantize_conv_outputs") and op.startswith("conv") and spec.scheme == "w8a8"
            and spec.output is None):
        # the engine runs a conv as integer only with a quantized output (ORT's QLinearConv)
        spec = replace(spec, output=spec.activation)
    if (ctx.notes.get("quantize_attention_scores") and spec.quantized and spec.output is None
            and layer in ctx.notes.get("attention_score_layers", ())):
        # a quantized query/key projection hands the attention int8 operands: the engine computes Q K^T
        # as an integer matmul (OpenVINO's int8 MHA). A layer kept in float keeps its output float too.
        spec = replace(spec, output=SCORE_OPERAND)
    if ctx.notes.get("symmetric_activations") and spec.activation is not None and not spec.activation.dynamic:
        # the engine's Q/DQ take symmetric int8 only (TensorRT: zero point 0): static activations follow
        sym = QuantSpec("int8", True, "per_tensor")
        spec = LayerSpec(spec.scheme, spec.weight, sym, output=sym if spec.output is not None else None)
    return spec


def config_spec(config: QuantConfig, name: str, output_projection: bool) -> LayerSpec:
    """The spec the config gives a layer: its own (after overrides), except that a causal LM's output projection
    (``output_projection``) under a 4-bit config takes ``output_layer_scheme`` unless an override pins it (the logits' layer is the
    most sensitive of an LLM: 4-bit there costs SmolLM2 about 7 points of perplexity)."""
    cfg = config.for_layer(name)
    if (output_projection and cfg.scheme == "w4a16" and config.output_layer_scheme is not None
            and not config.pins(name)):
        return replace(config, overrides={}, scheme=config.output_layer_scheme,
                       weight_granularity="per_channel").layer_spec(name)
    return config.layer_spec(name)


class Annotate(Pass):
    name = "annotate"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        plan: Plan | None = ctx.plan
        layers = assign_layer_names(gm)
        scores = attention_score_inputs(gm)
        ctx.notes["attention_score_layers"] = {k for k, n in layers.items() if output_node(n) in scores}
        if plan is not None:
            unknown = [k for k in plan.layers if k not in layers]
            if unknown:
                raise PlanError(
                    f"plan entry {unknown[0]!r} names no layer of this model"
                    f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; layers are: "
                    + ", ".join(list(layers)[:12]) + (" ..." if len(layers) > 12 else "")
                )
        ctx.notes["user_plan"] = plan is not None  # a given plan is final: plan_precision leaves it alone
        full: dict[str, LayerSpec] = {}
        counts: dict[str, int] = {}
        heads = output_projections(gm) if ctx.notes.get("causal_lm") else set()
        for name, node in layers.items():
            from_plan = plan is not None and name in plan.layers
            spec = plan.layers[name] if from_plan else config_spec(config, name, node in heads)
            op = QUANTIZABLE[node.target]
            weight = attr_tensor(gm, node.args[1])
            why = spec.inconsistency() if from_plan else None
            why = why or layer_problem(spec, op, tuple(weight.shape) if weight is not None else (), ctx)
            if why is not None:
                err = PlanError if from_plan else QuantConfigError
                raise err(f"{'plan entry' if from_plan else 'layer'} {name!r}: {why}")
            spec = engine_spec(spec, op, ctx, name)
            node.meta[meta.SPEC] = spec
            full[name] = spec
            counts[spec.scheme] = counts.get(spec.scheme, 0) + 1
        ctx.plan = Plan(full)
        return PassResult(gm, {f"layers_{k}": v for k, v in counts.items()})
