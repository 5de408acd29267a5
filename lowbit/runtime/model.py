"""CompiledModel: called like the original model; saved with .save(dir), reloaded with lowbit.load(dir)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import Plan

Runner = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


class CompiledModel:
    """A compiled model for one target.

    Calls take the original model's inputs (torch tensors or numpy arrays, positional or keyword as in
    ``example_inputs``) and return torch tensors in the original structure; a Hugging Face ModelOutput
    becomes the tuple of its tensors.
    """

    def __init__(
        self,
        target: str,
        runner: Runner,
        signature: Signature,
        plan: Plan,
        report: Report,
        saver: Callable[[CompiledModel, Path], None] | None = None,
        graph_module: torch.fx.GraphModule | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.target = target
        self._runner = runner
        self.signature = signature
        self._plan = plan
        self.report = report
        self._saver = saver
        self.graph_module = graph_module
        self.options = dict(options or {})
        self.state: dict[str, Any] = {}  # backend-private: what its save() needs
        self.source: Any = None  # lowbit.runtime.export.ModelSource of the compiled model: what export() needs
        self._tokenizer: Any = None  # compile(..., tokenizer=): travels with a causal LM's artifact and exports

    @property
    def tokenizer(self) -> Any:
        """The tokenizer given to compile(tokenizer=...) (None without one)."""
        return self._tokenizer

    @property
    def plan(self) -> dict[str, Any]:
        """The per-layer precision plan as JSON-serialisable data (edit it and pass it to compile(plan=))."""
        return self._plan.to_json()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.signature.unflatten(self.run_flat(self.signature.flatten_call(args, kwargs)))

    def run_flat(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the engine on the flat input tensors (the signature's order); its flat outputs."""
        if getattr(self._runner, "autograd_free", False):  # an engine outside torch (ONNX Runtime, OpenVINO)
            return list(self._runner(flat))
        with torch.no_grad():
            return list(self._runner(flat))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        if self._saver is None:
            raise LowbitError(f"this {self.target!r} model was built without a saver and cannot be saved")
        path = Path(directory)
        self._saver(self, path)
        return path

    def export(self, directory: str | os.PathLike[str], format: str, **options: Any) -> Path:
        """Write a checkpoint an LLM serving engine loads: ``format="compressed-tensors"`` (vLLM, transformers) or
        ``"gguf"`` (llama.cpp, Ollama). The checkpoint holds this model's codes and scales in the format's layout;
        a layer the format cannot hold is an ExportError naming it. See ``lowbit.runtime.export``."""
        from lowbit.runtime.export import export_checkpoint

        return export_checkpoint(self, directory, format, **options)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target!r}, layers={len(self._plan.layers)}, {self._plan.counts()})"
