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
from fxmerge.ops.registry import BatchNormSchema, arg, builtin, eval_identities, sums
from fxmerge.ops.pool_reduce import _max_min, _pad, reduce_rule, spatial_rule
from fxmerge.ops.shape import _cat, _constant, _matmul, _none, _roll, _stack, expand_rule, permute_rule, reshape_rule, split_rule

FAMILY = "aten"
aten = torch.ops.aten


def _batch_norm_with_statistics(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``_native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum,
    eps) -> (output, save_mean, save_rstd)``: the saved statistics are empty in inference."""
    out = _BATCH_NORM(ctx, node, args, kwargs)
    shapes = ctx.meta_shape(node)
    rest = tuple(ctx.opaque(s) for s in shapes[1:]) if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], tuple) else ()
    return (out,) + rest



_BATCH_NORM = batch_norm_rule(((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
_ATEN_RUNNING = ((3, "running_mean"), (4, "running_var"))

builtin(aten.linear, name="aten.linear", family=FAMILY, rule=functional_linear, layer=True, consumes=True)
for _spatial, _op in ((1, aten.conv1d), (2, aten.conv2d), (3, aten.conv3d)):
    builtin(_op, name=f"aten.conv{_spatial}d", family=FAMILY, rule=functional_conv(_spatial), layer=True, consumes=True)
builtin(aten.layer_norm, name="aten.layer_norm", family=FAMILY, rule=functional_layer_norm, affine=((2, "weight"), (3, "bias")))
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



builtin(aten.matmul, aten.bmm, aten.mm, name="aten.matmul", family=FAMILY, rule=_matmul)


# ---------------------------------------------------------------- what torch.export adds around them




def _slice(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``slice(x, dim, start, end, step)`` is ``x[..., start:end:step]`` at ``dim``; torch.export
    writes a whole dim as ``slice(x, d, 0, 2**63 - 1)``, which keeps its channels."""
    tensor = args[0]
    if not ctx.is_tensor(tensor):
        return None
    dim = arg(args, kwargs, 1, "dim", 0) % tensor.ndim
    start, step = arg(args, kwargs, 2, "start"), arg(args, kwargs, 4, "step", 1)
    # the end may be a symbolic size (its analysis value is None): the recorded shape decides
    whole = start in (None, 0) and step in (None, 1) and ctx.meta_shape(node)[dim] == tensor.shape[dim]
    piece = slice(None) if whole else slice(0, ctx.meta_shape(node)[dim])
    return ctx.getitem(node, tensor, (slice(None),) * dim + (piece,))


def _select(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``select(x, dim, index)`` is ``x[..., index]`` at ``dim`` (BERT's pooler takes token 0)."""
    tensor = args[0]
    if not ctx.is_tensor(tensor):
        return None
    dim = arg(args, kwargs, 1, "dim", 0) % tensor.ndim
    return ctx.getitem(node, tensor, (slice(None),) * dim + (arg(args, kwargs, 2, "index", 0),))


builtin(
    aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_scalar,
    aten.sym_constrain_range_for_size, name="aten checks and shape queries", family=FAMILY, rule=_none,
)
builtin(
    aten.new_ones, aten.new_zeros, aten.new_empty, aten.new_full, aten.zeros_like, aten.ones_like,
    aten.empty_like, aten.full_like, aten.scalar_tensor, name="aten fresh constants", family=FAMILY, rule=_constant,
)
# dtype/device/layout casts, detaching and masking comparisons commute with any channel order
builtin(
    aten.to, aten._to_copy, aten.type_as, aten.detach, aten.lift_fresh_copy, aten.bitwise_not, aten.logical_not,
    aten.isnan, aten.isinf, aten.sign, aten.reciprocal, aten.log, aten.sin, aten.cos, aten.square, aten.gelu_,
    aten.relu6, aten.mish, aten.softplus, aten.hardswish_, aten.hardsigmoid_, aten.native_dropout, aten.log_sigmoid,
    name="aten casts and unary", family=FAMILY, rule=preserve_rule,
)
builtin(
    aten.ge, aten.gt, aten.le, aten.lt, aten.eq, aten.ne, aten.__and__, aten.__or__, aten.bitwise_and,
    aten.bitwise_or, aten.logical_and, aten.logical_or, aten.masked_fill, aten.rsub, aten.floor_divide,
    aten.remainder, aten.div_, aten.sub_, aten.clamp_min, aten.clamp_max, aten.addcmul, aten.addcdiv,
    name="aten comparisons and masks", family=FAMILY, rule=binary_rule,
)
builtin(aten.slice, name="aten.slice", family=FAMILY, rule=_slice)
builtin(aten.select, name="aten.select", family=FAMILY, rule=_select)

try:  # the module ExportedProgram.module() calls first to check the input guards (dims, dtypes)
    from torch.export._unlift import GuardsFn
except ImportError:  # torch versions without it
    GuardsFn = None
if GuardsFn is not None:
    builtin(GuardsFn, name="torch.export input guards", family=FAMILY, rule=_none)






# pooling and resizing: (N, C, *spatial) -> (N, C, *spatial'); the *_with_indices forms and the
# adaptive max pools return indices, which depend on the channel order, and stay without a rule
for _spatial, _ops in (
    (1, (aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d)),
    (2, (aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d,
         aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.reflection_pad2d,
         aten.replication_pad2d)),
    (3, (aten.max_pool3d, aten.avg_pool3d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d)),
):
    builtin(*_ops, name=f"aten pool/resize over {_spatial} dims", family=FAMILY, rule=spatial_rule(_spatial))
builtin(aten.pad, aten.constant_pad_nd, name="aten.pad", family=FAMILY, rule=_pad)
for _name in ("amax", "amin", "std", "var", "logsumexp", "prod", "linalg_vector_norm"):
    builtin(getattr(aten, _name), name=f"aten.{_name}", family=FAMILY, rule=reduce_rule(_name))
builtin(aten.max, aten.min, name="aten.max/min", family=FAMILY, rule=_max_min)
builtin(aten.stack, name="aten.stack", family=FAMILY, rule=_stack)
builtin(aten.roll, name="aten.roll", family=FAMILY, rule=_roll)
# rms_norm(input, normalized_shape, weight, eps): layer norm's layout, without a bias
builtin(aten.rms_norm, name="aten.rms_norm", family=FAMILY, rule=functional_layer_norm, affine=((2, "weight"),))
builtin(aten.hardtanh_, aten.leaky_relu_, aten.elu_, aten.sigmoid_, aten.tanh_, aten.clamp_, aten.dropout_,
        name="aten in-place unary", family=FAMILY, rule=preserve_rule)
sums(aten.add, aten.add_)
eval_identities(aten.dropout, aten.dropout_, aten.feature_dropout, aten.alpha_dropout, aten.clone, aten.contiguous, aten.alias)


def _index(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``index(x, [None, ..., idx])``: one tensor index at dim d, a lookup like an embedding's
    (Swin's and BEiT's relative position bias tables: ``table[index]``). The looked-up axis is
    never a channel axis (its spaces are fixed); the other axes keep their channels."""
    tensor, indices = args[0], list(arg(args, kwargs, 1, "indices", ()))
    tensors = [i for i, index in enumerate(indices) if index is not None]
    shape = ctx.meta_shape(node)
    if not ctx.is_tensor(tensor) or len(tensors) != 1 or not ctx.is_tensor(indices[tensors[0]]):
        if not ctx.carries_channels((args, kwargs)):  # masks and positions (BERT's attention mask)
            return ctx.opaque_like(shape)
        return ctx.fail_closed(node, "advanced indexing with several index tensors")
    d, lookup = tensors[0], indices[tensors[0]]
    # out[..., p, ...] = x[..., idx[p], ...]: the index's own axes carry over
    dims = list(tensor.dims[:d]) + list(lookup.dims) + list(tensor.dims[d + 1 :])
    if tuple(shape) != tuple(tensor.shape[:d]) + tuple(lookup.shape) + tuple(tensor.shape[d + 1 :]):
        return ctx.fail_closed(node, "advanced indexing of an unexpected shape")
    ctx.make_opaque(tensor, d, f"rows looked up at {node.name}")
    return ctx.tensor(shape, dims)


builtin(aten.index, name="aten.index", family=FAMILY, rule=_index)
