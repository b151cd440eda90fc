"""Attention: ``nn.MultiheadAttention`` (heads x head channels, q/k sharing their within-head
order, v's mirrored in the output projection) and ``scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.groups import Layout
from fxmerge.ops.conv_linear import _linear_identity, resize_every_axis
from fxmerge.ops.registry import arg, builtin
from fxmerge.passes.spaces import opaque_layout

FAMILY = "attention"


def multihead_attention(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    module = ctx.module_of(node)
    names = ("query", "key", "value")
    q, k, v = (arg(args, kwargs, i, n, None) for i, n in enumerate(names))
    target = str(node.target)
    p = lambda attr: f"{target}.{attr}"  # noqa: E731
    heads_space, qk, vv = ctx.head_spaces(target, module.num_heads, module.head_dim)
    ctx.tie_heads(heads_space, (qk, vv), q.dims[-1])
    qk_layout: Layout = ((heads_space, qk),)
    v_layout: Layout = ((heads_space, vv),)
    for mask_key, position in (("key_padding_mask", 3), ("attn_mask", 5)):
        mask = arg(args, kwargs, position, mask_key, None)
        if ctx.is_tensor(mask):
            ctx.fix_tensor(mask, f"attention mask of {target}")
    for layout in (qk_layout, v_layout, q.dims[-1], k.dims[-1], v.dims[-1]):
        ctx.layer_axis(layout)
    if module._qkv_same_embed_dim:
        ctx.unify(q.dims[-1], k.dims[-1], node)
        ctx.unify(q.dims[-1], v.dims[-1], node)
        rows = qk_layout + qk_layout + v_layout
        weight = ctx.param(p("in_proj_weight"))
        ctx.unify(weight.dims[0], rows, node)
        ctx.unify(weight.dims[1], q.dims[-1], node)
        ctx.set_role(p("in_proj_weight"), 1, "in")
        bias = ctx.param(p("in_proj_bias"))
        if bias is not None:
            ctx.unify(bias.dims[0], rows, node)
    else:
        for name, source, layout in (("q_proj_weight", q, qk_layout), ("k_proj_weight", k, qk_layout), ("v_proj_weight", v, v_layout)):
            weight = ctx.param(p(name))
            ctx.unify(weight.dims[0], layout, node)
            ctx.unify(weight.dims[1], source.dims[-1], node)
            ctx.set_role(p(name), 1, "in")
        bias = ctx.param(p("in_proj_bias"))
        if bias is not None:
            ctx.unify(bias.dims[0], qk_layout + qk_layout + v_layout, node)
    for name, layout in (("bias_k", qk_layout), ("bias_v", v_layout)):
        extra = ctx.param(p(name))
        if extra is not None:
            ctx.unify(extra.dims[-1], layout, node)
    out_weight = ctx.param(p("out_proj.weight"))
    ctx.unify(out_weight.dims[1], v_layout, node)
    ctx.set_role(p("out_proj.weight"), 1, "in")
    out_layout = out_weight.dims[0]
    out_bias = ctx.param(p("out_proj.bias"))
    if out_bias is not None:
        ctx.unify(out_bias.dims[0], out_layout, node)
    shapes = ctx.meta_shape(node)
    attn_output = ctx.tensor(shapes[0], list(q.dims[:-1]) + [out_layout])
    weights_shape = shapes[1] if len(shapes) > 1 else None
    attn_weights: Any = None
    if weights_shape is not None:
        dims = [opaque_layout(s) for s in weights_shape]
        if len(weights_shape) == q.ndim + 1 or (q.ndim == 2 and len(weights_shape) == 3):
            head_axis = len(weights_shape) - 3
            dims[head_axis] = ((heads_space,),)
        attn_weights = ctx.tensor(weights_shape, dims)
    return (attn_output, attn_weights)


def sdpa(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """``scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)`` (also ATen's): q.k contracted, keys and values share their sequence axis."""
    q, k, v = (arg(args, kwargs, i, n, None) for i, n in enumerate(("query", "key", "value")))
    mask = arg(args, kwargs, 3, "attn_mask", None)
    if kwargs.get("enable_gqa"):
        return ctx.fail_closed(node, "grouped-query attention")
    shape = ctx.meta_shape(node)
    ctx.unify(q.dims[-1], ctx.layer_axis(k.dims[-1]), node)  # the q.k contraction
    ctx.layer_axis(v.dims[-1])
    ctx.unify(k.dims[-2], v.dims[-2], node)  # keys and values share their sequence axis
    batch = len(shape) - 2
    dims: list[Layout] = []
    for d in range(batch):
        layouts = [t.dims[d - (batch - (t.ndim - 2))] for t in (q, k, v) if d - (batch - (t.ndim - 2)) >= 0 and t.shape[d - (batch - (t.ndim - 2))] == shape[d] and shape[d] > 1]
        for other in layouts[1:]:
            ctx.unify(layouts[0], other, node)
        dims.append(layouts[0] if layouts else opaque_layout(shape[d]))
    if ctx.is_tensor(mask):
        # the mask is added to the scores (*batch, L, S), broadcasting: a per-head bias (Swin,
        # T5-style relative positions) moves with the heads, its positions with q's and k's
        scores = [*dims, q.dims[-2], k.dims[-2]]
        sizes = [*shape[:batch], q.shape[-2], k.shape[-2]]
        for d in range(1, mask.ndim + 1):
            if d <= len(scores) and mask.shape[-d] == sizes[-d] and sizes[-d] > 1:
                ctx.unify(mask.dims[-d], scores[-d], node)
    dims += [q.dims[-2], v.dims[-1]]
    return ctx.tensor(shape, dims)


def _resize_mha(module: Any) -> None:
    if module._qkv_same_embed_dim:
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
    else:
        module.embed_dim = module.q_proj_weight.shape[1]
        module.kdim, module.vdim = module.k_proj_weight.shape[1], module.v_proj_weight.shape[1]
    module.head_dim = module.out_proj.weight.shape[1] // module.num_heads
    module.out_proj.out_features, module.out_proj.in_features = module.out_proj.weight.shape


def _mha_identity(module: Any, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    if name == "in_proj_weight":
        embed = shape[1]
        return torch.cat([torch.eye(embed, dtype=like.dtype, device=like.device)] * (shape[0] // embed), dim=0)
    if name == "out_proj.weight":
        return _linear_identity(module, "weight", shape, like)
    return None


builtin(
    nn.MultiheadAttention, name="MultiheadAttention", family=FAMILY, rule=multihead_attention,
    layer=True, consumes=True, resize=_resize_mha, identity=_mha_identity, resized_shape=resize_every_axis,
    # a zero residual branch: the output projection is zeroed, the rest are identities
    zero_params=("out_proj",),
)
builtin(F.scaled_dot_product_attention, name="scaled_dot_product_attention", family=FAMILY, rule=sdpa)
