"""Insert observers where static activation quantization will go.

One observer per (producer, spec): Q, K and V reading the same LayerNorm output share one observer and
so one scale. Output observers (``LayerSpec.output``) go after the layer's fused activation.
Dynamic (per-token) and weight-only layers get no observer: their scales are computed at run time or
from the weight itself.
"""

from __future__ import annotations

from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import annotated_nodes
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.config import QuantConfig
from lowbit.passes.fuse_activation import output_node
from lowbit.runtime.observers import Observer, make_observer
from lowbit.runtime.spec import QuantSpec


class InsertObservers(Pass):
    name = "insert_observers"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        made: dict[tuple[str, QuantSpec], fx.Node] = {}
        counter = 0

        def observer_for(value: fx.Node, spec: QuantSpec, layer_name: str, role: str) -> fx.Node:
            nonlocal counter
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
        gm.recompile()
        return PassResult(gm, {k: v for k, v in
                               {"observers": len(made), "inputs_observed": inputs, "outputs_observed": outputs}.items() if v})


def observer_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, Observer]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if isinstance(mod, Observer):
                out.append((n, mod))
    return out
