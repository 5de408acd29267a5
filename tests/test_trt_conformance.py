"""The TensorRT Q/DQ conformance checker, on the graphs target="tensorrt-int8" exports and on broken ones.

No TensorRT is needed: the checker reads the ONNX only. The exported graphs (the CNN and tiny BERT) must
pass every rule; each hand-broken copy must be reported with the right rule and node name. The exported
graph must also run on ONNX Runtime and agree with the torch reference compiled with the same plan:

- BERT >= 90 dB SQNR: Q/DQ sit on linear inputs only, and ONNX Runtime's integer MatMul computes what
  the fake-quant graph computes (measured 138.6 dB);
- CNN >= 35 dB: float convolutions (ORT's MLAS vs torch's oneDNN) sum in another order, which moves a few
  values (4 in 20480 codes at layer1.conv2's input) across a rounding boundary of the next quantizer, one
  int8 step each; the residual Add's Q/DQ (TensorRT's placement, absent from the torch graph) adds its
  own rounding on top (measured 48.6 dB at batch 5, 50.6 dB at batch 1).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.backends.onnx.qdq_rules import set_node_attr
from lowbit.backends.tensorrt.conformance import OPSET_MAX, RULES, ConformanceReport, check_model
from lowbit.cli import main as cli_main
from lowbit.runtime.qparams import sqnr

from models import bert_batch, cnn_cal

BERT_DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


def bert_cal():
    return [bert_batch(4, 16, i) for i in range(1, 6)]


@pytest.fixture(scope="module")
def cnn_trt(cnn):
    return lowbit.compile(cnn, cnn_cal(1)[0], target="tensorrt-int8", calibration=cnn_cal(), export_only=True,
                          progress=False)


@pytest.fixture(scope="module")
def bert_trt(bert):
    return lowbit.compile(bert, bert_batch(2, 16, 0), target="tensorrt-int8", calibration=bert_cal(),
                          dynamic_shapes=BERT_DYN, export_only=True, progress=False)


def onnx_of(compiled) -> onnx.ModelProto:
    return onnx.load(str(compiled.state["model_dir"] / "model.onnx"))


# --------------------------------------------------------------------------------------------------
# The exported graphs conform, and agree with the torch reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cnn_trt", "bert_trt"])
def test_exported_graphs_pass_every_rule(request, which):
    compiled = request.getfixturevalue(which)
    report = check_model(onnx_of(compiled))
    print(f"\n[{which}] {report.format()}")
    assert report.ok, report.format()
    n_layers = len(compiled.plan["layers"])
    assert report.checked["weights"] == report.checked["per_channel_weights"] == n_layers
    assert report.opset == 19
    # the same summary is in the compile report, and the file next to the model
    assert compiled.report.sections["tensorrt"]["conformance"] == report.summary()
    stored = ConformanceReport.from_json(json.loads((compiled.state["model_dir"] / "conformance.json").read_text()))
    assert stored.ok and stored.checked == report.checked


def test_exported_graph_shape_follows_tensorrt_placement(cnn_trt, bert_trt):
    for compiled in (cnn_trt, bert_trt):
        model = onnx_of(compiled)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for n in model.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zp = inits[n.input[2]]
                assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point {zp}"
            if n.op_type == "QuantizeLinear":  # every Q feeds DQs only; activations only (weights are int8)
                assert {u.op_type for u in consumers[n.output[0]]} == {"DequantizeLinear"}
            if n.op_type == "Conv":  # no quantized conv outputs: TensorRT's advice for weighted ops
                assert all(u.op_type != "QuantizeLinear" for u in consumers.get(n.output[0], []))
    sec = cnn_trt.report.sections["tensorrt"]["residual_qdq"]
    assert sec["fired"] == 1  # layer1: Add(conv2, stem output) reads the stem output's quantizer
    assert len(sec["skipped"]) == 1 and "no calibrated quantizer" in sec["skipped"][0]  # layer2: conv + conv
    adds = [n for n in onnx_of(cnn_trt).graph.node if n.op_type == "Add" and any("residual_dq" in i for i in n.input)]
    assert len(adds) == 1


def _agreement(ref, got) -> tuple[float, float]:
    return sqnr(ref, got), float((ref - got.to(ref.dtype)).abs().max())


def test_cnn_export_runs_on_ort_and_agrees_with_torch(cnn, cnn_trt):
    ref = lowbit.compile(cnn, cnn_cal(1)[0], calibration=cnn_cal(), plan=cnn_trt.plan,
                         config=lowbit.QuantConfig(activation_symmetric=True), progress=False)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 16, 16)
        db, diff = _agreement(ref(x), cnn_trt(x))
        fp = sqnr(cnn(x), cnn_trt(x))
        print(f"\n[cnn batch {batch}] tensorrt-int8 ONNX on ORT vs torch reference: SQNR {db:.1f} dB, "
              f"max abs diff {diff:.3g}; vs FP32: {fp:.1f} dB")
        assert db >= 35.0 and fp >= 30.0


def test_bert_export_runs_on_ort_and_agrees_with_torch(bert, bert_trt):
    ref = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=bert_cal(), plan=bert_trt.plan,
                         # tensorrt-int8 keeps embedding tables float (int8 only between Q/DQ)
                         config=lowbit.QuantConfig(activation_symmetric=True, embeddings="float"),
                         dynamic_shapes=BERT_DYN,
                         progress=False)
    for batch, seq in ((1, 8), (3, 21)):
        b = bert_batch(batch, seq, batch + seq)
        db, diff = _agreement(ref(**b)[0], bert_trt(**b)[0])
        fp = sqnr(bert(**b).last_hidden_state, bert_trt(**b)[0])
        print(f"\n[bert {batch}x{seq}] tensorrt-int8 ONNX on ORT vs torch reference: SQNR {db:.1f} dB, "
              f"max abs diff {diff:.3g}; vs FP32: {fp:.1f} dB")
        assert db >= 90.0 and fp >= 25.0


# --------------------------------------------------------------------------------------------------
# Hand-broken graphs: one per rule
# --------------------------------------------------------------------------------------------------


def _node(model: onnx.ModelProto, pred) -> onnx.NodeProto:
    return next(n for n in model.graph.node if pred(n))


def _act_q(model: onnx.ModelProto) -> onnx.NodeProto:
    """The quantizer of layer1.conv1's input (the stem's ReLU output)."""
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    return _node(model, lambda n: n.op_type == "QuantizeLinear" and n.input[0] not in inits | graph_inputs)


def _dq_of(model: onnx.ModelProto, q: onnx.NodeProto) -> onnx.NodeProto:
    return _node(model, lambda n: n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])


def _add_init(model: onnx.ModelProto, array: np.ndarray, name: str) -> str:
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def break_zero_point(m):
    q = _act_q(m)
    q.input[2] = _add_init(m, np.array(3, np.int8), "bad_zp")
    return "zero-point-nonzero", q.name


def break_uint8_zero_point(m):
    q = _act_q(m)
    q.input[2] = _add_init(m, np.array(0, np.uint8), "bad_zp")
    return "quant-type-not-int8", q.name


def break_missing_zero_point(m):
    q = _act_q(m)
    del q.input[2]  # ONNX: QuantizeLinear without a zero point outputs uint8
    return "quant-type-not-int8", q.name


def _break_scale(value):
    def brk(m):
        q = _act_q(m)
        q.input[1] = _add_init(m, np.array(value, np.float32), "bad_scale")
        return "scale-invalid", q.name
    brk.__name__ = f"break_scale_{value}"
    return brk


def break_scale_not_constant(m):
    q = _act_q(m)
    m.graph.node.insert(0, helper.make_node("Identity", [q.input[1]], ["scale_at_run_time"], name="scale_identity"))
    q.input[1] = "scale_at_run_time"
    return "scale-not-constant", q.name


def break_conv_weight_axis(m):
    dq = _node(m, lambda n: n.name == "layer1.conv1/weight_dq")  # weight [16, 16, 3, 3]: channels on axis 0
    set_node_attr(dq, "axis", 1)
    return "weight-axis", dq.name


def break_matmul_weight_axis(m):
    dq = _node(m, lambda n: n.name == "fc/weight_dq")  # MatMul B [K=32, N=10]: channels on axis 1
    set_node_attr(dq, "axis", 0)
    return "weight-axis", dq.name


def break_weight_range(m):
    dq = _node(m, lambda n: n.name == "layer1.conv1/weight_dq")
    t = _init(m, dq.input[0])
    w = numpy_helper.to_array(t).copy()
    w.flat[0] = -128
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    return "weight-range", dq.name


def break_activation_per_channel(m):
    q = _act_q(m)
    q.input[1] = _add_init(m, np.full(16, 0.02, np.float32), "per_channel_scale")
    q.input[2] = _add_init(m, np.zeros(16, np.int8), "per_channel_zp")
    set_node_attr(q, "axis", 1)
    return "activation-per-channel", q.name


def break_blocked(m):
    dq = _node(m, lambda n: n.name == "fc/weight_dq")
    set_node_attr(dq, "block_size", 2)
    return "blocked-quantization", dq.name


def break_q_without_dq(m):
    q = _act_q(m)
    dq = _dq_of(m, q)
    conv = _node(m, lambda n: dq.output[0] in n.input)
    conv.input[list(conv.input).index(dq.output[0])] = q.output[0]  # the conv reads int8 codes
    return "q-not-followed-by-dq", q.name


def break_dq_without_q(m):
    dq = _dq_of(m, _act_q(m))
    dq.input[0] = m.graph.input[0].name  # reads the float graph input, not a Q
    return "dq-without-q", dq.name


def break_opset(version):
    def brk(m):
        next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = version
        return "opset-range", "<model>"
    brk.__name__ = f"break_opset_{version}"
    return brk


def _insert_qdq(m: onnx.ModelProto, before: onnx.NodeProto, idx: int, prefix: str) -> tuple[str, str]:
    """Q -> DQ on input ``idx`` of ``before`` (int8, zero point 0): (Q name, DQ name)."""
    src = before.input[idx]
    s = _add_init(m, np.array(0.05, np.float32), f"{prefix}_scale")
    z = _add_init(m, np.array(0, np.int8), f"{prefix}_zp")
    q = helper.make_node("QuantizeLinear", [src, s, z], [f"{prefix}_q_out"], name=f"{prefix}_q")
    dq = helper.make_node("DequantizeLinear", [f"{prefix}_q_out", s, z], [f"{prefix}_dq_out"], name=f"{prefix}_dq")
    at = list(m.graph.node).index(before)
    m.graph.node.insert(at, dq)
    m.graph.node.insert(at, q)
    before.input[idx] = f"{prefix}_dq_out"
    return q.name, dq.name


def _break_float_op(op):
    def brk(m):
        node = _node(m, lambda n: n.op_type == op)
        _, dq = _insert_qdq(m, node, 0, op.lower())
        return "qdq-around-float-op", dq
    brk.__name__ = f"break_qdq_around_{op}"
    return brk


def break_qdq_on_int64(m):
    s = _add_init(m, np.array(0.05, np.float32), "ids_scale")
    z = _add_init(m, np.array(0, np.int8), "ids_zp")
    m.graph.node.append(helper.make_node("QuantizeLinear", ["input_ids", s, z], ["ids_q_out"], name="ids_q"))
    m.graph.node.append(helper.make_node("DequantizeLinear", ["ids_q_out", s, z], ["ids_dq_out"], name="ids_dq"))
    return "qdq-on-non-float", "ids_q"


CNN_BREAKS = [break_zero_point, break_uint8_zero_point, break_missing_zero_point, _break_scale(-0.5),
              _break_scale(0.0), _break_scale(math.nan), _break_scale(math.inf), break_scale_not_constant,
              break_conv_weight_axis, break_matmul_weight_axis, break_weight_range, break_activation_per_channel,
              break_blocked, break_q_without_dq, break_dq_without_q, break_opset(11), break_opset(OPSET_MAX + 1)]
BERT_BREAKS = [_break_float_op("Softmax"), _break_float_op("LayerNormalization"), break_qdq_on_int64]


def _check_broken(compiled, brk):
    model = copy.deepcopy(onnx_of(compiled))
    rule, node = brk(model)
    report = check_model(model)
    found = {(v.rule, v.node) for v in report.violations}
    assert (rule, node) in found, report.format()
    assert {v.rule for v in report.violations} == {rule}, report.format()  # nothing else is blamed
    assert not report.ok and rule in RULES
    text = report.format()
    assert rule in text and node in text
    return report


@pytest.mark.parametrize("brk", CNN_BREAKS, ids=lambda f: f.__name__)
def test_each_broken_cnn_graph_names_rule_and_node(cnn_trt, brk):
    _check_broken(cnn_trt, brk)


@pytest.mark.parametrize("brk", BERT_BREAKS, ids=lambda f: f.__name__)
def test_each_broken_bert_graph_names_rule_and_node(bert_trt, brk):
    _check_broken(bert_trt, brk)


def test_report_json_round_trips(cnn_trt):
    model = copy.deepcopy(onnx_of(cnn_trt))
    break_zero_point(model)
    break_matmul_weight_axis(model)
    report = check_model(model)
    back = ConformanceReport.from_json(report.to_json())
    assert back.violations == report.violations and not back.ok
    assert report.rules_broken() == {"zero-point-nonzero": 1, "weight-axis": 1}
    assert set(report.to_json()["rules"]) == set(RULES)


def test_cli_trt_check(cnn_trt, tmp_path, capsys):
    d = cnn_trt.save(tmp_path / "cnn")
    assert cli_main(["trt-check", str(d)]) == 0
    assert ": OK" in capsys.readouterr().out
    model = copy.deepcopy(onnx_of(cnn_trt))
    _, node = break_zero_point(model)
    onnx.save(model, str(tmp_path / "broken.onnx"))
    assert cli_main(["trt-check", str(tmp_path / "broken.onnx")]) == 1
    out = capsys.readouterr().out
    assert "zero-point-nonzero" in out and node in out
    assert cli_main(["trt-check", str(tmp_path / "missing.onnx")]) == 1
    assert "no such ONNX file" in capsys.readouterr().err


def test_checker_reads_types_of_model_inputs():
    """A Q on a graph input of another float type (float16) is fine; on a bool input it is not."""
    x16 = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    s = numpy_helper.from_array(np.array(0.1, np.float16), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    w = numpy_helper.from_array(np.ones((2, 2), np.int8), "w")
    ws = numpy_helper.from_array(np.array(0.1, np.float16), "ws")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "z"], ["wd"], name="wdq"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])
    model = helper.make_model(helper.make_graph(nodes, "g", [x16], [y], [s, z, w, ws]),
                              opset_imports=[helper.make_opsetid("", 19)])
    assert check_model(model).ok, check_model(model).format()
