"""compile() and load(): the two entry points."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lowbit.config import QuantConfig
from lowbit.errors import ArtifactError, BackendNotAvailable, InputError
from lowbit.runtime.artifact import read_manifest
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.spec import Plan


def compile(  # noqa: A001 - the public name is compile
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    target: str = "torch",
    calibration: Iterable[Any] | None = None,
    config: QuantConfig | None = None,
    plan: Plan | Mapping[str, Any] | str | None = None,
    dynamic_shapes: Mapping[str, Any] | tuple[Any, ...] | list[Any] | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    progress: bool | str = True,
    **options: Any,
) -> CompiledModel:
    """Quantize and compile ``model`` for ``target``.

    example_inputs: a tuple of positional arguments or a dict of keyword arguments.
    calibration: an iterable of batches of the same form (streamed; any length).
    config: QuantConfig (default W8A8: int8 per-channel weights, int8 per-tensor activations, min/max).
    plan: a per-layer precision plan (``CompiledModel.plan``, its JSON, or a path) that overrides config.
    dynamic_shapes: per input name, ``{dim: "symbol"}``; dim 0 (batch) of every input is dynamic anyway.
    dump_dir: write per-pass graph dumps there (also switched on by LOWBIT_DUMP_DIR).
    progress: progress bars of the long steps on a terminal (True), never (False), or also into a log ("always").
    options: target options, e.g. ``compile=True`` for target="torch". For a causal LM: ``tokenizer=`` (saved
      with the artifact), ``decode=False`` (no KV-cache step graph: a model that only scores sequences).

    A Hugging Face causal LM (``can_generate()``) returns a ``CausalLM``: called, it gives the logits;
    ``.generate()`` decodes with a KV cache on the target's engine.
    """
    from lowbit.compiler.pipeline import compile_model

    return compile_model(model, example_inputs, target=target, calibration=calibration, config=config, plan=plan,
                         dynamic_shapes=dynamic_shapes, dump_dir=dump_dir, options=options, progress=progress)


def load(directory: str | os.PathLike[str], *, model: torch.nn.Module | None = None, **options: Any) -> CompiledModel:
    """Reload a saved CompiledModel; every file is checked against the manifest's SHA-256 first.

    target="torch" artifacts are recipes and need ``model=`` (the original model) to re-apply them.
    """
    manifest = read_manifest(directory)
    try:
        return _load_verified(directory, manifest, model, options)
    except (ArtifactError, BackendNotAvailable, InputError):  # InputError: a bad option given to load()
        raise
    except Exception as e:  # an artifact is untrusted input: any failure to rebuild it is an ArtifactError
        raise ArtifactError(f"{directory}: cannot be loaded ({type(e).__name__}: {e})") from e


def _load_verified(directory: str | os.PathLike[str], manifest: dict[str, Any], model: torch.nn.Module | None,
                   options: dict[str, Any]) -> CompiledModel:
    """Dispatch a verified artifact (every file matches the manifest) to the loader of its kind; each loader
    checks its kind against the target and its model file before an engine opens it."""
    compiled = _load_model(directory, manifest, model, options)
    if "causal_lm" in manifest:  # the step graph of a causal LM: generate() around it
        from lowbit.runtime.generate import CausalLM

        return CausalLM.from_artifact(compiled, manifest, Path(directory))
    return compiled


def _load_model(directory: str | os.PathLike[str], manifest: dict[str, Any], model: torch.nn.Module | None,
                options: dict[str, Any]) -> CompiledModel:
    d = Path(directory)
    stray = sorted(p.name for p in d.glob("*.onnx") if p.name not in manifest["files"])
    if stray:
        raise ArtifactError(f"{d / stray[0]}: not listed in the manifest (an unverified model is not loaded)")
    if manifest.get("kind") == "onnx":  # deployable artifacts load with the runtime alone
        from lowbit.runtime.onnx_artifact import load_onnx_artifact

        return load_onnx_artifact(directory, manifest, **options)
    if manifest.get("kind") == "tensorrt":  # engine or TensorRT-ready ONNX: the runtime alone, too
        from lowbit.runtime.tensorrt_artifact import load_tensorrt_artifact

        return load_tensorrt_artifact(directory, manifest, **options)
    from lowbit.backends.registry import get_backend

    backend = get_backend(str(manifest.get("target")))
    return backend.load(Path(directory), manifest, model=model, **options)
