"""Multi-head attention's head split and merge, as torch.export writes them; shared by the smooth_quant
pass (1/s for the attention-output projection folds into the value projection) and the ONNX attention
fusion.

    split:  x [B, S, H*D] -> view [B, S, H, D] -> transpose(1, 2)            -> [B, H, S, D]
    merge:  sdpa [B, H, S, D] -> (view 4-D) -> transpose(1, 2) -> view 3-D   -> [B, S, H*D]

Channel ``h*D + d`` of the merged output comes from channel ``h*D + d`` of the value input ``x``: the
attention mixes tokens, never channels, so a per-channel factor on V's channels reappears unchanged on
the merged output's channels.
"""

from __future__ import annotations

import torch
from torch import fx

from lowbit.compiler.graph import tensor_meta

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SDPA = aten.scaled_dot_product_attention.default


def heads_input(node: object) -> tuple[fx.Node, int, int] | None:
    """transpose(view(x [B,S,H*D], [B,S,H,D]), 1, 2) -> (x, H, D); None if ``node`` is not a head split."""
    if not isinstance(node, fx.Node) or node.target is not aten.transpose.int or tuple(node.args[1:]) != (1, 2):
        return None
    view = node.args[0]
    if not isinstance(view, fx.Node) or view.target not in VIEWS or len(view.users) != 1:
        return None
    x, val = view.args[0], tensor_meta(view)
    xv = tensor_meta(x) if isinstance(x, fx.Node) else None
    if val is None or xv is None or val.ndim != 4 or xv.ndim != 3:
        return None
    heads, dim = val.shape[2], val.shape[3]
    if not isinstance(heads, int) or not isinstance(dim, int) or xv.shape[2] != heads * dim:
        return None
    return x, heads, dim


def merged_output(sdpa: fx.Node) -> fx.Node | None:
    """Follow sdpa -> (view 4-D) -> transpose(1, 2) -> view 3-D through single users; the final view."""
    node = sdpa
    seen_transpose = False
    while len(node.users) == 1:
        user = next(iter(node.users))
        val = tensor_meta(user)
        if val is None:
            return None
        if user.target is aten.transpose.int and tuple(user.args[1:]) == (1, 2) and not seen_transpose:
            seen_transpose = True
        elif user.target in VIEWS and val.ndim == 4 and not seen_transpose:
            pass
        elif user.target in VIEWS and val.ndim == 3 and seen_transpose:
            return user
        else:
            return None
        node = user
    return None


def attention_value_source(x: fx.Node) -> fx.Node | None:
    """If ``x`` is the merged output of an SDPA (see ``merged_output``), the 3-D tensor its value input
    was split from (``heads_input``); else None. Its channels map one to one onto ``x``'s."""
    node = x
    for _ in range(3):  # view 3-D <- transpose <- (view 4-D) <- sdpa
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
        if node.target is SDPA:
            break
    else:
        return None
    if merged_output(node) is not x:
        return None
    v = node.args[2] if len(node.args) > 2 else None
    split = heads_input(v)
    if split is None or not isinstance(v, fx.Node) or len(v.users) != 1:
        return None
    return split[0]


def attention_score_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """The 3-D tensors [B, S, H*D] split into heads (``heads_input``) as an SDPA's query or key: the two
    operands of the attention scores Q K^T. Quantizing such a tensor per tensor quantizes the split heads
    alike (a view and a transpose move no value)."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.target is not SDPA:
            continue
        for arg in node.args[:2]:
            split = heads_input(arg)
            if split is not None and isinstance(arg, fx.Node) and len(arg.users) == 1:
                out.add(split[0])
    return out


def feeds_attention_scores(node: fx.Node, max_depth: int = 16) -> bool:
    """Whether ``node``'s value reaches an SDPA as its query or key (the operands of Q K^T) through ops that
    are not another linear or attention: head splits, rotary embeddings (mul, cat, add), grouped-query
    expands. A value projection reaches it as the third argument only."""
    frontier, seen = [node], {node}
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.target is SDPA:
                    if any(a is n for a in user.args[:2]):
                        return True
                    continue
                if user in seen or user.target in (aten.linear.default, aten.matmul.default, aten.bmm.default):
                    continue
                seen.add(user)
                nxt.append(user)
        frontier = nxt
    return False


ADDS = {aten.add.Tensor, aten.add_.Tensor}


def residual_adds(gm: fx.GraphModule) -> list[fx.Node]:
    """Element-wise adds of two 4-D floating-point feature maps of one shape: a CNN's residual joins.
    (A transformer's residual, 3-D and into a LayerNorm, is not matched.)"""
    out = []
    for node in gm.graph.nodes:
        if node.target not in ADDS or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        a, b = node.args[:2]
        va = tensor_meta(a) if isinstance(a, fx.Node) else None
        vb = tensor_meta(b) if isinstance(b, fx.Node) else None
        if va is None or vb is None or va.ndim != 4 or va.shape != vb.shape or not va.dtype.is_floating_point:
            continue
        out.append(node)
    return out


MULS = {aten.mul.Tensor, aten.mul_.Tensor}
POOLS = {aten.mean.dim, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.avg_pool2d.default,
         aten.max_pool2d.default}


def gating_muls(gm: fx.GraphModule) -> list[fx.Node]:
    """Element-wise products of a 4-D feature map [B, C, H, W] and a gate of one shape or [B, C, 1, 1]: a
    squeeze-excite block's channel scaling (or a spatial gate). A product with a constant is not matched."""
    out = []
    for node in gm.graph.nodes:
        if node.target not in MULS or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        va = tensor_meta(a) if isinstance(a, fx.Node) else None
        vb = tensor_meta(b) if isinstance(b, fx.Node) else None
        if va is None or vb is None or va.ndim != 4 or vb.ndim != 4 or not va.dtype.is_floating_point:
            continue
        sa, sb = [str(d) for d in va.shape], [str(d) for d in vb.shape]  # symbolic dims compare by name
        if sa == sb or sa[:2] == sb[:2] and (sa[2:] == ["1", "1"] or sb[2:] == ["1", "1"]):
            out.append(node)
    return out


def feature_pools(gm: fx.GraphModule) -> list[fx.Node]:
    """Pooling of a 4-D feature map: average or max pooling, and ``mean`` over the spatial dims (a global
    average pool as torch.export writes ``AdaptiveAvgPool2d(1)``)."""
    out = []
    for node in gm.graph.nodes:
        if node.target not in POOLS or not isinstance(node.args[0], fx.Node):
            continue
        val = tensor_meta(node.args[0])
        if val is None or val.ndim != 4:
            continue
        if node.target is aten.mean.dim and sorted(d % 4 for d in node.args[1]) != [2, 3]:
            continue
        out.append(node)
    return out
