"""Declarative templates for ``fxmerge.ops.register``: the common op shapes without writing a rule.

Each returns an ``OpEntry`` without targets; ``register(Target, template)`` fills them in::

    fxmerge.ops.register(MyRMSNorm, fxmerge.ops.norm(dims=-1, params=("weight",)))
    fxmerge.ops.register(MyGatedAct, fxmerge.ops.elementwise())
    fxmerge.ops.register(MyDense, fxmerge.ops.linear(weight="kernel", bias="offset"))

Parameters are named by module attribute (a module target) or by argument name or position (a
function target).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fxmerge.ops.conv_linear import linear_like, resize_every_axis
from fxmerge.ops.registry import OpEntry, bind, first_input


def _tensor_argument(ctx: Any, node: Any, args: tuple, kwargs: dict, spec: str | int) -> tuple[Any, str | None]:
    """(value, qualified parameter name or None) of a parameter given by attribute/argument."""
    if node.op == "call_module":
        name = f"{node.target}.{spec}" if node.target else str(spec)
        return ctx.param(name), name
    if isinstance(spec, int):
        raw = node.args[spec] if len(node.args) > spec else None
    else:
        raw = node.kwargs.get(spec)
        if raw is None:
            try:
                raw = bind(node).get(spec)
            except (TypeError, ValueError):
                raw = None
    value = ctx.value(raw)
    return (value if ctx.is_tensor(value) else None), ctx.attr_name(raw)


def _dims(spec: int | Sequence[int]) -> tuple[int, ...]:
    return (spec,) if isinstance(spec, int) else tuple(spec)


def _affine_identity(module: Any, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    return torch.ones(shape, dtype=like.dtype, device=like.device) if name == "weight" else None


def norm(dims: int | Sequence[int] = -1, params: Sequence[str | int] = ("weight", "bias"), *, name: str = "") -> OpEntry:
    """A normalisation over ``dims`` of its first input (e.g. -1: an RMSNorm/LayerNorm over the
    last dim; 1: a BatchNorm-like norm of (N, C, ...)). Output layouts = input layouts; each
    parameter in ``params`` (missing ones are skipped) runs along ``dims``, its trailing axes
    aligned with them. An identity in depth insertion: "weight" 1, the others 0."""
    norm_dims = _dims(dims)

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        x = first_input(args, kwargs)
        if not ctx.is_tensor(x):
            return ctx.fail_closed(node, "norm template: the first input is not a tensor")
        layouts = [ctx.layer_axis(x.dims[d % x.ndim]) for d in norm_dims]
        for spec in params:
            tensor, _ = _tensor_argument(ctx, node, args, kwargs, spec)
            if tensor is None:
                continue
            if tensor.ndim > len(layouts):
                return ctx.fail_closed(node, f"norm template: parameter {spec!r} has more dims than {norm_dims}")
            for axis in range(tensor.ndim):
                layout = layouts[axis - tensor.ndim + len(layouts)]
                if tensor.shape[axis] > 1:
                    ctx.unify(tensor.dims[axis], layout, node)
        return ctx.preserve(x)

    return OpEntry(name=name, family="template", rule=rule, identity=_affine_identity, resized_shape=resize_every_axis)


def elementwise(*, name: str = "") -> OpEntry:
    """An op applied independently to every element (an activation): output layouts = those of
    the first tensor input; other tensor inputs broadcast against it like in ``x * y``."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        tensors = [v for v in list(args) + list(kwargs.values()) if ctx.is_tensor(v)]
        if len(tensors) > 1:
            return ctx.broadcast(node, tensors)
        return ctx.preserve(tensors[0] if tensors else first_input(args, kwargs))

    return OpEntry(name=name, family="template", rule=rule)


preserve = elementwise


def linear(weight: str | int = "weight", bias: str | int | None = "bias", *, layer: bool = True, name: str = "") -> OpEntry:
    """y[..., o] = sum_i W[o, i] x[..., i] + b[o] on the first input's last dim, with ``weight``
    (out, in) and an optional ``bias`` (out,): a layer for units and a consumed statistics tap."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        x = first_input(args, kwargs)
        w, w_name = _tensor_argument(ctx, node, args, kwargs, weight)
        if not ctx.is_tensor(x) or w is None or w.ndim != 2:
            return ctx.fail_closed(node, "linear template: needs a tensor input and a 2-d weight")
        b_name = None
        if bias is not None:
            b, b_name = _tensor_argument(ctx, node, args, kwargs, bias)
            if b is not None and b_name is None:
                ctx.unify(b.dims[0], w.dims[0], node)
        return linear_like(ctx, node, x, w_name, b_name, weight=w)

    def identity(module: Any, pname: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
        return torch.eye(shape[0], shape[1], dtype=like.dtype, device=like.device) if pname == weight and len(shape) == 2 else None

    return OpEntry(
        name=name, family="template", rule=rule, layer=layer, consumes=layer, identity=identity,
        resized_shape=resize_every_axis,
    )
