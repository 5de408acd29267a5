"""Lower observers and weight specs to ``quantized_decomposed`` quantize/dequantize ops.

- A static activation observer becomes ``quantize_per_tensor`` followed by one ``dequantize_per_tensor``
  per consumer (a dedicated DQ per consumer is what ONNX Runtime's and OpenVINO's QDQ fusions match).
- A weight becomes an int8 buffer (int4 codes are stored unpacked in int8) with its scales, read
  through ``dequantize_per_tensor`` / ``dequantize_per_channel`` / ``dequantize_per_channel_group``.
- A dynamic per-token layer gets ``choose_qparams_per_token -> quantize_per_token -> dequantize_per_token``
  on its input, shared by the layers reading that input (per-token scales depend on the input alone). With an outlier threshold (``w8a8_llm_int8``, LLM.int8()) the input is split first: the
  columns where any |x| of the call exceeds it bypass the quantizer and are added back after the dequantize,
  ``x' = DQ(Q(x - x_o)) + x_o`` with ``x_o = x * [max_tokens |x_j| > t]``: the outliers meet the int8 weight's
  dequantized columns in float, as bitsandbytes does.
- A static W8A8 conv's bias is put on its int32 accumulator grid, ``round(b / (s_x s_w)) s_x s_w``, as the
  integer convs of the engines add it (so they agree with this reference to the code).

The qparams go to ``ctx.notes['qparams']`` (what an artifact stores) and a per-layer summary to
``ctx.notes['layers']`` (what the report prints). With ``ctx.qparams`` set (re-applying an artifact),
stored weight codes and scales are used instead of quantizing the model's weights again; a weight that GPTQ or
AWQ rounded (``ctx.notes['weight_qparams']``: its scales and zero points, the weight left on their grid) keeps
their qparams.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from lowbit.compiler import meta
from lowbit.compiler.graph import (
    QUANTIZABLE,
    annotated_nodes,
    attr_tensor,
    constant_node,
    delete_unused_attrs,
)
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.errors import ArtifactError
from lowbit.passes.calibrate import qparam_key
from lowbit.passes.insert_observers import observer_nodes
from lowbit.runtime.qparams import dequantize_weight, quantize_weight, sqnr, weight_codes
from lowbit.runtime.spec import QuantSpec

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
TORCH_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8}


def _call(graph: fx.Graph, target: Any, args: tuple[Any, ...], role: str,
          kwargs: dict[str, Any] | None = None) -> fx.Node:
    node = graph.call_function(target, args, kwargs)
    node.meta[meta.QROLE] = role
    return node


class LowerQDQ(Pass):
    name = "lower_qdq"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        qparams: dict[str, torch.Tensor] = ctx.notes.setdefault("qparams", {})
        layers: dict[str, dict[str, Any]] = ctx.notes.setdefault("layers", {})
        stats = {"act_qdq": 0, "weights_quantized": 0, "dynamic_inputs": 0, "conv_biases_on_int32_grid": 0}
        graph = gm.graph

        # 1. activations: observers -> Q + one DQ per consumer -----------------------------------------
        for node, obs in observer_nodes(gm):
            scale, zp = obs.calculate_qparams()
            spec: QuantSpec = obs.spec
            dtype = TORCH_DTYPES[spec.dtype]
            for observed in node.meta[meta.OBSERVES]:
                key = qparam_key(observed)
                qparams[f"{key}.scale"] = torch.tensor(scale, dtype=torch.float32)
                qparams[f"{key}.zero_point"] = torch.tensor(zp, dtype=torch.int32)
                layer, role = observed.rsplit(":", 1)
                layers.setdefault(layer, {})[f"{role}_scale"] = scale
                layers[layer][f"{role}_zero_point"] = zp
            x = node.args[0]
            qargs = (scale, zp, spec.qmin, spec.qmax, dtype)
            with graph.inserting_after(node):
                q = _call(graph, qd.quantize_per_tensor.default, (x, *qargs), "act_q")
            for user in list(node.users):
                with graph.inserting_before(user):
                    dq = _call(graph, qd.dequantize_per_tensor.default, (q, *qargs), "act_dq")
                dq.meta["val"] = node.meta.get("val")
                user.replace_input_with(node, dq)
            graph.erase_node(node)
            delattr(gm, str(node.target))
            stats["act_qdq"] += 1

        # 2. weights and dynamic inputs ----------------------------------------------------------------
        dynamic: dict[tuple[fx.Node, float | None], fx.Node] = {}  # (input, outlier threshold) -> its dequantize
        for layer in list(annotated_nodes(gm)):
            spec = layer.meta[meta.SPEC]
            name = layer.meta[meta.LAYER]
            info = layers.setdefault(name, {})
            info.update(op=QUANTIZABLE[layer.target], scheme=spec.scheme)
            w_node = layer.args[1]
            w = attr_tensor(gm, w_node)
            info["weight_shape"] = list(w.shape) if w is not None else None
            act = spec.activation
            if spec.weight is not None and w is not None:
                dq = self._lower_weight(gm, layer, name, w, spec.weight, ctx, qparams, info)
                layer.replace_input_with(w_node, dq)
                stats["weights_quantized"] += 1
                if act is not None and not act.dynamic and QUANTIZABLE[layer.target].startswith("conv"):
                    stats["conv_biases_on_int32_grid"] += self._round_conv_bias(gm, layer, name, qparams)
            if act is not None and act.dynamic and isinstance(layer.args[0], fx.Node):
                x = original = layer.args[0]
                shared = dynamic.get((original, act.outlier_threshold))
                if shared is not None:  # Q, K and V (gate and up) read one input: one per-token quantizer
                    layer.replace_input_with(original, shared)
                    stats["dynamic_inputs"] += 1
                    continue
                outliers = None
                if act.outlier_threshold is not None:  # LLM.int8(): outlier columns go around the quantizer
                    x, outliers = self._split_outliers(graph, layer, original, float(act.outlier_threshold))
                    stats["llm_int8_inputs"] = stats.get("llm_int8_inputs", 0) + 1
                with graph.inserting_before(layer):
                    cq = _call(graph, qd.choose_qparams_per_token.default, (x, torch.int8), "token_qparams")
                    s = _call(graph, operator.getitem, (cq, 0), "token_scale")
                    z = _call(graph, operator.getitem, (cq, 1), "token_zero_point")
                    q = _call(graph, qd.quantize_per_token.default, (x, s, z, -128, 127, torch.int8), "token_q")
                    dq = _call(graph, qd.dequantize_per_token.default,
                               (q, s, z, -128, 127, torch.int8, torch.float32), "token_dq")
                dq.meta["val"] = x.meta.get("val")
                if outliers is not None:
                    with graph.inserting_before(layer):
                        dq = _call(graph, aten.add.Tensor, (dq, outliers), "llm_int8_join")
                    dq.meta["val"] = original.meta.get("val")
                layer.replace_input_with(original, dq)
                dynamic[(original, act.outlier_threshold)] = dq
                stats["dynamic_inputs"] += 1
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {k: v for k, v in stats.items() if v})

    @staticmethod
    def _lower_weight(
        gm: fx.GraphModule, layer: fx.Node, name: str, w: torch.Tensor, spec: QuantSpec, ctx: PassContext,
        qparams: dict[str, torch.Tensor], info: dict[str, Any],
    ) -> fx.Node:
        key = f"{name}.weight"
        if ctx.qparams is not None:
            try:
                scale, zp = (ctx.qparams[f"{key}.{k}"] for k in ("scale", "zero_point"))
                # an ONNX artifact keeps its int8 weights in model.onnx only: the codes follow from the
                # model's weight and the stored scales (the same codes, for the same model)
                q = ctx.qparams[f"{key}.q"] if f"{key}.q" in ctx.qparams else weight_codes(w, scale, zp, spec)
            except KeyError as e:
                raise ArtifactError(f"the artifact's qparams have no entry {e.args[0]!r}") from e
            if tuple(q.shape) != tuple(w.shape):
                raise ArtifactError(f"layer {name!r}: stored weight has shape {tuple(q.shape)}, the model's has "
                                    f"{tuple(w.shape)}: the artifact was made from another model")
        elif key in ctx.notes.get("weight_qparams", {}):
            # GPTQ / AWQ chose this weight's qparams and left it on their grid: the codes are exact
            scale, zp = ctx.notes["weight_qparams"][key]
            q = weight_codes(w, scale, zp, spec)
        else:
            q, scale, zp = quantize_weight(w, spec)
        info["weight_method"] = ctx.notes.get("weight_methods", {}).get(name, "rtn")
        qparams.update({f"{key}.q": q, f"{key}.scale": scale, f"{key}.zero_point": zp})
        info["weight_granularity"] = spec.granularity + (f"/{spec.group_size}" if spec.group_size else "")
        info["weight_bits"] = spec.bits
        # GPTQ / AWQ left the weight on (or clipped it toward) its grid: they measured against the weight before
        info["weight_sqnr_db"] = ctx.notes.get("weight_sqnr", {}).get(name, sqnr(w, dequantize_weight(q, scale, zp, spec)))
        graph = gm.graph
        dtype = TORCH_DTYPES[spec.dtype]
        q_node = constant_node(gm, f"{name}_weight_q", q, layer)
        info["weight_attr"] = str(q_node.target)  # backends map engine kernels back to layers by it
        with graph.inserting_before(layer):
            if spec.granularity == "per_tensor":
                dq = _call(graph, qd.dequantize_per_tensor.default,
                           (q_node, float(scale), int(zp), spec.qmin, spec.qmax, dtype), "weight_dq")
            else:
                s_node = constant_node(gm, f"{name}_weight_scale", scale, layer)
                z_node = constant_node(gm, f"{name}_weight_zero_point", zp, layer)
                with graph.inserting_before(layer):
                    if spec.granularity == "per_channel":
                        dq = _call(graph, qd.dequantize_per_channel.default,
                                   (q_node, s_node, z_node, spec.axis or 0, spec.qmin, spec.qmax, dtype), "weight_dq")
                    else:
                        dq = _call(graph, qd.dequantize_per_channel_group.default,
                                   (q_node, s_node, z_node, spec.qmin, spec.qmax, dtype, int(spec.group_size or 0),
                                    torch.float32), "weight_dq")
        dq.meta["val"] = w
        return dq

    @staticmethod
    def _split_outliers(graph: fx.Graph, layer: fx.Node, x: fx.Node, threshold: float) -> tuple[fx.Node, fx.Node]:
        """LLM.int8()'s decomposition as graph ops: (inliers, outliers) with x = inliers + outliers, the outliers
        the input columns where any |x| of the call exceeds ``threshold`` (``qparams.llm_int8_split``)."""
        val = x.meta.get("val")
        ndim = val.ndim if isinstance(val, torch.Tensor) else 2
        with graph.inserting_before(layer):
            absx = _call(graph, aten.abs.default, (x,), "llm_int8_abs")
            colmax = _call(graph, aten.amax.default, (absx, list(range(ndim - 1))), "llm_int8_colmax")
            mask = _call(graph, aten.gt.Scalar, (colmax, threshold), "llm_int8_mask")
            maskf = _call(graph, aten._to_copy.default, (mask,), "llm_int8_mask",
                          {"dtype": val.dtype if isinstance(val, torch.Tensor) else torch.float32})
            outliers = _call(graph, aten.mul.Tensor, (x, maskf), "llm_int8_outliers")
            inliers = _call(graph, aten.sub.Tensor, (x, outliers), "llm_int8_inliers")
        for n in (outliers, inliers):
            n.meta["val"] = val
        return inliers, outliers

    @staticmethod
    def _round_conv_bias(gm: fx.GraphModule, layer: fx.Node, name: str, qparams: dict[str, torch.Tensor]) -> int:
        """Put a static W8A8 conv's bias on its int32 accumulator grid: b' = round(b / (s_x s_w)) s_x s_w.

        Integer convs (ONNX Runtime's QLinearConv, TensorRT's int8 conv) add the bias as int32 at scale
        s_x * s_w[c], and requantize the sum: a float bias would put the reference half a bias step off
        the engines, enough to flip an output code now and then (5 in 10,000 on ORT). Linear engines add the
        bias in float after the int32 GEMM (MatMulIntegerToFloat), so linear biases stay as they are.
        Returns 1 if the bias was rounded."""
        x = layer.args[0]
        bias = layer.args[2] if len(layer.args) > 2 else None
        b = attr_tensor(gm, bias)
        if b is None or not (isinstance(x, fx.Node) and x.target is qd.dequantize_per_tensor.default):
            return 0
        step = float(x.args[1]) * qparams[f"{name}.weight.scale"].double()  # per output channel
        rounded = (torch.round(b.double() / step) * step).to(b.dtype)
        layer.replace_input_with(bias, constant_node(gm, f"{name}_bias_int32_grid", rounded, layer))
        return 1

    def postconditions(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        problems = [f"observer {n.name} was not lowered" for n, _ in observer_nodes(gm)]
        for layer in annotated_nodes(gm):
            spec = layer.meta[meta.SPEC]
            w = layer.args[1]
            if spec.weight is not None and not (isinstance(w, fx.Node) and w.meta.get(meta.QROLE) == "weight_dq"):
                problems.append(f"layer {layer.meta[meta.LAYER]}: weight is not read through a dequantize")
        return problems
