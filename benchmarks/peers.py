"""Row builders shared by the MiniLM and CNN benchmarks: FP32 engines, peer quantizers and lowbit.

Every builder takes a :class:`Workload` and the :class:`harness.BuildContext` and returns a
:class:`harness.Built` whose runner maps the batch dict (the same tensors for every row) to the model's
main output as a torch tensor. :func:`standard_rows` lists them with the exact settings of each one.

Engines run with ``threads`` threads: torch via ``torch.set_num_threads`` (set by the caller), ONNX
Runtime with ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential execution and
``session.intra_op.allow_spinning=0`` / ``session.inter_op.allow_spinning=0``, OpenVINO with
``INFERENCE_NUM_THREADS=threads`` and ``PERFORMANCE_HINT=LATENCY``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import (
    Batch,
    BuildContext,
    Built,
    RowSpec,
    RowUnavailable,
    file_mb,
    graph_tensors_mb,
    quick_median_ms,
    state_dict_mb,
)


@dataclass
class Workload:
    """A model and how to run, export and quantize it with every engine."""

    name: str
    model: torch.nn.Module  # the FP32 reference, called as model(**batch)
    input_names: list[str]
    output: Callable[[Any], torch.Tensor]  # the main tensor of model(**batch)
    #: a module with forward(*inputs in input_names order) -> the main tensor; for ONNX export and PT2E
    export_module: Callable[[], torch.nn.Module]
    #: for torch.onnx.export's dynamic_axes (inputs and the single output "output")
    onnx_dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    #: onnxruntime.transformers optimizer arguments (None: no transformer optimizer, plain graph only)
    ort_optimizer: dict[str, Any] | None = None
    #: nncf.ModelType name ("TRANSFORMER") or None
    nncf_model_type: str | None = None
    #: lowbit.compile(dynamic_shapes=...)
    lowbit_dynamic_shapes: dict[str, Any] | None = None
    #: the module PT2E and lowbit capture with torch.export (default: export_module()): like every peer's
    #: model, it computes the main output only (MiniLM: last_hidden_state, not BertModel's pooler too)
    traced_module: Callable[[], torch.nn.Module] | None = None
    onnx_opset: int = 17

    def traced(self) -> torch.nn.Module:
        """A fresh module for torch.export (PT2E and lowbit), in eval mode."""
        return (self.traced_module or self.export_module)().eval()


@dataclass
class LowbitRow:
    """One lowbit row: ``lowbit.compile(model, cal[0], target=target, calibration=cal, config=QuantConfig(
    **config), dynamic_shapes=..., **options)``. Add a row with one line, e.g.
    ``LowbitRow("lowbit ORT, no SmoothQuant", "onnxruntime-int8", config={"smoothquant": False})``."""

    label: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> str:
        parts = [f"target={self.target!r}"]
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        parts.append(f"config=QuantConfig({', '.join(f'{k}={v!r}' for k, v in self.config.items())})")
        return "lowbit.compile(" + ", ".join(parts) + ", calibration=all calibration batches)"


# ------------------------------------------------------------------------------------------ engines


def numpy_feed(batch: Batch, names: Sequence[str]) -> dict[str, Any]:
    return {n: batch[n].numpy() for n in names}


def ort_session(path: str | os.PathLike[str], threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(sess) -> Callable[[Batch], torch.Tensor]:
    names = [i.name for i in sess.get_inputs()]
    out = [sess.get_outputs()[0].name]

    def run(batch: Batch) -> torch.Tensor:
        return torch.from_numpy(sess.run(out, numpy_feed(batch, names))[0])

    return run


OV_FP32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def ov_compile(model, threads: int, extra: Mapping[str, Any] | None = None):
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **(extra or {})}
    return ov.Core().compile_model(model, "CPU", cfg)


def ov_runner(compiled) -> Callable[[Batch], torch.Tensor]:
    names = [p.get_any_name() for p in compiled.inputs]
    req = compiled.create_infer_request()

    def run(batch: Batch) -> torch.Tensor:
        res = req.infer(numpy_feed(batch, names), share_inputs=True)  # outputs are copied (share_outputs=False)
        return torch.from_numpy(res[0])

    return run


def ov_precision(compiled) -> str:
    try:
        t = compiled.get_property("INFERENCE_PRECISION_HINT")
        return t.get_type_name() if hasattr(t, "get_type_name") else str(t)
    except Exception:  # noqa: BLE001 - a property name changed: not worth failing the row
        return "?"


# ------------------------------------------------------------------------------------------ shared stages


def onnx_fp32(wl: Workload, ctx: BuildContext) -> tuple[Path, float]:
    """The legacy TorchScript exporter with dynamic axes: the graph onnxruntime.transformers fuses."""

    def make() -> Path:
        path = ctx.workdir / f"{wl.name}_fp32.onnx"
        module = wl.export_module().eval()
        args = tuple(ctx.example[n] for n in wl.input_names)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(wl.input_names),
                              output_names=["output"], dynamic_axes=wl.onnx_dynamic_axes,
                              opset_version=wl.onnx_opset)
        return path

    return ctx.stages.get(f"{wl.name}:onnx", make)


def onnx_optimized(wl: Workload, ctx: BuildContext) -> tuple[Path, float]:
    """onnxruntime.transformers.optimizer on the exported graph; fails unless it fused attention."""

    def make() -> Path:
        from onnxruntime.transformers.optimizer import optimize_model

        src, _ = onnx_fp32(wl, ctx)
        om = optimize_model(str(src), **(wl.ort_optimizer or {}))
        stats = om.get_fused_operator_statistics()
        ctx.info[f"{wl.name}:ort_fusions"] = {k: v for k, v in stats.items() if v}
        if wl.ort_optimizer and wl.ort_optimizer.get("model_type") == "bert" and not stats.get("Attention"):
            raise RuntimeError(f"the ORT optimizer fused no Attention: {stats}")
        path = ctx.workdir / f"{wl.name}_fp32_opt.onnx"
        om.save_model_to_file(str(path))
        return path

    path, t = ctx.stages.get(f"{wl.name}:onnx_opt", make)
    return path, t + onnx_fp32(wl, ctx)[1]


def ort_fp32_choice(wl: Workload, ctx: BuildContext) -> tuple[Path, str, float, dict[str, float]]:
    """The faster of the optimized and the plain FP32 graph (interleaved short medians on the example batch).

    The time charged is the export (+ the optimizer when the optimized graph wins), not the choosing.
    """

    def make() -> tuple[Path, str, dict[str, float]]:
        plain, _ = onnx_fp32(wl, ctx)
        cands = {"plain": plain}
        if wl.ort_optimizer is not None:
            cands["optimized"] = onnx_optimized(wl, ctx)[0]
        runs = {k: ort_runner(ort_session(p, ctx.threads)) for k, p in cands.items()}
        samples: dict[str, list[float]] = {k: [] for k in cands}
        for _ in range(4):  # interleaved, so load drift hits both candidates alike
            for k, run in runs.items():
                samples[k].append(quick_median_ms(lambda run=run: run(ctx.example), calls=3, warmup=1))
        ms = {k: min(v) for k, v in samples.items()}
        best = min(ms, key=ms.__getitem__)
        return cands[best], best, ms

    (path, which, ms), _ = ctx.stages.get(f"{wl.name}:ort_choice", make)
    stage_s = onnx_optimized(wl, ctx)[1] if which == "optimized" else onnx_fp32(wl, ctx)[1]
    return path, which, stage_s, ms


def to_ov_static(wl: Workload, model, ctx: BuildContext):
    model.reshape({n: list(ctx.example[n].shape) for n in wl.input_names})
    return model


# ------------------------------------------------------------------------------------------ FP32 rows


def build_torch_eager(wl: Workload, ctx: BuildContext) -> Built:
    model = wl.model.eval()
    return Built(lambda b: wl.output(model(**b)), size_mb=state_dict_mb(model), note="")


def build_torch_inductor(wl: Workload, ctx: BuildContext) -> Built:
    model = wl.model.eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(**ctx.example)  # compile now (charged to this row)
    return Built(lambda b: wl.output(compiled(**b)), size_mb=state_dict_mb(model))


def build_ort_fp32(wl: Workload, ctx: BuildContext) -> Built:
    path, which, stage_s, ms = ort_fp32_choice(wl, ctx)
    sess = ort_session(path, ctx.threads)
    extra = {"graph": which, "choice_ms": ms}
    if f"{wl.name}:ort_fusions" in ctx.info:
        extra["fusions"] = ctx.info[f"{wl.name}:ort_fusions"]
    return Built(ort_runner(sess), size_mb=file_mb(path), note=f"{which} graph", extra=extra, stages_s=stage_s,
                 keep=sess)


def build_ov_fp32(wl: Workload, ctx: BuildContext, static: bool = True) -> Built:
    import openvino as ov

    src, stage_s = onnx_fp32(wl, ctx)
    model = ov.Core().read_model(str(src))
    if static:
        to_ov_static(wl, model, ctx)
    compiled = ov_compile(model, ctx.threads, OV_FP32_CONFIG)
    xml = ctx.workdir / f"{wl.name}_ov_fp32.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Built(ov_runner(compiled), size_mb=file_mb(xml, xml.with_suffix(".bin")), stages_s=stage_s,
                 note="static shapes" if static else "", extra={"precision": ov_precision(compiled)},
                 keep=compiled)


# ------------------------------------------------------------------------------------------ peers


def build_ort_dynamic(wl: Workload, ctx: BuildContext) -> Built:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if wl.ort_optimizer is not None:
        src, stage_s = onnx_optimized(wl, ctx)
        which = "optimized"
    else:
        src, stage_s = onnx_fp32(wl, ctx)
        which = "plain"
    dst = ctx.workdir / f"{wl.name}_ort_dynamic.onnx"
    # DefaultTensorType: the optimizer's contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape
    # inference, and quantize_dynamic asks for this hint to type their outputs
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=False,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    sess = ort_session(dst, ctx.threads)
    return Built(ort_runner(sess), size_mb=file_mb(dst), stages_s=stage_s, note=f"{which} graph", keep=sess)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: Sequence[Batch], names: Sequence[str]) -> None:
        self._batches = list(batches)
        self._names = list(names)
        self._i = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._i >= len(self._batches):
            return None
        b = self._batches[self._i]
        self._i += 1
        return numpy_feed(b, self._names)

    def rewind(self) -> None:
        self._i = 0


#: the graph quantize_static gets for transformers: "optimized" (the fused FP32 graph: Attention hides the
#: additive -3.4e38 attention mask) or "preprocessed" (the plain graph, where per-tensor MinMax sees that
#: mask and the embedding cosine collapses to ~0.3)
ORT_STATIC_GRAPH = "optimized"


def build_ort_static(wl: Workload, ctx: BuildContext, graph: str | None = None) -> Built:
    """quantize_static, QDQ, MinMax, the library's defaults otherwise, after ``quant_pre_process``.

    graph="optimized": the transformer-optimized FP32 graph, pre-processed with symbolic shape inference
    only (``skip_optimization=True, auto_merge=True``): without the activation types it gives, the
    quantizer silently skips every activation and produces a weight-only model. graph="preprocessed": the
    plain export through the full ``quant_pre_process`` (shape inference + ORT basic optimizations).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph = graph or (ORT_STATIC_GRAPH if wl.ort_optimizer is not None else "preprocessed")
    if graph == "optimized":
        base, stage_s = onnx_optimized(wl, ctx)
        pre_kwargs: dict[str, Any] = {"skip_optimization": True, "auto_merge": True}
    else:
        base, stage_s = onnx_fp32(wl, ctx)
        pre_kwargs = {"auto_merge": True}
    src = ctx.workdir / f"{wl.name}_fp32_{graph}_pre.onnx"
    quant_pre_process(str(base), str(src), skip_symbolic_shape=False, **pre_kwargs)
    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]

    class Reader(_Reader, CalibrationDataReader):
        pass

    dst = ctx.workdir / f"{wl.name}_ort_static_{graph}.onnx"
    quantize_static(str(src), str(dst), Reader(ctx.calibration, names), quant_format=QuantFormat.QDQ,
                    per_channel=False, reduce_range=False, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    qmodel = onnx.load(str(dst), load_external_data=False)
    n_q = sum(1 for n in qmodel.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise RuntimeError("quantize_static inserted no QuantizeLinear (weight-only result): shape inference failed")
    sess = ort_session(dst, ctx.threads)
    return Built(ort_runner(sess), size_mb=file_mb(dst), stages_s=stage_s, note=f"{graph} graph",
                 extra={"quantize_linear_nodes": n_q}, keep=sess)


def build_ov_nncf(wl: Workload, ctx: BuildContext, static: bool = True) -> Built:
    try:
        import nncf
    except ImportError as e:
        raise RowUnavailable("nncf is not installed (pip install nncf)") from e
    import openvino as ov

    src, stage_s = onnx_fp32(wl, ctx)
    model = ov.Core().read_model(str(src))
    if static:
        to_ov_static(wl, model, ctx)
    names = [p.get_any_name() for p in model.inputs]
    dataset = nncf.Dataset(ctx.calibration, lambda b: numpy_feed(b, names))
    kwargs: dict[str, Any] = {"subset_size": len(ctx.calibration)}
    if wl.nncf_model_type:
        kwargs["model_type"] = getattr(nncf.ModelType, wl.nncf_model_type)
    with _quiet_logs("nncf"):
        qmodel = nncf.quantize(model, dataset, **kwargs)
    compiled = ov_compile(qmodel, ctx.threads)  # engine default precision for the non-quantized ops
    xml = ctx.workdir / f"{wl.name}_ov_nncf.xml"
    ov.save_model(qmodel, str(xml), compress_to_fp16=False)
    prec = ov_precision(compiled)
    note = ("static shapes, " if static else "") + f"non-int8 ops in {prec}"
    return Built(ov_runner(compiled), size_mb=file_mb(xml, xml.with_suffix(".bin")), stages_s=stage_s,
                 note=note, extra={"precision": prec}, keep=compiled)


def pt2e_api() -> tuple[Any, Any, Any, Any, str]:
    """(prepare_pt2e, convert_pt2e, X86InductorQuantizer, default config factory, where) or RowUnavailable."""
    try:
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e  # type: ignore[import-not-found]
        from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq  # type: ignore[import-not-found]

        where = "torch.ao.quantization"
    except ImportError:
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

            where = "torchao.quantization.pt2e"
        except ImportError as e:
            raise RowUnavailable(
                f"PT2E is not in torch {torch.__version__} (torch.ao.quantization.quantize_pt2e was removed) "
                "and torchao is not installed"
            ) from e
    return prepare_pt2e, convert_pt2e, xiq.X86InductorQuantizer, xiq.get_default_x86_inductor_quantization_config, where


def build_pt2e(wl: Workload, ctx: BuildContext) -> Built:
    import torch._inductor.config as inductor_config

    previous_pass = inductor_config.pre_grad_custom_pass  # importing the quantizer installs a global pass
    prepare_pt2e, convert_pt2e, Quantizer, default_config, where = pt2e_api()
    lift_pass = inductor_config.pre_grad_custom_pass
    inductor_config.pre_grad_custom_pass = previous_pass
    module = wl.traced()
    args = tuple(ctx.example[n] for n in wl.input_names)
    with torch.no_grad():
        ep = torch.export.export(module, args)  # static shapes: the example batch's
    gm = ep.module()
    gm.graph.eliminate_dead_code()  # e.g. MiniLM's unused pooler, which prepare_pt2e trips over
    gm.recompile()
    quantizer = Quantizer()
    quantizer.set_global(default_config())
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for b in ctx.calibration:
            prepared(*(b[n] for n in wl.input_names))
    converted = convert_pt2e(prepared)
    with contextlib.suppress(Exception):
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(converted)
    size = graph_tensors_mb(converted)  # the module still holds the unused FP32 weights: count what the graph uses
    with inductor_config.patch(freezing=True, pre_grad_custom_pass=lift_pass), torch.no_grad():
        compiled = torch.compile(converted)
        compiled(*args)  # compile now, with freezing on (needed for the int8 oneDNN fusions)

    def run(b: Batch) -> torch.Tensor:
        return compiled(*(b[n] for n in wl.input_names))

    return Built(run, size_mb=size, note="static shapes", extra={"api": where})


# ------------------------------------------------------------------------------------------ lowbit


def build_lowbit(wl: Workload, ctx: BuildContext, row: LowbitRow) -> Built:
    import lowbit

    cfg = lowbit.QuantConfig(**row.config) if row.config else None
    module = wl.traced()
    q = lowbit.compile(module, ctx.calibration[0], target=row.target,
                       calibration=ctx.calibration, config=cfg, dynamic_shapes=wl.lowbit_dynamic_shapes,
                       progress=False, **row.options)
    with torch.no_grad():
        q(**ctx.example)
    out = ctx.workdir / ("lowbit_" + wl.name + "_" + "".join(c if c.isalnum() else "_" for c in row.label))
    extra: dict[str, Any] = {"target": row.target}
    note = ""
    size: float | None = None
    try:
        q.save(out)
    except Exception as e:  # noqa: BLE001 - a save bug costs the size column, not the row
        extra["save_error"] = f"{type(e).__name__}: {e}"[:500]
        note = "save failed: no size"
    else:
        artifact_mb = file_mb(out)
        extra["artifact_mb"] = size = artifact_mb
        if _read_json(out / "manifest.json").get("kind") == "recipe" and q.graph_module is not None:
            # a recipe (plan + qparams) needs the FP32 model to reload: report what the lowered graph holds
            gm = q.graph_module
            size = sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()]) / 1e6
            note = f"size: lowered graph tensors; artifact is a {artifact_mb:.1f} MB recipe"
    with contextlib.suppress(Exception):
        extra["plan_counts"] = q._plan.counts()

    def run(b: Batch) -> torch.Tensor:
        return wl.output(q(**b))

    return Built(run, size_mb=size, note=note, extra=extra, keep=q)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _quiet_logs(name: str):
    import logging

    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


# ------------------------------------------------------------------------------------------ the row list

DEFAULT_LOWBIT_ROWS = [
    LowbitRow("lowbit torch (compile)", "torch", {"compile": True}),
    LowbitRow("lowbit onnxruntime-int8", "onnxruntime-int8"),
    LowbitRow("lowbit openvino-int8", "openvino-int8"),
]


def standard_rows(wl: Workload, *, threads: int, n_cal: int, lowbit_rows: Sequence[LowbitRow] = DEFAULT_LOWBIT_ROWS,
                  dynamic_quant: bool = True) -> list[RowSpec]:
    """Every row, in table order, with its exact settings."""
    ort_sess = (f"ORT CPU EP, intra_op={threads}, inter_op=1, sequential, ORT_ENABLE_ALL, "
                "session.intra_op/inter_op.allow_spinning=0")
    ov_cfg = f"OpenVINO CPU, INFERENCE_NUM_THREADS={threads}, PERFORMANCE_HINT=LATENCY"
    export = (f"torch.onnx.export(dynamo=False, opset {wl.onnx_opset}, dynamic axes "
              f"{sorted({a for d in wl.onnx_dynamic_axes.values() for a in d.values()})})")
    opt = (f"onnxruntime.transformers.optimizer.optimize_model({', '.join(f'{k}={v!r}' for k, v in wl.ort_optimizer.items())})"
           if wl.ort_optimizer else None)
    rows = [
        RowSpec("FP32 torch eager", "fp32", lambda c: build_torch_eager(wl, c), "torch eager, no_grad"),
        RowSpec("FP32 torch inductor", "fp32", lambda c: build_torch_inductor(wl, c),
                "torch.compile(model) default mode, default inductor config (no freezing)"),
        RowSpec("FP32 onnxruntime", "fp32", lambda c: build_ort_fp32(wl, c),
                f"{export}; " + (f"the faster of the plain graph and {opt}" if opt else "the plain graph")
                + f"; {ort_sess}"),
        RowSpec("FP32 openvino", "fp32", lambda c: build_ov_fp32(wl, c),
                "Core().read_model(the exported ONNX), reshaped to the example batch's static shapes, "
                f"{ov_cfg}, INFERENCE_PRECISION_HINT=f32"),
    ]
    if dynamic_quant:
        rows.append(RowSpec(
            "ORT quantize_dynamic", "peer", lambda c: build_ort_dynamic(wl, c),
            f"quantize_dynamic({'optimized' if wl.ort_optimizer else 'plain'} FP32 graph, weight_type=QInt8, "
            f"per_channel=False, reduce_range=False, all default op types); {ort_sess}"))
    static_graph = ORT_STATIC_GRAPH if wl.ort_optimizer is not None else "preprocessed"
    rows += [
        RowSpec("ORT quantize_static QDQ", "peer", lambda c: build_ort_static(wl, c),
                f"quant_pre_process(the {static_graph} FP32 graph, symbolic shape inference with auto_merge"
                + (", skip_optimization" if static_graph == "optimized" else "") + f") -> quantize_static(QuantFormat.QDQ, CalibrationMethod.MinMax, "
                f"activation_type=QInt8, weight_type=QInt8, per_channel=False, reduce_range=False, "
                f"{n_cal} calibration batches via a CalibrationDataReader, all default op types); {ort_sess}"),
        RowSpec("OpenVINO + NNCF", "peer", lambda c: build_ov_nncf(wl, c),
                f"nncf.quantize(ov model from the exported ONNX, static shapes, nncf.Dataset(calibration), "
                f"subset_size={n_cal}"
                + (f", model_type=ModelType.{wl.nncf_model_type} (SmoothQuant on by default)" if wl.nncf_model_type
                   else ", default preset/model_type") + f"); {ov_cfg}, engine-default inference precision"),
        RowSpec("PT2E X86InductorQuantizer", "peer", lambda c: build_pt2e(wl, c),
                "torch.export (static shapes) -> graph.eliminate_dead_code() -> prepare_pt2e(X86InductorQuantizer "
                f"with get_default_x86_inductor_quantization_config()) -> {n_cal} calibration batches -> "
                "convert_pt2e -> torch.compile with inductor freezing=True"),
    ]
    for lr in lowbit_rows:
        rows.append(RowSpec(lr.label, "lowbit", lambda c, lr=lr: build_lowbit(wl, c, lr), lr.settings()))
    return rows
