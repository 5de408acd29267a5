"""Insert observers where static activation quantization will go.

One observer per (producer, spec): Q, K and V reading the same LayerNorm output share one observer and
so one scale. Output observers (``LayerSpec.output``) go after the layer's fused activation.
Dynamic (per-token) and weight-only layers get no observer: their scales are computed at run time or
from the weight itself.

Engine choices (backend attributes): ``quantize_residual_adds`` quantizes CNN residual joins in and out;
``quantize_gating`` quantizes squeeze-excite products ``x * gate`` in and out and lets a pooling read an
int8 feature map through the quantizer another reader already has on it. ``quantize_hardswish_gate`` writes a
hardswish between two quantizers as ``x * Q(hardsigmoid(x))``, the gate on a fixed [0, 1] grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import annotated_nodes, observer_of
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.patterns import feature_pools, gating_muls, residual_adds
from lowbit.config import QuantConfig
from lowbit.passes.fuse_activation import output_node
from lowbit.runtime.observers import HARDSIGMOID_QPARAMS, FixedQParamsObserver, Observer, make_observer
from lowbit.runtime.spec import QuantSpec

aten = torch.ops.aten

HARDSWISH = (aten.hardswish.default, aten.hardswish_.default)
#: hardswish's gate: hardsigmoid's [0, 1] on uint8, 1.0 a code (the input must be uint8 too: QLinearMul)
GATE_SPEC = QuantSpec(dtype="uint8", symmetric=False)


class InsertObservers(Pass):
    name = "insert_observers"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        made: dict[tuple[str, QuantSpec], fx.Node] = {}
        counter = 0

        def observer_for(value: fx.Node, spec: QuantSpec, layer_name: str, role: str) -> fx.Node:
            existing = observer_of(gm, value)
            if existing is not None and existing.spec == spec:
                # already quantized this way (the producer's output quantizer): share it, not Q/DQ it twice
                value.meta[meta.OBSERVES].append(f"{layer_name}:{role}")
                return value
            key = (value.name, spec)
            if key in made:
                made[key].meta[meta.OBSERVES].append(f"{layer_name}:{role}")
                return made[key]
            cfg = config.for_layer(layer_name)
            obs = make_observer(spec, cfg.calibration, percentile=cfg.percentile, bins=cfg.histogram_bins)
            made[key] = attach(value, obs, layer_name, role)
            return made[key]

        def attach(value: fx.Node, obs: Observer, layer_name: str, role: str) -> fx.Node:
            nonlocal counter
            name = f"lowbit_observer_{counter}"
            counter += 1
            gm.add_submodule(name, obs)
            with gm.graph.inserting_after(value):
                node = gm.graph.call_module(name, (value,))
            node.meta["val"] = value.meta.get("val")
            node.meta[meta.OBSERVES] = [f"{layer_name}:{role}"]
            return node

        inputs = outputs = 0
        for layer in list(annotated_nodes(gm)):
            spec = layer.meta[meta.SPEC]
            name = layer.meta[meta.LAYER]
            act = spec.activation
            if act is not None and not act.dynamic and isinstance(layer.args[0], fx.Node):
                obs = observer_for(layer.args[0], act, name, "input")
                layer.replace_input_with(layer.args[0], obs)
                inputs += 1
            if spec.output is not None:
                out = output_node(layer)
                users = list(out.users)
                obs = observer_for(out, spec.output, name, "output")
                for u in users:
                    u.replace_input_with(out, obs)
                outputs += 1
        residual = self._quantize_residual_adds(gm, observer_for) if ctx.notes.get("quantize_residual_adds") else 0
        gates = pools = 0
        if ctx.notes.get("quantize_gating"):
            gates = self._quantize_gating_muls(gm, observer_for)
            pools = self._pool_int8_inputs(gm)
        hardswish = self._quantize_hardswish_gates(gm, attach) if ctx.notes.get("quantize_hardswish_gate") else 0
        gm.recompile()
        return PassResult(gm, {k: v for k, v in
                               {"observers": len(made), "inputs_observed": inputs, "outputs_observed": outputs,
                                "residual_adds_quantized": residual, "gating_muls_quantized": gates,
                                "pools_read_int8": pools, "hardswish_gates_quantized": hardswish}.items() if v})

    @staticmethod
    def _quantize_residual_adds(gm: fx.GraphModule, observer_for: Any) -> int:
        """Residual adds of int8 feature maps, in and out (the graphs OpenVINO fuses into the conv that
        produces one operand, as a sum post-op writing int8):

        - an operand that some layer quantizes at its input (a block input shared by the next conv and the
          shortcut) is read through that quantizer;
        - when both operands are then quantized, the add's output (after its ReLU, if any) is quantized too,
          with the operands' spec, unless a layer already quantizes it (the next block's input). The role
          is ``<layer of the first operand>:residual``.
        """
        done = 0
        for add in residual_adds(gm):
            for x in add.args[:2]:
                if isinstance(x, fx.Node) and observer_of(gm, x) is None:
                    shared = _observer_user(gm, x)
                    if shared is not None:
                        add.replace_input_with(x, shared)
            operands = [observer_of(gm, x) for x in add.args[:2]]
            if any(o is None for o in operands):
                continue
            out = add
            if len(add.users) == 1 and next(iter(add.users)).target in (aten.relu.default, aten.relu_.default):
                out = next(iter(add.users))
            users = list(out.users)
            obs = _observer_user(gm, out)  # a layer that reads it quantized already: share that quantizer
            if obs is None:
                layer = add.args[0].meta[meta.OBSERVES][0].rsplit(":", 1)[0]
                obs = observer_for(out, operands[0].spec, layer, "residual")
            for u in users:
                if u is not obs and observer_of(gm, u) is None:
                    u.replace_input_with(out, obs)
            done += 1
        return done


    @staticmethod
    def _quantize_gating_muls(gm: fx.GraphModule, observer_for: Any) -> int:
        """Squeeze-excite products ``x * gate`` whose output a layer quantizes (the project conv after the block):
        both operands are read quantized too, with the output's spec, so the engine multiplies int8 tensors
        (ONNX Runtime's QDQ rule ``2DQ``: DQ, DQ -> Mul -> Q becomes QLinearMul; OpenVINO runs the
        Multiply between FakeQuantizes as an int8 eltwise subgraph, as NNCF quantizes both Multiply inputs).
        An operand already quantized (a conv output with its fused hardswish / hardsigmoid) keeps its quantizer;
        another reader of a newly quantized operand (the squeeze's average pool) reads it through the same one.
        The roles are ``<layer reading the product>:gate_input`` and ``:gate``."""
        done = 0
        for mul in gating_muls(gm):
            out_obs = _observer_user(gm, mul)
            if out_obs is None:
                continue  # the product stays float: an int8 multiply would need a quantizer after it
            spec = observer_of(gm, out_obs).spec
            layer = out_obs.meta[meta.OBSERVES][0].rsplit(":", 1)[0]
            for x, role in zip(mul.args[:2], ("gate_input", "gate"), strict=True):
                if observer_of(gm, x) is not None:
                    continue
                mul.replace_input_with(x, _observer_user(gm, x) or observer_for(x, spec, layer, role))
            done += 1
        return done

    @staticmethod
    def _quantize_hardswish_gates(gm: fx.GraphModule, attach: Any) -> int:
        """``hardswish(x) = x * hardsigmoid(x)`` with the gate quantized on the fixed grid [0, 1] / 255 (uint8, zero
        point 0), where the hardswish reads a uint8 quantized input and its output is quantized: the engine then
        multiplies two uint8 tensors (QLinearMul), and the gate itself is an integer add
        (``ort_rules.hardsigmoid_as_qlinear_add``) instead of four float passes over the feature map. The gate's
        rounding moves an output by at most ``|x| / 510``, at most one output code; the reference computes the
        same rounding, so engine and reference agree. The role is ``<layer of x>:hardswish_gate``."""
        done = 0
        for hs in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in HARDSWISH]:
            x = hs.args[0]
            x_obs = observer_of(gm, x) if isinstance(x, fx.Node) else None
            if x_obs is None or (x_obs.spec.dtype, x_obs.spec.granularity) != ("uint8", "per_tensor") or len(hs.users) != 1 or \
                    observer_of(gm, next(iter(hs.users))) is None:
                continue
            layer = x.meta[meta.OBSERVES][0].rsplit(":", 1)[0]
            with gm.graph.inserting_after(hs):
                gate = gm.graph.call_function(aten.hardsigmoid.default, (x,))
            gate.meta["val"] = hs.meta.get("val")
            gate_q = attach(gate, FixedQParamsObserver(GATE_SPEC, *HARDSIGMOID_QPARAMS), layer, "hardswish_gate")
            with gm.graph.inserting_after(gate_q):
                mul = gm.graph.call_function(aten.mul.Tensor, (x, gate_q))
            mul.meta["val"] = hs.meta.get("val")
            hs.replace_all_uses_with(mul)
            gm.graph.erase_node(hs)
            done += 1
        return done

    @staticmethod
    def _pool_int8_inputs(gm: fx.GraphModule) -> int:
        """A pooling of a feature map that is also quantized for another reader reads it through that quantizer
        (the engines pool int8 input: QLinearGlobalAveragePool / QLinearAveragePool on ONNX Runtime, ReduceMean
        in i8 on OpenVINO; NNCF quantizes ReduceMean's input)."""
        done = 0
        for pool in feature_pools(gm):
            x = pool.args[0]
            if observer_of(gm, x) is not None:
                continue
            obs = _observer_user(gm, x)
            if obs is not None:
                pool.replace_input_with(x, obs)
                done += 1
        return done


def _observer_user(gm: fx.GraphModule, x: fx.Node) -> fx.Node | None:
    """An observer node reading ``x``, if any."""
    return next((u for u in x.users if observer_of(gm, u) is not None and u.args[0] is x), None)


def observer_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, Observer]]:
    return [(n, obs) for n in gm.graph.nodes if (obs := observer_of(gm, n)) is not None]
