"""Per-layer sensitivity: what quantizing each layer costs the model's outputs, measured without recompiling.

**The probe.** A copy of the calibrated graph (observers calibrated, weights still float) in which every
quantizable layer reads its weight and its input through a switch module. A switch hands the layer the
float tensor or its fake-quantized version under one *option*:

==============  ============================================================================
option          the layer sees
==============  ============================================================================
``w8a8``        the input fake-quantized with its calibrated static scale, int8 weights
``w8a8_dynamic``  the input fake-quantized per token (symmetric int8), int8 weights
``w8a16``       float input, int8 weights
``w4a16/gN``    float input, int4 weights in groups of N input channels
``float``       float input, float weights
==============  ============================================================================

Dequantized weights are computed once per (layer, option) with the qparam oracle of
``lowbit.runtime.qparams`` and cached, so toggling a layer is setting an attribute: no recompile, no
recalibration. Output quantizers (``LayerSpec.output``) follow their layer's option.

**Fidelity.** ``SqnrFidelity``: the SQNR (dB) of all floating-point model outputs together against the
float model (the same graph with every layer on ``float``), on a few calibration batches; or
``FunctionFidelity``: a user ``fn(model) -> float`` (higher is better) whose target is its float value
minus a tolerance. Both are measured on calibration data, so they are a little optimistic.

**Sensitivity.** For each layer: the gain when only that layer is left in float while all others are
quantized (``float_gain``, relative to all-quantized: what the planner ranks by), and, with
``full=True``, the fidelity with only that layer quantized (``alone``). ``n + 1`` evaluations for ``n``
layers (``2 n + 1`` in full); ``Sensitivity.write`` puts ``sensitivity.json`` and a bar chart
``sensitivity.png`` into a directory.

**Forked passes.** The evaluations of one analysis differ from a base plan (all-quantized, or all-float
for ``alone``) in one layer each, so ``Probe.sweep`` runs the graph once under the base plan and, at each
layer's first switch, forks off the rest of the graph with that layer changed: everything before the layer
runs once for all of them: about half the passes of setting each plan in turn, with bit-identical
results. The all-quantized fidelity comes from the same sweep. A user metric (``FunctionFidelity``) runs
the model its own way, so it is measured one plan at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from lowbit.compiler import meta
from lowbit.compiler.graph import QUANTIZABLE, attr_tensor, observer_of
from lowbit.config import QuantConfig
from lowbit.errors import EngineError, PlanError
from lowbit.evaluate import token_nll
from lowbit.runtime.progress import bar_disabled
from lowbit.runtime.qparams import (
    PER_TOKEN_EPS,
    dequantize_weight,
    fake_quantize_llm_int8,
    fake_quantize_per_tensor,
    quantize_weight,
    sqnr_db,
)
from lowbit.runtime.report import json_safe
from lowbit.runtime.spec import LayerSpec, QuantSpec, scheme_spec

FLOAT = "float"


# --------------------------------------------------------------------------------------------------
# Options: a scheme plus, for W4, its group size ("w4a16/g64")
# --------------------------------------------------------------------------------------------------


def option_of(spec: LayerSpec) -> str:
    """The option name of a LayerSpec: its scheme, with the group size for w4a16."""
    if spec.scheme == "w4a16" and spec.weight is not None:
        return f"w4a16/g{spec.weight.group_size}"
    return spec.scheme


def scheme_of(option: str) -> str:
    return option.split("/", 1)[0]


def option_spec(option: str, config: QuantConfig) -> LayerSpec:
    """The LayerSpec an option stands for, with the layer config's weight and activation settings."""
    scheme, _, group = option.partition("/g")
    return scheme_spec(
        scheme,
        weight_granularity=config.weight_granularity,
        group_size=int(group) if group else config.group_size,
        activation_symmetric=config.activation_symmetric,
        weight_symmetric=config.weight_symmetric,
        outlier_threshold=config.llm_int8_threshold,
    )


# --------------------------------------------------------------------------------------------------
# Switch modules
# --------------------------------------------------------------------------------------------------


class WeightSwitch(nn.Module):
    """Returns a layer's weight: float, or dequantized under the current option (cached per option)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.float_weight = weight.detach()
        self.cache: dict[str, torch.Tensor] = {}
        self.current: torch.Tensor = self.float_weight

    def select(self, option: str, spec: QuantSpec | None) -> None:
        if spec is None:
            self.current = self.float_weight
            return
        if option not in self.cache:
            q, scale, zp = quantize_weight(self.float_weight, spec)
            self.cache[option] = dequantize_weight(q, scale, zp, spec).to(self.float_weight.dtype)
        self.current = self.cache[option]

    def forward(self) -> torch.Tensor:
        return self.current


class ActivationSwitch(nn.Module):
    """Passes an activation through, or fake-quantizes it: static per tensor (calibrated) or per token."""

    def __init__(self, static: tuple[float, int, QuantSpec] | None) -> None:
        super().__init__()
        self.static = static  # (scale, zero_point, spec) from the calibrated observer, if there was one
        self.mode = FLOAT  # FLOAT | "static" | "token" | "llm_int8"
        self.threshold = 6.0  # the outlier threshold of "llm_int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "static" and self.static is not None:
            scale, zp, spec = self.static
            return fake_quantize_per_tensor(x, scale, zp, spec.qmin, spec.qmax)
        if self.mode == "llm_int8":
            return fake_quantize_llm_int8(x, self.threshold)
        if self.mode == "token":
            # quantized_decomposed's per-token convention: symmetric int8, scale = max(absmax, 1e-5) / 127
            scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=PER_TOKEN_EPS) / 127.0
            return torch.clamp(torch.round(x / scale), -128, 127) * scale
        return x


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeLayer:
    name: str
    op: str
    spec: LayerSpec  # as annotated
    weight: WeightSwitch
    input: ActivationSwitch
    outputs: list[ActivationSwitch] = field(default_factory=list)
    option: str = FLOAT
    switches: list[fx.Node] = field(default_factory=list)  # the graph nodes of its weight and input switches

    @property
    def observed(self) -> bool:
        """Whether calibration measured this layer's input range (static w8a8 is possible)."""
        return self.input.static is not None


class Probe:
    """The calibrated graph with a switch on every layer's weight and input; ``set`` chooses options."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig) -> None:
        self.config = config
        graph = fx.Graph()
        out = graph.graph_copy(gm.graph, {})
        graph.output(out)
        self.gm = fx.GraphModule(gm, graph)  # shares gm's weights and observers; owns its graph
        self.layers: dict[str, ProbeLayer] = {}
        self._build()

    def _add(self, prefix: str, module: nn.Module, args: tuple[Any, ...], before: fx.Node) -> fx.Node:
        name = f"{prefix}_{len(self.gm._modules)}"
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.call_module(name, args)

    def _build(self) -> None:
        graph = self.gm.graph
        qparams: dict[int, tuple[float, int]] = {}
        for node in [n for n in graph.nodes if meta.SPEC in n.meta]:
            name, spec = node.meta[meta.LAYER], node.meta[meta.SPEC]
            w = attr_tensor(self.gm, node.args[1])
            assert w is not None, f"layer {name}: weight is not a constant"
            wsw = WeightSwitch(w)
            w_node = self._add("lowbit_probe_w", wsw, (), node)
            w_node.meta["val"] = w  # layer_macs reads the weight's shape here
            node.replace_input_with(node.args[1], w_node)
            x = node.args[0]
            obs = observer_of(self.gm, x)
            static = None
            if obs is not None:
                if id(obs) not in qparams:
                    qparams[id(obs)] = obs.calculate_qparams()
                static = (*qparams[id(obs)], obs.spec)
                x = x.args[0]
            asw = ActivationSwitch(static)
            in_node = self._add("lowbit_probe_in", asw, (x,), node)
            node.replace_input_with(node.args[0], in_node)
            self.layers[name] = ProbeLayer(name, QUANTIZABLE[node.target], spec, wsw, asw,
                                           switches=[w_node, in_node])
        # what is left of the observers: output observers (follow their layer), residual-add outputs
        # (always quantized), or nothing
        for node in list(graph.nodes):
            obs = observer_of(self.gm, node)
            if obs is None:
                continue
            roles = node.meta.get(meta.OBSERVES, [])
            owner = next((o.rsplit(":", 1)[0] for o in roles if o.endswith(":output")), None)
            residual = any(o.endswith(":residual") for o in roles)
            if node.users and (owner in self.layers or residual):
                sw = ActivationSwitch((*qparams.setdefault(id(obs), obs.calculate_qparams()), obs.spec))
                if owner in self.layers:
                    self.layers[owner].outputs.append(sw)
                else:  # a residual add's output quantizer stays whatever the plan
                    sw.mode = "static"
                node.replace_all_uses_with(self._add("lowbit_probe_out", sw, (node.args[0],), node))
            else:
                node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        graph.lint()
        self.gm.recompile()

    @contextlib.contextmanager
    def all_float(self) -> Iterator[Probe]:
        """Every layer float for the ``with`` block, then back on the options they had."""
        saved = {k: v.option for k, v in self.layers.items()}
        self.set({})
        try:
            yield self
        finally:
            self.set(saved)

    def set(self, options: Mapping[str, str]) -> None:
        """Put every layer on its option (layers not named go float)."""
        for name, layer in self.layers.items():
            option = options.get(name, FLOAT)
            if option == layer.option:
                continue
            if option == FLOAT:
                spec = LayerSpec(FLOAT)
            elif option == option_of(layer.spec):
                spec = layer.spec  # exactly what annotate decided
            else:
                spec = option_spec(option, self.config.for_layer(name))
            act = spec.activation
            if act is not None and not act.dynamic and not layer.observed:
                raise ValueError(f"layer {name!r}: static activations need a calibrated input range")
            layer.weight.select(option, spec.weight)
            layer.input.mode = FLOAT if act is None else ("static" if not act.dynamic else
                                                          "token" if act.outlier_threshold is None else "llm_int8")
            if act is not None and act.outlier_threshold is not None:
                layer.input.threshold = act.outlier_threshold
            for sw in layer.outputs:
                sw.mode = "static" if spec.output is not None else FLOAT
            layer.option = option

    def __call__(self, *flat: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            out = self.gm(*flat)
        return _as_list(out)

    @functools.cached_property
    def _schedule(self) -> tuple[list[fx.Node], dict[fx.Node, int], list[list[fx.Node]]]:
        """The probe's nodes in order, each one's position, and per position the values last used there."""
        nodes = list(self.gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        dead: list[list[fx.Node]] = [[] for _ in nodes]
        for i, n in enumerate(nodes):
            dead[max((index[u] for u in n.users), default=i)].append(n)
        return nodes, index, dead

    def sweep(self, flat: Sequence[torch.Tensor], base: Mapping[str, str], changes: Sequence[tuple[str, str]],
              on_output: Callable[[int, list[torch.Tensor]], None]) -> list[torch.Tensor]:
        """The outputs under ``base``, and through ``on_output(i, outputs)`` those under ``base`` with the one
        change ``changes[i] = (layer, option)``: each change forks off one pass of the graph under ``base``
        at its layer's first switch, so the nodes before it run once for all changes. A sweep of n changes
        costs about 1 + n/2 passes, not 1 + n. Leaves the probe on ``base``."""
        nodes, index, dead = self._schedule
        forks: dict[int, list[int]] = {}
        for k, (layer, _) in enumerate(changes):
            forks.setdefault(min(index[n] for n in self.layers[layer].switches), []).append(k)
        placeholders = iter(flat)
        interp = fx.Interpreter(self.gm, garbage_collect_values=False)

        def run(env: dict[fx.Node, Any], start: int) -> list[torch.Tensor]:
            interp.env = env
            for i in range(start, len(nodes)):
                node = nodes[i]
                if i in forks and env is base_env:
                    for k in forks[i]:
                        layer, option = changes[k]
                        self.set({**base, layer: option})
                        on_output(k, run(dict(env), i))
                        interp.env = env
                    self.set(base)
                if node.op == "placeholder":
                    env[node] = next(placeholders)
                elif node.op == "output":
                    return _as_list(interp.run_node(node))
                else:
                    env[node] = interp.run_node(node)
                for d in dead[i]:
                    env.pop(d, None)
            raise AssertionError("graph without output")

        self.set(base)
        base_env: dict[fx.Node, Any] = {}
        with torch.no_grad():
            return run(base_env, 0)


def _as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


# --------------------------------------------------------------------------------------------------
# Fidelity: one number, higher is better, with a target
# --------------------------------------------------------------------------------------------------


def fidelity_batches(ctx: Any, n: int) -> list[list[torch.Tensor]]:
    """The first ``n`` calibration batches of a PassContext, flattened: what fidelity is measured on."""
    signature = ctx.notes["signature"]
    out = []
    for i, batch in enumerate(ctx.calibration or ()):
        if i >= n:
            break
        out.append(signature.flatten(batch, where=f"calibration batch {i}"))
    return out


def float_outputs(outs: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a graph's outputs: what SQNR fidelity compares."""
    return _float_outputs(_as_list(outs))


def outputs_sqnr_db(reference: Sequence[Sequence[torch.Tensor]], outputs: Sequence[Sequence[Any]]) -> float:
    """SQNR (dB) of per-batch outputs (their float tensors) against per-batch float references, all
    energies summed."""
    signal = sum(SqnrFidelity._signal(ref) for ref in reference)
    noise = sum(SqnrFidelity._noise(ref, outs) for ref, outs in zip(reference, outputs, strict=True))
    return sqnr_db(signal, noise)


def check_output_shapes(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
    """An engine that returns another number of outputs or another shape than the float model is broken, not
    imprecise: EngineError naming the output, before any figure is computed from it."""
    if len(outputs) != len(reference):
        raise EngineError(f"the engine returned {len(outputs)} floating-point outputs where the float model "
                          f"gives {len(reference)}")
    for i, (r, t) in enumerate(zip(reference, outputs, strict=True)):
        if tuple(r.shape) != tuple(t.shape):
            raise EngineError(f"output {i}: the engine returned shape {tuple(t.shape)} where the float model "
                              f"gives {tuple(r.shape)} (an engine defect: save the model and report it)")


def _float_outputs(outs: Sequence[Any]) -> list[torch.Tensor]:
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]


class SqnrFidelity:
    """SQNR (dB) of the model's floating-point outputs, all together, against the float model."""

    unit = "dB"
    metric = "sqnr_db"

    def __init__(self, probe: Probe, batches: Sequence[list[torch.Tensor]], target: float,
                 reference: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        """``reference``: the float outputs of ``batches`` when the graph's own all-float run is not the
        float model (quantize_embeddings' int8 tables are in every run of the graph)."""
        self.batches = list(batches)
        self.target = float(target)
        if reference is None or len(reference) != len(self.batches):
            with probe.all_float():
                reference = [_float_outputs(probe(*b)) for b in self.batches]
        self.reference = [[t.detach().double() for t in outs] for outs in reference]
        self.float_value = math.inf

    def __call__(self, probe: Probe) -> float:
        return outputs_sqnr_db(self.reference, [probe(*flat) for flat in self.batches])

    def sweep(self, probe: Probe, base: Mapping[str, str], changes: Sequence[tuple[str, str]],
              tick: Callable[[], Any] = lambda: None) -> tuple[float, list[float]]:
        """The fidelity under ``base`` and under ``base`` with each one change, from one ``Probe.sweep`` per
        batch (the same numbers as setting each plan and calling this fidelity, for about half the work)."""
        signal = base_noise = 0.0
        noise = [0.0] * len(changes)
        for flat, ref in zip(self.batches, self.reference, strict=True):
            def take(k: int, outs: list[torch.Tensor], ref: list[torch.Tensor] = ref) -> None:
                noise[k] += self._noise(ref, outs)
                tick()

            signal += self._signal(ref)
            base_noise += self._noise(ref, probe.sweep(flat, base, changes, take))
        return sqnr_db(signal, base_noise), [sqnr_db(signal, n) for n in noise]

    @staticmethod
    def _signal(ref: Sequence[torch.Tensor]) -> float:
        return sum(float(r.pow(2).sum()) for r in ref)

    @staticmethod
    def _noise(ref: Sequence[torch.Tensor], outs: Sequence[Any]) -> float:
        outs = _float_outputs(outs)
        check_output_shapes(ref, outs)
        return sum(float((r - t.double()).pow(2).sum()) for r, t in zip(ref, outs, strict=True))


class FunctionFidelity:
    """A user metric ``fn(model) -> float`` (higher is better); the target is its float value - tolerance.

    ``model`` is called like the original model (positional or keyword inputs) and returns its outputs
    in the original structure, as a CompiledModel does.
    """

    unit = ""
    metric = "fidelity_fn"

    def __init__(self, probe: Probe, fn: Callable[[Callable[..., Any]], float], tolerance: float,
                 signature: Any, float_value: float | None = None) -> None:
        """``float_value``: the metric of the float model when the graph's own all-float run is not it."""
        self.fn = fn
        self.signature = signature
        if float_value is None:
            with probe.all_float():
                float_value = self(probe)
        self.float_value = float(float_value)
        self.target = self.float_value - tolerance

    def __call__(self, probe: Probe) -> float:
        def model(*args: Any, **kwargs: Any) -> Any:
            return self.signature.unflatten(probe(*self.signature.flatten_call(args, kwargs)))

        with torch.no_grad():
            return float(self.fn(model))


class PerplexityFidelity:
    """A causal LM's perplexity on the fidelity batches, as ``float ppl / ppl`` (1.0 is float, higher is better):
    the target ``1 / (1 + increase)`` keeps perplexity within ``increase`` (0.01: 1%) of float. The logits are
    the model's first floating-point output; the tokens its ``input_ids`` (or first integer input)."""

    unit = ""
    metric = "float_ppl / ppl"

    def __init__(self, probe: Probe, batches: Sequence[list[torch.Tensor]], increase: float, input_names: Sequence[str],
                 reference: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        self.batches = list(batches)
        names = list(input_names)
        ints = [i for i, t in enumerate(self.batches[0]) if not t.is_floating_point()]
        self.ids_at = names.index("input_ids") if "input_ids" in names else (ints[0] if ints else -1)
        if self.ids_at < 0:
            raise PlanError("target_ppl_increase needs a model with integer token inputs (input_ids)")
        if reference is None or len(reference) != len(self.batches):
            with probe.all_float():
                reference = [_float_outputs(probe(*b)) for b in self.batches]
        self.float_ppl = self.perplexity([[r] for r in (outs[0] for outs in reference)])
        self.float_value = 1.0
        self.target = 1.0 / (1.0 + float(increase))

    def nll(self, flat: Sequence[torch.Tensor], outs: Sequence[Any]) -> tuple[float, int]:
        nll = token_nll(_float_outputs(outs)[0], flat[self.ids_at])  # the same measure as lowbit.evaluate
        return float(nll.double().sum()), int(nll.numel())

    def perplexity(self, outputs: Sequence[Sequence[Any]]) -> float:
        total = count = 0
        for flat, outs in zip(self.batches, outputs, strict=True):
            t, c = self.nll(flat, outs)
            total, count = total + t, count + c
        return math.exp(total / max(count, 1))

    def value_of(self, ppl: float) -> float:
        return self.float_ppl / ppl

    def __call__(self, probe: Probe) -> float:
        return self.value_of(self.perplexity([probe(*flat) for flat in self.batches]))

    def sweep(self, probe: Probe, base: Mapping[str, str], changes: Sequence[tuple[str, str]],
              tick: Callable[[], Any] = lambda: None) -> tuple[float, list[float]]:
        """As ``SqnrFidelity.sweep``: the base plan and each one change, from one forked pass per batch."""
        base_nll, count = 0.0, 0
        nll = [0.0] * len(changes)
        for flat in self.batches:
            def take(k: int, outs: list[torch.Tensor], flat: Sequence[torch.Tensor] = flat) -> None:
                nll[k] += self.nll(flat, outs)[0]
                tick()

            t, c = self.nll(flat, probe.sweep(flat, base, changes, take))
            base_nll, count = base_nll + t, count + c
        return (self.value_of(math.exp(base_nll / count)),
                [self.value_of(math.exp(n / count)) for n in nll])


Fidelity = SqnrFidelity | FunctionFidelity | PerplexityFidelity


# --------------------------------------------------------------------------------------------------
# Sensitivity analysis
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    option: str  # the quantized option measured (the layer's option in the all-quantized plan)
    macs: int
    float_gain: float  # fidelity(all quantized but this layer) - fidelity(all quantized)
    alone: float | None = None  # fidelity with only this layer quantized, all others float (full analysis)


@dataclass
class Sensitivity:
    metric: str
    unit: str
    all_quantized: float
    float_value: float
    layers: list[LayerSensitivity]  # most sensitive (largest float_gain) first
    evaluations: int = 0

    def gains(self) -> dict[str, float]:
        return {r.layer: r.float_gain for r in self.layers}

    def table(self) -> str:
        head = f"{'layer':<44} {'option':<12} {'float gain':>10} {'alone':>9} {'MACs':>12}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            alone = "-" if r.alone is None else _fmt(r.alone)
            lines.append(f"{r.layer:<44} {r.option:<12} {_fmt(r.float_gain):>10} {alone:>9} {r.macs:>12}")
        lines.append(f"all quantized: {_fmt(self.all_quantized)} {self.unit} ({self.metric})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict[str, Any]:
        return json_safe({"metric": self.metric, "unit": self.unit, "all_quantized": self.all_quantized,
                       "float_value": self.float_value, "evaluations": self.evaluations,
                       "layers": [asdict(r) for r in self.layers]})

    def write(self, directory: str | Path) -> list[Path]:
        """``sensitivity.json`` and the bar chart ``sensitivity.png`` (when matplotlib is installed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "sensitivity.json").write_text(json.dumps(self.to_json(), indent=2))
        written = [d / "sensitivity.json"]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return written
        names = [r.layer for r in self.layers]
        n = len(names)
        full = all(r.alone is not None for r in self.layers)
        fig, axes = plt.subplots(1, 2 if full else 1, figsize=(13 if full else 8, 1.6 + 0.28 * n), sharey=True,
                                 squeeze=False)
        y = range(n)
        ax1 = axes[0][0]
        ax1.barh(y, [_finite(r.float_gain) for r in self.layers], color="tab:red")
        ax1.set_title(f"gain when only this layer stays float ({self.unit or self.metric})")
        if full:
            ax2 = axes[0][1]
            ax2.barh(y, [_finite(r.alone or 0.0) for r in self.layers], color="tab:blue")
            ax2.set_title(f"fidelity with only this layer quantized ({self.unit or self.metric})")
        ax1.set_yticks(list(y), names, fontsize=7)
        ax1.invert_yaxis()
        for ax in axes[0]:
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"lowbit sensitivity: all quantized = {_fmt(self.all_quantized)} {self.unit}")
        fig.tight_layout()
        fig.savefig(d / "sensitivity.png", dpi=110)
        plt.close(fig)
        return [*written, d / "sensitivity.png"]


def analyze(probe: Probe, quantized: Mapping[str, str], fidelity: Fidelity, macs: Mapping[str, int] | None = None,
            *, layers: Iterable[str] | None = None, full: bool = True, base: float | None = None,
            progress: bool | str = True) -> Sensitivity:
    """Sensitivity of ``layers`` (default: every layer quantized in ``quantized``, a layer -> option map
    of the all-quantized plan). ``base``: fidelity(quantized) if already measured. Leaves the probe on
    ``quantized``."""
    names = [k for k in (layers if layers is not None else quantized) if quantized.get(k, FLOAT) != FLOAT]
    evaluations = int(base is None)
    alone: list[float | None] = [None] * len(names)
    if isinstance(fidelity, (SqnrFidelity, PerplexityFidelity)):  # one forked pass per batch each
        with tqdm(total=len(names) * (1 + int(full)) * len(fidelity.batches), desc="lowbit sensitivity",
                  unit="eval", disable=bar_disabled(progress), leave=False) as bar:
            if full:
                _, alone = fidelity.sweep(probe, {}, [(n, quantized[n]) for n in names], bar.update)
            swept, without = fidelity.sweep(probe, quantized, [(n, FLOAT) for n in names], bar.update)
        base = swept if base is None else base
    else:  # a user metric runs the model its own way: one plan at a time
        if base is None:
            probe.set(quantized)
            base = fidelity(probe)
        without = []
        for i, name in enumerate(tqdm(names, desc="lowbit sensitivity", unit="layer",
                                      disable=bar_disabled(progress), leave=False)):
            if full:
                probe.set({name: quantized[name]})
                alone[i] = fidelity(probe)
            probe.set({**quantized, name: FLOAT})
            without.append(fidelity(probe))
    evaluations += len(names) * (1 + int(full))
    rows = [LayerSensitivity(name, quantized[name], int((macs or {}).get(name, 0)), _gain(w, base), a)
            for name, w, a in zip(names, without, alone, strict=True)]
    probe.set(quantized)
    rows.sort(key=lambda r: (-_finite(r.float_gain), _finite(r.alone if r.alone is not None else 0.0)))
    return Sensitivity(fidelity.metric, fidelity.unit, base, fidelity.float_value, rows, evaluations)


def _gain(after: float, before: float) -> float:
    if math.isinf(after) and math.isinf(before) and after == before:
        return 0.0
    return after - before


def _finite(v: float, cap: float = 1e3) -> float:
    return max(-cap, min(cap, v)) if not math.isnan(v) else 0.0


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) and v > 0 else f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"

