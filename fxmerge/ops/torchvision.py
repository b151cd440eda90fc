"""torchvision's fx-wrapped functions: stochastic depth and Swin's window attention, relative
position bias and patch-merging pad.

Registered by dotted name, so ``import fxmerge`` does not import torchvision: the registry
resolves each name to the function object once its module is imported (a graph can only contain
such a function when the model's code imported torchvision), and matches nodes by that object.
"""

from __future__ import annotations

from typing import Any

from fxmerge.groups import Layout
from fxmerge.ops.elementwise import preserve_rule
from fxmerge.ops.registry import bind, builtin
from fxmerge.passes.spaces import opaque_layout

FAMILY = "torchvision"


def swin_attention(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size,
    num_heads, shift_size, ..., qkv_bias, proj_bias, logit_scale)``: weights are get_attr tensors."""
    bound = bind(node)
    x = ctx.value(bound["input"])
    heads = bound["num_heads"]
    channels = x.shape[-1]
    names = {key: ctx.attr_name(bound.get(key)) for key in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias", "logit_scale")}
    if names["qkv_weight"] is None or names["proj_weight"] is None:
        return ctx.fail_closed(node, "window attention with computed weights")
    heads_space, qk, vv = ctx.head_spaces(node.name, heads, channels // heads)
    ctx.tie_heads(heads_space, (qk, vv), x.dims[-1])
    rows: Layout = ((heads_space, qk), (heads_space, qk), (heads_space, vv))
    ctx.layer_axis(rows)
    ctx.layer_axis(x.dims[-1])
    qkv = ctx.param(names["qkv_weight"])
    ctx.unify(qkv.dims[0], rows, node)
    ctx.unify(qkv.dims[1], x.dims[-1], node)
    ctx.set_role(names["qkv_weight"], 1, "in")
    if names["qkv_bias"]:
        ctx.unify(ctx.param(names["qkv_bias"]).dims[0], rows, node)
    proj = ctx.param(names["proj_weight"])
    ctx.unify(proj.dims[1], ((heads_space, vv),), node)
    ctx.set_role(names["proj_weight"], 1, "in")
    out_layout = proj.dims[0]
    if names["proj_bias"]:
        ctx.unify(ctx.param(names["proj_bias"]).dims[0], out_layout, node)
    if names["logit_scale"]:
        ctx.unify(ctx.param(names["logit_scale"]).dims[0], ((heads_space,),), node)
    bias = ctx.value(bound["relative_position_bias"])
    if ctx.is_tensor(bias):
        ctx.unify(bias.dims[1], ((heads_space,),), node)
        for d in (0, 2, 3):
            ctx.table.fix_all(ctx.table.spaces_of(bias.dims[d]), f"position bias at {node.name}")
    return ctx.tensor(ctx.meta_shape(node), list(x.dims[:-1]) + [out_layout])


def swin_position_bias(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``_get_relative_position_bias(table, index, window_size)``: rows looked up, heads kept."""
    table_value = args[0]
    index = ctx.value(node.args[1])
    if ctx.is_tensor(index):
        ctx.fix_tensor(index, f"position index at {node.name}")
    ctx.make_opaque(table_value, 0, f"position table rows at {node.name}")
    shape = ctx.meta_shape(node)
    dims = [opaque_layout(s) for s in shape]
    dims[1] = table_value.dims[1]
    return ctx.tensor(shape, dims)


def swin_merge_pad(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``_patch_merging_pad(x)``: (..., H, W, C) -> (..., H/2, W/2, 4C), four copies of the channels."""
    x = args[0]
    shape = ctx.meta_shape(node)
    for d in (-3, -2):
        ctx.table.fix_all(ctx.table.spaces_of(x.dims[d]), f"patch merging at {node.name}")
    dims = [opaque_layout(s) for s in shape[:-1]] + [x.dims[-1] * 4]
    dims[: x.ndim - 3] = x.dims[: x.ndim - 3]
    return ctx.tensor(shape, dims)


builtin("torchvision.ops.stochastic_depth.stochastic_depth", name="stochastic_depth", family=FAMILY, rule=preserve_rule)
# not a "layer" for units: a Swin block's attention step has no Linear module, and counting it
# would cut Swin into different units than the depth tests and benchmarks were built on
builtin("torchvision.models.swin_transformer.shifted_window_attention", name="shifted_window_attention", family=FAMILY, rule=swin_attention)
builtin("torchvision.models.swin_transformer._get_relative_position_bias", name="_get_relative_position_bias", family=FAMILY, rule=swin_position_bias)
builtin("torchvision.models.swin_transformer._patch_merging_pad", name="_patch_merging_pad", family=FAMILY, rule=swin_merge_pad)
