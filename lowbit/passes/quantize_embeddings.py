"""Store large embedding tables as int8, one symmetric scale per row, and dequantize only the rows read.

    embedding(W, ids)   ->   embedding(codes, ids).to(float) * embedding(scales, ids)

``codes = round(W / s)`` in [-127, 127] and ``s = max|W_row| / 127`` per row (``scales`` is [rows, 1]).
Gathering first and scaling after is exactly ``embedding(codes * scales, ids)`` -- the same products --
but every engine reads ``len(ids)`` int8 rows instead of a float table or a dequantized copy of it:
ONNX ``Gather(int8) -> Cast -> Mul(Gather(scales))``, which ONNX Runtime and OpenVINO run as they are.

MiniLM-L6's word embeddings are 47 MB of its 91 MB in float32; as int8 they are 11.8 MB, at 42.8 dB SQNR
against the float table: far below what the int8 linears add after them (the model's cosine to float on
real tokens is unchanged; the SQNR of all outputs, padded positions included, goes 20.3 -> 18.2 dB).

The pass runs before SmoothQuant and calibration, so every later measurement (ranges, the planner's
fidelity, the sensitivity analysis) sees the int8 tables. Tables under ``MIN_NUMEL`` entries stay float
(MiniLM's 2 x 384 token-type table: nothing worth saving), and so does a table the graph also reads other
than through ``embedding`` or as the weight of a linear. A table tied to an output projection (a causal LM's
``lm_head``) is looked up as int8 rows while the projection reads the float table and gets its own quantized
copy from its layer spec (w8a16 by default under ``w4a16``). ``QuantConfig(embeddings="float")`` or a
target that runs no plain int8 tensors (``tensorrt-int8``: int8 only between Q/DQ) switch it off.

With a fidelity target the tables are not part of the plan, so they get a fixed share of its error budget:
they turn int8 only if the model with int8 tables alone (every layer float) stays ``MARGIN_DB`` above the
SQNR target (a tenth of the noise the target allows; a user metric: within a tenth of its tolerance).
The float model's outputs (or metric) measured here, before the tables change, are what the planner then
measures every plan against (``ctx.notes["float_outputs"]`` / ``["float_fidelity"]``), so the fidelity it
reports includes the tables' error. MiniLM-L6 with int8 tables alone: 42 dB against the default 18 dB.

The per-row scales go to the qparams (``<table>.row_scale``): re-applying an artifact quantizes exactly the
tables it lists, with their scales, whatever the budget would decide without calibration data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import attr_tensor, constant_node, delete_unused_attrs
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.sensitivity import fidelity_batches, float_outputs, outputs_sqnr_db
from lowbit.config import QuantConfig
from lowbit.errors import ArtifactError
from lowbit.runtime.qparams import quantize_weight, sqnr, weight_codes
from lowbit.runtime.spec import QuantSpec

aten = torch.ops.aten
#: symmetric int8 per row (axis 0 of a [rows, dim] table), codes in [-127, 127]
ROW_SPEC = QuantSpec("int8", True, "per_channel", axis=0, narrow=True)
#: smaller tables stay float
MIN_NUMEL = 1024
#: with a fidelity target, int8 tables alone must stay this far above it (a tenth of its noise budget)
MARGIN_DB = 10.0


def _is_lookup(user: fx.Node, weight: fx.Node) -> bool:
    return (user.op == "call_function" and user.target is aten.embedding.default and user.args[0] is weight
            and weight not in user.args[1:])


def _table_users_are_lookups(weight: fx.Node) -> bool:
    """Every reader of the table looks rows up in it, or is a linear using it as its weight (a tied output
    projection: it keeps reading the float table, and gets its own quantized copy from its layer spec)."""
    lookups = [u for u in weight.users if _is_lookup(u, weight)]
    tied = [u for u in weight.users if u.op == "call_function" and u.target is aten.linear.default
            and u.args[1] is weight and weight not in (u.args[0], *u.args[2:])]
    return bool(lookups) and len(lookups) + len(tied) == len(weight.users)


def _with_dtype(val: Any, dtype: torch.dtype, last: int | None = None) -> Any:
    """The output meta of a rewritten lookup: the original's shape (last dim ``last``) in ``dtype``."""
    if not isinstance(val, torch.Tensor):
        return None
    if last is not None:
        val = val[..., :last]
    return val.to(dtype)


class QuantizeEmbeddings(Pass):
    name = "quantize_embeddings"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config: QuantConfig = ctx.config or QuantConfig()
        if config.embeddings == "float":
            return PassResult(gm, {})
        if not ctx.notes.get("int8_embeddings", True):
            ctx.notes.setdefault("warnings", []).append(
                f"embeddings stay float: target {ctx.notes.get('target')!r} runs int8 tensors only between Q/DQ")
            return PassResult(gm, {})
        graph = gm.graph
        stored = ctx.qparams  # re-applying an artifact: exactly its int8 tables, with their scales
        tables = {}
        for weight in [n for n in graph.nodes if n.op == "get_attr"]:
            table = attr_tensor(gm, weight)
            if (table is None or table.ndim != 2 or not table.is_floating_point() or table.numel() < MIN_NUMEL
                    or not weight.users or not _table_users_are_lookups(weight)):
                continue
            key = f"{weight.target}.row_scale"
            if stored is None:
                codes, scale, _ = quantize_weight(table, ROW_SPEC)
            elif key in stored:
                scale = stored[key].float()
                if scale.shape != (table.shape[0],):
                    raise ArtifactError(f"{key}: {tuple(scale.shape)} scales for a table of {table.shape[0]} rows: "
                                        "the artifact was made from another model")
                codes = weight_codes(table, scale, torch.zeros(scale.shape, dtype=torch.int32), ROW_SPEC)
            else:
                continue
            scales = scale.to(table.dtype).reshape(-1, 1)
            tables[weight] = (table, codes, scales, codes.to(table.dtype) * scales)
        if not tables:
            return PassResult(gm, {})
        alone = None
        if stored is None:
            fits, alone = self._fits_the_budget(gm, ctx, config, tables)
            if not fits:
                return PassResult(gm, {})
        qparams: dict[str, torch.Tensor] = ctx.notes.setdefault("qparams", {})
        report: dict[str, dict[str, Any]] = {}
        for weight, (table, codes, scales, restored) in tables.items():
            name = str(weight.target)
            qparams[f"{name}.row_scale"] = scales.reshape(-1).float()
            # the table's get_attr precedes its lookups
            codes_node = constant_node(gm, f"{name}_int8", codes, weight, weight, kind="int8_rows")
            scales_node = constant_node(gm, f"{name}_row_scale", scales, weight, weight, kind="row_scale")
            for lookup in [u for u in weight.users if _is_lookup(u, weight)]:
                ids = lookup.args[1]
                with graph.inserting_before(lookup):
                    rows = graph.call_function(aten.embedding.default, (codes_node, ids))
                    row_scales = graph.call_function(aten.embedding.default, (scales_node, ids))
                    as_float = graph.call_function(aten._to_copy.default, (rows,), {"dtype": table.dtype})
                    out = graph.call_function(aten.mul.Tensor, (as_float, row_scales))
                val = lookup.meta.get("val")
                rows.meta["val"] = _with_dtype(val, torch.int8)
                row_scales.meta["val"] = _with_dtype(val, table.dtype, last=1)
                as_float.meta["val"] = val
                out.meta["val"] = val
                for n in (rows, row_scales, as_float, out):
                    n.meta[meta.QROLE] = "int8_embedding"
                lookup.replace_all_uses_with(out)
                graph.erase_node(lookup)
            report[name] = {"rows": int(table.shape[0]), "dim": int(table.shape[1]),
                            "float_mb": round(table.numel() * table.element_size() / 1e6, 2),
                            "int8_mb": round((codes.numel() + scales.numel() * scales.element_size()) / 1e6, 2),
                            "sqnr_db": round(sqnr(table.float(), restored.float()), 1)}
        delete_unused_attrs(gm)
        gm.recompile()
        ctx.notes["embeddings"] = {"tables": report, "alone_sqnr_db": alone}
        return PassResult(gm, {"tables_int8": len(report),
                               "mb_saved": round(sum(r["float_mb"] - r["int8_mb"] for r in report.values()), 1)})

    @staticmethod
    def _fits_the_budget(gm: fx.GraphModule, ctx: PassContext, config: QuantConfig,
                         tables: dict[fx.Node, tuple[torch.Tensor, ...]]) -> tuple[bool, float | None]:
        """(whether the int8 tables fit, the model's SQNR with them alone). Without a fidelity target: yes.
        With one: run the fidelity batches with float and with int8 tables (every layer still float), keep
        the float results for the planner, and compare."""
        if not (config.plans_automatically or config.sensitivity) or ctx.calibration is None:
            return True, None
        batches = fidelity_batches(ctx, config.fidelity_batches)
        if not batches:
            return True, None
        signature = ctx.notes["signature"]

        def run() -> tuple[list[list[torch.Tensor]], float | None]:
            with torch.no_grad():
                outs = [float_outputs(gm(*b)) for b in batches]
                if config.fidelity_fn is None:
                    return outs, None
                return outs, float(config.fidelity_fn(
                    lambda *a, **k: signature.unflatten(list(gm(*signature.flatten_call(a, k))))))

        reference, float_metric = run()
        ctx.notes["float_outputs"] = reference
        if float_metric is not None:
            ctx.notes["float_fidelity"] = float_metric
        originals = [table.clone() for table, *_ in tables.values()]
        try:
            with torch.no_grad():  # the tables as the rewrite reads them, in place for one run
                for table, _, _, restored in tables.values():
                    table.copy_(restored)
            outs, metric = run()
        finally:
            with torch.no_grad():
                for (table, *_), original in zip(tables.values(), originals, strict=True):
                    table.copy_(original)
        alone = round(outputs_sqnr_db(reference, outs), 1)
        if config.fidelity_fn is not None:
            cost = float_metric - metric  # type: ignore[operator]
            fits, why = cost <= config.fidelity_tolerance / 10, (
                f"int8 tables alone cost {cost:.4g} of the metric, more than a tenth of the tolerance "
                f"{config.fidelity_tolerance:g}")
        else:
            target = config.target_sqnr_db if config.target_sqnr_db is not None else -float("inf")
            fits, why = alone >= target + MARGIN_DB, (
                f"int8 tables alone give {alone:.1f} dB, less than {MARGIN_DB:g} dB above the {target:g} dB target")
        if not fits:
            ctx.notes.setdefault("warnings", []).append(f"embeddings stay float: {why}")
        return fits, alone
