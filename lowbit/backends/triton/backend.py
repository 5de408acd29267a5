"""target="triton": quantized linear layers run lowbit's Triton kernels; the rest of the graph runs in PyTorch.

What each scheme lowers to (pass ``lower_quantized_linear``):

=============  =====================================================================================
scheme         runs as
=============  =====================================================================================
w8a8           static per-tensor activations: ``lowbit::quantize_per_tensor_int8`` (the calibrated
               scale, broadcast to one per row; uint8 codes shifted into int8, the shift folded into
               the bias) then ``lowbit::w8a8_linear`` (W8A8 GEMM kernel). Same activation codes as the
               torch target, so it matches it to float32 rounding.
w8a8_dynamic   ``lowbit::quantize_per_token`` (per-token kernel) then ``lowbit::w8a8_linear``
w8a16, w4a16   ``lowbit::weight_only_linear`` (weight-only kernel; int4 packed two per byte)
float          ``aten.linear``
=============  =====================================================================================

Convolutions and layers the kernels cannot run keep their fake-quant torch ops; the report's "triton"
section names the kernel of every layer and the reason of every fallback.

The artifact is the compiled graph itself, loadable without the model and without pickle: the graph
as JSON (``lowbit.runtime.graph_io``), every graph constant (int8 / packed int4 weights, scales,
biases, embeddings, ...) in ``weights.safetensors``, plus plan, report and a manifest with SHA-256s.

Option ``device``: where the graph runs ("cuda" when a GPU is visible and ``TRITON_INTERPRET`` is not
set, else "cpu", which needs ``TRITON_INTERPRET=1``). Inputs are moved there; outputs stay there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import fx

import lowbit
from lowbit.backends.triton import ops  # noqa: F401  registers the lowbit:: ops the graph calls
from lowbit.backends.triton.drop_export_guards import DropExportGuards
from lowbit.backends.triton.lower_linear import LowerQuantizedLinear
from lowbit.compiler.capture import Captured
from lowbit.compiler.pass_manager import Pass, PassContext
from lowbit.config import QuantConfig
from lowbit.errors import ArtifactError, BackendNotAvailable
from lowbit.kernels import INSTALL_HINT
from lowbit.runtime import artifact
from lowbit.runtime.graph_io import graph_from_json, graph_to_json
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.report import Report
from lowbit.runtime.signature import Signature
from lowbit.runtime.spec import Plan

GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"


class TritonBackend:
    name = "triton"
    schemes = frozenset({"w8a8", "w8a8_dynamic", "w8a8_llm_int8", "w8a16", "w4a16", "float"})
    #: relative cost per MAC (planner). Estimates for compute-bound GEMMs on GPUs with int8 tensor cores
    #: (int8 ~2x fp16); weight-only kernels win only when memory-bound (small batch), not modelled here.
    scheme_costs = {"w8a8": 1.0, "w8a8_dynamic": 1.1, "w8a8_llm_int8": 1.3, "w4a16": 1.4, "w8a16": 1.5, "float": 2.0}
    extra = "triton"

    def check_available(self) -> None:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise BackendNotAvailable(f'target="triton" needs Triton, which is not installed; {INSTALL_HINT}') from e

    def lowering_passes(self, options: dict[str, Any]) -> list[Pass]:
        return [
            DropExportGuards(),  # Signature checks input shapes; an artifact graph holds no modules
            LowerQuantizedLinear(),  # quantized aten.linear -> lowbit:: kernel ops, int4 packed
        ]

    def build(self, gm: fx.GraphModule, ctx: PassContext, captured: Captured, options: dict[str, Any]) -> CompiledModel:
        report: Report = ctx.notes["report"]
        report.sections["triton"] = ctx.notes.get("triton", {"kernels": {}, "fallbacks": {}})
        config = ctx.config or QuantConfig()
        return self._compiled(gm, ctx.notes["signature"], ctx.plan or Plan(), report, options, config)

    def _compiled(self, gm: fx.GraphModule, signature: Signature, plan: Plan, report: Report,
                  options: dict[str, Any], config: QuantConfig) -> CompiledModel:
        device = torch.device(options.get("device") or default_device())
        gm = to_device(gm, device)

        def run(flat: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(gm(*(t.to(device) for t in flat)))

        compiled = CompiledModel(self.name, run, signature, plan, report, self.save, gm, options)
        compiled.state = {"config": config}
        return compiled

    def save(self, compiled: CompiledModel, directory: Path) -> None:
        gm = compiled.graph_module
        assert gm is not None
        graph = graph_to_json(gm)
        tensors = _unshared({name: _constant(gm, name) for name in graph["constants"]})
        config: QuantConfig = compiled.state.get("config") or QuantConfig()

        def write(tmp: Path) -> None:
            artifact.write_json(tmp / GRAPH_FILE, graph)
            artifact.save_tensors(tmp / WEIGHTS_FILE, tensors)
            artifact.write_json(tmp / "plan.json", compiled.plan)
            artifact.write_json(tmp / "report.json", compiled.report.to_json())

        manifest = {
            "lowbit_version": lowbit.__version__,
            "target": self.name,
            "kind": "graph",
            "signature": compiled.signature.to_json(),
            "config": config.to_json(),
            "options": {k: v for k, v in compiled.options.items() if isinstance(v, (bool, int, float, str))},
        }
        artifact.write_artifact(directory, write, manifest)

    def load(self, directory: Path, manifest: dict[str, Any], model: torch.nn.Module | None = None,
             **kwargs: Any) -> CompiledModel:
        """Rebuild from the artifact alone (``model`` is not needed and is ignored)."""
        if manifest.get("kind") != "graph":
            raise ArtifactError(f"{directory}: not a target='triton' graph artifact (kind={manifest.get('kind')!r})")
        graph = artifact.load_json(directory, GRAPH_FILE)
        tensors = artifact.load_tensors(directory, WEIGHTS_FILE)
        gm = graph_from_json(graph, tensors)
        try:
            signature = Signature.from_json(manifest["signature"])
            config = QuantConfig.from_json(manifest["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{directory}/manifest.json: bad signature or config ({e})") from e
        plan = artifact.parse(directory, "plan.json", Plan.from_json)
        report = artifact.parse(directory, "report.json", Report.from_json)
        options = {**manifest.get("options", {}), **kwargs}
        return self._compiled(gm, signature, plan, report, options, config)


def default_device() -> str:
    """cuda when a GPU is visible and the kernels are compiled (not interpreted), else cpu."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "cuda" if torch.cuda.is_available() and not interpreted else "cpu"


def to_device(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """Move the constants to ``device`` and point the graph's device arguments (arange, to, ...) there.

    torch.export records the capture device in the graph (``aten.arange(..., device=cpu)``); a graph
    captured on CPU and run on a GPU would otherwise mix devices.
    """
    gm = gm.to(device)
    changed = False

    def retarget(a: Any) -> Any:
        nonlocal changed
        if isinstance(a, torch.device) and a != device:
            changed = True
            return device
        return a

    for node in gm.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, retarget)
        node.kwargs = fx.node.map_aggregate(node.kwargs, retarget)
    if changed:
        gm.recompile()
    return gm


def _constant(gm: fx.GraphModule, name: str) -> torch.Tensor:
    obj: Any = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give the second and later ones their own copy."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
