"""The ``tensorrt-int8`` target: a QDQ ONNX shaped for TensorRT's explicit quantization, then an engine.

1. Export: the lowered graph through the shared ONNX export (``onnx/export.py`` and its rules), at an
   opset every TensorRT 10 parses, then the TensorRT rules (``tensorrt/qdq_rules.py``: Q/DQ on residual
   Add inputs). Activations are symmetric int8 (``symmetric_activations``: annotate forces it, as TensorRT's
   Q/DQ take zero point 0 only); weights are symmetric int8 per output channel; Q/DQ sit on the inputs of
   conv and matmul only, so nothing TensorRT runs in float is wrapped in Q/DQ.
2. Check: ``tensorrt/conformance.py`` against TensorRT's documented Q/DQ rules (conformance.json).
3. Build: ``tensorrt/build.py`` with TensorRT and a GPU. Without them compile() writes the export-only
   artifact (to ``dump_dir/tensorrt_export``, or a fresh temp directory) and raises BackendUnavailable
   naming it (``err.artifact_dir``); with ``export_only=True`` it returns that model instead, whose calls
   run the TensorRT-ready ONNX on ONNX Runtime CPU (so it can be checked numerically anywhere).

Options: ``export_only`` (bool), ``profiles`` ({symbol: (min, opt, max)}), ``workspace_bytes`` (int),
``residual_qdq`` (bool, default True), ``threads`` (ONNX Runtime threads of the export-only runner).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx

from lowbit.backends.onnx.export import export_onnx
from lowbit.backends.tensorrt import build as trt_build
from lowbit.backends.tensorrt.conformance import check_model, write_report
from lowbit.backends.tensorrt.qdq_rules import apply_trt_rules
from lowbit.compiler.capture import Captured
from lowbit.compiler.graph import layer_macs
from lowbit.compiler.pass_manager import Pass, PassContext
from lowbit.errors import BackendUnavailable, InputError
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.onnx_artifact import MODEL_FILE, write_model
from lowbit.runtime.tensorrt_artifact import CONFORMANCE_FILE, load_tensorrt_artifact, make_tensorrt_compiled
from lowbit.runtime.tensorrt_engine import rebuild_call

#: TensorRT 9.2 documents opsets up to 19 and 10.15 up to 24: 19 parses on every TensorRT 10
TRT_OPSET = 19
OPTIONS = {"export_only", "profiles", "workspace_bytes", "residual_qdq", "threads"}


class TensorRTBackend:
    name = "tensorrt-int8"
    extra: str | None = None
    #: static W8A8 runs in TensorRT's int8 kernels; float layers carry no Q/DQ
    schemes = frozenset({"w8a8", "float"})
    #: relative cost per MAC (planner). Estimates for tensor-core GPUs: int8 GEMM/conv ~2x fp16 and ~4x the
    #: fp32/tf32 path float layers take in a strongly typed network with fp32 inputs
    scheme_costs = {"w8a8": 1.0, "float": 4.0}
    #: TensorRT's Q/DQ are symmetric (zero point 0): annotate makes static activations symmetric int8
    symmetric_activations = True
    #: int8 tensors only between Q/DQ: embedding tables stay float (quantize_embeddings is skipped)
    int8_embeddings = False
    #: TensorRT fuses DQ -> Conv without an output quantizer (its docs: do not quantize weighted-op outputs)
    quantize_conv_outputs = False

    def check_available(self) -> None:
        for module, why in (("onnx", "to write the QDQ graph"), ("onnxscript", "for torch.onnx's exporter")):
            if importlib.util.find_spec(module) is None:
                raise BackendUnavailable(f"target {self.name!r} needs the {module} package {why}: pip install {module}")

    def lowering_passes(self, options: dict[str, Any]) -> list[Pass]:
        return []  # attention stays decomposed: TensorRT fuses MatMul/Softmax attention itself

    def build(self, gm: fx.GraphModule, ctx: PassContext, captured: Captured, options: dict[str, Any]) -> CompiledModel:
        unknown = set(options) - OPTIONS
        if unknown:
            raise InputError(f"target {self.name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
        signature = ctx.notes["signature"]
        layers = ctx.notes.get("layers", {})
        weight_layers = {v["weight_attr"]: k for k, v in layers.items() if "weight_attr" in v}
        trt_skips: list[str] = []

        def trt_rules(m: onnx.ModelProto) -> dict[str, int]:
            stats, skips = apply_trt_rules(m, residual_qdq=bool(options.get("residual_qdq", True)))
            trt_skips.extend(skips)
            return stats

        model, info = export_onnx(gm, signature, weight_layers, None, TRT_OPSET, engine_rules=trt_rules)
        conformance = check_model(model)
        flat = [t for t in torch.utils._pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(t, torch.Tensor)]
        macs = {k: v for k, v in layer_macs(gm, flat).items() if k in info["weights"]}
        profile = trt_build.profile_shapes(signature, flat, options.get("profiles"))

        tmp = tempfile.TemporaryDirectory(prefix="lowbit-tensorrt-")
        model_dir = Path(tmp.name)
        write_model(model, model_dir / MODEL_FILE)
        write_report(conformance, model_dir / CONFORMANCE_FILE)
        report = ctx.notes["report"]
        report.sections["onnx_export"] = {"opset": TRT_OPSET, **info["rules"],
                                          "problems": info["problems"]}
        report.sections["tensorrt"] = {
            "activations": "symmetric int8 per tensor (forced: TensorRT's Q/DQ take zero point 0)",
            "weights": "symmetric int8 [-127, 127] per output channel",
            "residual_qdq": {"fired": info["rules"].get("quantize_residual_add", 0), "skipped": trt_skips},
            "conformance": conformance.summary(),
            "violations": [v.to_json() for v in conformance.violations],
            "profile": profile["dims"],
        }
        state = {"opset": TRT_OPSET, "weights": info["weights"], "macs": macs, "tmp": tmp,
                 "qparams": dict(ctx.notes.get("qparams", {})),
                 "tensorrt": {"engine_file": None, "profile": profile, "workspace_bytes": options.get("workspace_bytes"),
                              "not_built": "export_only"}}
        threads = int(options.get("threads", 2))
        why = None if options.get("export_only") else trt_build.unavailable_reason()
        if options.get("export_only") or why is not None:
            if why is not None:
                state["tensorrt"]["not_built"] = why
            compiled = make_tensorrt_compiled(self.name, model_dir, signature, ctx.plan, report, state, threads)
            compiled.graph_module = gm
            if why is None:
                return compiled
            raise self._unavailable(compiled, why, ctx.notes.get("dump_dir"))
        state["tensorrt"] = trt_build.build_engine(model_dir, profile, workspace_bytes=options.get("workspace_bytes"))
        compiled = make_tensorrt_compiled(self.name, model_dir, signature, ctx.plan, report, state, threads)
        compiled.graph_module = gm
        return compiled

    def _unavailable(self, compiled: CompiledModel, why: str, dump_dir: Any) -> BackendUnavailable:
        """Save the export-only artifact where the user will find it and say so in the error."""
        out = Path(dump_dir) / "tensorrt_export" if dump_dir else Path(tempfile.mkdtemp(prefix="lowbit-tensorrt-"))
        compiled.save(out)
        err = BackendUnavailable(
            f"target {self.name!r}: the engine build needs TensorRT and a CUDA GPU: {why}. The TensorRT-ready ONNX, "
            f"its conformance report ({CONFORMANCE_FILE}) and the plan are saved in {out}; build the engine there "
            f"on a machine with TensorRT: {rebuild_call(out)}; or compile with export_only=True to get a model "
            "that runs the ONNX on ONNX Runtime CPU")
        err.artifact_dir = out
        return err

    def save(self, compiled: CompiledModel, directory: Path) -> None:
        compiled.save(directory)

    def load(self, directory: Path, manifest: dict[str, Any], **kwargs: Any) -> CompiledModel:
        kwargs.pop("model", None)
        return load_tensorrt_artifact(directory, manifest, **kwargs)
