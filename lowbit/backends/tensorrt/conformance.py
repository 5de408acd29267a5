"""Check a QDQ ONNX model against TensorRT's documented Q/DQ rules for INT8 explicit quantization.

``check_model(model_or_path) -> ConformanceReport`` lists every violation with its rule id and the node
name; it needs only onnx and numpy (it runs in CI, where there is no TensorRT). ``lowbit trt-check
MODEL.onnx`` prints the report and exits 1 on a violation.

Sources (each rule says which): [ops] onnx-tensorrt ``docs/operators.md`` (TensorRT 10.15: opsets 9 to
24; QuantizeLinear/DequantizeLinear: "`zero_point` must be 0"; UINT8 "only supported as network input or
output"); [quant] TensorRT developer guide, "Working with Quantized Types" / "Explicit Quantization":
symmetric quantization, INT8 activations in [-128, 127] and INT8 weights in [-127, 127], per-tensor
activations and per-channel weights along the output channel, build-time constant scales, Q/DQ placement
(quantize the inputs of weighted ops; a Q/DQ pair whose consumer runs in float only adds rounding).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from lowbit.backends.onnx.qdq_rules import node_attr

#: the opsets TensorRT's ONNX parser documents: QuantizeLinear's per-axis ``axis`` arrived in opset 13;
#: TensorRT 10.15 parses opsets up to 24 (older 10.x releases document lower maxima: export at 19)
OPSET_MIN, OPSET_MAX = 13, 24

RULES: dict[str, str] = {
    "opset-range": f"the model's ai.onnx opset is within [{OPSET_MIN}, {OPSET_MAX}]: per-channel Q/DQ needs "
                   f"opset 13, TensorRT 10.15 parses up to {OPSET_MAX} [ops]",
    "zero-point-nonzero": "Q/DQ zero points are 0: TensorRT quantizes symmetrically [ops][quant]",
    "quant-type-not-int8": "the quantized type is int8 (a zero point of dtype int8; no zero point means uint8); "
                           "TensorRT takes UINT8 only as network I/O [ops]",
    "scale-invalid": "scales are positive and finite (no 0, negative, NaN or Inf)",
    "scale-not-constant": "scales and zero points are build-time constants (initializers or Constant nodes) [quant]",
    "weight-range": "INT8 weights lie in [-127, 127] (symmetric narrow range) [quant]",
    "weight-axis": "per-channel weight scales run along the output-channel axis (Conv [O,I,kh,kw]: 0; "
                   "ConvTranspose [I,O,..]: 1; MatMul B [K,N]: 1; Gemm B: 0 with transB=1, else 1) and have one "
                   "entry per output channel [quant]",
    "activation-per-channel": "activations are quantized per tensor (one scale) [quant]",
    "blocked-quantization": "INT8 Q/DQ are per-tensor or per-channel: block quantization (block_size, opset 21) "
                            "is for 4-bit / FP8 weights [quant]",
    "q-not-followed-by-dq": "a QuantizeLinear output feeds only DequantizeLinear nodes (a quantized value "
                            "never leaves its Q/DQ pair) [quant]",
    "dq-without-q": "an activation DequantizeLinear reads a QuantizeLinear [quant]",
    "qdq-around-float-op": "a DequantizeLinear feeds an op TensorRT can run quantized or move Q/DQ through "
                           "(weighted ops, Add, pooling, Concat, data movement); around a float-only op "
                           "(Softmax, LayerNormalization, ...) the pair only adds rounding [quant]",
    "qdq-on-non-float": "QuantizeLinear reads a float tensor (float32, float16 or bfloat16) [ops]",
}

#: ops whose weight input TensorRT quantizes: op -> (input index of the weight)
WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
#: ops TensorRT fuses with DQ inputs (and an output Q) or commutes Q/DQ through: a DQ may feed them
DQ_CONSUMERS = set(WEIGHTED) | {
    "Add",  # residual add fused into the conv; quantized elementwise add
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat",  # quantizable layers
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Pad", "Identity",  # data movement
}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "message": self.message}


@dataclass
class ConformanceReport:
    """The violations found, and what was checked (counts of Q, DQ, weights, per-channel weights)."""

    violations: list[Violation] = field(default_factory=list)
    opset: int | None = None
    checked: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules_broken(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for v in self.violations:
            out[v.rule] += 1
        return dict(out)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "opset": self.opset, "checked": dict(self.checked),
                "violations": [v.to_json() for v in self.violations], "rules": RULES}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConformanceReport:
        return cls([Violation(v["rule"], v["node"], v["message"]) for v in d.get("violations", [])],
                   d.get("opset"), dict(d.get("checked", {})), d.get("source", ""))

    def summary(self) -> str:
        c = self.checked
        what = (f"{c.get('quantize', 0)} Q, {c.get('dequantize', 0)} DQ ({c.get('weights', 0)} weights, "
                f"{c.get('per_channel_weights', 0)} per-channel), opset {self.opset}")
        verdict = "OK" if self.ok else f"{len(self.violations)} violation(s)"
        return f"TensorRT Q/DQ conformance{f' of {self.source}' if self.source else ''}: {what}: {verdict}"

    def format(self) -> str:
        """The summary line, then one row per violation: rule, node, problem."""
        lines = [self.summary()]
        if self.violations:
            wr = max(len("rule"), *(len(v.rule) for v in self.violations))
            wn = min(48, max(len("node"), *(len(v.node) for v in self.violations)))
            lines.append(f"  {'rule':<{wr}}  {'node':<{wn}}  problem")
            for v in self.violations:
                lines.append(f"  {v.rule:<{wr}}  {v.node:<{wn}}  {v.message}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------


class _Model:
    """Lookups the rules need: constants (initializers and Constant nodes), producers, consumers, types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.const: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = a.t
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}
        self.types: dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # a model shape inference cannot handle: the type rules use what is declared
            inferred = g
        for vi in [*inferred.value_info, *inferred.input, *inferred.output]:
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for name, t in self.const.items():
            self.types[name] = t.data_type

    def array(self, name: str) -> np.ndarray | None:
        t = self.const.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def is_const(self, name: str) -> bool:
        return name in self.const


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def _weight_consumer(m: _Model, node: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | None:
    """The weighted op (and input index) a weight's DQ feeds; for a weight Q, the op behind its DQ."""
    out = node.output[0]
    if node.op_type == "QuantizeLinear":
        dqs = [u for u in m.consumers[out] if u.op_type == "DequantizeLinear"]
        if not dqs:
            return None
        out = dqs[0].output[0]
    for user in m.consumers[out]:
        if user.op_type in WEIGHTED:
            for idx, name in enumerate(user.input):
                if name == out:
                    return user, idx
    return None


def _expected_weight_axis(op: onnx.NodeProto, idx: int, rank: int) -> int | None:
    """The output-channel axis of a weight consumed by ``op`` at input ``idx`` (None: not a weight slot)."""
    if op.op_type == "Conv" and idx == 1:
        return 0
    if op.op_type == "ConvTranspose" and idx == 1:
        return 1  # weight [C_in, C_out / group, k...]
    if op.op_type == "MatMul":
        return rank - 1 if idx == 1 else rank - 2  # B [.., K, N]: N; A [.., M, K]: M
    if op.op_type == "Gemm" and idx == 1:
        return 0 if node_attr(op, "transB", 0) else 1
    if op.op_type == "Gemm" and idx == 0:
        return 1 if node_attr(op, "transA", 0) else 0
    return None


def check_model(model_or_path: onnx.ModelProto | str | os.PathLike[str]) -> ConformanceReport:
    """Check every QuantizeLinear / DequantizeLinear of a model against TensorRT's Q/DQ rules."""
    source = ""
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    else:
        source = os.fspath(model_or_path)
        model = onnx.load(source)
    report = ConformanceReport(opset=_opset(model), source=source)
    bad = report.violations.append
    if report.opset is None or not OPSET_MIN <= report.opset <= OPSET_MAX:
        bad(Violation("opset-range", "<model>", f"ai.onnx opset {report.opset} is outside [{OPSET_MIN}, "
                                                f"{OPSET_MAX}] (per-channel Q/DQ needs 13; TensorRT 10.15 "
                                                f"parses up to {OPSET_MAX})"))
    m = _Model(model)
    counts = {"quantize": 0, "dequantize": 0, "weights": 0, "per_channel_weights": 0}
    for node in model.graph.node:
        if node.op_type not in QDQ:
            continue
        counts["quantize" if node.op_type == "QuantizeLinear" else "dequantize"] += 1
        for v in _check_qdq(m, node, counts):
            bad(v)
    report.checked = counts
    return report


def _check_qdq(m: _Model, node: onnx.NodeProto, counts: dict[str, int]) -> list[Violation]:
    name, op = _label(node), node.op_type
    out: list[Violation] = []
    x = node.input[0]
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""

    # constants: scale and zero point
    scale = m.array(scale_name)
    if scale is None:
        out.append(Violation("scale-not-constant", name, f"{op} scale {scale_name!r} is computed at run time; "
                                                         "TensorRT needs a build-time constant"))
    else:
        flat = scale.astype(np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            kind = "NaN" if np.isnan(flat).any() else "Inf"
            out.append(Violation("scale-invalid", name, f"{op} scale {scale_name!r} holds {kind}"))
        elif np.any(flat <= 0):
            i = int(np.argmax(flat <= 0))
            out.append(Violation("scale-invalid", name, f"{op} scale {scale_name!r} holds {flat[i]:g} at index "
                                                        f"{i}; scales must be positive"))
    if zp_name and not m.is_const(zp_name):
        out.append(Violation("scale-not-constant", name, f"{op} zero point {zp_name!r} is computed at run time"))
    zp = m.array(zp_name) if zp_name else None

    # the quantized type and the zero point's value
    if zp_name:
        qtype = m.types.get(zp_name)
    elif op == "QuantizeLinear":
        qtype = int(node_attr(node, "output_dtype", 0)) or TensorProto.UINT8  # ONNX: no zero point means uint8
    else:
        qtype = m.types.get(x)
    if qtype is not None and qtype != TensorProto.INT8:
        tname = TensorProto.DataType.Name(qtype).lower()
        hint = " (no zero point: QuantizeLinear outputs uint8)" if op == "QuantizeLinear" and not zp_name else ""
        verb = "quantizes to" if op == "QuantizeLinear" else "reads"
        out.append(Violation("quant-type-not-int8", name, f"{op} {verb} {tname}{hint}; TensorRT's INT8 Q/DQ "
                                                          "need an int8 zero point of 0"))
    if zp is not None and np.any(zp != 0):
        out.append(Violation("zero-point-nonzero", name, f"{op} zero point {zp_name!r} is {_show(zp)}; "
                                                         "TensorRT supports only symmetric quantization (0)"))

    # granularity: weights per output channel, activations per tensor, no blocks for int8
    if int(node_attr(node, "block_size", 0) or 0) > 0:
        out.append(Violation("blocked-quantization", name, f"{op} has block_size={node_attr(node, 'block_size')}; "
                                                           "INT8 runs per-tensor or per-channel"))
    per_channel = scale is not None and scale.ndim >= 1 and scale.size > 1
    weight = m.is_const(x)
    src = m.producer.get(x)
    # DQ(Q(W float)): TensorRT quantizes the float weight at build time; the Q's own check covers it
    weight_via_q = src is not None and src.op_type == "QuantizeLinear" and m.is_const(src.input[0])
    if weight:
        counts["weights"] += 1
        out += _check_weight(m, node, name, scale, per_channel, counts)
    elif per_channel and not weight_via_q:
        out.append(Violation("activation-per-channel", name, f"{op} quantizes activation {x!r} with "
                                                             f"{scale.size} scales; activations are per tensor"))

    # placement
    if op == "QuantizeLinear":
        users = [u.op_type for u in m.consumers[node.output[0]] if u.op_type != "DequantizeLinear"]
        if node.output[0] in m.outputs:
            users.append("graph output")
        if users:
            out.append(Violation("q-not-followed-by-dq", name, f"QuantizeLinear output {node.output[0]!r} "
                                                               f"feeds {', '.join(users)}, not a DequantizeLinear"))
        xtype = m.types.get(x)
        if xtype is not None and xtype not in FLOAT_TYPES:
            out.append(Violation("qdq-on-non-float", name, f"QuantizeLinear reads {x!r} of type "
                                                           f"{TensorProto.DataType.Name(xtype).lower()}"))
    else:
        if not weight and (src is None or src.op_type != "QuantizeLinear"):
            what = f"{src.op_type} {_label(src)}" if src is not None else "a graph input"
            out.append(Violation("dq-without-q", name, f"DequantizeLinear reads {x!r} from {what}, not a "
                                                       "QuantizeLinear"))
        for user in m.consumers[node.output[0]]:
            if user.op_type == "QuantizeLinear":
                out.append(Violation("qdq-around-float-op", name, f"DequantizeLinear feeds QuantizeLinear "
                                                                  f"{_label(user)}: a float re-quantization between "
                                                                  "two Q/DQ pairs; quantize the tensor once"))
            elif user.op_type not in DQ_CONSUMERS:
                out.append(Violation("qdq-around-float-op", name, f"DequantizeLinear feeds {user.op_type} "
                                                                  f"{_label(user)}, which TensorRT runs in float: "
                                                                  "drop this Q/DQ pair"))
    return out


def _check_weight(m: _Model, node: onnx.NodeProto, name: str, scale: np.ndarray | None, per_channel: bool,
                  counts: dict[str, int]) -> list[Violation]:
    out: list[Violation] = []
    w = m.array(node.input[0])
    if w is None:
        return out
    if node.op_type == "DequantizeLinear" and w.dtype == np.int8 and w.size and int(w.min()) < -127:
        out.append(Violation("weight-range", name, f"int8 weight {node.input[0]!r} holds -128; TensorRT's INT8 "
                                                   "weights are symmetric in [-127, 127]"))
    if not per_channel or scale is None:
        return out
    counts["per_channel_weights"] += 1
    axis = int(node_attr(node, "axis", 1))
    axis = axis + w.ndim if axis < 0 else axis
    found = _weight_consumer(m, node)
    if found is None:
        return out  # a per-channel constant that feeds no weighted op: placement rules report it if needed
    op, idx = found
    want = _expected_weight_axis(op, idx, w.ndim)
    if want is not None and axis != want:
        out.append(Violation("weight-axis", name, f"per-channel axis {axis} for the weight of {op.op_type} "
                                                  f"{_label(op)} (shape {list(w.shape)}); its output channels "
                                                  f"are axis {want}"))
    elif 0 <= axis < w.ndim and scale.size != w.shape[axis]:
        out.append(Violation("weight-axis", name, f"{scale.size} scales for axis {axis} of weight shape "
                                                  f"{list(w.shape)} ({w.shape[axis]} channels)"))
    return out


def _show(a: np.ndarray) -> str:
    flat = a.ravel()
    return str(flat.tolist()) if flat.size <= 4 else f"[{', '.join(str(v) for v in flat[:4].tolist())}, ...]"


def write_report(report: ConformanceReport, path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=2)
        f.write("\n")
