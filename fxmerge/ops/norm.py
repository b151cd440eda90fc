"""Normalisations: batch/instance norm (channel dim 1, with running statistics), layer norm (the
trailing dims), group norm (channels refined into groups x channels per group)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.groups import Layout
from fxmerge.ops.conv_linear import resize_every_axis
from fxmerge.ops.registry import BatchNormSchema, arg, builtin, first_input

FAMILY = "norm"
# torch.batch_norm's and ATen's argument order (F.batch_norm puts the running statistics first)
ATEN_BATCH_NORM_ARGUMENTS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")


def group_structure(ctx: Any, node: Any, layout: Layout, groups: int) -> None:
    """GroupNorm: refine channels into groups x channels-per-group (groups move as blocks)."""
    table = ctx.table
    total = ctx.layout_extent(layout)
    if groups in (1, total):
        return
    expanded = table.expand(layout)
    cut = table.cut(expanded[0], [groups, total // groups]) if len(expanded) == 1 else None
    if cut is None:
        table.fix_all(table.spaces_of(layout), f"GroupNorm at {node.name} over concatenated channels")


def _batch_norm_module(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    x = first_input(args, kwargs)
    target = str(node.target)
    channel = 1 if x.ndim > 1 else 0
    layout = ctx.layer_axis(x.dims[channel])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        tensor = ctx.param(f"{target}.{attr}")
        if tensor is not None:
            ctx.unify(tensor.dims[0], layout, node)
    return ctx.preserve(x)


def _layer_norm_module(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    x = first_input(args, kwargs)
    module, target = ctx.module_of(node), str(node.target)
    trailing = [ctx.layer_axis(d) for d in x.dims[x.ndim - len(module.normalized_shape) :]]
    for attr in ("weight", "bias"):
        tensor = ctx.param(f"{target}.{attr}")
        if tensor is not None:
            for axis, layout in enumerate(trailing):
                ctx.unify(tensor.dims[axis], layout, node)
    return ctx.preserve(x)


def _group_norm_module(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    x = first_input(args, kwargs)
    module, target = ctx.module_of(node), str(node.target)
    layout = x.dims[1]
    for attr in ("weight", "bias"):
        tensor = ctx.param(f"{target}.{attr}")
        if tensor is not None:
            ctx.unify(tensor.dims[0], layout, node)
    group_structure(ctx, node, layout, module.num_groups)
    return ctx.preserve(x)


def functional_layer_norm(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``layer_norm(input, normalized_shape, weight, bias, eps)`` (also ATen's)."""
    x = args[0]
    normalized = arg(args, kwargs, 1, "normalized_shape", ())
    normalized = [normalized] if isinstance(normalized, int) else list(normalized)
    trailing = [ctx.layer_axis(d) for d in x.dims[x.ndim - len(normalized) :]]
    for position, key in ((2, "weight"), (3, "bias")):
        tensor = arg(args, kwargs, position, key, None)
        if ctx.is_tensor(tensor):
            for axis, layout in enumerate(trailing):
                ctx.unify(tensor.dims[axis], layout, node)
    for k, value in enumerate(normalized):
        if value > 1 and ctx.table.spaces_of(trailing[k]):
            path = (1, k) if "normalized_shape" not in node.kwargs else ("normalized_shape", k)
            ctx.literals.append((node.name, path, value, trailing[k]))
    return ctx.preserve(x)


def functional_group_norm(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``group_norm(input, num_groups, weight, bias, eps)`` (also ATen's)."""
    x = args[0]
    groups = arg(args, kwargs, 1, "num_groups", 1)
    for position, key in ((2, "weight"), (3, "bias")):
        tensor = arg(args, kwargs, position, key, None)
        if ctx.is_tensor(tensor):
            ctx.unify(tensor.dims[0], x.dims[1], node)
    group_structure(ctx, node, x.dims[1], groups)
    return ctx.preserve(x)


def batch_norm_rule(vectors: tuple[tuple[int, str], ...]) -> Any:
    """A functional batch norm whose per-channel vectors sit at these (position, keyword) args."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        for position, key in vectors:
            tensor = arg(args, kwargs, position, key, None)
            if ctx.is_tensor(tensor):
                ctx.unify(tensor.dims[0], x.dims[1], node)
        return ctx.preserve(x)

    return rule


# -- width changes and identities ------------------------------------------------------------------


def _resize_batch_norm(module: Any) -> None:
    reference = module.running_mean if module.running_mean is not None else module.weight
    if reference is not None:
        module.num_features = reference.shape[0]


def _resize_layer_norm(module: Any) -> None:
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def _resize_group_norm(module: Any) -> None:
    if module.weight is None:
        return
    if module.num_groups == module.num_channels > 1:
        # one channel per group (an instance norm): a plain channel group, the groups follow it
        module.num_groups = module.weight.shape[0]
    module.num_channels = module.weight.shape[0]


def _batch_norm_identity(module: Any, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    if name == "weight":
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    if name == "running_var":
        # (x - 0) / sqrt(var + eps) * 1 + 0 = x
        return torch.full(shape, 1.0 - module.eps, dtype=like.dtype, device=like.device)
    return None


def _affine_identity(module: Any, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    return torch.ones(shape, dtype=like.dtype, device=like.device) if name == "weight" else None


builtin(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    name="BatchNorm", family=FAMILY, rule=_batch_norm_module, running_stats=("running_mean", "running_var"),
    resize=_resize_batch_norm, identity=_batch_norm_identity, resized_shape=resize_every_axis, rescale=("weight", "bias"),
)
builtin(
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    # running statistics only with track_running_stats=True (the buffers are None otherwise)
    name="InstanceNorm", family=FAMILY, rule=_batch_norm_module, running_stats=("running_mean", "running_var"),
    resize=_resize_batch_norm, identity=_batch_norm_identity, resized_shape=resize_every_axis,
)
builtin(
    nn.LayerNorm, name="LayerNorm", family=FAMILY, rule=_layer_norm_module,
    resize=_resize_layer_norm, identity=_affine_identity, resized_shape=resize_every_axis, rescale=("weight", "bias"),
)
builtin(
    nn.GroupNorm, name="GroupNorm", family=FAMILY, rule=_group_norm_module,
    resize=_resize_group_norm, identity=_affine_identity, resized_shape=resize_every_axis, rescale=("weight", "bias"),
)
builtin(F.layer_norm, name="F.layer_norm", family=FAMILY, rule=functional_layer_norm, affine=((2, "weight"), (3, "bias")))
builtin(F.group_norm, name="F.group_norm", family=FAMILY, rule=functional_group_norm)
# F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
builtin(
    F.batch_norm, name="F.batch_norm", family=FAMILY,
    rule=batch_norm_rule(((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))),
    running_stats=((1, "running_mean"), (2, "running_var")),
    batch_norm=BatchNormSchema(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")),
)
# torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
builtin(
    torch.batch_norm, name="torch.batch_norm", family=FAMILY,
    rule=batch_norm_rule(((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))),
    running_stats=((3, "running_mean"), (4, "running_var")),
    batch_norm=BatchNormSchema(ATEN_BATCH_NORM_ARGUMENTS + ("cudnn_enabled",)),
)
