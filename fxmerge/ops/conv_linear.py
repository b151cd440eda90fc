"""Convolutions and linear layers (modules and functional forms): the producers and consumers of
channels, with the groups x per-group structure of grouped convolutions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.groups import Layout
from fxmerge.ops.registry import arg, builtin, first_input
from fxmerge.passes.spaces import opaque_layout

FAMILY = "conv_linear"


# -- analysis ------------------------------------------------------------------------------------


def linear_like(ctx: Any, node: Any, x: Any, weight_name: str | None, bias_name: str | None, weight: Any = None) -> Any:
    """y[..., o] = sum_i W[o, i] x[..., i] + b[o]."""
    if weight is None:
        weight = ctx.param(weight_name) if weight_name else None
    shape = ctx.meta_shape(node)
    if weight is None:
        ctx.fix_tensor(x, f"linear at {node.name} with an untracked weight")
        return ctx.opaque(shape)
    ctx.unify(weight.dims[1], ctx.layer_axis(x.dims[-1]), node)
    if weight_name:
        ctx.set_role(weight_name, 1, "in")
    out = ctx.layer_axis(weight.dims[0])
    if bias_name and ctx.param(bias_name) is not None:
        ctx.unify(ctx.param(bias_name).dims[0], out, node)
    return ctx.tensor(shape, list(x.dims[:-1]) + [out])


def conv_like(
    ctx: Any,
    node: Any,
    x: Any,
    weight_name: str,
    bias_name: str | None,
    groups: int,
    spatial_dims: int,
    transposed: bool = False,
) -> Any:
    """Conv weight (out, in/groups, *k); transposed conv weight (in, out/groups, *k)."""
    table = ctx.table
    shape = ctx.meta_shape(node)
    weight = ctx.param(weight_name)
    channel = x.ndim - spatial_dims - 1
    if weight is None:
        ctx.fix_tensor(x, f"conv at {node.name} with an untracked weight")
        return ctx.opaque(shape)
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    ctx.set_role(weight_name, in_axis, "in")
    in_channels = x.shape[channel]
    out_channels = shape[channel]
    for axis in range(2, weight.ndim):
        ctx.make_opaque(weight, axis, "kernel taps")
    x_layout = ctx.layer_axis(x.dims[channel])
    ctx.layer_axis(weight.dims[out_axis])
    if groups == 1:
        ctx.unify(weight.dims[in_axis], x_layout, node)
        out_layout: Layout = weight.dims[out_axis]
    else:
        # Channels split into groups x per-group, row-major: the group index is shared by the
        # input and the output (a group permutation), the per-group indices are independent.
        in_per_group = in_channels // groups
        expanded = table.expand(x_layout)
        if len(expanded) != 1:
            ctx.fix_tensor(x, f"grouped conv at {node.name} over concatenated channels")
            expanded = table.expand(x.dims[channel])
            cut = None
        else:
            cut = table.cut(expanded[0], [groups, in_per_group])
        if cut is None:
            table.fix_all(table.spaces_of(x_layout), f"grouped conv at {node.name}")
            table.fix_all(table.spaces_of(weight.dims[out_axis]), f"grouped conv at {node.name}")
            table.fix_all(table.spaces_of(weight.dims[in_axis]), f"grouped conv at {node.name}")
            out_layout = opaque_layout(out_channels)
        else:
            group_piece, per_group_piece = cut
            ctx.unify(weight.dims[in_axis], (per_group_piece,), node)
            w_axis = weight.dims[0] if not transposed else weight.dims[1]
            # weight rows are (groups x out_per_group) for conv; for transposed conv the rows are
            # the inputs and the columns the outputs per group.
            if not transposed:
                rows = table.expand(w_axis)
                out_per_group = out_channels // groups
                rcut = table.cut(rows[0], [groups, out_per_group]) if len(rows) == 1 else None
                if rcut is None:
                    table.fix_all(table.spaces_of(w_axis), f"grouped conv at {node.name}")
                    out_layout = opaque_layout(out_channels)
                else:
                    ctx.unify((rcut[0],), (group_piece,), node)
                    out_layout = weight.dims[0]
            else:
                ctx.fix_tensor(x, f"grouped transposed conv at {node.name}")
                ctx.fix_tensor(weight, f"grouped transposed conv at {node.name}")
                out_layout = opaque_layout(out_channels)
    if bias_name and ctx.param(bias_name) is not None:
        ctx.unify(ctx.param(bias_name).dims[0], out_layout, node)
    dims = list(x.dims[:channel]) + [out_layout] + [opaque_layout(s) for s in shape[channel + 1 :]]
    for d in range(channel + 1, x.ndim):
        table.fix_all(table.spaces_of(x.dims[d]), f"spatial dims of conv {node.name}")
    return ctx.tensor(shape, dims)


def _linear_module(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    target = str(node.target)
    return linear_like(ctx, node, first_input(args, kwargs), f"{target}.weight", f"{target}.bias")


def _conv_module(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    module, target = ctx.module_of(node), str(node.target)
    return conv_like(
        ctx, node, first_input(args, kwargs), f"{target}.weight", f"{target}.bias", module.groups,
        len(module.kernel_size), transposed=module.transposed,
    )


def functional_linear(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``linear(input, weight, bias=None)`` with any weight: a parameter or a computed tensor."""
    x, weight = args[0], arg(args, kwargs, 1, "weight", None)
    bias = arg(args, kwargs, 2, "bias", None)
    weight_name = ctx.attr_name(arg(node.args, node.kwargs, 1, "weight", None))
    if not ctx.is_tensor(weight):
        return ctx.fail_closed(node, "linear with a non-tensor weight")
    # a computed weight is coupled like a parameter but has no role of its own
    ctx.unify(weight.dims[1], x.dims[-1], node)
    if weight_name is not None:
        ctx.set_role(weight_name, 1, "in")
    out = weight.dims[0]
    if ctx.is_tensor(bias):
        ctx.unify(bias.dims[0], out, node)
    return ctx.tensor(ctx.meta_shape(node), list(x.dims[:-1]) + [out])


def functional_conv(spatial: int) -> Any:
    """``conv{spatial}d(input, weight, bias, stride, padding, dilation, groups)``."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        weight_name = ctx.attr_name(arg(node.args, node.kwargs, 1, "weight", None))
        bias_name = ctx.attr_name(arg(node.args, node.kwargs, 2, "bias", None))
        groups = arg(args, kwargs, 6, "groups", 1)
        if weight_name is None or ctx.param(weight_name) is None:
            return ctx.fail_closed(node, "convolution with a computed weight")
        return conv_like(ctx, node, args[0], weight_name, bias_name, groups, spatial)

    return rule


# -- width changes and identities ------------------------------------------------------------------


def _resize_conv(module: Any) -> None:
    weight = module.weight
    if not module.transposed and 1 < module.groups == module.in_channels == module.out_channels and weight.shape[1] == 1:
        # depthwise, one output per input channel: inputs and outputs are one channel group,
        # and the number of groups follows its width. (With a channel multiplier the inputs
        # are the outer factor of the outputs, groups x multiplier: the analysis keeps that
        # count, only the multiplier can change, and ``groups`` stays.)
        module.groups = weight.shape[0]
    if module.transposed:
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups


def _resize_linear(module: Any) -> None:
    module.out_features, module.in_features = module.weight.shape


def _conv_identity(module: Any, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    if name != "weight":
        return None
    value = torch.zeros(shape, dtype=like.dtype, device=like.device)
    centre = tuple(k // 2 for k in shape[2:])
    per_group = shape[1]
    for c in range(min(shape[0], shape[1] * module.groups)):
        value[(c, c % per_group) + centre] = 1.0
    return value


def _linear_identity(module: Any, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    return torch.eye(shape[0], shape[1], dtype=like.dtype, device=like.device) if name == "weight" else None


def _conv_resized_shape(module: Any, shape: torch.Size, resize: Any) -> torch.Size:
    if len(shape) == 1:  # the bias: one entry per output channel
        return torch.Size((resize(shape[0]),))
    if 1 < module.groups == module.in_channels == module.out_channels and shape[1] == 1:
        in_axis = 1  # depthwise: its groups follow the width (the entry's ``resize``)
    else:
        in_axis = resize(shape[1] * module.groups) // module.groups if module.groups > 1 else resize(shape[1])
    return torch.Size((resize(shape[0]), in_axis, *shape[2:]))


def resize_every_axis(module: Any, shape: torch.Size, resize: Any) -> torch.Size:
    """Every axis of more than one entry is a channel axis (linear, norm, attention parameters)."""
    return torch.Size(resize(s) if s > 1 else s for s in shape)


builtin(
    nn.Linear, name="Linear", family=FAMILY, rule=_linear_module, layer=True, consumes=True,
    resize=_resize_linear, identity=_linear_identity, resized_shape=resize_every_axis, rescale=("weight", "bias"),
)
builtin(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    name="Conv/ConvTranspose", family=FAMILY, rule=_conv_module, layer=True, consumes=True,
    resize=_resize_conv, identity=_conv_identity, resized_shape=_conv_resized_shape, rescale=("weight", "bias"),
)
builtin(F.linear, name="F.linear", family=FAMILY, rule=functional_linear, layer=True, consumes=True)
for _spatial, _function in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    builtin(_function, name=f"F.conv{_spatial}d", family=FAMILY, rule=functional_conv(_spatial), layer=True, consumes=True)
