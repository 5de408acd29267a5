"""Random valid models for differential testing (after NNSmith): a JSON graph spec, a Hypothesis strategy
that draws one, and ``build_model(spec)`` that turns it into an ``nn.Module`` with its inputs.

A spec is plain JSON, so a failing graph is saved as a file and replayed as a regression test::

    {"version": 1, "seed": 7, "input": [4, 8, 8], "smoothquant": true,
     "ops": [{"op": "conv2d", "in": [0], "out_channels": 8, "kernel": 3, "stride": 1, "padding": 1,
              "groups": 2, "bias": true},
             {"op": "relu", "in": [1]},
             {"op": "add", "in": [2, 1]}],
     "outputs": [3, 1]}

Value 0 is the model input (its shape without the batch dim: ``[C, H, W]`` an image, ``[F]`` a vector,
``[T, F]`` a token sequence); op k (0-based) produces value k + 1 from the values it names in ``in``.
``outputs`` lists the values the model returns (a tuple). ``seed`` seeds the weights and the inputs.
Every op is its own submodule (``ops.<k>``), so forward hooks see every intermediate and layer names
in plans and reports are ``ops.<k>``.

Ops, by the kind of value they read:

- image: conv2d (kernel 1/3, stride 1/2, padding 0/1, groups: 1, 2, 4 or every channel -- depthwise),
  batch_norm, max_pool / avg_pool (2x2), global_avg_pool -> vector, flatten -> vector, to_tokens
  ([C, H, W] -> [H*W, C]), softmax over channels, squeeze_excite (MobileNetV3's gating: global average
  pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid or sigmoid -> x * gate)
- vector: linear, matmul_weight (``x @ W (+ b)``, a parameter W), batch_norm, layer_norm,
  unflatten -> sequence, softmax
- sequence: linear, matmul_weight, matmul (``a @ b^T / sqrt(F)`` -> [T, T], or ``a @ b``), layer_norm,
  flatten -> vector, softmax
- any: relu, relu6, gelu, hardswish, sigmoid; add, mul (same shape), concat (image: channels; vector and
  sequence: features)

Sizes stay small (channels 4-16, spatial 6-16, features 8-32, tokens 2-8, at most 64 channels/features
after concats, flattened vectors at most 1024) so one compile takes about a second.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

SPEC_VERSION = 1
Shape = list[int]

ACTIVATIONS = ("relu", "relu6", "gelu", "hardswish", "sigmoid")
#: per value kind, the ops by family; a family is drawn first (layers twice as often), then an op of it,
#: so a rare op (matmul, to_tokens) is drawn as often as its family's common ones
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {"layer": ("conv2d",), "norm": ("batch_norm",), "activation": ACTIVATIONS,
              "binary": ("add", "mul", "concat", "squeeze_excite"), "softmax": ("softmax",),
              "reshape": ("max_pool", "avg_pool", "global_avg_pool", "flatten", "to_tokens")},
    "vector": {"layer": ("linear", "matmul_weight"), "norm": ("batch_norm", "layer_norm"), "activation": ACTIVATIONS,
               "binary": ("add", "mul", "concat"), "softmax": ("softmax",), "reshape": ("unflatten",)},
    "seq": {"layer": ("linear", "matmul_weight"), "norm": ("layer_norm",), "activation": ACTIVATIONS,
            "binary": ("add", "mul", "concat", "matmul"), "softmax": ("softmax",), "reshape": ("flatten",)},
}
FAMILY_ODDS = ("layer", "layer", "activation", "binary", "norm", "reshape", "softmax")
ALL_OPS = sorted({op for fams in FAMILIES.values() for ops in fams.values() for op in ops})
MAX_WIDTH = 64  # channels / features after concats
MAX_FLAT = 1024  # elements of a flattened value


def kind(shape: Sequence[int]) -> str:
    return {3: "image", 1: "vector", 2: "seq"}[len(shape)]


# --------------------------------------------------------------------------------------------------
# Shapes: one function used by the generator (what can follow) and the builder (validation)
# --------------------------------------------------------------------------------------------------


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def infer_shape(op: dict[str, Any], shapes: Sequence[Shape]) -> Shape:
    """The output shape (without batch) of ``op`` reading ``shapes``; ValueError when the op is invalid."""
    name = op["op"]
    ins = [list(shapes[i]) for i in op["in"]]
    x = ins[0]
    k = kind(x)
    if name == "conv2d":
        c, h, w = x
        g = op["groups"]
        if k != "image" or c % g or op["out_channels"] % g:
            raise ValueError(f"conv2d: groups {g} must divide {c} and {op['out_channels']}")
        hw = [conv_out(s, op["kernel"], op["stride"], op["padding"]) for s in (h, w)]
        if min(hw) < 2:
            raise ValueError(f"conv2d: output {hw} is too small")
        return [op["out_channels"], *hw]
    if name in ("linear", "matmul_weight"):
        if k == "image":
            raise ValueError(f"{name} reads vectors or sequences")
        return [*x[:-1], op["out_features"]]
    if name == "matmul":
        a, b = ins
        if k != "seq" or kind(b) != "seq":
            raise ValueError("matmul reads two sequences")
        if op["transpose_b"]:
            if a[1] != b[1]:
                raise ValueError(f"matmul: a @ b^T needs equal features, got {a} and {b}")
            return [a[0], b[0]]
        if a[1] != b[0]:
            raise ValueError(f"matmul: a @ b needs a's features == b's tokens, got {a} and {b}")
        return [a[0], b[1]]
    if name == "batch_norm":
        if k == "seq":
            raise ValueError("batch_norm reads images or vectors")
        return x
    if name == "layer_norm":
        if k == "image":
            raise ValueError("layer_norm reads vectors or sequences")
        return x
    if name in ACTIVATIONS or name == "softmax":
        return x
    if name == "squeeze_excite":
        if k != "image":
            raise ValueError("squeeze_excite reads images")
        return x
    if name in ("add", "mul"):
        if ins[0] != ins[1]:
            raise ValueError(f"{name}: shapes differ: {ins[0]} and {ins[1]}")
        return x
    if name == "concat":
        a, b = ins
        axis = 0 if k == "image" else len(a) - 1
        if len(a) != len(b) or any(p != q for i, (p, q) in enumerate(zip(a, b, strict=True)) if i != axis):
            raise ValueError(f"concat: shapes {a} and {b} differ off the concat axis")
        out = list(a)
        out[axis] += b[axis]
        if out[axis] > MAX_WIDTH:
            raise ValueError(f"concat: {out[axis]} > {MAX_WIDTH} channels")
        return out
    if name in ("max_pool", "avg_pool"):
        if k != "image" or min(x[1:]) < 4:
            raise ValueError(f"{name} reads images of at least 4x4")
        return [x[0], x[1] // 2, x[2] // 2]
    if name == "global_avg_pool":
        if k != "image":
            raise ValueError("global_avg_pool reads images")
        return [x[0]]
    if name == "flatten":
        if k == "vector" or math.prod(x) > MAX_FLAT:
            raise ValueError(f"flatten reads images or sequences of at most {MAX_FLAT} elements")
        return [math.prod(x)]
    if name == "to_tokens":
        if k != "image":
            raise ValueError("to_tokens reads images")
        return [x[1] * x[2], x[0]]
    if name == "unflatten":
        t = op["tokens"]
        if k != "vector" or x[0] % t or x[0] // t < 4:
            raise ValueError(f"unflatten: {t} tokens do not split {x[0]} features")
        return [t, x[0] // t]
    raise ValueError(f"unknown op {name!r}")


def value_shapes(spec: dict[str, Any]) -> list[Shape]:
    shapes: list[Shape] = [list(spec["input"])]
    for i, op in enumerate(spec["ops"]):
        if any(not 0 <= j < len(shapes) for j in op["in"]):
            raise ValueError(f"op {i} reads a value not defined before it: {op['in']}")
        shapes.append(infer_shape(op, shapes))
    return shapes


# --------------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------------


def _fits(op: dict[str, Any], shapes: Sequence[Shape]) -> bool:
    try:
        infer_shape(op, shapes)
    except ValueError:
        return False
    return True


LAYERS = ("conv2d", "linear", "matmul_weight")
#: what may follow a layer directly (the patterns fold_conv_bn and fuse_activation look for)
EPILOGUES = ((), (), ("relu",), ("batch_norm",), ("batch_norm", "relu"), ("relu6",), ("batch_norm", "relu6"))


@st.composite
def graph_specs(draw: st.DrawFn, min_ops: int = 2, max_ops: int = 8) -> dict[str, Any]:
    """A random valid graph spec. Choices shrink towards small, chain-shaped graphs: the first op kind,
    the latest value as operand, the smallest sizes.

    An op reads the latest value half of the time, else any earlier one (a branch; add/mul/concat/matmul
    take a second operand that fits, an earlier value where one does: a residual). Its family comes from
    ``FAMILY_ODDS`` (2 in 7 are layers: conv, linear, matmul with a weight), each layer followed by one of
    ``EPILOGUES`` (BatchNorm and ReLU: the folds and fusions); a graph without a layer gets one at the
    end: every graph quantizes something. The outputs are every value no op reads (several outputs when
    the graph branches), plus, sometimes, an intermediate value.
    """
    start = draw(st.sampled_from(["image", "vector", "seq"]))
    if start == "image":
        shape = [draw(st.sampled_from([4, 8, 12, 16])), draw(st.integers(6, 16)), draw(st.integers(6, 16))]
    elif start == "vector":
        shape = [draw(st.integers(8, 32))]
    else:
        shape = [draw(st.integers(2, 8)), draw(st.integers(8, 32))]
    shapes: list[Shape] = [shape]
    ops: list[dict[str, Any]] = []

    def append(op: dict[str, Any]) -> None:
        ops.append(op)
        shapes.append(infer_shape(op, shapes))

    n_ops = draw(st.integers(min_ops, max_ops))
    while len(ops) < n_ops:
        latest = len(shapes) - 1
        src = latest if draw(st.integers(0, 3)) < 2 else latest - draw(st.integers(0, latest))
        x = shapes[src]
        family = FAMILIES[kind(x)][draw(st.sampled_from(FAMILY_ODDS))]
        op = _draw_op(draw, draw(st.sampled_from(family)), src, shapes)
        if op is None:  # e.g. a pool on a 2x2 image: an activation instead (always valid)
            op = {"op": draw(st.sampled_from(ACTIVATIONS)), "in": [src]}
        append(op)
        if op["op"] in LAYERS:
            for name in draw(st.sampled_from(EPILOGUES)):
                if len(ops) < max_ops and _fits({"op": name, "in": [len(shapes) - 1]}, shapes):
                    append({"op": name, "in": [len(shapes) - 1]})
    if not any(op["op"] in LAYERS for op in ops):
        last = len(shapes) - 1
        op = _draw_op(draw, "conv2d" if kind(shapes[last]) == "image" else "linear", last, shapes)
        if op is None:  # an image too small for this conv: pool it to a vector first
            append({"op": "global_avg_pool", "in": [last]})
            op = _draw_op(draw, "linear", last + 1, shapes)
        append(op)
    read = {i for op in ops for i in op["in"]}
    sinks = [v for v in reversed(range(1, len(shapes))) if v not in read]
    extra = draw(st.lists(st.integers(1, len(shapes) - 1), max_size=1))
    outputs = sinks + [v for v in extra if v not in sinks]
    return {"version": SPEC_VERSION, "seed": draw(st.integers(0, 2**16)), "input": shape,
            "smoothquant": draw(st.booleans()), "ops": ops, "outputs": outputs}


def fingerprint(spec: dict[str, Any]) -> str:
    """The graph's structure without its sizes: specs with one fingerprint test much the same thing."""
    body = ";".join(f"{op['op']}{op['in']}" for op in spec["ops"])
    return f"{kind(spec['input'])}|{body}|{spec['outputs']}"


def _partner(draw: st.DrawFn, op: dict[str, Any], shapes: Sequence[Shape]) -> dict[str, Any] | None:
    """Complete a binary op with a second operand that fits (the first one itself always does for add,
    mul and concat; a residual branch when an earlier value fits)."""
    src = op["in"][0]
    fitting = [j for j in range(len(shapes)) if _fits({**op, "in": [src, j]}, shapes)]
    if not fitting:
        return None
    j = fitting[len(fitting) - 1 - draw(st.integers(0, len(fitting) - 1))]
    return {**op, "in": [src, j]}


def _draw_op(draw: st.DrawFn, name: str, src: int, shapes: Sequence[Shape]) -> dict[str, Any] | None:
    x = shapes[src]
    op: dict[str, Any] = {"op": name, "in": [src]}
    if name == "conv2d":
        out = draw(st.sampled_from([4, 8, 12, 16, x[0]]))
        common = math.gcd(x[0], out)
        op.update(out_channels=out, kernel=draw(st.sampled_from([3, 1])), stride=draw(st.sampled_from([1, 2])),
                  padding=draw(st.sampled_from([1, 0])),
                  groups=draw(st.sampled_from([g for g in (1, 2, 4, common) if common % g == 0])),
                  bias=draw(st.booleans()))
    elif name in ("linear", "matmul_weight"):
        op.update(out_features=draw(st.integers(8, 32)), bias=draw(st.booleans()))
    elif name == "matmul":
        op["transpose_b"] = draw(st.booleans())
        return _partner(draw, op, shapes) or _partner(draw, {**op, "transpose_b": True}, shapes)
    elif name in ("add", "mul", "concat"):
        return _partner(draw, op, shapes)
    elif name == "squeeze_excite":
        op.update(hidden=draw(st.sampled_from([2, 4, 8])), gate=draw(st.sampled_from(["hardsigmoid", "sigmoid"])))
    elif name == "softmax":
        op["dim"] = 1 if kind(x) == "image" else -1
    elif name == "unflatten":
        splits = [t for t in range(2, 9) if x[0] % t == 0 and x[0] // t >= 4]
        if not splits:
            return None
        op["tokens"] = draw(st.sampled_from(splits))
    return op if _fits(op, shapes) else None


# --------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------


class Binary(nn.Module):
    """add, mul, concat or matmul of two values (a module, so hooks see its output)."""

    def __init__(self, op: str, dim: int = -1, transpose_b: bool = False, features: int = 1) -> None:
        super().__init__()
        self.op, self.dim, self.transpose_b = op, dim, transpose_b
        self.scale = 1.0 / math.sqrt(features)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.op == "add":
            return a + b
        if self.op == "mul":
            return a * b
        if self.op == "concat":
            return torch.cat([a, b], dim=self.dim)
        return torch.matmul(a, b.transpose(-1, -2) if self.transpose_b else b) * self.scale

    def extra_repr(self) -> str:
        return self.op


class MatMulWeight(nn.Module):
    """``x @ W (+ b)`` with parameters: fuse_linear_bias turns it into a linear."""

    def __init__(self, features: int, out: int, bias: bool) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(features)
        self.weight = nn.Parameter(torch.empty(features, out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y


class SqueezeExcite(nn.Module):
    """``x * gate(fc2(relu(fc1(mean(x)))))``: two 1x1 conv layers on the pooled channels gate the image."""

    def __init__(self, channels: int, hidden: int, gate: str) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid() if gate == "hardsigmoid" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class ToTokens(nn.Module):
    """[N, C, H, W] -> [N, H*W, C], as a vision transformer's patch tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class SpecModel(nn.Module):
    """The model a spec describes: ``ops[k]`` reads the values ``inputs[k]`` names and appends its own."""

    def __init__(self, ops: list[nn.Module], inputs: list[list[int]], outputs: list[int]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.inputs = inputs
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [x]
        for op, ins in zip(self.ops, self.inputs, strict=True):
            values.append(op(*[values[i] for i in ins]))
        return tuple(values[i] for i in self.outputs)


def _module(op: dict[str, Any], shapes: Sequence[Shape], g: torch.Generator) -> nn.Module:
    name = op["op"]
    x = shapes[op["in"][0]]
    if name == "conv2d":
        m: nn.Module = nn.Conv2d(x[0], op["out_channels"], op["kernel"], op["stride"], op["padding"],
                                 groups=op["groups"], bias=op["bias"])
    elif name == "linear":
        m = nn.Linear(x[-1], op["out_features"], bias=op["bias"])
    elif name == "matmul_weight":
        m = MatMulWeight(x[-1], op["out_features"], op["bias"])
    elif name == "matmul":
        m = Binary("matmul", transpose_b=op["transpose_b"], features=x[-1])
    elif name == "batch_norm":
        m = (nn.BatchNorm2d if kind(x) == "image" else nn.BatchNorm1d)(x[0])
        n = x[0]  # non-trivial statistics, so folding is really tested; var >= 0.5 keeps the gain bounded
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    elif name == "layer_norm":
        m = nn.LayerNorm(x[-1])
        m.weight.data.copy_(torch.rand(x[-1], generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(x[-1], generator=g) * 0.2)
    elif name in ACTIVATIONS:
        m = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "hardswish": nn.Hardswish,
             "sigmoid": nn.Sigmoid}[name]()
    elif name in ("add", "mul"):
        m = Binary(name)
    elif name == "concat":
        m = Binary("concat", dim=1 if kind(x) == "image" else -1)
    elif name == "softmax":
        m = nn.Softmax(dim=op["dim"])
    elif name == "max_pool":
        m = nn.MaxPool2d(2)
    elif name == "avg_pool":
        m = nn.AvgPool2d(2)
    elif name == "global_avg_pool":
        m = GlobalAvgPool()
    elif name == "squeeze_excite":
        m = SqueezeExcite(x[0], op["hidden"], op["gate"])
    elif name == "flatten":
        m = nn.Flatten(1)
    elif name == "to_tokens":
        m = ToTokens()
    elif name == "unflatten":
        m = nn.Unflatten(1, (op["tokens"], x[0] // op["tokens"]))
    else:
        raise ValueError(f"unknown op {name!r}")
    return m


def build_model(spec: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model of ``spec`` (weights seeded by ``spec['seed']``) and an example input tuple."""
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"graph spec version {spec.get('version')!r}; this builder reads {SPEC_VERSION}")
    shapes = value_shapes(spec)
    if not spec["outputs"] or any(not 1 <= v < len(shapes) for v in spec["outputs"]):
        raise ValueError(f"outputs {spec['outputs']} must name op values 1..{len(shapes) - 1}")
    torch.manual_seed(spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    ops = [_module(op, shapes, g) for op in spec["ops"]]
    model = SpecModel(ops, [list(op["in"]) for op in spec["ops"]], list(spec["outputs"])).eval()
    return model, batches(spec, count=1, batch=2, stream=0)[0]


def batches(spec: dict[str, Any], count: int, batch: int, stream: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` seeded standard-normal input batches; ``stream`` keeps calibration and test data apart."""
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + stream)
    return [(torch.randn(batch, *spec["input"], generator=g),) for _ in range(count)]


def describe(spec: dict[str, Any]) -> str:
    """One line: ``[4, 8, 8] -> conv2d(0) -> relu(1) -> add(2,1) => (3, 1)``."""
    body = " -> ".join(f"{op['op']}({','.join(map(str, op['in']))})" for op in spec["ops"])
    return f"{spec['input']} -> {body} => {tuple(spec['outputs'])}"


def save_spec(spec: dict[str, Any], path: str | Path) -> Path:
    """Write a spec as JSON, one op per line (diffs and reviews read it like the graph)."""
    lines = []
    for key, value in spec.items():
        if key == "ops":
            body = ",\n".join(f"  {json.dumps(op)}" for op in value)
            lines.append(f' "ops": [\n{body}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == spec
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_spec(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
