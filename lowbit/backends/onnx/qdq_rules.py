"""Rewrite rules on the exported ONNX graph, so engines' QDQ fusions turn Q/DQ into integer kernels.

Each rule is pattern -> check -> rewrite and returns how many times it fired.

- ``fold_weight_transpose``: ``DQ(W int8 [N, K], axis=0) -> Transpose -> MatMul`` becomes
  ``DQ(W^T int8 [K, N], axis=1) -> MatMul``. ORT's and OpenVINO's QDQ MatMul fusions need the weight DQ
  to feed the MatMul directly.
- ``gemm_to_matmul``: ``Gemm(x, DQ(W), b, transB=1)`` becomes ``MatMul(x, DQ(W^T)) + b`` (one pattern for
  every linear, whatever the input rank).
- ``dedicate_dq``: a DQ with several consumers is cloned per consumer (QDQ node units own their DQ).
- ``check_qdq_placement``: Q feeds only DQ; an activation DQ feeds only MatMul/Conv/Gemm, directly or
  through a head split (Reshape/Transpose: the query and key of an attention's scores matmul), or a
  pooling op or an Add/Mul of two int8 tensors (a quantized residual block; a squeeze-excite gate x * s,
  QLinearMul on ORT). Returns the violations (stray Q/DQ around float ops) instead of rewriting.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

QUANT_CONSUMERS = {"MatMul", "Conv", "Gemm", "MatMulInteger", "ConvInteger"}
#: pooling that engines run on int8 input (a quantized residual block's output into global pooling)
INT8_POOLS = {"ReduceMean", "GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool"}


class Graph:
    """A thin mutable view of an ONNX graph: producers, consumers, initializers by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.init = {t.name: t for t in self.g.initializer}

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.g.node for o in n.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                out[i].append(n)
        for o in self.g.output:
            out[o.name].append(None)  # type: ignore[arg-type]  # a graph output counts as a consumer
        return out

    def array(self, name: str) -> np.ndarray | None:
        t = self.init.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        base, i = name, 0
        while name in self.init:
            i += 1
            name = f"{base}_{i}"
        t = numpy_helper.from_array(array, name)
        self.g.initializer.append(t)
        self.init[name] = t
        return name

    def remove_unused_initializers(self) -> None:
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        self.init = {t.name: t for t in keep}

    def unique(self, base: str) -> str:
        names = {o for n in self.g.node for o in n.output} | set(self.init)
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        return name


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_node_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _weight_dq(g: Graph, node: onnx.NodeProto | None) -> bool:
    """A per-tensor or per-channel weight DQ (a blocked one, a grouped weight, keeps its own layout)."""
    return (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in g.init
            and node_attr(node, "block_size") is None)


def _transposed_weight_dq(g: Graph, dq: onnx.NodeProto, w: np.ndarray, output: str) -> onnx.NodeProto:
    """A DQ of W^T (a new [K, N] initializer); a per-channel axis 0 becomes axis 1."""
    scale = g.array(dq.input[1])
    per_channel = scale is not None and scale.ndim == 1 and scale.size > 1
    inputs = [g.add_initializer(np.ascontiguousarray(w.T), dq.input[0] + "_t"), *dq.input[1:]]
    new_dq = helper.make_node("DequantizeLinear", inputs, [output], name=g.unique(dq.name + "_t"))
    if per_channel:
        new_dq.attribute.append(helper.make_attribute("axis", 1 - int(node_attr(dq, "axis", 1)) % 2))
    return new_dq


def fold_weight_transpose(g: Graph) -> int:
    prod, cons = g.producers(), g.consumers()
    fired = 0
    for tr in list(g.g.node):
        if tr.op_type != "Transpose":
            continue
        dq = prod.get(tr.input[0])
        w = g.array(dq.input[0]) if _weight_dq(g, dq) else None
        if w is None or w.ndim != 2 or list(node_attr(tr, "perm", [1, 0])) != [1, 0]:
            continue
        if len(cons[dq.output[0]]) != 1:
            continue
        new_dq = _transposed_weight_dq(g, dq, w, tr.output[0])
        idx = list(g.g.node).index(tr)
        g.g.node.remove(tr)
        g.g.node.remove(dq)
        g.g.node.insert(min(idx, len(g.g.node)), new_dq)
        fired += 1
    return fired


def gemm_to_matmul(g: Graph) -> int:
    prod = g.producers()
    fired = 0
    for gemm in list(g.g.node):
        if gemm.op_type != "Gemm" or node_attr(gemm, "transA", 0) or float(node_attr(gemm, "alpha", 1.0)) != 1.0:
            continue
        dq = prod.get(gemm.input[1])
        if not _weight_dq(g, dq) or float(node_attr(gemm, "beta", 1.0)) != 1.0:
            continue
        w = g.array(dq.input[0])
        if node_attr(gemm, "transB", 0):
            new_dq = _transposed_weight_dq(g, dq, w, g.unique(dq.output[0] + "_t"))
            b_input = new_dq.output[0]
            extra = [new_dq]
        else:
            b_input, extra = gemm.input[1], []
        idx = list(g.g.node).index(gemm)
        mm_out = g.unique(gemm.output[0] + "_mm") if len(gemm.input) > 2 else gemm.output[0]
        nodes = [*extra, helper.make_node("MatMul", [gemm.input[0], b_input], [mm_out], name=g.unique(gemm.name + "_mm"))]
        if len(gemm.input) > 2 and gemm.input[2]:
            nodes.append(helper.make_node("Add", [mm_out, gemm.input[2]], [gemm.output[0]], name=g.unique(gemm.name + "_bias")))
        g.g.node.remove(gemm)
        for k, n in enumerate(nodes):
            g.g.node.insert(idx + k, n)
        fired += 1
    return fired


def dedicate_dq(g: Graph) -> int:
    cons = g.consumers()
    fired = 0
    for dq in list(g.g.node):
        if dq.op_type != "DequantizeLinear":
            continue
        users = [u for u in cons[dq.output[0]] if u is not None]
        if len(users) < 2:
            continue
        idx = list(g.g.node).index(dq)
        for k, user in enumerate(users[1:], start=1):
            out = g.unique(f"{dq.output[0]}_c{k}")
            clone = helper.make_node("DequantizeLinear", list(dq.input), [out], name=g.unique(f"{dq.name}_c{k}"))
            clone.attribute.extend(dq.attribute)
            for j, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[j] = out
            g.g.node.insert(idx + k, clone)
            fired += 1
    return fired


def check_qdq_placement(g: Graph) -> list[str]:
    prod, cons = g.producers(), g.consumers()
    problems = []
    for n in g.g.node:
        if n.op_type == "QuantizeLinear":
            bad = [u.op_type if u is not None else "graph output" for u in cons[n.output[0]]
                   if u is None or u.op_type != "DequantizeLinear"]
            if bad:
                problems.append(f"QuantizeLinear {n.name} feeds {bad}: a quantized value leaves the QDQ unit")
        elif n.op_type == "DequantizeLinear" and n.input[0] not in g.init:
            q = prod.get(n.input[0])
            if q is not None and _is_conv_output(q, prod):
                continue  # a quantized conv output: QLinearConv writes int8, its consumers read a DQ
            bad = [u.op_type if u is not None else "graph output" for u in cons[n.output[0]]
                   if u is None or u.op_type not in QUANT_CONSUMERS and not _split_into_matmul(u, cons)
                   and u.op_type not in INT8_POOLS and not _int8_binary(u, prod)]
            if bad or q is None or q.op_type != "QuantizeLinear":
                problems.append(f"DequantizeLinear {n.name} feeds {bad or '?'}: stray Q/DQ around a float op")
    return problems


def _int8_binary(node: onnx.NodeProto, prod: dict[str, onnx.NodeProto]) -> bool:
    """An Add or Mul of two dequantized int8 tensors: a residual join an engine fuses into the conv before it,
    a squeeze-excite gate (ORT's QDQ rule ``2DQ`` makes both QLinearAdd / QLinearMul)."""
    return node.op_type in ("Add", "Mul") and len(node.input) == 2 and all(
        prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in node.input)


def _split_into_matmul(node: onnx.NodeProto, cons: dict[str, list[onnx.NodeProto]]) -> bool:
    """Does ``node`` start a chain of single-consumer Reshape/Transpose ops (a head split) into a MatMul?"""
    for _ in range(4):
        if node is None or node.op_type not in ("Reshape", "Transpose"):
            return node is not None and node.op_type == "MatMul"
        users = cons.get(node.output[0], [])
        if len(users) != 1:
            return False
        node = users[0]
    return False


def remove_dead_nodes(g: Graph) -> int:
    """Drop nodes none of whose outputs is used (a rewrite's leftovers)."""
    removed = 0
    while True:
        cons = g.consumers()
        dead = [n for n in g.g.node if not any(cons.get(o) for o in n.output)]
        if not dead:
            return removed
        for n in dead:
            g.g.node.remove(n)
        removed += len(dead)


def _is_conv_output(q: onnx.NodeProto, prod: dict[str, onnx.NodeProto]) -> bool:
    """Is this Q the output quantizer of a conv (possibly after its fused Relu/Clip)?"""
    src = prod.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
    while src is not None and src.op_type in ("Relu", "Clip"):
        src = prod.get(src.input[0])
    return src is not None and src.op_type == "Conv"


def toposort(g: Graph) -> None:
    """Re-order nodes topologically (rules insert nodes near their anchors; keep the graph valid)."""
    available = {i.name for i in g.g.input} | set(g.init) | {""}
    pending = list(g.g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            ordered.extend(rest)  # a cycle or an undefined input: leave it to the checker to report
            break
        pending = rest
    del g.g.node[:]
    g.g.node.extend(ordered)


def apply_rules(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int], list[str]]:
    from lowbit.backends.onnx.weight_only import fold_casts_into_dq

    g = Graph(model)
    stats = {
        "dq_casts_folded": fold_casts_into_dq(g),
        "gemm_to_matmul": gemm_to_matmul(g),
        "fold_weight_transpose": fold_weight_transpose(g),
        "dedicate_dq": dedicate_dq(g),
    }
    remove_dead_nodes(g)
    g.remove_unused_initializers()
    toposort(g)
    return model, stats, check_qdq_placement(g)
