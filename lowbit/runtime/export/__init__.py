"""Checkpoints that LLM serving engines load, written from a compiled model (``CompiledModel.export``).

- ``"compressed-tensors"`` (``compressed_tensors.py``): vLLM, llm-compressor, ``transformers``.
- ``"gguf"`` (``gguf.py``): llama.cpp, Ollama.

Both start from one view of the compiled model (``view.py``): the original model's parameters under their own
names, quantized linears as lowbit's codes and scales. Nothing is quantized again: the checkpoint holds the
codes the compiled model computes with, in the format's layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowbit.errors import ExportError
from lowbit.runtime import artifact
from lowbit.runtime.export.view import CheckpointView, ModelSource, checkpoint_view

FORMATS = ("compressed-tensors", "gguf")


def export_checkpoint(compiled: Any, directory: str | os.PathLike[str], format: str, **options: Any) -> Path:
    """Write ``compiled`` as a ``format`` checkpoint in ``directory`` (atomically), with ``report.json`` naming
    each layer's representation in the format (the report's ``checkpoint`` column)."""
    if format not in FORMATS:
        raise ExportError(f"unknown checkpoint format {format!r}; lowbit writes {', '.join(FORMATS)}")
    if format == "compressed-tensors":
        from lowbit.runtime.export import compressed_tensors as writer
    else:
        from lowbit.runtime.export import gguf as writer  # type: ignore[no-redef]

        writer.check_architecture(getattr(getattr(compiled, "source", None), "config", None))
    view = checkpoint_view(compiled)
    path = Path(directory)
    representation: dict[str, str] = {}  # the writer fills it before it writes: the report goes in the same dir
    with artifact.extra_content({}, lambda tmp: _write_report(compiled, tmp, representation)):
        writer.write(view, path, representation=representation, **options)
    for row in compiled.report.layers:
        if row["layer"] in representation:
            row["checkpoint"] = representation[row["layer"]]
    return path


def _write_report(compiled: Any, tmp: Path, representation: dict[str, str]) -> None:
    report = compiled.report.to_json()
    for row in report.get("layers", []):
        row["checkpoint"] = representation.get(row["layer"], "float")
    artifact.write_json(tmp / "report.json", report)


__all__ = ["export_checkpoint", "FORMATS", "CheckpointView", "ModelSource", "checkpoint_view"]
