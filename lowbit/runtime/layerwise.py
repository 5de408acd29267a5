"""Layer-wise error across stages: where do the torch fake-quant reference and the deployed engine diverge?

For the same inputs, every quantized layer's output is taken from

- the reference (a ``target="torch"`` CompiledModel): an FX Interpreter records each layer's output;
- the deployed model (an ONNX target): a copy of its graph exposes each layer's output tensor as an extra
  graph output, run by the same engine.

A layer's output is taken after its bias and fused activation; where the layer's output is itself
quantized (ORT's QLinearConv), both sides take the value its consumers read (after Q -> DQ). Layers map
through their names: ONNX nodes are named ``<layer>/<OpType>`` at export.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import fx

from lowbit.errors import LowbitError
from lowbit.runtime.engines import make_runner
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.qparams import sqnr

SPEC, LAYER, QROLE, FUSED_ACT = "lowbit_spec", "lowbit_layer", "lowbit_qrole", "lowbit_fused_activation"
PASS_THROUGH = {"Relu", "Clip"}
#: activations an engine fuses into a conv (fuse_activation.POST_OP_ACTIVATIONS), as ONNX ops
POST_OPS = {"HardSwish", "HardSigmoid", "Sigmoid"}


@dataclass
class LayerwiseReport:
    engine: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    output_sqnr_db: float = math.nan

    def table(self) -> str:
        lines = [f"layer-wise SQNR, torch reference vs {self.engine} (dB; higher is closer)",
                 f"{'layer':<48} {'SQNR dB':>9}  {'max abs diff':>12}"]
        for r in self.rows:
            lines.append(f"{r['layer']:<48} {r['sqnr_db']:>9.2f}  {r['max_abs_diff']:>12.4g}")
        lines.append(f"{'model output':<48} {self.output_sqnr_db:>9.2f}")
        return "\n".join(lines)

    __str__ = table

    def worst(self, n: int = 5) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: r["sqnr_db"])[:n]


def reference_layer_outputs(gm: fx.GraphModule, flat: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Each annotated layer's output (after bias, fused activation and, if any, its output Q/DQ)."""
    taps: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if SPEC not in node.meta or not node.meta[SPEC].quantized:
            continue
        tap = node
        act = node.meta.get(FUSED_ACT)
        nxt = next((u for u in tap.users if u.name == act), None) if act else None
        tap = nxt or tap
        q = next((u for u in tap.users if u.meta.get(QROLE) == "act_q"), None)
        if q is not None and node.meta[SPEC].output is not None:
            tap = next(iter(q.users))
        taps[tap] = node.meta[LAYER]
    values: dict[str, torch.Tensor] = {}

    class _Tap(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in taps:
                values[taps[n]] = out.detach().clone()
            return out

    with torch.no_grad():
        outs = _Tap(gm).run(*flat)
    return values, list(outs)


def expose_layer_outputs(model: onnx.ModelProto, layers: list[str], post_op_layers: Collection[str] | None = None,
                         ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of the model with each layer's output tensor added as a graph output. A post-op activation the
    engine fuses (hardswish before the layer's output Q) is part of the output, for the layers in
    ``post_op_layers`` when given (the ones whose reference output includes it), else wherever a Q follows it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name for t in m.graph.initializer}
    by_name = {n.name: n for n in m.graph.node}
    tensors: dict[str, str] = {}
    for layer in layers:
        node = next((by_name[k] for k in by_name if k.rpartition("/")[0] == layer and not k.endswith("weight_dq")), None)
        if node is None:
            continue
        out = node.output[0]
        while True:
            users = consumers.get(out, [])
            if len(users) != 1:
                break
            u = users[0]
            if (u.op_type == "Add" and any(i in inits for i in u.input) or u.op_type in PASS_THROUGH
                    or u.op_type in POST_OPS and (layer in post_op_layers if post_op_layers is not None else any(
                        c.op_type == "QuantizeLinear" for c in consumers.get(u.output[0], [])))):
                out = u.output[0]  # a post-op activation counts when the layer's output quantizer follows it
            elif u.op_type == "QuantizeLinear":
                dq = consumers.get(u.output[0], [])
                out = dq[0].output[0] if dq else out
                break
            else:
                break
        tensors[layer] = out
    existing = {o.name for o in m.graph.output}
    for out in dict.fromkeys(tensors.values()):
        if out not in existing:
            m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return m, tensors


def compare_layers(reference: CompiledModel, deployed: CompiledModel, *args: Any, **kwargs: Any) -> LayerwiseReport:
    """SQNR per quantized layer between the torch reference and the deployed engine, on these inputs."""
    if reference.graph_module is None or reference.target != "torch":
        raise LowbitError("compare_layers: the reference must be a target='torch' CompiledModel")
    if "model_dir" not in deployed.state:
        raise LowbitError(f"compare_layers: target {deployed.target!r} has no ONNX graph to tap")
    flat = deployed.signature.flatten_call(args, kwargs)
    ref_layers, ref_out = reference_layer_outputs(reference.graph_module, flat)
    model = onnx.load(str(Path(deployed.state["model_dir"]) / "model.onnx"))
    fused = {n.meta[LAYER] for n in reference.graph_module.graph.nodes if n.meta.get(FUSED_ACT) and LAYER in n.meta}
    tapped, tensors = expose_layer_outputs(model, list(ref_layers), post_op_layers=fused)
    engine = deployed.state["engine"]
    with tempfile.TemporaryDirectory(prefix="lowbit-layerwise-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(tapped, str(path))
        runner = make_runner(engine, path, deployed.signature, deployed.options.get("threads", 2))
        outs = runner(flat)
    names = [o.name for o in tapped.graph.output]
    by_tensor = dict(zip(names, outs, strict=True))
    report = LayerwiseReport(engine)
    for layer, ref in ref_layers.items():
        got = by_tensor.get(tensors.get(layer, ""))
        if got is None or got.shape != ref.shape:
            continue
        report.rows.append({"layer": layer, "sqnr_db": sqnr(ref, got),
                            "max_abs_diff": float((ref - got.to(ref.dtype)).abs().max())})
    n_out = len(deployed.signature.outputs)
    report.output_sqnr_db = sqnr(ref_out[0], outs[0]) if n_out else math.nan
    return report
