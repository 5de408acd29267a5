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
from lowbit.errors import ArtifactError
from lowbit.runtime import artifact
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import SCHEMES, Plan


class TorchBackend:
    name = "torch"
    schemes = frozenset(SCHEMES)
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

        def run(flat: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(gm(*flat))

        compiled = CompiledModel("torch", run, signature, ctx.plan, ctx.notes["report"], self.save, gm, options)
        compiled.state = state
        return compiled

    def save(self, compiled: CompiledModel, directory: Path) -> None:
        state = compiled.state
        config: QuantConfig = state["config"]

        def write(tmp: Path) -> None:
            artifact.write_json(tmp / "plan.json", compiled.plan)
            artifact.save_tensors(tmp / "qparams.safetensors", state["qparams"])
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

        signature = Signature.from_json(manifest["signature"])
        plan = Plan.from_json(artifact.load_json(directory, "plan.json"))
        qparams = artifact.load_tensors(directory, "qparams.safetensors")
        tensors = artifact.load_tensors(directory, "example_inputs.safetensors")
        try:
            flat = [tensors[s.name] for s in signature.inputs]
        except KeyError as e:
            raise ArtifactError(f"{directory}/example_inputs.safetensors has no input {e.args[0]!r}") from e
        example: Any = dict(zip(signature.keywords, flat, strict=True)) if signature.keywords else tuple(flat)
        names = signature.keywords or [s.name for s in signature.inputs]
        dynamic = {n: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
                   for n, s in zip(names, signature.inputs, strict=True)}
        compiled = compile_model(
            model, example, target=self.name, config=QuantConfig.from_json(manifest["config"]), plan=plan,
            dynamic_shapes=dynamic, qparams=qparams, dim_bounds=signature.dim_bounds,
            options={**manifest.get("options", {}), **kwargs}, progress=False,
        )
        saved = Report.from_json(artifact.load_json(directory, "report.json"))
        compiled.report.sections.update(saved.sections)
        return compiled
