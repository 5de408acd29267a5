"""target="torch": the lowered graph runs in PyTorch. It is the numerical oracle for every other backend.

An artifact is the *recipe*, not the model (no pickle): plan.json, the qparams and the example inputs in
safetensors, and a manifest with a SHA-256 for every file. ``lowbit.load(dir, model=m)`` captures ``m``
again and re-applies the stored plan and qparams, so the reloaded model computes exactly what was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

import lowbit
from lowbit.compiler.capture import Captured
from lowbit.compiler.pass_manager import Pass, PassContext
from lowbit.config import QuantConfig
from lowbit.errors import ArtifactError, LowbitError
from lowbit.runtime import artifact
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.reference import pack_int4, unpack_int4
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import SCHEMES, Plan


def pack_4bit_codes(qparams: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The 4-bit layers' weight codes two per byte (``<layer>.weight.q4``, uint8 [out, in / 2]): a w4a16
    recipe stores half a byte per weight, not the int8 its graph holds them in."""
    out = dict(qparams)
    for layer, spec in plan.get("layers", {}).items():
        w = spec.get("weight") or {}
        q = out.get(f"{layer}.weight.q")
        if w.get("dtype") in ("int4", "uint4") and q is not None and q.shape[-1] % 2 == 0:
            out[f"{layer}.weight.q4"] = pack_int4(out.pop(f"{layer}.weight.q"))
            out[f"{layer}.weight.q4_signed"] = torch.tensor(w["dtype"] == "int4")
    return out


def unpack_4bit_codes(qparams: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in qparams.items():
        if key.endswith(".q4_signed"):
            continue
        if key.endswith(".q4"):
            signed = qparams.get(f"{key}_signed")
            if signed is None or value.dtype != torch.uint8:
                raise ArtifactError(f"{directory}/qparams.safetensors: {key} is not packed uint8 with its sign flag")
            out[key[:-1]] = unpack_int4(value, signed=bool(signed))
        else:
            out[key] = value
    return out


class TorchBackend:
    name = "torch"
    schemes = frozenset(SCHEMES)
    #: relative cost per MAC (planner): the CPU table (compile=True runs int8 layers on oneDNN; eager
    #: fake-quant is a reference, not a speed). Estimates, to be replaced by measured ones.
    scheme_costs = {"w8a8": 1.0, "w8a8_dynamic": 1.15, "w8a8_llm_int8": 1.4, "float": 2.0, "w8a16": 2.2, "w4a16": 2.5}
    extra = None

    def check_available(self) -> None:
        return None

    def lowering_passes(self, options: dict[str, Any]) -> list[Pass]:
        return []

    def build(self, gm: fx.GraphModule, ctx: PassContext, captured: Captured, options: dict[str, Any]) -> CompiledModel:
        signature: Signature = ctx.notes["signature"]
        leaves = [t for t in torch.utils._pytree.tree_leaves((captured.args, captured.kwargs))
                  if isinstance(t, torch.Tensor)]
        example = dict(zip([s.name for s in signature.inputs], leaves, strict=True))
        state = {"qparams": ctx.notes.get("qparams", {}), "example": example, "config": ctx.config}

        report = ctx.notes["report"]
        fn: Any = gm
        if options.get("compile"):
            fn = self._inductor(gm, leaves, ctx, report)

        def run(flat: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(fn(*flat))

        compiled = CompiledModel("torch", run, signature, ctx.plan, report, self.save, gm, options)
        compiled.state = state
        return compiled

    @staticmethod
    def _inductor(gm: fx.GraphModule, example: list[torch.Tensor], ctx: PassContext, report: Report) -> Any:
        """torch.compile with freezing, so inductor's x86 quantization fusions turn dq -> linear/conv into
        oneDNN int8 kernels (qlinear_pointwise / qconv_pointwise). Proof: count them in the generated code.

        Shapes are static per compiled graph (a new batch size recompiles): with dynamic shapes, inductor's
        qconv lowering in torch 2.13 fails a stride assertion."""
        import torch._inductor.config as inductor_config
        from torch._inductor.utils import run_and_get_code

        compiled = torch.compile(gm, dynamic=False)  # one static graph per shape: qconv needs static strides

        def fn(*flat: torch.Tensor) -> Any:
            # freezing must be on whenever inductor (re)compiles, e.g. for a new batch size
            with inductor_config.patch(freezing=True), torch.no_grad():
                return compiled(*flat)

        try:
            _, code = run_and_get_code(fn, *example)
        except Exception as e:  # inductor raises InductorError/BackendCompilerFailed with nested causes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(
                f"target 'torch' with compile=True: inductor could not compile the lowered graph ({first}). "
                "Use compile=False or an ONNX target for this model."
            ) from e
        text = "\n".join(code)
        calls = {k: text.count(f"torch.ops.onednn.{k}") for k in
                 ("qlinear_pointwise", "qconv_pointwise", "qconv2d_pointwise", "qlinear_pointwise.binary",
                  "qconv2d_pointwise.binary")}
        int8_calls = sum(v for k, v in calls.items() if "." not in k)
        layers = ctx.notes.get("layers", {})
        static = [k for k, v in layers.items() if v.get("scheme") in ("w8a8", "w8a8_dynamic")]
        report.sections["engine"] = {
            "engine": "inductor",
            "int8_share": min(1.0, int8_calls / len(static)) if static else 0.0,
            "basis": "oneDNN int8 kernel calls in inductor's code / quantized layers (by count, not MACs)",
            "calls": calls,
            "layers": {},
        }
        return fn

    def save(self, compiled: CompiledModel, directory: Path) -> None:
        state = compiled.state
        config: QuantConfig = state["config"]

        def write(tmp: Path) -> None:
            artifact.write_json(tmp / "plan.json", compiled.plan)
            artifact.save_tensors(tmp / "qparams.safetensors", pack_4bit_codes(state["qparams"], compiled.plan))
            artifact.save_tensors(tmp / "example_inputs.safetensors", state["example"])
            artifact.write_json(tmp / "report.json", compiled.report.to_json())

        manifest = {
            "lowbit_version": lowbit.__version__,
            "target": self.name,
            "kind": "recipe",
            "signature": compiled.signature.to_json(),
            "config": config.to_json(),
            "options": {k: v for k, v in compiled.options.items() if isinstance(v, (bool, int, float, str))},
        }
        artifact.write_artifact(directory, write, manifest)

    def load(self, directory: Path, manifest: dict[str, Any], model: torch.nn.Module | None = None,
             **kwargs: Any) -> CompiledModel:
        if model is None:
            raise ArtifactError(
                f"{directory}: a target='torch' artifact holds the quantization recipe, not the model; "
                "reload it with lowbit.load(dir, model=the_original_model)"
            )
        from lowbit.compiler.pipeline import compile_model

        if manifest.get("kind") != "recipe":
            raise ArtifactError(f"{directory}: not a target='torch' recipe (kind={manifest.get('kind')!r})")
        signature = Signature.from_json(manifest["signature"])
        plan = artifact.parse(directory, "plan.json", Plan.from_json)
        qparams = unpack_4bit_codes(artifact.load_tensors(directory, "qparams.safetensors"), directory)
        tensors = artifact.load_tensors(directory, "example_inputs.safetensors")
        try:
            flat = [tensors[s.name] for s in signature.inputs]
        except KeyError as e:
            raise ArtifactError(f"{directory}/example_inputs.safetensors has no input {e.args[0]!r}") from e
        signature.check(flat, error=ArtifactError, where=f"{directory}/example_inputs.safetensors")
        example: Any = dict(zip(signature.keywords, flat, strict=True)) if signature.keywords else tuple(flat)
        names = signature.keywords or [s.name for s in signature.inputs]
        dynamic = {n: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
                   for n, s in zip(names, signature.inputs, strict=True)}
        if "causal_lm" in manifest:  # the recipe of a causal LM's step graph: re-apply it to the model's step
            from lowbit.compiler.decode import step_module

            model = step_module(model)[0]
        compiled = compile_model(
            model, example, target=self.name, config=QuantConfig.from_json(manifest["config"]), plan=plan,
            dynamic_shapes=dynamic, qparams=qparams, dim_bounds=signature.dim_bounds,
            options={**manifest.get("options", {}), **kwargs}, progress=False,
        )
        if compiled.signature.to_json()["inputs"] != signature.to_json()["inputs"]:
            raise ArtifactError(f"{directory}: the recipe was made for inputs {signature.to_json()['inputs']}, but the "
                                f"model re-captured with its example takes {compiled.signature.to_json()['inputs']}")
        saved = artifact.parse(directory, "report.json", Report.from_json)
        compiled.report.sections.update(saved.sections)
        return compiled

