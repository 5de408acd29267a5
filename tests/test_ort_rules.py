"""ort_rules: every quantized linear becomes one MatMulIntegerToFloat with its bias inside (ONNX Runtime computes
the same numbers as from the plain QDQ graph); a spatial ReduceMean becomes GlobalAveragePool; a quantized
hardswish's quantized gate becomes an integer add."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import torch
from torch import nn

import lowbit


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) + self.c(x)


def test_fused_graph_matches_the_plain_qdq_graph():
    torch.manual_seed(0)
    model = TwoLinears().eval()
    cal = [(torch.randn(4, 5, 16),) for _ in range(4)]
    kw = dict(target="onnxruntime-int8", calibration=cal, progress=False, config=lowbit.QuantConfig(smoothquant=False))
    fused = lowbit.compile(model, cal[0], **kw)
    plain = lowbit.compile(model, cal[0], engine_rules=False, **kw)
    graph = onnx.load(str(fused.state["model_dir"] / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops and "Add" in ops  # the residual sum
    assert fused.report.sections["onnx_export"]["matmul_integer_to_float"] == 3
    assert fused.report.sections["onnx_export"]["bias_fused"] == 2  # c has no bias
    names = {n.name for n in graph.graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert names == {"a/MatMulIntegerToFloat", "b/MatMulIntegerToFloat", "c/MatMulIntegerToFloat"}
    x = torch.randn(3, 5, 16)
    # same int8 products, the bias added inside the kernel instead of after it: float rounding only
    assert torch.allclose(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    assert fused.report.sections["engine"]["int8_share"] == 1.0


def _mean_model(axes: list[int], keepdims: int = 1) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    axes_t = numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="pool/ReduceMean", keepdims=keepdims)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 1, 1])], [axes_t])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_spatial_reduce_mean_becomes_global_average_pool():
    """ReduceMean over H, W (keepdims) is GlobalAveragePool, the op ORT's QDQ rules run as
    QLinearGlobalAveragePool; a mean over channels or without keepdims is left alone."""
    import onnxruntime as ort

    from lowbit.backends.onnx.ort_rules import reduce_mean_to_global_pool

    x = np.random.default_rng(0).standard_normal((2, 8, 5, 7)).astype(np.float32)
    for axes in ([2, 3], [-1, -2]):
        model = _mean_model(axes)
        assert reduce_mean_to_global_pool(model) == {"reduce_mean_to_global_pool": 1}
        (node,) = model.graph.node
        assert node.op_type == "GlobalAveragePool" and node.name == "pool/ReduceMean"
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x.mean((2, 3), keepdims=True), rtol=1e-6, atol=1e-6)
    for model in (_mean_model([1]), _mean_model([2, 3], keepdims=0)):  # (output shapes not checked)
        assert reduce_mean_to_global_pool(model) == {}
        assert model.graph.node[0].op_type == "ReduceMean"


def _gate_model(scale: float = 0.05, zp: int = 100, gate_scale: float = 1.0 / 255.0) -> onnx.ModelProto:
    """hardswish as insert_observers writes it on ONNX Runtime: x * Q(hardsigmoid(x); 1/255, 0), both Q/DQ'd."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zp, np.uint8), "z"),
             numpy_helper.from_array(np.array(gate_scale, np.float32), "sg"),
             numpy_helper.from_array(np.array(0, np.uint8), "zg"),
             numpy_helper.from_array(np.array(0.03, np.float32), "so"), numpy_helper.from_array(np.array(20, np.uint8), "zo")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
             helper.make_node("HardSigmoid", ["xd"], ["g"], name="act/HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
             helper.make_node("QuantizeLinear", ["g", "sg", "zg"], ["gq"], name="q_gate"),
             helper.make_node("DequantizeLinear", ["gq", "sg", "zg"], ["gd"], name="dq_gate"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd2"], name="dq_in2"),
             helper.make_node("Mul", ["xd2", "gd"], ["h"], name="act/Mul"),
             helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["hq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["hq", "so", "zo"], ["y"], name="dq_out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _ort_ops(model: onnx.ModelProto) -> list[str]:
    import onnxruntime as ort

    opt = ort.SessionOptions()
    opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        opt.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(model.SerializeToString(), opt, providers=["CPUExecutionProvider"])
        return sorted(n.op_type for n in onnx.load(opt.optimized_model_filepath).graph.node)


def test_hardswish_gate_becomes_an_integer_add_with_the_same_codes():
    """DQ -> HardSigmoid -> Q(1/255, 0) becomes DQ, DQ(3) -> Add -> Q(6/255, 0): ORT then runs the gate as
    QLinearAdd and the product as QLinearMul, no float pass between the graph's own Q/DQ, and the output is
    the float gate's, code for code but at a rounding tie, on a sweep over every input code."""
    import onnxruntime as ort

    from lowbit.backends.onnx.ort_rules import hardsigmoid_as_qlinear_add

    plain, model = _gate_model(), _gate_model()
    assert hardsigmoid_as_qlinear_add(model) == {"hardsigmoid_as_qlinear_add": 1}
    onnx.checker.check_model(model, full_check=True)
    assert sorted(n.op_type for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")) \
        == ["Add", "Mul"]
    codes = np.arange(256, dtype=np.float32)  # every input code, on a non-integer-aligned grid
    x = np.resize((codes - 100) * 0.05, (2, 4, 8, 8)).astype(np.float32)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    diff = np.abs(out - ref)
    # the same codes but at a half-code tie of the gate, where the two float roundings may part: 1 of the 256
    # input codes here, one output step (0.03)
    assert diff.max() <= 0.03 + 1e-6 and (diff > 1e-6).mean() <= 1 / 256 + 1e-9, (diff.max(), (diff > 1e-6).mean())
    assert _ort_ops(model) == ["DequantizeLinear", "QLinearAdd", "QLinearMul", "QuantizeLinear"]
    assert "HardSigmoid" in _ort_ops(plain)  # without the rule the gate is float


def test_hardsigmoid_off_the_gate_grid_or_signed_is_left_alone():
    from lowbit.backends.onnx.ort_rules import hardsigmoid_as_qlinear_add

    assert hardsigmoid_as_qlinear_add(_gate_model(gate_scale=0.01)) == {}  # another grid: not relu6's clip
    int8 = _gate_model()  # an int8 (symmetric) input: QLinearAdd wants the uint8 gate's type: left alone
    int8.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int8), "z"))
    assert hardsigmoid_as_qlinear_add(int8) == {}
