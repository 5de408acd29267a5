"""Multi-head attention for the ONNX engines: SDPA with its head reshapes becomes one attention op.

Exported as is, ``scaled_dot_product_attention`` turns into MatMul/Softmax plus Where/IsNaN guards, which
cost ONNX Runtime as much as the int8 projections; its transformer optimizer cannot fuse attention in a
QDQ graph. This pass matches

    q/k/v [B, S, H*D] -> view [B, S, H, D] -> transpose(1, 2) -> sdpa(q, k, v, mask) [B, H, S, D]
      -> (reshape) -> transpose(1, 2) -> reshape [B, S, H*D]

and replaces it with ``lowbit::attention(q, k, v, mask, H, scale) -> [B, S, H*D]``: in torch, the same
SDPA (so the graph's numbers do not change); in ONNX, either the standard ``Attention`` op (opset 23),
which ONNX Runtime runs as one fused CPU kernel, or the plain MatMul/Softmax pattern OpenVINO fuses into
its (int8 when q and k are quantized) MHA kernel.
"""

from __future__ import annotations

import torch
from torch import fx

from lowbit.compiler.graph import tensor_meta
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.compiler.patterns import heads_input, merged_output

aten = torch.ops.aten


@torch.library.custom_op("lowbit::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, num_heads: int,
              scale: float) -> torch.Tensor:
    """[B, S, H*D] x3 -> [B, S, H*D]; ``mask`` broadcasts to [B, H, S, S] (bool: True attends)."""
    b, s, hidden = q.shape
    d = hidden // num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, x.shape[1], num_heads, d).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, s, hidden)


@attention.register_fake
def _(q, k, v, mask, num_heads, scale):
    return torch.empty_like(q)


def onnx_attention(q, k, v, mask, num_heads: int, scale: float):  # noqa: ANN001, ANN201 - onnxscript types
    """ONNX translation: the standard Attention op (opset 23) on 3-D [B, S, H*D] inputs, boolean mask."""
    from onnxscript import opset23 as op

    out = op.Attention(q, k, v, mask, q_num_heads=num_heads, kv_num_heads=num_heads, scale=scale)
    return out[0] if isinstance(out, (tuple, list)) else out


def onnx_attention_matmuls(q, k, v, mask, num_heads: int, scale: float):  # noqa: ANN001, ANN201
    """ONNX translation as plain ops, the MultiHeadAttention pattern OpenVINO fuses (the one its ONNX
    Attention import and a plain SDPA export both wrap in an IsNaN/Select guard it runs separately):

        Reshape/Transpose q, k, v -> MatMul(q, k^T) * scale + bias -> Softmax -> MatMul(., v) * valid
          -> Transpose/Reshape [B, S, H*D]

    ``bias`` is 0 where ``mask`` attends and the lowest float32 elsewhere. SDPA gives a query row that
    attends to nothing zeros (where the softmax would spread evenly over the masked keys): ``valid``, 1 if
    the row attends to any key and 0 if not, keeps that exact. A Q/DQ pair on q and k ahead of this (the
    query/key projections' output quantizers) lets OpenVINO run Q K^T as an int8 matmul."""
    from onnxscript import FLOAT
    from onnxscript import opset21 as op

    split = op.Constant(value_ints=[0, 0, num_heads, -1])
    qh = op.Transpose(op.Reshape(q, split), perm=[0, 2, 1, 3])
    kt = op.Transpose(op.Reshape(k, split), perm=[0, 2, 3, 1])
    vh = op.Transpose(op.Reshape(v, split), perm=[0, 2, 1, 3])
    scores = op.Mul(op.MatMul(qh, kt), op.Constant(value_float=scale))
    if mask is not None:
        lowest = op.Constant(value_float=float(torch.finfo(torch.float32).min))
        scores = op.Add(scores, op.Where(mask, op.Constant(value_float=0.0), lowest))
    out = op.MatMul(op.Softmax(scores, axis=-1), vh)
    if mask is not None:
        out = op.Mul(out, op.ReduceMax(op.Cast(mask, to=FLOAT.dtype), op.Constant(value_ints=[-1]), keepdims=1))
    return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


CUSTOM_TRANSLATIONS = {torch.ops.lowbit.attention.default: onnx_attention}
MATMUL_TRANSLATIONS = {torch.ops.lowbit.attention.default: onnx_attention_matmuls}


def _erase_chain(graph: fx.Graph, node: fx.Node, stop: fx.Node) -> None:
    """Erase the now-unused chain node -> ... -> stop (eliminate_dead_code keeps SDPA: it may do dropout)."""
    while not node.users:
        prev = node.args[0] if node is not stop else None
        graph.erase_node(node)
        if node is stop or not isinstance(prev, fx.Node):
            return
        node = prev


class FuseAttention(Pass):
    name = "fuse_attention"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fused = 0
        for sdpa in list(gm.graph.nodes):
            if sdpa.target is not aten.scaled_dot_product_attention.default:
                continue
            args = list(sdpa.args) + [None] * (4 - len(sdpa.args))
            q, k, v, mask = args[:4]
            if sdpa.kwargs.get("is_causal") or sdpa.kwargs.get("dropout_p", 0.0) or len(sdpa.args) > 4:
                continue
            parts = [heads_input(x) for x in (q, k, v)]
            out = merged_output(sdpa)
            mv = tensor_meta(mask) if isinstance(mask, fx.Node) else None
            if any(p is None for p in parts) or out is None or (mask is not None and (mv is None or mv.dtype != torch.bool)):
                continue
            heads, dim = parts[0][1], parts[0][2]
            if any(p[1] != heads or p[2] != dim for p in parts):
                continue
            scale = sdpa.kwargs.get("scale") or dim**-0.5
            with gm.graph.inserting_before(out):
                mha = gm.graph.call_function(
                    torch.ops.lowbit.attention.default, (parts[0][0], parts[1][0], parts[2][0], mask, heads, float(scale)))
            mha.meta["val"] = out.meta.get("val")
            out.replace_all_uses_with(mha)
            _erase_chain(gm.graph, out, stop=sdpa)
            fused += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, {"attention_fused": fused} if fused else {})
