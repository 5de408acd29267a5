"""Weight-only linears (``w4a16``, ``w8a16`` per group) in the ONNX engines' own kernels.

Exported, a grouped weight is a blocked ``DequantizeLinear`` (opset 21: ``axis=1, block_size=group``) of a
4-bit (INT4/UINT4) or 8-bit initializer [N, K], transposed into a MatMul. Each engine then gets it in the
form its int4 kernels read:

- ONNX Runtime: ``com.microsoft.MatMulNBits`` (``bits`` 4 or 8, ``block_size`` = the group, the codes
  offset to unsigned with zero point 2^(bits-1) when symmetric, packed zero points when asymmetric;
  ``accuracy_level=4``: int8 activations on VNNI). In a causal LM's step graph, per-channel 8-bit weights
  become blocks of one power-of-two size with the channel's scale repeated (the same numbers) and run so
  too. Two known traps are avoided by
  construction: the weight is never a blocked DQ on axis 0 of a [K, N] initializer (mis-fused), and no
  block is 512 wide (returns zeros).
- OpenVINO: the blocked DQ of the INT4/UINT4 initializer as it is; the ONNX frontend turns it into a
  compressed constant (u4/i4 + group scales) that the CPU FullyConnected decompresses in its kernel
  (checked on the runtime model: ``weight_compression`` in the report).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.qdq_rules import Graph, node_attr, toposort

qd = torch.ops.quantized_decomposed
MSFT = "com.microsoft"


def onnx_dequantize_group(q, scale, zero_point, quant_min: int, quant_max: int, dtype, group_size: int,  # noqa: ANN001, ANN201
                          output_dtype=None):  # noqa: ANN001
    """``quantized_decomposed.dequantize_per_channel_group`` as a blocked DequantizeLinear (opset 21) along
    the input features; 4-bit ranges are cast to INT4/UINT4 (folded into the initializer afterwards)."""
    from onnxscript import opset21 as op

    four = quant_max - quant_min <= 15
    if four:
        to = TensorProto.INT4 if quant_min < 0 else TensorProto.UINT4
    else:
        to = TensorProto.INT8 if quant_min < 0 else TensorProto.UINT8
    return op.DequantizeLinear(op.Cast(q, to=to), scale, op.Cast(zero_point, to=to), axis=1, block_size=group_size)


TRANSLATIONS = {qd.dequantize_per_channel_group.default: onnx_dequantize_group}


def _np(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)


def integer_tensor(name: str, data_type: int, values: np.ndarray) -> onnx.TensorProto:
    """An INT4/UINT4/INT8/UINT8 initializer from integer codes, built from raw bytes (``make_tensor`` with
    a Python list takes minutes for an output projection of 28M weights)."""
    v = np.asarray(values)
    if data_type in (TensorProto.INT8, TensorProto.UINT8):
        return numpy_helper.from_array(v.astype(np.int8 if data_type == TensorProto.INT8 else np.uint8), name)
    flat = (v.astype(np.int16).reshape(-1) & 0xF).astype(np.uint8)  # two's complement nibbles for INT4
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, data_type, list(v.shape), raw, raw=True)


def fold_casts_into_dq(g: Graph) -> int:
    """Cast(initializer) -> DequantizeLinear: the initializer stored in the cast's type (INT4 / UINT4 packed
    two per byte), so the engine sees constant codes and zero points (a grouped weight's 4-bit codes; the
    uint8 zero points of an asymmetric per-channel weight, which would otherwise be a Cast node that no
    later rewrite can read)."""
    prod = g.producers()
    fired = 0
    for dq in list(g.g.node):
        if dq.op_type != "DequantizeLinear":
            continue
        for slot in (0, 2):
            if len(dq.input) <= slot:
                continue
            cast = prod.get(dq.input[slot])
            if cast is None or cast.op_type != "Cast" or cast.input[0] not in g.init:
                continue
            to = int(node_attr(cast, "to"))
            values = _np(g.init[cast.input[0]]).astype(np.int32)
            name = g.unique(cast.input[0] + ("_int4" if to in (TensorProto.INT4, TensorProto.UINT4) else "_cast"))
            t = integer_tensor(name, to, values)
            g.g.initializer.append(t)
            g.init[name] = t
            dq.input[slot] = name
            fired += 1
    return fired


def blocked_weight_dqs(g: Graph) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """MatMul output -> (DQ, Transpose, MatMul) for every blocked weight DQ feeding a MatMul's B through a
    [1, 0] Transpose (the exported form of ``linear(x, dq(W))``)."""
    cons = g.consumers()
    out = {}
    for dq in g.g.node:
        if dq.op_type != "DequantizeLinear" or node_attr(dq, "block_size") is None or dq.input[0] not in g.init:
            continue
        users = cons.get(dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        tr = users[0]
        mms = cons.get(tr.output[0], [])
        if len(mms) == 1 and mms[0].op_type == "MatMul" and mms[0].input[1] == tr.output[0]:
            out[mms[0].output[0]] = (dq, tr, mms[0])
    return out


def _codes(g: Graph, name: str) -> tuple[np.ndarray, int]:
    t = g.init[name]
    bits = 4 if t.data_type in (TensorProto.INT4, TensorProto.UINT4) else 8
    return _np(t).astype(np.int32), bits


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., n] -> bytes (4-bit: low nibble first)."""
    u = u.astype(np.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), np.uint8)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _block_for(k: int) -> int | None:
    """The widest power-of-two block (16..256; 512 is a known ORT trap) dividing K."""
    for block in (256, 128, 64, 32, 16):
        if k % block == 0:
            return block
    return None


def per_channel_to_blocked(g: Graph) -> int:
    """A per-channel 8-bit weight DQ [K, N] (axis 1) feeding a MatMul's B -> the blocked [N, K] form with the
    channel's scale repeated over its blocks (the same numbers), so MatMulNBits runs it too."""
    prod, cons = g.producers(), g.consumers()
    fired = 0
    for mm in list(g.g.node):
        if mm.op_type != "MatMul" or len(mm.input) < 2:
            continue
        act = prod.get(mm.input[0])
        if act is not None and act.op_type == "DequantizeLinear":  # a W8A8 layer: ORT's integer MatMul fusion
            continue
        dq = prod.get(mm.input[1])
        if (dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.init
                or node_attr(dq, "block_size") is not None or len(cons.get(dq.output[0], [])) != 1):
            continue
        w = g.init[dq.input[0]]
        if w.data_type not in (TensorProto.INT8, TensorProto.UINT8) or len(w.dims) != 2:
            continue
        scale = g.array(dq.input[1])
        k, n = w.dims
        block = _block_for(k)
        if block is None or scale is None or scale.shape not in ((n,),) or int(node_attr(dq, "axis", 1)) % 2 != 1:
            continue
        has_zp = len(dq.input) > 2 and bool(dq.input[2])
        zp = g.array(dq.input[2]) if has_zp else None
        if has_zp and zp is None:  # a computed zero point: nothing to pack
            continue
        q = _np(w).T  # [N, K]
        blocks = k // block
        scales = np.repeat(scale.astype(np.float32)[:, None], blocks, axis=1)
        if len(cons.get(dq.input[0], [])) != 1:
            continue
        g.g.initializer.remove(g.init.pop(dq.input[0]))  # the [N, K] codes keep its name (engine reports)
        tensors = [integer_tensor(dq.input[0], w.data_type, np.ascontiguousarray(q)),
                   numpy_helper.from_array(scales, g.unique(dq.input[1] + "_nk"))]
        if zp is not None:
            zps = np.repeat(np.broadcast_to(zp, (n,))[:, None], blocks, axis=1)
            tensors.append(integer_tensor(g.unique(dq.input[2] + "_nk"), w.data_type, zps))
        for t in tensors:
            g.g.initializer.append(t)
            g.init[t.name] = t
        blocked = helper.make_node("DequantizeLinear", [t.name for t in tensors], [g.unique(dq.output[0] + "_nk")],
                                   name=dq.name, axis=1, block_size=block)
        tr = helper.make_node("Transpose", [blocked.output[0]], [mm.input[1]], name=g.unique(dq.name + "_t"), perm=[1, 0])
        idx = list(g.g.node).index(dq)
        g.g.node.remove(dq)
        g.g.node.insert(idx, tr)
        g.g.node.insert(idx, blocked)
        fired += 1
    return fired


def to_matmul_nbits(model: onnx.ModelProto, accuracy_level: int = 4, eight_bit: bool = False) -> dict[str, int]:
    """Every blocked weight DQ -> Transpose -> MatMul as one ``com.microsoft.MatMulNBits`` with
    ``accuracy_level`` (4: int8 activations per block on VNNI). With ``eight_bit``, per-channel 8-bit weights
    first become blocked and run so too (ORT's 8-bit MatMulNBits at accuracy level 0 is a slow reference
    path: 0.5 s per SmolLM2 decode step, against 15 ms at level 4); without, they stay DQ -> MatMul, which
    ORT folds into a float weight (float activations)."""
    g = Graph(model)
    if eight_bit:
        per_channel_to_blocked(g)
    fired = 0
    for dq, tr, mm in blocked_weight_dqs(g).values():
        q, bits = _codes(g, dq.input[0])  # [N, K]
        n, k = q.shape
        block = int(node_attr(dq, "block_size"))
        scale = _np(g.init[dq.input[1]]).astype(np.float32)  # [N, K / block]
        signed = g.init[dq.input[0]].data_type in (TensorProto.INT4, TensorProto.INT8)
        if len(dq.input) > 2 and dq.input[2] and dq.input[2] not in g.init:
            continue  # a computed zero point: leave the DQ as it is
        zp = _np(g.init[dq.input[2]]).astype(np.int32) if len(dq.input) > 2 and dq.input[2] else None
        offset = 1 << (bits - 1)
        blocks = -(-k // block)
        u = q + offset if signed else q  # unsigned codes: MatMulNBits' default zero point is 2^(bits-1)
        u = np.pad(u, ((0, 0), (0, blocks * block - k))).reshape(n, blocks, block)
        packed = _pack(u, bits).reshape(n, blocks, block * bits // 8)
        # the packed codes keep the weight's initializer name: engine reports map kernels to layers by it
        weight = g.init.pop(dq.input[0])
        g.g.initializer.remove(weight)
        for info in [v for v in g.g.value_info if v.name == dq.input[0]]:  # its old INT4 type
            g.g.value_info.remove(info)
        inputs = [mm.input[0], g.add_initializer(packed, dq.input[0]),
                  g.add_initializer(scale.reshape(-1), dq.input[1] + "_nbits")]
        zu = (zp + offset if signed else zp) if zp is not None else None
        if zu is not None and not np.all(zu == offset):  # symmetric: the default zero point
            inputs.append(g.add_initializer(_pack(zu.reshape(n, blocks), bits).reshape(-1), dq.input[2] + "_nbits"))
        node = helper.make_node("MatMulNBits", inputs, [mm.output[0]], name=mm.name.replace("/MatMul", "") + "/MatMulNBits",
                                domain=MSFT, K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)
        idx = list(g.g.node).index(mm)
        for old in (mm, tr, dq):
            g.g.node.remove(old)
        g.g.node.insert(min(idx, len(g.g.node)), node)
        fired += 1
    if fired and not any(o.domain == MSFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT, 1))
    g.remove_unused_initializers()
    toposort(g)
    return {"matmul_nbits": fired}
