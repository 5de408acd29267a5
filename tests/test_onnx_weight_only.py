"""Weight-only linears in ONNX Runtime's MatMulNBits: every rewrite computes what the DequantizeLinear ->
MatMul graph it replaces means, ``x @ dequantize(W)`` in float64 from the graph's own initializers (ORT
itself may run the original DQ -> MatMul with int8 activations, so it is not the reference). The rewritten
graph runs at accuracy level 0 (float activations): relative error < 1e-5."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.qdq_rules import apply_rules
from lowbit.backends.onnx.weight_only import integer_tensor, to_matmul_nbits

ort = pytest.importorskip("onnxruntime")
K, N = 192, 40


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _model(nodes, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def per_channel(signed: bool, zp_by_cast: bool) -> onnx.ModelProto:
    """MatMul(x, DQ(W [K, N], scale [N], zp [N], axis=1)); the zero point as an initializer or a Cast of an
    int32 one (what torch.onnx emits for an asymmetric per-channel weight)."""
    rng = np.random.default_rng(0)
    dt = TensorProto.INT8 if signed else TensorProto.UINT8
    q = rng.integers(-128, 128, (K, N)) if signed else rng.integers(0, 256, (K, N))
    zp = np.zeros(N, np.int64) if signed else rng.integers(90, 170, N)
    inits = [integer_tensor("w", dt, q), numpy_helper.from_array(rng.uniform(0.001, 0.02, N).astype(np.float32), "s")]
    nodes = []
    if zp_by_cast:
        inits.append(numpy_helper.from_array(zp.astype(np.int32), "z32"))
        nodes.append(helper.make_node("Cast", ["z32"], ["z"], to=dt))
    else:
        inits.append(integer_tensor("z", dt, zp))
    nodes += [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=1),
              helper.make_node("MatMul", ["x", "wd"], ["y"])]
    return _model(nodes, inits)


def grouped(bits: int, signed: bool, group: int = 64) -> onnx.ModelProto:
    """MatMul(x, Transpose(DQ(W [N, K], scale [N, K/g], zp, axis=1, block_size=g))): a grouped weight."""
    rng = np.random.default_rng(1)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    dt = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
          (8, False): TensorProto.UINT8}[bits, signed]
    blocks = K // group
    zp = np.zeros((N, blocks), np.int64) if signed else rng.integers(lo, hi, (N, blocks))
    inits = [integer_tensor("w", dt, rng.integers(lo, hi, (N, K))), integer_tensor("z", dt, zp),
             numpy_helper.from_array(rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float32), "s")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=1, block_size=group),
             helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    return _model(nodes, inits)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """x @ W in float64, W dequantized from the model's initializers (per axis 1, or per block of axis 1)."""
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    nodes = {n.op_type: n for n in model.graph.node}
    if "Cast" in nodes:
        init[nodes["Cast"].output[0]] = init[nodes["Cast"].input[0]]
    dq = nodes["DequantizeLinear"]
    q, s, z = (init[i] for i in dq.input)
    block = next((a.i for a in dq.attribute if a.name == "block_size"), 0)
    if block:  # [N, K], groups along K, then transposed into the MatMul
        n, k = q.shape
        w = ((q.reshape(n, k // block, block) - z[..., None]) * s[..., None]).reshape(n, k).T
    else:  # [K, N], one scale per column
        w = (q - z) * s
    return x.astype(np.float64) @ w


def _check(model: onnx.ModelProto, expect_nbits: int) -> None:
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32) * 3
    ref = _reference(model, x)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    rewritten, _, _ = apply_rules(rewritten)
    stats = to_matmul_nbits(rewritten, accuracy_level=0, eight_bit=True)
    assert stats["matmul_nbits"] == expect_nbits
    assert [n.op_type for n in rewritten.graph.node] == ["MatMulNBits"]
    out = _run(rewritten, x)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(out - ref).max()


@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
@pytest.mark.parametrize("zp_by_cast", [False, True], ids=["zp", "cast_zp"])
def test_per_channel_8bit(signed: bool, zp_by_cast: bool) -> None:
    _check(per_channel(signed, zp_by_cast), 1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_grouped(bits: int, signed: bool) -> None:
    _check(grouped(bits, signed), 1)
