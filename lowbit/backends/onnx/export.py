"""Export the lowered graph to an ONNX QDQ model.

``torch.onnx.export(dynamo=True)`` maps the ``quantized_decomposed`` quantize/dequantize ops to
QuantizeLinear/DequantizeLinear; the rules in qdq_rules.py then shape the graph for the engines' QDQ
fusions. Dynamic dims keep the Signature's symbol names. Every emitted model passes
``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import torch
from torch import fx
from torch.export import Dim

from lowbit.backends.onnx.qdq_rules import apply_rules
from lowbit.errors import LowbitError
from lowbit.runtime.signature import Signature

OPSET = 21


class OnnxExportError(LowbitError):
    """The lowered graph holds an op with no ONNX translation (the message names the op and the node)."""


def _dynamic_shapes(signature: Signature) -> tuple[dict[int, Dim], ...]:
    dims: dict[str, Dim] = {}
    out = []
    for s in signature.inputs:
        spec = {}
        for i, d in enumerate(s.shape):
            if isinstance(d, str):
                if d not in dims:
                    lo, hi = signature.dim_bounds.get(d, (1, None))
                    dims[d] = Dim(d, min=max(lo, 1), max=hi) if hi is not None else Dim(d, min=max(lo, 1))
                spec[i] = dims[d]
        out.append(spec)
    return tuple(out)


def _example(signature: Signature) -> tuple[torch.Tensor, ...]:
    sizes = {}
    for s in signature.inputs:
        for d in s.shape:
            if isinstance(d, str):
                lo, hi = signature.dim_bounds.get(d, (1, None))
                sizes[d] = max(min(8, hi or 8), lo, 2)
    return tuple(signature.example_tensors(sizes))


def export_onnx(gm: fx.GraphModule, signature: Signature, weight_layers: dict[str, str] | None = None,
                custom_translations: dict[Any, Any] | None = None, opset: int = OPSET,
                engine_rules: Callable[[onnx.ModelProto], dict[str, int]] | None = None,
                ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The lowered GraphModule as an ONNX QDQ model, plus rewrite stats and ``weights``: layer -> the
    name of its int8 weight initializer. ``weight_layers`` maps weight buffer names to layer names.
    ``engine_rules`` rewrites the named model in place for one engine (its stats join the shared rules');
    the model is checked once, after it."""
    names = [s.name for s in signature.inputs]
    from lowbit.backends.onnx.weight_only import TRANSLATIONS

    custom_translations = {**TRANSLATIONS, **(custom_translations or {})}
    _exact_aliases(gm)
    try:
        with warnings.catch_warnings(), _quiet(), _torchlib_registry_built_once(), _decompose_only_when_needed():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm, _example(signature), dynamo=True, opset_version=opset, input_names=names,
                output_names=list(signature.outputs), dynamic_shapes=_dynamic_shapes(signature),
                optimize=False, verbose=False, report=False, custom_translation_table=custom_translations,
            )
            _optimize(program.model)
    except Exception as e:  # the exporter raises several types; name the op when it says which
        raise OnnxExportError(_explain_export_failure(gm, e)) from e
    model = program.model_proto
    model, stats, problems = apply_rules(model)
    stats["qdq_placement_problems"] = len(problems)
    weights = name_layer_nodes(model, weight_layers or {})
    if engine_rules is not None:
        stats.update(engine_rules(model))
    onnx.checker.check_model(model, full_check=True)
    return model, {"rules": stats, "problems": problems, "weights": weights}


# onnxscript's rewrite rules that rewrite nothing in lowbit's graphs and cost most of the optimizer's time:
# SlicesSplit matches every pair of Slices (52 of 59 s on SmolLM2-135M's W4 graph, no rewrite; the other rules
# together take 6 s and give the same 2980 nodes).
_SKIPPED_REWRITES = frozenset({"SlicesSplit"})


def _optimize(model: Any) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's ``optimize_ir``: constant folding, its
    default rewrite rules, dead code and common subexpressions), less ``_SKIPPED_REWRITES``. onnxscript reads
    its rule list at call time; where that list is not found (another onnxscript), the whole optimizer runs."""
    from onnxscript import rewriter
    from onnxscript.optimizer import optimize_ir

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        optimize_ir(model)
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in _SKIPPED_REWRITES)
    try:
        optimize_ir(model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


_REGISTRY_LOCK = threading.Lock()
_REGISTRIES: dict[int | None, Any] = {}  # opset -> the exporter's registry of torchlib functions, built once


@contextlib.contextmanager
def _torchlib_registry_built_once() -> Iterator[None]:
    """``torch.onnx.export`` builds its registry of torchlib functions afresh on every call: ~1 s of Python
    (12,000 function signatures parsed from source), most of a small model's export (75% of the random-graph
    test's ONNX export time). Within this block the registry is built once per opset and each export gets a
    copy (the exporter adds the custom translations to its copy). Exports hold a lock while the class attribute
    is swapped; where torch's private class is not found, the exporter runs as it is."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        build = cls.__dict__["from_torchlib"].__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass: type, opset_version: int | None = None) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = build(klass) if opset_version is None else build(klass, opset_version)
        built = _REGISTRIES[opset_version]
        copy = klass()
        copy._opset_version = built._opset_version
        copy.functions = {k: list(v) for k, v in built.functions.items()}
        return copy

    with _REGISTRY_LOCK:
        saved = cls.__dict__["from_torchlib"]
        cls.from_torchlib = classmethod(from_torchlib)
        try:
            yield
        finally:
            cls.from_torchlib = saved


# ops the exporter would decompose (re-tracing the whole program for them) that are one ATen op under another name
_ALIASES = {
    torch.ops.aten.__and__.Tensor: torch.ops.aten.bitwise_and.Tensor,  # an attention mask's `a & b`
    torch.ops.aten.__or__.Tensor: torch.ops.aten.bitwise_or.Tensor,
    torch.ops.aten.__xor__.Tensor: torch.ops.aten.bitwise_xor.Tensor,
}


_TO = {torch.ops.aten.to.dtype: ("dtype",), torch.ops.aten.to.device: ("device", "dtype"),
       torch.ops.aten.to.dtype_layout: ()}


def _exact_aliases(gm: fx.GraphModule) -> None:
    """Rename the ops of ``_ALIASES`` in place, and write ``Tensor.to`` as the ``_to_copy`` the exporter's
    decomposition makes of it (the same function in a graph without mutation, so the same numbers on every
    backend)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ALIASES:
            node.target = _ALIASES[node.target]
            changed = True
        elif node.target in _TO:
            given = dict(zip(_TO[node.target], node.args[1:], strict=False)) | dict(node.kwargs)
            kwargs = {k: given[k] for k in ("dtype", "device") if given.get(k) is not None}
            value = node.args[0].meta.get("val")
            if (isinstance(value, torch.Tensor) and kwargs.get("dtype", value.dtype) == value.dtype
                    and kwargs.get("device", value.device) == value.device):
                node.replace_all_uses_with(node.args[0])  # a no-op ``to``: what functionalization makes of it
                gm.graph.erase_node(node)
            else:
                node.target, node.args, node.kwargs = torch.ops.aten._to_copy.default, (node.args[0],), kwargs
            changed = True
    if changed:
        gm.recompile()


_DECOMPOSE_LOCK = threading.Lock()
_ASSERTIONS = frozenset({  # what the exporter removes after decomposing (torch's remove_assertion_nodes)
    torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg, torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
})


@contextlib.contextmanager
def _decompose_only_when_needed() -> Iterator[None]:
    """The exporter re-traces the program it exported (``run_decompositions``) to decompose the ops ONNX has no
    function for: half of the export of a decoder's step graph (4 of 8 s for a 2-layer Llama, ~20 s for
    SmolLM2-135M), where, after ``_exact_aliases``, every op already has an ONNX function. Within this block the
    re-trace runs only when the program holds an op without one, a mutating op or a higher-order op; otherwise the program goes on as exported (tests/test_backend_onnx.py: the same
    outputs bit for bit either way). Where torch's private modules are not found, the exporter runs as it is."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes

        decompose = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):
        yield
        return

    def only_when_needed(exported_program: Any, registry: Any) -> Any:
        # every op the exporter would decompose is one without an ONNX function (its table leaves those out)
        implemented = set(_decomp.get_onnx_implemented_overloads(registry))

        def needs(target: Any) -> bool:
            if target in _ASSERTIONS:
                return False
            if isinstance(target, torch._ops.HigherOrderOperator):
                return True
            return isinstance(target, torch._ops.OpOverload) and (target not in implemented
                                                                  or target._schema.is_mutable)

        if any(needs(n.target) for n in exported_program.graph.nodes if n.op == "call_function"):
            return decompose(exported_program, registry)
        return exported_program

    with _DECOMPOSE_LOCK:
        _fx_passes.decompose_with_registry = only_when_needed
        try:
            yield
        finally:
            _fx_passes.decompose_with_registry = decompose


def name_layer_nodes(model: onnx.ModelProto, weight_layers: dict[str, str]) -> dict[str, str]:
    """Name each weight DQ ``<layer>/weight_dq`` and its consumer ``<layer>/<OpType>``, so engine
    reports (ORT's optimized graph, OpenVINO's originalLayersNames) map back to layers."""
    inits = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        base = n.input[0][:-2] if n.input[0].endswith("_t") and n.input[0] not in weight_layers else n.input[0]
        layer = weight_layers.get(base)
        if layer is None and len(n.input) > 1 and n.input[1].endswith("_weight_scale"):
            layer = weight_layers.get(n.input[1][: -len("_scale")] + "_q")  # a 4-bit weight folded from a Cast
        if layer is None:
            continue
        weights[layer] = n.input[0]
        n.name = f"{layer}/weight_dq"
        for user in consumers.get(n.output[0], []):
            user.name = f"{layer}/{user.op_type}"
            if user.op_type == "Transpose":  # a grouped weight: DQ -> Transpose -> MatMul
                for mm in consumers.get(user.output[0], []):
                    mm.name = f"{layer}/{mm.op_type}"
    return weights


def _explain_export_failure(gm: fx.GraphModule, e: Exception) -> str:
    text = str(e)
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in text:
            return (f"no ONNX translation for op {node.target} (node {node.name!r}): "
                    f"{type(e).__name__}: {text.splitlines()[0] if text else ''}")
    first = "\n".join(text.splitlines()[:8])
    return f"ONNX export failed: {type(e).__name__}: {first}"


class _quiet:
    """Silence the exporter's progress prints and warnings logger."""

    def __enter__(self) -> None:
        self.level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        import contextlib

        self.redirect = contextlib.redirect_stdout(io.StringIO())
        self.redirect.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.redirect.__exit__(*exc)
        logging.getLogger("torch.onnx").setLevel(self.level)
