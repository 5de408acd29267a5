"""Q/DQ placement for MobileNet-family blocks on the two ONNX engines, and what each engine then runs.

The block (tests/models.tiny_mobilenet): 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + hardswish,
squeeze-excite (mean -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> x * gate), 1x1 project + BN, residual add.

- openvino-int8 places Q/DQ as NNCF does for OpenVINO (pattern LINEAR_ACTIVATIONS: the quantizer after the
  conv's hardswish / hardsigmoid; both Multiply inputs quantized; ReduceMean on int8): every conv, the
  depthwise ones included, runs u8 with its activation as a post-op; the mean runs u8.
- onnxruntime-int8 follows ORT's QDQ rules (qdq_selector_action_transformer.cc): DQ -> Conv (-> Clip/Relu)
  -> Q is QLinearConv, DQ, DQ -> Mul -> Q is QLinearMul, DQ -> GlobalAveragePool -> Q is
  QLinearGlobalAveragePool (the squeeze's ReduceMean is rewritten to it); hardswish has no QLinear kernel:
  insert_observers writes it as x * Q(hardsigmoid(x)) on a fixed [0, 1] grid, a QLinearMul, and
  ort_rules.hardsigmoid_as_qlinear_add turns the gate into a QLinearAdd of 3 that saturates at 6.

Tolerances: engine vs FP32 >= 35 dB SQNR and engine vs lowbit's torch reference >= 35 dB (the tiny model
reaches ~47-50 dB; int8 rounding differences between the engines' integer kernels and the float reference
stay far below that).
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.runtime.qparams import sqnr

from helpers import needs_engine
from models import mobilenet_cal, tiny_mobilenet

onnx = pytest.importorskip("onnx")

ENGINES = ["openvino-int8", "onnxruntime-int8"]


@pytest.fixture(scope="module")
def model():
    return tiny_mobilenet()


@pytest.fixture(scope="module")
def reference(model):
    cal = mobilenet_cal()
    return lowbit.compile(model, cal[0], target="torch", calibration=cal, progress=False)


@pytest.fixture(scope="module", params=ENGINES)
def compiled(request, model):
    needs_engine(request.param)
    cal = mobilenet_cal()
    q = lowbit.compile(model, cal[0], target=request.param, calibration=cal, progress=False)
    graph = onnx.load(str(q.state["model_dir"] / "model.onnx")).graph
    return request.param, q, graph


def _wiring(graph):
    prod = {o: n for n in graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return prod, cons


def _from_dq(name, prod) -> bool:
    p = prod.get(name)
    return p is not None and p.op_type == "DequantizeLinear" and prod.get(p.input[0]) is not None \
        and prod[p.input[0]].op_type == "QuantizeLinear"


def _only_into_q(name, cons) -> bool:
    users = cons.get(name, [])
    return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)


def test_placement_in_the_onnx_graph(compiled):
    target, q, graph = compiled
    prod, cons = _wiring(graph)
    assert q.report.sections["onnx_export"]["problems"] == []
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 10  # stem, 2 x (expand, depthwise, project), SE fc1 + fc2, last
    for conv in convs:  # every conv reads int8 activations
        assert _from_dq(conv.input[0], prod), conv.name
    depthwise = [c for c in convs if any(a.name == "group" and a.i > 1 for a in c.attribute)]
    assert len(depthwise) == 2
    for dw in depthwise:
        (act,) = cons[dw.output[0]]
        if target == "openvino-int8":  # conv + hardswish + Q: one int8 conv with a hardswish post-op
            assert act.op_type == "HardSwish" and _only_into_q(act.output[0], cons)
        else:  # QLinearConv writes uint8; hardswish = x * Q(x + 3 on the grid [0, 6] / 255), both integer
            assert act.op_type == "QuantizeLinear"
            readers = [u for d in cons[act.output[0]] for u in cons[d.output[0]]]
            assert sorted(r.op_type for r in readers) == ["Add", "Mul"]
            assert all(_only_into_q(r.output[0], cons) for r in readers)
    # squeeze-excite: the mean reads int8 and is quantized after, the gate product multiplies two int8 tensors
    pool_op = "ReduceMean" if target == "openvino-int8" else "GlobalAveragePool"
    pools = [n for n in graph.node if n.op_type == pool_op and _from_dq(n.input[0], prod)]
    assert len([p for p in pools if _only_into_q(p.output[0], cons)]) == 1  # the squeeze (the head's mean
    # feeds a Reshape before the linear's Q)
    assert "ReduceMean" not in {n.op_type for n in graph.node} or target == "openvino-int8"
    gates = [n for n in graph.node if n.op_type == "Mul" and all(_from_dq(i, prod) for i in n.input)]
    hardswish = q.report.sections["onnx_export"].get("hardsigmoid_as_qlinear_add", 0)
    assert hardswish == (0 if target == "openvino-int8" else 3)  # stem, depthwise, last (the SE gate: float)
    assert len(gates) == 1 + hardswish and all(_only_into_q(g.output[0], cons) for g in gates)
    # residual adds of two int8 tensors
    adds = [n for n in graph.node if n.op_type == "Add" and all(_from_dq(i, prod) for i in n.input)]
    assert len(adds) == 2  # both blocks keep their shape


def test_what_the_engine_runs(compiled, tmp_path):
    target, q, _ = compiled
    x = torch.randn(4, 3, 32, 32)
    q(x)
    if target == "openvino-int8":
        runner = q.state["runner"]
        engine = runner.static if getattr(runner, "static", None) is not None else runner.compiled
        kinds: dict[str, list[str]] = {}
        for op in engine.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kinds.setdefault(info["layerType"].astype(str), []).append(info["runtimePrecision"].astype(str))
        assert len(kinds["Convolution"]) == 10 and set(kinds["Convolution"]) <= {"u8", "i8"}, kinds["Convolution"]
        assert kinds.get("Reduce") and set(kinds["Reduce"]) <= {"u8", "i8"}, kinds
        # the squeeze-excite product runs as an int8-input subgraph (the hardsigmoid gate itself is [B, C, 1, 1])
        assert "Eltwise" not in kinds and any(p == "u8" for p in kinds.get("Subgraph", [])), kinds
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(q.state["model_dir"] / "model.onnx"), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
        assert ops.count("QLinearConv") == 10 and "Conv" not in ops, ops
        assert ops.count("QLinearMul") == 1 + 3 and ops.count("QLinearGlobalAveragePool") >= 1, ops
        assert ops.count("QLinearAdd") == 2 + 3 and "ReduceMean" not in ops, ops  # + the 3 hardswish gates
        # float: the SE gate [B, C, 1, 1] and the head's hardswish, whose output the pool reads in float
        assert ops.count("HardSigmoid") + ops.count("HardSwish") == 2, ops


def test_outputs_match_fp32_and_the_torch_reference(model, reference, compiled):
    _, q, _ = compiled
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            fp32 = model(x)
        out = q(x)
        assert sqnr(fp32, out) >= 35.0
        assert sqnr(reference(x), out) >= 35.0


def test_layer_by_layer_against_the_torch_reference(reference, compiled):
    """compare_layers taps each layer where the reference does: before a hardswish the engine fuses into the
    conv, when the reference (target torch) leaves it unfused."""
    _, q, _ = compiled
    rep = lowbit.compare_layers(reference, q, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7)))
    assert len(rep.rows) == 11
    assert min(r["sqnr_db"] for r in rep.rows) >= 30.0, str(rep)


def test_hardswish_gate_is_in_the_reference_and_can_be_switched_off(model):
    """On onnxruntime-int8 the quantized hardswish gate is in lowbit's own graph (the reference the engine is
    held to), so the engine matches it as closely as any integer kernel; ``quantize_hardswish_gate=False``
    keeps the float hardswish between a DQ and a Q."""
    needs_engine("onnxruntime-int8")
    cal = mobilenet_cal()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    hardsigmoid = torch.ops.aten.hardsigmoid.default
    gated = lowbit.compile(model, cal[0], target="onnxruntime-int8", calibration=cal, progress=False)
    plain = lowbit.compile(model, cal[0], target="onnxruntime-int8", calibration=cal, progress=False,
                           quantize_hardswish_gate=False)
    for q, gates in ((gated, 3), (plain, 0)):  # stem, both depthwise (the head's hardswish feeds the float mean)
        assert sum(n.target is hardsigmoid for n in q.graph_module.graph.nodes) == 1 + gates  # + the SE gate
        assert q.report.sections["onnx_export"].get("hardsigmoid_as_qlinear_add", 0) == gates
        with torch.no_grad():
            assert sqnr(model(x), q(x)) >= 35.0
            assert sqnr(q.graph_module(x)[0], q(x)) >= 45.0  # the engine against its own torch graph
    hs = [n.op_type for n in onnx.load(str(plain.state["model_dir"] / "model.onnx")).graph.node].count("HardSwish")
    assert hs == 4
