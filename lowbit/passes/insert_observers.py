"""Insert observers where static activation quantization will go.

One observer per (producer, spec): Q, K and V reading the same LayerNorm output share one observer and
so one scale. Output observers (``LayerSpec.output``) go after the layer's fused activation.
Dynamic (per-token) and weight-only layers get no observer: their scales are computed at run time or
from the weight itself.

Engine choices (backend attributes): ``quantize_residual_adds`` quantizes CNN residual joins in and out;
``quantize_gating`` quantizes squeeze-excite products ``x * gate`` in and out and lets a pooling read an
int8 feature map through the quantizer another reader already has on it.
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
from lowbit.runtime.observers import Observer, make_observer
from lowbit.runtime.spec import QuantSpec

aten = torch.ops.aten


class InsertObservers(Pass):
    name = "insert_observers"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        made: dict[tuple[str, QuantSpec], fx.Node] = {}
        counter = 0

        def observer_for(value: fx.Node, spec: QuantSpec, layer_name: str, role: str) -> fx.Node:
            nonlocal counter
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
            name = f"lowbit_observer_{counter}"
            counter += 1
            gm.add_submodule(name, obs)
            with gm.graph.inserting_after(value):
                node = gm.graph.call_module(name, (value,))
            node.meta["val"] = value.meta.get("val")
            node.meta[meta.OBSERVES] = [f"{layer_name}:{role}"]
            made[key] = node
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
        gm.recompile()
        return PassResult(gm, {k: v for k, v in
                               {"observers": len(made), "inputs_observed": inputs, "outputs_observed": outputs,
                                "residual_adds_quantized": residual, "gating_muls_quantized": gates,
                                "pools_read_int8": pools}.items() if v})

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
