"""Pooling, resizing and padding (channel and batch dims kept, spatial dims new) and reductions
(the reduced dims drop out of the layouts)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.ops.registry import arg, builtin, first_input

FAMILY = "pool_reduce"


def spatial_rule(spatial_dims: int) -> Any:
    """An op over the last ``spatial_dims`` dims (-1: all but batch and channels)."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            if getattr(ctx.module_of(node), "return_indices", False):
                return ctx.fail_closed(node, "pooling indices depend on channel order")
        elif kwargs.get("return_indices"):
            return ctx.fail_closed(node, "pooling indices depend on channel order")
        return ctx.spatial(node, first_input(args, kwargs), spatial_dims)

    return rule


def reduce_rule(name: str) -> Any:
    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        return ctx.reduce(node, args[0], arg(args, kwargs, 1, "dim", None), name)

    return rule


def _max_min(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.max_min(node, args, kwargs)


def _pad(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.pad(node, args[0], arg(args, kwargs, 1, "pad", ()))


_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.Upsample: -1,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2, nn.ZeroPad2d: 2, nn.ReflectionPad2d: 2,
    nn.ReplicationPad2d: 2, nn.ConstantPad2d: 2, nn.LPPool2d: 2,
}
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.interpolate: -1, F.upsample: -1,
}
for _name in ("max_pool1d", "max_pool2d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d"):
    if hasattr(torch, _name) and getattr(torch, _name) not in _POOL_FUNCTIONS:
        _POOL_FUNCTIONS[getattr(torch, _name)] = 1 if "1d" in _name else 2

for _dims in sorted(set(_POOL_MODULES.values()) | set(_POOL_FUNCTIONS.values())):
    builtin(
        *[m for m, d in _POOL_MODULES.items() if d == _dims],
        *[f for f, d in _POOL_FUNCTIONS.items() if d == _dims],
        name=f"pool/resize/pad over {_dims if _dims > 0 else 'all spatial'} dims",
        family=FAMILY,
        rule=spatial_rule(_dims),
    )
builtin(F.pad, name="pad", family=FAMILY, rule=_pad)

_REDUCTIONS = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "prod", "nansum", "nanmean")
for _name in _REDUCTIONS:
    _function = getattr(torch, _name) if _name in ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm") else None
    builtin(*([_function] if _function is not None else []), _name, name=_name, family=FAMILY, rule=reduce_rule(_name))
builtin(torch.max, torch.min, "max", "min", name="max/min", family=FAMILY, rule=_max_min)
