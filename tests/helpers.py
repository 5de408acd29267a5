"""Test helpers: run a few passes on a captured tiny model; count ops; compare numerics."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from lowbit.compiler.capture import capture
from lowbit.compiler.instruments import VerifyInstrument
from lowbit.compiler.pass_manager import Pass, PassContext, PassManager
from lowbit.config import QuantConfig
from lowbit.runtime.signature import Signature


def run_passes(model: torch.nn.Module, example: Any, passes: list[Pass], *, config: QuantConfig | None = None,
               calibration: Any = None, plan: Any = None) -> tuple[fx.GraphModule, PassManager, PassContext]:
    """Capture ``model``, run ``passes`` under the verify instrument, return the graph, manager and context."""
    cap = capture(model, example)
    with torch.no_grad():
        out = model(*cap.args, **cap.kwargs)
    sig = Signature.from_example(cap.args, cap.kwargs, cap.input_names, cap.dynamic, out, cap.dim_bounds)
    ctx = PassContext(config=config or QuantConfig(), plan=plan, calibration=calibration, progress=False)
    ctx.notes["signature"] = sig
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
