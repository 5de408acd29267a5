"""The default pipeline: one flat list of named steps, read top to bottom."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lowbit.backends.registry import get_backend
from lowbit.compiler import engine_fidelity
from lowbit.compiler.capture import capture, index_ranges, sequence_dynamic_shapes, without_kv_cache
from lowbit.compiler.instruments import DumpInstrument, TimingInstrument, VerifyInstrument
from lowbit.compiler.pass_manager import Pass, PassContext, PassManager, PassRecord
from lowbit.compiler.planner import CPU_SCHEME_COSTS, PlanPrecision
from lowbit.compiler.sensitivity import check_output_shapes
from lowbit.config import QuantConfig
from lowbit.passes import (
    Annotate,
    BiasCorrection,
    Calibrate,
    Canonicalize,
    FoldConvBatchNorm,
    FuseActivation,
    FuseLinearBias,
    InsertObservers,
    LowerQDQ,
    QuantizeEmbeddings,
)
from lowbit.passes.awq import AWQ
from lowbit.passes.gptq import GPTQ
from lowbit.passes.smooth_quant import SmoothQuant, reiterable
from lowbit.runtime.export.view import ModelSource
from lowbit.runtime.generate import CausalLM
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.progress import step
from lowbit.runtime.qparams import cosine, sqnr
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import Plan


def default_passes() -> list[Pass]:
    return [
        Canonicalize(),  # drop dropout, no-ops and dead code, fold constants: fewer shapes to match later
        FoldConvBatchNorm(),  # BN disappears into conv/linear weights before quantization sees them
        FuseLinearBias(),  # matmul + add -> linear: the bias rides in the integer accumulator
        FuseActivation(),  # conv/linear + relu groups: an output quantizer goes after the relu
        QuantizeEmbeddings(),  # large embedding tables -> int8 rows + a scale per row, gathered then scaled
        SmoothQuant(),  # move activation outliers into the weights (exact in float) before ranges are taken
        AWQ(),  # 4-bit weight-only layers asking for it: scale salient columns up (same fold), clip per group
        Annotate(),  # QuantConfig / plan -> one frozen LayerSpec per layer: the policy
        InsertObservers(),  # where static activation ranges are measured (shared by Q/K/V)
        Calibrate(),  # stream calibration batches through the graph (or load stored qparams)
        PlanPrecision(),  # with a fidelity target: promote the layers quantization hurts most, cheapest first
        GPTQ(),  # weight-only layers asking for it: round with error feedback, layer by layer (true-sequential)
        BiasCorrection(),  # W8A8 layers: the mean output shift of the weights' rounding goes back into the bias
        LowerQDQ(),  # observers and weight specs -> quantize/dequantize ops and int8 weights
    ]


def compile_model(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    target: str = "torch",
    calibration: Iterable[Any] | None = None,
    config: QuantConfig | None = None,
    plan: Plan | Mapping[str, Any] | str | None = None,
    dynamic_shapes: Mapping[str, Any] | tuple[Any, ...] | list[Any] | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    qparams: Mapping[str, torch.Tensor] | None = None,
    dim_bounds: Mapping[str, tuple[int, int | None]] | None = None,
    progress: bool | str = True,
) -> CompiledModel:
    options = dict(options or {})
    tokenizer = options.pop("tokenizer", None)
    decode = bool(options.pop("decode", True))
    check_engine = bool(options.pop("engine_fidelity", True))
    backend = get_backend(target)
    backend.check_available()
    causal_lm = is_causal_lm(model)
    config = config or QuantConfig()
    resolved = config.for_model(causal_lm)
    if (config.target_ppl_increase == "auto" and isinstance(resolved.target_ppl_increase, float)
            and resolved.scheme == "w8a8" and "w8a8_dynamic" in backend.schemes):
        # the default perplexity budget of an LLM starts from per-token activations where the engine runs them:
        # a few tokens carry outliers no static per-tensor scale survives, so the budget is met by promoting
        # a few layers, not most of them. Planning off (both targets None): exactly the configured scheme.
        resolved = dataclasses.replace(resolved, scheme="w8a8_dynamic")
    config = resolved
    if causal_lm and dynamic_shapes is None:  # prompts and windows of any length, not the example's
        dynamic_shapes = sequence_dynamic_shapes(model, example_inputs)
    if getattr(backend, "symmetric_activations", False) and not config.activation_symmetric:
        # the engine takes symmetric int8 activations only (TensorRT): SmoothQuant's alpha search and the
        # planner must measure that scheme, not the default uint8 one (annotate enforces it per layer too)
        config = dataclasses.replace(config, activation_symmetric=True)
    if calibration is not None and (config.smoothquant or config.plans_automatically or config.sensitivity):
        calibration = reiterable(calibration)  # read more than once: a one-shot iterator becomes a list
    captured = capture(model, example_inputs, dynamic_shapes, dim_bounds)
    with torch.no_grad(), without_kv_cache(model):
        example_out = model(*captured.args, **captured.kwargs)
    signature = Signature.from_example(captured.args, captured.kwargs, captured.input_names, captured.dynamic,
                                       example_out, captured.dim_bounds,
                                       index_ranges(captured.gm, captured.input_names))
    ctx = PassContext(config=config, plan=Plan.coerce(plan), calibration=calibration,
                      input_names=captured.input_names, example=(captured.args, captured.kwargs),
                      qparams=qparams, progress=progress)
    ctx.notes.update(signature=signature, target=target, causal_lm=causal_lm, supported_schemes=backend.schemes,
                     scheme_costs=getattr(backend, "scheme_costs", CPU_SCHEME_COSTS),
                     quantize_conv_outputs=getattr(backend, "quantize_conv_outputs", False),
                     # engine choices a call may override (compile(..., quantize_attention_scores=False))
                     **{k: bool(options.get(k, getattr(backend, k, False)))
                        for k in ("quantize_residual_adds", "quantize_attention_scores", "quantize_hardswish_gate")},
                     symmetric_activations=getattr(backend, "symmetric_activations", False),
                     int8_embeddings=getattr(backend, "int8_embeddings", True),
                     # what the engine fuses: conv post-op activations, int8 squeeze-excite products and pools
                     post_op_activations=tuple(getattr(backend, "post_op_activations", ())),
                     quantize_gating=getattr(backend, "quantize_gating", False))
    instruments: list[Any] = [VerifyInstrument(), TimingInstrument()]
    dump = dump_dir or os.environ.get("LOWBIT_DUMP_DIR")
    ctx.notes["dump_dir"] = dump  # a backend that cannot finish writes what it has there (tensorrt-int8)
    if dump:
        instruments.append(DumpInstrument(dump))
    manager = PassManager(default_passes() + backend.lowering_passes(options), instruments)
    gm = manager.run(captured.gm, ctx)
    ctx.notes["report"] = build_report(target, ctx, manager.records)
    sensitivity = ctx.notes.get("sensitivity")
    if sensitivity is not None and dump:
        sensitivity.write(dump)  # sensitivity.json and the bar chart sensitivity.png
    with step(f"building the {target} engine", progress):
        compiled = (_compile_decoder(model, target, ctx, signature, options, tokenizer, dump) if causal_lm and decode
                    else backend.build(gm, ctx, captured, options))
    compiled.source = ModelSource.of(model)
    if compiled._tokenizer is None:
        compiled._tokenizer = tokenizer
    report = compiled.report
    report.sections["model"] = model_facts(model)
    fid = ctx.notes.get("fidelity_measure")
    if fid is not None and check_engine and not causal_lm:
        # the plan's target must hold on the engine, not only on the reference (engine_fidelity.py)
        def replan(cfg: QuantConfig) -> CompiledModel:
            return compile_model(model, example_inputs, target=target, calibration=calibration, config=cfg,
                                 dynamic_shapes=dynamic_shapes, dump_dir=dump_dir,
                                 options={**options, "tokenizer": tokenizer, "engine_fidelity": False},
                                 dim_bounds=dim_bounds, progress=progress)

        best = engine_fidelity.hold(compiled, fid, config, replan)
        if best is not compiled:  # a re-plan: it wrote its own dump; its page gets the engine's figures
            best.report.sections["fidelity"] = measure_fidelity(best, captured, example_out, False)
            if dump:
                write_report_page(best.report, dump)
            return best
    if not options.get("decode_graph"):  # a causal LM's step graph: its model measures the whole
        report.sections["fidelity"] = (measure_fidelity(compiled, captured, example_out, causal_lm and decode)
                                       if check_engine else {"note": "not measured on the engine (engine_fidelity=False)"})
    if dump:
        report.sections["dump"] = {"dir": os.path.abspath(dump),
                                   "passes": {r.name: f"{r.index:03d}_{r.name}" for r in manager.records}}
        write_report_page(report, dump)
    return compiled


def model_facts(model: torch.nn.Module) -> dict[str, Any]:
    """The float model's class, parameter count and bytes (parameters and buffers, each tensor once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    params = {id(p) for p in model.parameters()}
    return {"class": type(model).__name__,
            "parameters": int(sum(t.numel() for k, t in seen.items() if k in params)),
            "float_bytes": int(sum(t.numel() * t.element_size() for t in seen.values()))}


def measure_fidelity(compiled: CompiledModel, captured: Any, example_out: Any, causal_lm: bool) -> dict[str, Any]:
    """How far the compiled engine is from the float model on the compile example (one call): perplexity of its
    tokens for a causal LM, else SQNR and cosine of all floating-point outputs together."""
    from lowbit.evaluate import logits_of, token_nll

    where = "the compile example"
    if causal_lm:
        flat = [t for t in pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(t, torch.Tensor)]
        ids = next(t for t in flat if not t.is_floating_point())
        if ids.shape[-1] < 2:
            return {"metric": "perplexity", "on": where, "note": "the example has one token: nothing to score"}
        rows = 1 if bool((ids == ids[:1]).all()) else ids.shape[0]  # capture widens a batch-1 example by repeating it
        with torch.no_grad():
            out = compiled(ids[:rows])
        nll = [float(token_nll(logits_of(o)[:rows], ids[:rows]).double().mean()) for o in (example_out, out)]
        return {"metric": "perplexity", "float": math.exp(nll[0]), "quantized": math.exp(nll[1]),
                "tokens": int(ids[:rows].numel()), "on": where}

    with torch.no_grad():
        out = compiled(*captured.args, **captured.kwargs)

    def leaves(o: Any) -> list[torch.Tensor]:
        return [t.detach().double() for t in pytree.tree_leaves(logits_or(o))
                if isinstance(t, torch.Tensor) and t.is_floating_point()]

    ref_leaves, test_leaves = leaves(example_out), leaves(out)
    check_output_shapes(ref_leaves, test_leaves)
    if not ref_leaves:
        return {"metric": "sqnr_db", "on": where, "note": "no floating-point outputs to compare"}
    ref, test = (torch.cat([t.flatten() for t in ts]) for ts in (ref_leaves, test_leaves))
    return {"metric": "sqnr_db", "sqnr_db": sqnr(ref, test), "cosine": cosine(ref, test), "on": where}


def logits_or(out: Any) -> Any:
    """A Hugging Face ModelOutput as its tensors (a dict's values), anything else as is."""
    return list(out.values()) if hasattr(out, "values") and hasattr(out, "keys") else out


def write_report_page(report: Report, directory: str | os.PathLike[str]) -> None:
    """report.html in the dump directory, its passes linked to their dumps there."""
    from lowbit.runtime import report_html

    data = report.to_json()
    page = report_html.render(data, title=f"lowbit report: {report.target}", dump_dir=".")
    (Path(directory) / "report.html").write_text(page)


def _compile_decoder(model: torch.nn.Module, target: str, ctx: PassContext, signature: Signature,
                     options: Mapping[str, Any], tokenizer: Any, dump: str | os.PathLike[str] | None) -> CausalLM:
    """The engine of a causal LM is its KV-cache step graph (``lowbit.compiler.decode``), compiled with the
    plan and qparams the whole-sequence compile chose (GPTQ codes, AWQ and SmoothQuant factors, activation
    ranges): the same codes in both graphs, and nothing calibrated twice."""
    from lowbit.compiler.decode import step_module

    module, example, dynamic, bounds, layout = step_module(model)
    replay = dataclasses.replace(ctx.config, target_sqnr_db=None, target_ppl_increase=None, sensitivity=False)
    # every decode step has another cache length: an engine model for the example's shapes would serve none
    options = {**options, "specialize_example_shape": False, "decode_graph": True}
    step = compile_model(module, example, target=target, config=replay, plan=ctx.plan, dynamic_shapes=dynamic,
                         dim_bounds=bounds, qparams=ctx.notes.get("qparams", {}), options=options, progress=False,
                         dump_dir=os.path.join(dump, "decode") if dump else None)
    # the whole-sequence compile's report (plan search, sensitivity, GPTQ/AWQ) with the engine's sections
    report: Report = ctx.notes["report"]
    for name, section in step.report.sections.items():
        report.sections.setdefault(name, section)
    report.sections["decode"] = {"graph": "KV-cache step (prefill and decode)", "layout": layout.to_json(),
                                 "passes": [p["pass"] for p in step.report.passes]}
    engine_rows = {row["layer"]: row for row in step.report.layers}
    for row in report.layers:  # the same layers: add what the engine runs for each
        for key in ("kernel", "weights", "int8"):
            if key in engine_rows.get(row["layer"], {}):
                row[key] = engine_rows[row["layer"]][key]
    step.report = report
    return CausalLM(step, layout.to_json(), signature, tokenizer=tokenizer)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A Hugging Face model that generates text (``can_generate()``) and is not an encoder-decoder."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    try:
        return bool(callable(can_generate) and can_generate() and not getattr(config, "is_encoder_decoder", False))
    except Exception:  # a custom model whose can_generate needs arguments: not one we recognise
        return False


def build_report(target: str, ctx: PassContext, records: list[PassRecord]) -> Report:
    layers = []
    smooth = ctx.notes.get("smooth_quant", {})
    for name, spec in (ctx.plan.layers.items() if ctx.plan else []):
        row = {"layer": name, "scheme": spec.scheme}
        row.update(ctx.notes.get("layers", {}).get(name, {}))
        if name in smooth:
            sq = smooth[name]
            alpha = sq["alpha"]
            alpha = f"{alpha:g}" if isinstance(alpha, (int, float)) else str(alpha)
            row["smoothquant"] = "-" if sq["alpha"] is None else f"a={alpha} {sq['folded_into'].split()[0]}"
        layers.append(row)
    passes = [{"pass": r.name, "seconds": r.seconds, "nodes_before": r.nodes_before,
               "nodes_after": r.nodes_after, "stats": dict(r.stats)} for r in records]
    report = Report(target, layers, passes)
    if smooth:
        report.sections["smooth_quant"] = smooth
    if "embeddings" in ctx.notes:
        report.sections["embeddings"] = ctx.notes["embeddings"]
    for section in ("awq", "gptq", "bias_correction"):  # per layer: search results, dampening, tokens, shifts
        if ctx.notes.get(section):
            report.sections[section] = ctx.notes[section]
    if "plan_search" in ctx.notes:
        report.sections["plan"] = ctx.notes["plan_search"]
    if "sensitivity" in ctx.notes:
        report.sections["sensitivity"] = ctx.notes["sensitivity"].to_json()
    if ctx.notes.get("warnings"):
        report.sections["warnings"] = list(ctx.notes["warnings"])
    return report
