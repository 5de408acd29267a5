"""Differential oracle for one random graph spec (``fuzz_models``): compile it on every leg, compare, classify.

Legs, all calibrated on the same seeded batches (4 x 8 samples), checked on batches of 3 and 1 (other
batch sizes than the example's 2: the dynamic batch dim is exercised too):

- ``torch``: the fake-quant reference against FP32, per output: SQNR >= ``SQNR_FLOOR_DB`` on held-in
  samples (the first 3 of a calibration batch). Fresh samples beyond the calibrated ranges are clipped:
  that is the data's coverage, not the compiler's fidelity (a global average pool leaves one value per
  channel and sample, so 32 calibration samples cover its range loosely).
- ``onnxruntime-int8``: ORT against the fake-quant graph the ORT model was exported from
  (``compiled.graph_module``: the plan *and* the engine's own Q/DQ choices -- quantized conv outputs for
  QLinearConv, quantized gating products for QLinearMul -- which a torch compile of the same plan lacks),
  per output: ``|ort - ref| <= 1 step`` on >= 99.9% of the elements, on the held-in samples and on a fresh
  batch (saturation at the clipped ranges included); and the engine against FP32 keeps the SQNR floor
  (its extra quantizers included).
- ``openvino-int8`` (when OpenVINO is installed): the OpenVINO model run with its float ops in f32
  (``INFERENCE_PRECISION_HINT=f32``), checked like ORT's against the graph it was exported from (residual
  adds and post-op activations quantized there). Why f32: by default OpenVINO runs the float ops between the int8 kernels (dequantize-scale
  epilogues, softmax, layer norm, the float layers) in bf16 on CPUs that have it, and bf16 keeps 8
  significant bits: a value of magnitude ~1 rounds by up to 2^-8 ~ 0.4%, several such roundings per path
  move an output by a few of its int8 steps (an int8 step of a range +-4 is ~0.03, i.e. 3% of 1). No fixed
  step tolerance separates that from a real defect, so the integer kernels are checked with f32 float ops
  and one step, like ORT's; anything beyond is a defect.
- ``tensorrt-int8`` (export only, when the target is registered): the TensorRT-ready ONNX passes the
  conformance checker and the SQNR floor against FP32, and its ONNX Runtime run is compared like ORT's,
  against a torch reference with symmetric activations (TensorRT's) compiled with the TRT model's plan
  (where the TRT residual rule fired, on an export without it: see ``_trt_leg``).

Every leg uses ``QuantConfig(target_sqnr_db=None)``: the automatic planner would promote a layer a bug broke
to float and hide the bug; SmoothQuant (exact in float) is on or off as the spec says.

**The step.** Per output, the quantization step is the scale of the last quantized activation feeding that
output when the output is quantized (its value is a dequantized int8 code, reached through ops that keep
values on their grid: shape ops, ReLU, ReLU6, max pooling),
otherwise the output's own observed int8 step: the scale lowbit's uint8 min/max observer would choose for
that output, ``(max(hi, 0) - min(lo, 0)) / 255`` of the reference output over the calibration and test
batches (a code flip upstream, scaled by the ops after it, is then about one such step; ``STEP_TOLERANCE``
says why one step is 255/254 of it). Rounding
differences between the engines' integer kernels and torch's float fake-quant (ties; float summation
order just below a rounding boundary; ORT's QLinearAdd/QLinearConv requantization) flip a code by one
step now and then; more than one step, or on more than 0.1% of the elements, is a bug. A float slack of
``1e-5 * max|ref|`` absorbs float32 summation order.

**Rejected inputs.** The FP32 model runs first on every batch with forward hooks on every op (each op is
a submodule); an intermediate that is non-finite or above ``OVERFLOW`` in magnitude rejects the graph up
front: it is counted as rejected, never as a failure.

Statuses: ``passed``, ``rejected``, ``fidelity`` (a leg's comparison failed), ``crash`` (any exception
while compiling or running a leg). ``shrink`` reduces a failing spec (delta debugging over its ops and
outputs) to what a regression test should keep.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import operator
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

import lowbit
from lowbit.backends.registry import TARGETS
from lowbit.runtime.qparams import choose_qparams, sqnr
from lowbit.runtime.spec import QuantSpec

from fuzz_models import batches, build_model, value_shapes

#: Torch reference vs FP32, per output. Why 15 dB: one int8 min/max quantizer of a roughly Gaussian
#: tensor (range ~ +-4 sigma over the calibration set) has SQNR 10 log10(12 * 255^2 / 8^2) ~ 41 dB; a
#: random graph of up to 8 ops holds at most 8 layers with an input and a weight quantizer each, whose
#: noise powers add: 41 - 10 log10(16) ~ 29 dB. Heavy tails (products of two activations, pooled maxima,
#: softmax probabilities, ranges set by a few large values) and tiny layers (4 tokens x 8 features) cost
#: up to another ~10 dB (the lowest seen over 300 graphs: 25 dB); 15 dB leaves that margin and still
#: fails real bugs (the planted ones in test_fuzz_differential.py: ranges clipped to a quarter, 7 dB).
SQNR_FLOOR_DB = 15.0
#: ORT / TRT-on-ORT vs the torch reference: at most 1 step on at least this share of every output
STEP_SHARE = 0.999
#: one step, measured against an output's observed step: a value already on an int8 grid (a dequantized
#: code, times a constant) spans 254 or 255 codes of it, as the ends of a calibrated range round to codes
#: themselves, so its observed step may be 254/255 of its grid's and one code of the grid is 255/254 steps
STEP_TOLERANCE = 255.0 / 254.0
FLOAT_SLACK = 1e-5  # x max|ref|: float32 summation order, not quantization
OUTPUT_OBSERVER = QuantSpec("uint8", symmetric=False)  # lowbit's default activation quantizer
OVERFLOW = 1e4  # an FP32 intermediate above this (or non-finite) rejects the input
CALIBRATION = dict(count=4, batch=8, stream=1)
FRESH = dict(count=1, batch=1, stream=2)  # batch 1: the smallest dynamic batch
HELD_IN = 3  # samples of the first calibration batch the SQNR is measured on
TRT_TARGET = "tensorrt-int8"
OV_TARGET = "openvino-int8"

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
#: ops whose outputs are elements of their input, zeros or clip bounds: a quantized value stays on its
#: grid through them (shape ops, ReLU, ReLU6, max pooling)
GRID_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.transpose.int, aten.permute.default, aten.unflatten.int, aten.unsqueeze.default,
            aten.squeeze.dim, aten.clone.default, aten.contiguous.default, aten.relu.default,
            aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.max_pool2d.default,
            aten.max_pool2d_with_indices.default, operator.getitem}


@dataclass
class Outcome:
    status: str  # passed | rejected | fidelity | crash
    leg: str = ""
    detail: str = ""
    sqnr_db: list[float] = field(default_factory=list)  # torch reference vs FP32, per output
    within_step: dict[str, float] = field(default_factory=dict)  # leg -> worst share within 1 step
    seconds: float = 0.0
    compile_seconds: dict[str, float] = field(default_factory=dict)  # target -> seconds compiling

    def line(self) -> str:
        where = f" [{self.leg}]" if self.leg else ""
        return f"{self.status}{where}: {self.detail}".strip()


def trt_available() -> bool:
    return TRT_TARGET in TARGETS


def ov_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


# --------------------------------------------------------------------------------------------------
# Screening FP32
# --------------------------------------------------------------------------------------------------


def overflow_reason(model: nn.Module, inputs: list[tuple[torch.Tensor, ...]]) -> str | None:
    """Why these inputs are rejected (a non-finite or overflowing FP32 intermediate), or None."""
    found: list[str] = []

    def hook(module: nn.Module, args: Any, out: Any, name: str = "") -> None:
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and not found:
                if not torch.isfinite(t).all():
                    found.append(f"{name or 'model'} ({type(module).__name__}) is non-finite")
                elif t.abs().max() > OVERFLOW:
                    found.append(f"{name or 'model'} ({type(module).__name__}) reaches "
                                 f"{float(t.abs().max()):.3g} > {OVERFLOW:g}")

    handles = [m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            for batch in inputs:
                model(*batch)
                if found:
                    return found[0]
    finally:
        for h in handles:
            h.remove()
    return None


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def output_grid_scales(gm: fx.GraphModule) -> list[float | None]:
    """Per flat output of a lowered graph: the scale of the activation dequantize it is read from through
    ``GRID_OPS`` (the output is quantized), else None."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    scales: list[float | None] = []
    for value in torch.utils._pytree.tree_leaves(out_node.args[0]):
        node = value
        while isinstance(node, fx.Node) and node.op == "call_function" and node.target in GRID_OPS:
            node = node.args[0]
        is_dq = isinstance(node, fx.Node) and node.target is qd.dequantize_per_tensor.default
        scales.append(float(node.args[1]) if is_dq else None)
    return scales


def output_steps(reference: Any, observed: list[tuple[torch.Tensor, ...]]) -> list[tuple[float, str]]:
    """Per output: (its quantization step, where the step comes from). A quantized output's step is its
    scale; any other output's is the scale lowbit's uint8 min/max observer would choose for the reference
    output over ``observed`` (the calibration and test batches): ``(max(hi, 0) - min(lo, 0)) / 255``."""
    lo: list[float] = []
    hi: list[float] = []
    for batch in observed:
        for i, y in enumerate(as_tuple(reference(*batch))):
            if len(lo) <= i:
                lo.append(math.inf)
                hi.append(-math.inf)
            lo[i], hi[i] = min(lo[i], float(y.min())), max(hi[i], float(y.max()))
    grid = output_grid_scales(reference.graph_module)
    return [(g, "quantized output") if g is not None else (observed_step(a, b), "observed int8 step")
            for g, a, b in zip(grid, lo, hi, strict=True)]


def observed_step(lo: float, hi: float) -> float:
    """The scale lowbit's own uint8 min/max observer gives a tensor with this range (0 included)."""
    scale, _ = choose_qparams(torch.tensor(lo), torch.tensor(hi), OUTPUT_OBSERVER)
    return float(scale)


def compare_steps(leg: str, deployed: Any, reference: Any, tests: list[tuple[torch.Tensor, ...]],
                  observed: list[tuple[torch.Tensor, ...]], outcome: Outcome) -> str | None:
    """Why ``deployed`` is not within one step of ``reference`` on ``tests``, or None."""
    steps = output_steps(reference, observed)
    worst = 1.0
    for batch in tests:
        got, want = as_tuple(deployed(*batch)), as_tuple(reference(*batch))
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if g.shape != w.shape:
                return f"output {i}: shape {tuple(g.shape)} != reference {tuple(w.shape)}"
            step, source = steps[i]
            diff = (g.double() - w.double()).abs()
            share = float((diff <= step * STEP_TOLERANCE + FLOAT_SLACK * float(w.abs().max())).double().mean())
            worst = min(worst, share)
            if share < STEP_SHARE:
                outcome.within_step[leg] = worst
                err = float(diff.max())
                return (f"output {i}: {share:.2%} of {g.numel()} elements within 1 step ({step:.4g}, {source}); "
                        f"max |diff| {err:.4g} = {err / max(step, 1e-30):.1f} steps"
                        f"{_worst_layers(reference, deployed, batch)}")
    outcome.within_step[leg] = worst
    return None


def _worst_layers(reference: Any, deployed: Any, batch: tuple[torch.Tensor, ...]) -> str:
    """Where the engine diverges from the reference first (layer-wise SQNR), for the failure message."""
    try:
        rows = lowbit.compare_layers(reference, deployed, *batch).worst(2)
    except Exception as e:  # diagnostics only: never hide the failure behind them
        return f"; layer-wise comparison failed: {type(e).__name__}: {e}"
    return "; worst layers: " + ", ".join(f"{r['layer']} {r['sqnr_db']:.1f} dB" for r in rows)


# --------------------------------------------------------------------------------------------------
# One spec, every leg
# --------------------------------------------------------------------------------------------------


def run_case(spec: dict[str, Any], *, trt: bool | None = None) -> Outcome:
    """Compile ``spec`` on every leg and compare; never raises (a crash is an Outcome)."""
    start = time.perf_counter()
    outcome = _run(spec, trt_available() if trt is None else trt)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _run(spec: dict[str, Any], trt: bool) -> Outcome:
    leg = "build"
    try:
        value_shapes(spec)
        model, example = build_model(spec)
        calibration = batches(spec, **CALIBRATION)
        held_in = [tuple(t[:HELD_IN] for t in calibration[0])]
        tests = held_in + batches(spec, **FRESH)
        reason = overflow_reason(model, calibration + tests)
        if reason is not None:
            return Outcome("rejected", detail=reason)
        config = lowbit.QuantConfig(target_sqnr_db=None, smoothquant=bool(spec["smoothquant"]))

        timings: dict[str, float] = {}

        def compile_on(target: str, cfg: lowbit.QuantConfig = config, **kw: Any) -> Any:
            t0 = time.perf_counter()
            compiled = lowbit.compile(model, example, target=target, calibration=calibration, config=cfg,
                                      progress=False, **kw)
            timings[target] = timings.get(target, 0.0) + time.perf_counter() - t0
            return compiled

        leg = "torch"
        ref = compile_on("torch")
        outcome = Outcome("passed", sqnr_db=fp32_sqnr(model, ref, held_in), compile_seconds=timings)
        low = [(i, db) for i, db in enumerate(outcome.sqnr_db) if not db >= SQNR_FLOOR_DB]
        if low:
            i, db = low[0]
            return Outcome("fidelity", leg, f"output {i}: SQNR vs FP32 {db:.2f} dB < {SQNR_FLOOR_DB} dB",
                           outcome.sqnr_db)

        leg = "onnxruntime-int8"
        ort = compile_on("onnxruntime-int8")
        why = _engine_leg(leg, ort, ort, model, held_in, tests, calibration + tests, outcome)
        if why is not None:
            return Outcome("fidelity", leg, why, outcome.sqnr_db, outcome.within_step)

        if ov_available():
            leg = OV_TARGET
            why = _ov_leg(compile_on, model, held_in, tests, calibration + tests, outcome)
            if why is not None:
                return Outcome("fidelity", leg, why, outcome.sqnr_db, outcome.within_step)

        if trt:
            leg = TRT_TARGET
            why = _trt_leg(compile_on, config, model, held_in, tests, calibration + tests, outcome)
            if why is not None:
                return Outcome("fidelity", leg, why, outcome.sqnr_db, outcome.within_step)
        return outcome
    except Exception as e:
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        return Outcome("crash", leg, f"{type(e).__name__}: {e}\n{''.join(tb[-6:])}")


def _trt_leg(compile_on: Callable[..., Any], config: lowbit.QuantConfig, model: nn.Module,
             held_in: list[tuple[torch.Tensor, ...]], tests: list[tuple[torch.Tensor, ...]],
             observed: list[tuple[torch.Tensor, ...]], outcome: Outcome) -> str | None:
    """TensorRT export-only: the ONNX passes the conformance checker and keeps the SQNR floor against
    FP32; its ORT run is within one step of a torch reference with symmetric activations and the TRT
    model's plan.

    The residual rule (``tensorrt/qdq_rules.py``) reads an Add's residual input through a DQ of its
    existing quantizer in the ONNX only: the torch reference has no such rounding, so where it fired the
    one-step comparison runs on an export with ``residual_qdq=False`` (checked for conformance too)."""
    sym = dataclasses.replace(config, activation_symmetric=True)
    trt = compile_on(TRT_TARGET, sym, export_only=True)
    why = _conformance(trt)
    if why is not None:
        return why
    for i, db in enumerate(fp32_sqnr(model, trt, held_in)):
        if not db >= SQNR_FLOOR_DB:
            return f"output {i}: SQNR vs FP32 {db:.2f} dB < {SQNR_FLOOR_DB} dB"
    if trt.report.sections["tensorrt"]["residual_qdq"]["fired"]:
        trt = compile_on(TRT_TARGET, sym, export_only=True, residual_qdq=False)
        why = _conformance(trt)
        if why is not None:
            return f"with residual_qdq=False: {why}"
    return compare_steps(TRT_TARGET, trt, compile_on("torch", sym, plan=trt.plan), tests, observed, outcome)


class GraphReference:
    """The fake-quant graph a compiled ONNX model was exported from, callable like a CompiledModel (and
    tapped by ``lowbit.compare_layers`` as a torch reference)."""

    target = "torch"

    def __init__(self, compiled: Any) -> None:
        self.graph_module, self.signature = compiled.graph_module, compiled.signature

    def __call__(self, *args: Any) -> Any:
        with torch.no_grad():
            outs = self.graph_module(*self.signature.flatten_call(args, {}))
        return self.signature.unflatten(list(outs))


def _ov_leg(compile_on: Callable[..., Any], model: nn.Module, held_in: list[tuple[torch.Tensor, ...]],
            tests: list[tuple[torch.Tensor, ...]], observed: list[tuple[torch.Tensor, ...]],
            outcome: Outcome) -> str | None:
    """OpenVINO with f32 float ops within one step of the graph it was exported from (see the module doc)."""
    from lowbit.runtime.engines import OpenVinoRunner

    ov = compile_on(OV_TARGET, specialize_example_shape=False)  # the leg runs its own f32 model only
    f32 = copy.copy(ov)
    f32._runner = OpenVinoRunner(Path(ov.state["model_dir"]) / "model.onnx", ov.signature, threads=1,
                                 inference_precision="f32")
    return _engine_leg(OV_TARGET, f32, ov, model, held_in, tests, observed, outcome)


def _engine_leg(leg: str, deployed: Any, compiled: Any, model: nn.Module, held_in: list[tuple[torch.Tensor, ...]],
                tests: list[tuple[torch.Tensor, ...]], observed: list[tuple[torch.Tensor, ...]],
                outcome: Outcome) -> str | None:
    """``deployed`` keeps the SQNR floor against FP32 and is within one step of the graph ``compiled`` was
    exported from."""
    for i, db in enumerate(fp32_sqnr(model, deployed, held_in)):
        if not db >= SQNR_FLOOR_DB:
            return f"output {i}: SQNR vs FP32 {db:.2f} dB < {SQNR_FLOOR_DB} dB"
    return compare_steps(leg, deployed, GraphReference(compiled), tests, observed, outcome)


def _conformance(trt: Any) -> str | None:
    from lowbit.backends.tensorrt.conformance import check_model

    report = check_model(str(Path(trt.state["model_dir"]) / "model.onnx"))
    if report.ok:
        return None
    return f"conformance: {len(report.violations)} violation(s): {[str(v) for v in report.violations[:3]]}"


def fp32_sqnr(model: nn.Module, compiled: Any, batches: list[tuple[torch.Tensor, ...]]) -> list[float]:
    """Per output: the lowest SQNR (dB) of ``compiled`` against the FP32 model over ``batches``."""
    worst: list[float] = []
    with torch.no_grad():
        for batch in batches:
            for i, (q, f) in enumerate(zip(as_tuple(compiled(*batch)), as_tuple(model(*batch)), strict=True)):
                db = sqnr(f, q)
                if len(worst) <= i:
                    worst.append(db)
                worst[i] = min(worst[i], db)
    return worst


# --------------------------------------------------------------------------------------------------
# Shrinking
# --------------------------------------------------------------------------------------------------


def _without_op(spec: dict[str, Any], k: int) -> dict[str, Any] | None:
    """``spec`` with op k removed: its readers read its first input instead (when the shape allows)."""
    removed, replacement = k + 1, spec["ops"][k]["in"][0]

    def remap(v: int) -> int:
        v = replacement if v == removed else v
        return v - 1 if v > removed else v

    ops = [{**op, "in": [remap(v) for v in op["in"]]} for j, op in enumerate(spec["ops"]) if j != k]
    outputs = list(dict.fromkeys(v for v in (remap(v) for v in spec["outputs"]) if v > 0))
    new = {**spec, "ops": ops, "outputs": outputs}
    try:
        value_shapes(new)
    except ValueError:
        return None
    return new if ops and outputs else None


def _candidates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k in reversed(range(len(spec["ops"]))):
        new = _without_op(spec, k)
        if new is not None:
            out.append(new)
    for v in spec["outputs"]:
        if len(spec["outputs"]) > 1:
            out.append({**spec, "outputs": [w for w in spec["outputs"] if w != v]})
    if spec["smoothquant"]:
        out.append({**spec, "smoothquant": False})
    for k, op in enumerate(spec["ops"]):
        for key, simple in (("bias", False), ("groups", 1), ("stride", 1)):
            if op.get(key, simple) != simple:
                ops = [dict(o) for o in spec["ops"]]
                ops[k][key] = simple
                new = {**spec, "ops": ops}
                try:
                    value_shapes(new)
                except ValueError:
                    continue
                out.append(new)
    return out


def shrink(spec: dict[str, Any], fails: Callable[[dict[str, Any]], bool], budget: int = 40) -> dict[str, Any]:
    """Greedy delta debugging: take the first simpler spec (an op removed, an output dropped, SmoothQuant
    off, a bias/group/stride simplified) that still ``fails``; repeat until none does or ``budget`` runs."""
    runs = 0
    progress = True
    while progress and runs < budget:
        progress = False
        for cand in _candidates(spec):
            if runs >= budget:
                break
            runs += 1
            if fails(cand):
                spec, progress = cand, True
                break
    return spec


def same_failure(outcome: Outcome) -> Callable[[dict[str, Any]], bool]:
    """The predicate ``shrink`` keeps: the same status on the same leg."""

    def fails(spec: dict[str, Any]) -> bool:
        o = run_case(spec)
        return o.status == outcome.status and o.leg == outcome.leg

    return fails


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"
