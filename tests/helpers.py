"""Test helpers: run a few passes on a captured tiny model; count ops; compare numerics."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import fx

from lowbit.compiler.capture import Captured, capture
from lowbit.compiler.instruments import VerifyInstrument
from lowbit.compiler.pass_manager import Pass, PassContext, PassManager
from lowbit.config import QuantConfig
from lowbit.runtime.signature import Signature


def run_passes(model: torch.nn.Module, example: Any, passes: list[Pass], *, config: QuantConfig | None = None,
               calibration: Any = None, plan: Any = None, notes: dict[str, Any] | None = None,
               ) -> tuple[fx.GraphModule, PassManager, PassContext]:
    """Capture ``model``, run ``passes`` under the verify instrument, return the graph, manager and context.
    ``notes`` go into the context first (what a backend declares, e.g. ``quantize_residual_adds``)."""
    cap = capture(model, example)
    with torch.no_grad():
        out = model(*cap.args, **cap.kwargs)
    sig = Signature.from_example(cap.args, cap.kwargs, cap.input_names, cap.dynamic, out, cap.dim_bounds)
    ctx = PassContext(config=config or QuantConfig(), plan=plan, calibration=calibration, progress=False)
    ctx.notes["signature"] = sig
    ctx.notes.update(notes or {})
    pm = PassManager(passes, [VerifyInstrument()])
    gm = pm.run(cap.gm, ctx)
    return gm, pm, ctx


def call_flat(gm: fx.GraphModule, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def count(gm: fx.GraphModule, *targets: Any) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def rel_err(test: torch.Tensor, ref: torch.Tensor) -> float:
    """max |test - ref| / max |ref|: the relative error the pass tests bound."""
    test, ref = test.detach(), ref.detach()
    return float((test.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


@contextlib.contextmanager
def capture_cache() -> Iterator[None]:
    """Within the block, compile() captures each (model, example shapes, dynamic shapes) once and hands
    every later compile a deep copy: torch.export is most of a small model's compile time, and its result
    does not depend on the target, the config or the calibration data. The pipeline is otherwise unchanged."""
    from lowbit.compiler import pipeline

    cache: dict[tuple, Captured] = {}
    real = pipeline.capture

    def capture_once(model, example_inputs, dynamic_shapes=None, dim_bounds=None):
        leaves = torch.utils._pytree.tree_leaves(example_inputs)
        key = (id(model), repr([(tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor)]),
               repr(dynamic_shapes), repr(dim_bounds))
        if key not in cache:
            cache[key] = real(model, example_inputs, dynamic_shapes, dim_bounds)
        c = cache[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree's LeafSpec deprecation, from deepcopy
            return dataclasses.replace(c, gm=copy.deepcopy(c.gm))

    pipeline.capture = capture_once
    try:
        yield
    finally:
        pipeline.capture = real


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread within the block. For suites of tiny models: a second OpenMP thread
    buys nothing there, and when another process holds a core it makes each op wait for a descheduled
    thread (measured: 100x slower calls on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def needs_engine(target: str) -> None:
    """Skip (with the reason) when the engine package a CPU target runs on is not installed."""
    module = {"onnxruntime-int8": "onnxruntime", "openvino-int8": "openvino"}.get(target)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
