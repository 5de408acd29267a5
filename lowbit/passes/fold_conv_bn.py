"""Fold eval-mode BatchNorm into the preceding convolution or linear.

    std = sqrt(var + eps)
    W' = W * (gamma / std)          (scaled along the output channel, axis 0)
    b' = (b - mean) * gamma / std + beta

Handles conv1d/conv2d -> batch_norm and linear -> batch_norm1d on 2-D activations ([N, C]: the BN
channel is the linear's output feature). The conv/linear must be the BN's only input user, with constant
weights, and the BN must be in inference mode (training=False).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lowbit.compiler.graph import attr_tensor, constant_node, delete_unused_attrs, tensor_meta
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default}
BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def _bn_params(node: fx.Node) -> tuple[fx.Node, ...] | None:
    """(input, weight, bias, mean, var, eps) of an inference batch norm, or None."""
    if node.target is aten.batch_norm.default:
        x, w, b, mean, var, training, _momentum, eps, _cudnn = node.args
        if training:
            return None
        return x, w, b, mean, var, eps
    x, w, b, mean, var, _momentum, eps = node.args
    return x, w, b, mean, var, eps


def fold_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None, beta: torch.Tensor | None,
    mean: torch.Tensor, var: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The math of the fold, on tensors (computed in float64, returned in the weight's dtype)."""
    std = torch.sqrt(var.double() + eps)
    g = gamma.double() if gamma is not None else torch.ones_like(std)
    be = beta.double() if beta is not None else torch.zeros_like(std)
    b = bias.double() if bias is not None else torch.zeros_like(std)
    factor = g / std
    w = weight.double() * factor.reshape([-1] + [1] * (weight.ndim - 1))
    return w.to(weight.dtype), ((b - mean.double()) * factor + be).to(weight.dtype)


class FoldConvBatchNorm(Pass):
    name = "fold_conv_bn"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = 0
        for bn in list(gm.graph.nodes):
            if bn.op != "call_function" or bn.target not in BN_OPS:
                continue
            params = _bn_params(bn)
            if params is None:
                continue
            x, gamma_n, beta_n, mean_n, var_n, eps = params
            if not self._foldable_producer(x, bn):
                continue
            layer = x
            w = attr_tensor(gm, layer.args[1])
            b = attr_tensor(gm, layer.args[2]) if len(layer.args) > 2 else None
            tensors = [attr_tensor(gm, n) if n is not None else None for n in (gamma_n, beta_n, mean_n, var_n)]
            if w is None or tensors[2] is None or tensors[3] is None:
                continue
            if len(layer.args) > 2 and layer.args[2] is not None and b is None:
                continue  # a bias computed at runtime: leave it
            new_w, new_b = fold_weights(w, b, tensors[0], tensors[1], tensors[2], tensors[3], float(eps))
            prefix = layer.args[1].target
            w_node = constant_node(gm, f"{prefix}_bnfold", new_w, layer)
            b_node = constant_node(gm, f"{prefix}_bnfold_bias", new_b, layer)
            args = list(layer.args)
            while len(args) < 3:
                args.append(None)
            args[1], args[2] = w_node, b_node
            layer.args = tuple(args)
            self._replace_bn(gm.graph, bn, layer)
            folded += 1
        delete_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, {"bn_folded": folded} if folded else {})

    @staticmethod
    def _foldable_producer(x: object, bn: fx.Node) -> bool:
        if not isinstance(x, fx.Node) or x.op != "call_function" or len(x.users) != 1:
            return False
        if x.target not in CONVS and x.target is not aten.linear.default:
            return False  # e.g. a relu or hardswish: one argument, no weight to fold into
        if not isinstance(x.args[1], fx.Node) or x.args[1].op != "get_attr":
            return False
        if x.target in CONVS:
            return True
        if x.target is aten.linear.default:
            out = tensor_meta(x)
            return out is not None and out.ndim == 2  # BN1d over [N, C]: C is the linear's output
        return False

    @staticmethod
    def _replace_bn(graph: fx.Graph, bn: fx.Node, layer: fx.Node) -> None:
        if bn.target is aten.batch_norm.default:
            bn.replace_all_uses_with(layer)
        else:  # _native_batch_norm_legit_no_training returns (out, mean, rstd): only out may be used
            for user in list(bn.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(layer)
                    graph.erase_node(user)
        if not bn.users:
            graph.erase_node(bn)
