"""ATen ops (what ``torch.export`` graphs contain): entries for the ops the functional rules cover.

An entry is registered for an ``OpOverloadPacket`` (``torch.ops.aten.linear``); a node's target is
an ``OpOverload`` (``torch.ops.aten.linear.default``), which the registry looks up through its
packet. Most ATen ops take their arguments in the order of the ``torch`` / ``F`` function, so
they reuse its rule; batch norm and embedding differ and say where their tensors are.
"""

from __future__ import annotations

from typing import Any

import torch

from fxmerge.ops.attention import sdpa
from fxmerge.ops.conv_linear import functional_conv, functional_linear
from fxmerge.ops.elementwise import binary_rule, preserve_rule
from fxmerge.ops.embedding import embedding_rule
from fxmerge.ops.norm import ATEN_BATCH_NORM_ARGUMENTS, batch_norm_rule, functional_group_norm, functional_layer_norm
from fxmerge.ops.pool_reduce import reduce_rule
from fxmerge.ops.registry import BatchNormSchema, builtin
from fxmerge.ops.shape import expand_rule, permute_rule, reshape_rule, split_rule

FAMILY = "aten"
aten = torch.ops.aten


def _batch_norm_with_statistics(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``_native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum,
    eps) -> (output, save_mean, save_rstd)``: the saved statistics are empty in inference."""
    out = _BATCH_NORM(ctx, node, args, kwargs)
    shapes = ctx.meta_shape(node)
    rest = tuple(ctx.opaque(s) for s in shapes[1:]) if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], tuple) else ()
    return (out,) + rest


def _cat(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.cat(node, args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))


_BATCH_NORM = batch_norm_rule(((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
_ATEN_RUNNING = ((3, "running_mean"), (4, "running_var"))

builtin(aten.linear, name="aten.linear", family=FAMILY, rule=functional_linear, layer=True, consumes=True)
for _spatial, _op in ((1, aten.conv1d), (2, aten.conv2d), (3, aten.conv3d)):
    builtin(_op, name=f"aten.conv{_spatial}d", family=FAMILY, rule=functional_conv(_spatial), layer=True, consumes=True)
builtin(aten.layer_norm, name="aten.layer_norm", family=FAMILY, rule=functional_layer_norm)
builtin(aten.group_norm, name="aten.group_norm", family=FAMILY, rule=functional_group_norm)
# batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
builtin(
    aten.batch_norm, name="aten.batch_norm", family=FAMILY, rule=_BATCH_NORM, running_stats=_ATEN_RUNNING,
    batch_norm=BatchNormSchema(ATEN_BATCH_NORM_ARGUMENTS + ("cudnn_enabled",)),
)
builtin(
    aten._native_batch_norm_legit_no_training, name="aten._native_batch_norm_legit_no_training", family=FAMILY,
    rule=_batch_norm_with_statistics, running_stats=_ATEN_RUNNING,
    batch_norm=BatchNormSchema(
        ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
        returns_tuple=True, has_training_flag=False,
    ),
)
# the training forms (out, save_mean, save_invstd), as in graphs exported in train mode
builtin(
    aten._native_batch_norm_legit, aten.native_batch_norm, name="aten.native_batch_norm", family=FAMILY,
    rule=_batch_norm_with_statistics, running_stats=_ATEN_RUNNING,
    batch_norm=BatchNormSchema(ATEN_BATCH_NORM_ARGUMENTS, returns_tuple=True),
)
# embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse): the table comes first
builtin(aten.embedding, name="aten.embedding", family=FAMILY, rule=embedding_rule(0))
builtin(
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.sigmoid, aten.tanh, aten.hardswish,
    aten.hardsigmoid, aten.hardtanh, aten.leaky_relu, aten.elu, aten.softmax, aten._softmax,
    aten.log_softmax, aten.clone, aten.contiguous, aten.alias, aten.exp, aten.rsqrt, aten.sqrt, aten.neg,
    aten.abs, aten.erf, aten.dropout, aten.alpha_dropout, aten.feature_dropout, aten.clamp,
    name="aten unary", family=FAMILY, rule=preserve_rule,
)
builtin(
    aten.add, aten.add_, aten.sub, aten.mul, aten.mul_, aten.div, aten.pow, aten.maximum, aten.minimum,
    aten.where, name="aten binary", family=FAMILY, rule=binary_rule,
)
builtin(aten.cat, aten.concat, name="aten.cat", family=FAMILY, rule=_cat)
builtin(aten.view, aten.reshape, aten._unsafe_view, name="aten.view/reshape", family=FAMILY, rule=reshape_rule(True))
builtin(aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze, name="aten.flatten/squeeze", family=FAMILY, rule=reshape_rule(False))
builtin(aten.permute, name="aten.permute", family=FAMILY, rule=permute_rule("permute"))
builtin(aten.transpose, name="aten.transpose", family=FAMILY, rule=permute_rule("transpose"))
builtin(aten.t, name="aten.t", family=FAMILY, rule=permute_rule("t"))
builtin(aten.split, aten.split_with_sizes, aten.chunk, name="aten.split", family=FAMILY, rule=split_rule(False))
builtin(aten.unbind, name="aten.unbind", family=FAMILY, rule=split_rule(True))
builtin(aten.expand, name="aten.expand", family=FAMILY, rule=expand_rule(True))
builtin(aten.mean, name="aten.mean", family=FAMILY, rule=reduce_rule("mean"))
builtin(aten.sum, name="aten.sum", family=FAMILY, rule=reduce_rule("sum"))
builtin(aten.scaled_dot_product_attention, name="aten.scaled_dot_product_attention", family=FAMILY, rule=sdpa)


def _matmul(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.matmul(node, args[0], args[1])


builtin(aten.matmul, aten.bmm, aten.mm, name="aten.matmul", family=FAMILY, rule=_matmul)
