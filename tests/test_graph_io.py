"""graph_io: an FX graph to JSON and back, without pickle; the rebuilt graph computes the same outputs."""

from __future__ import annotations

import json
import math
import operator

import pytest
import torch
from torch import fx

import lowbit
from lowbit.errors import ArtifactError
from lowbit.runtime.graph_io import GUARDS_FN, graph_from_json, graph_to_json

from models import bert_batch, tiny_bert

aten = torch.ops.aten


def constants(gm: fx.GraphModule, d: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name in d["constants"]:
        obj = gm
        for part in name.split("."):
            obj = getattr(obj, part)
        out[name] = obj
    return out


def roundtrip(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    d = graph_to_json(gm)
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN / Infinity literals
    return graph_from_json(json.loads(text), constants(gm, d)), d


def small_graph(build) -> fx.GraphModule:
    """A GraphModule with a constant ``w`` [4, 3] and placeholder ``x`` [2, 3]; ``build(g, x, w)`` adds nodes."""
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("sub.w")
    g.output(build(g, x, w))
    root = torch.nn.Module()
    root.sub = torch.nn.Module()
    root.sub.register_buffer("w", torch.randn(4, 3))
    return fx.GraphModule(root, g)


@pytest.fixture(scope="module")
def bert_torch_target():
    model = tiny_bert()
    cal = [bert_batch(2, 8, i) for i in range(1, 3)]
    return lowbit.compile(model, bert_batch(2, 8, 0), calibration=cal, progress=False,
                          dynamic_shapes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})


def test_lowered_torch_target_bert_round_trips_to_identical_outputs(bert_torch_target) -> None:
    gm = bert_torch_target.graph_module
    rebuilt, d = roundtrip(gm)
    ops = {e["target"] for e in d["nodes"] if e["op"] == "call_function"}
    assert {"aten.linear.default", "quantized_decomposed.quantize_per_tensor.default",
            "aten.sym_size.int"} <= ops
    assert not any(e["op"] == "call_module" for e in d["nodes"])  # torch.export's _guards_fn is left out
    assert any(n.op == "call_module" and n.target == GUARDS_FN for n in gm.graph.nodes)
    for batch, seq in ((2, 8), (3, 5)):  # the rebuilt graph has no fixed shapes
        b = bert_batch(batch, seq, 40 + seq)
        flat = [b["input_ids"], b["attention_mask"]]
        with torch.no_grad():
            for x, y in zip(gm(*flat), rebuilt(*flat), strict=True):
                assert torch.equal(x, y)
    # node names and lowbit's meta survive
    layers = {n.name: n.meta.get("lowbit_qrole") for n in rebuilt.graph.nodes}
    assert layers == {n.name: n.meta.get("lowbit_qrole") for n in gm.graph.nodes if n.op != "call_module"}


def test_argument_kinds_round_trip() -> None:
    def build(g: fx.Graph, x: fx.Node, w: fx.Node) -> tuple:
        y = g.call_function(aten.linear.default, (x, w))
        y = g.call_function(aten.clamp.default, (y, float("-inf"), 1.5))
        z = g.call_function(aten._to_copy.default, (y,), {"dtype": torch.float64, "layout": torch.strided,
                                                          "device": torch.device("cpu"),
                                                          "memory_format": torch.contiguous_format})
        n = g.call_function(aten.sym_size.int, (x, 0))
        n2 = g.call_function(operator.mul, (n, 2))
        v = g.call_function(aten.view.default, (y, [n2, -1]))
        mx = g.call_function(aten.max.dim, (y, 1, True))
        return (z, v, g.call_function(operator.getitem, (mx, 1)))

    gm = small_graph(build)
    rebuilt, d = roundtrip(gm)
    clamp = next(e for e in d["nodes"] if e["target"] == "aten.clamp.default")
    assert clamp["args"][1] == {"float": "-inf"}
    x = torch.randn(2, 3)
    for a, b in zip(gm(x), rebuilt(x), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert isinstance(rebuilt.sub.w, torch.Tensor) and "w" in dict(rebuilt.sub.named_buffers())


def test_unserialisable_argument_names_the_node_and_the_type() -> None:
    gm = small_graph(lambda g, x, w: g.call_function(aten.mul.Tensor, (x, torch.ones(3))))
    with pytest.raises(ArtifactError, match=r"node 'mul_tensor'.*args\[1\] of type Tensor"):
        graph_to_json(gm)


def test_unserialisable_target_and_module_calls_are_refused() -> None:
    gm = small_graph(lambda g, x, w: g.call_function(math.sqrt, (x,)))
    with pytest.raises(ArtifactError, match=r"node 'sqrt'.*cannot be written"):
        graph_to_json(gm)
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_module("lin", (x,)))
    root = torch.nn.Module()
    root.lin = torch.nn.Linear(3, 3)
    with pytest.raises(ArtifactError, match=r"node 'lin'.*'call_module'"):
        graph_to_json(fx.GraphModule(root, g))


def test_reading_checks_ops_and_constants() -> None:
    gm = small_graph(lambda g, x, w: g.call_function(aten.linear.default, (x, w)))
    d = graph_to_json(gm)
    tensors = constants(gm, d)
    with pytest.raises(ArtifactError, match="no tensor 'sub.w'"):
        graph_from_json(d, {})
    with pytest.raises(ArtifactError, match=r"'sub.w' is float32\[3, 4\]"):
        graph_from_json(d, {"sub.w": torch.zeros(3, 4)})
    bad = json.loads(json.dumps(d))
    next(e for e in bad["nodes"] if e["op"] == "call_function")["target"] = "lowbit.no_such_op.default"
    with pytest.raises(ArtifactError, match=r"graph node 'linear[a-z_]*'.*lowbit.no_such_op.default.*not registered"):
        graph_from_json(bad, tensors)
    bad = json.loads(json.dumps(d))
    bad["nodes"][-2]["args"][0] = {"node": "nowhere"}
    with pytest.raises(ArtifactError, match="before it is defined"):
        graph_from_json(bad, tensors)
    with pytest.raises(ArtifactError, match="version"):
        graph_from_json({**d, "version": 99}, tensors)
