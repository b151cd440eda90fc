"""Shape and view ops: indexing, cat/stack/split, reshapes, permutations, expand, matmul, and the
ops whose value carries no channels (shape queries, fresh constants)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from fxmerge.ops.registry import arg, builtin, first_input

FAMILY = "shape"


def _none(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return None


def _constant(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """A fresh tensor (zeros_like, new_zeros): no channels of any input."""
    return ctx.opaque_like(ctx.meta_shape(node))


def _getitem(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.getitem(node, args[0], args[1])


def _cat(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.cat(node, args[0], arg(args, kwargs, 1, "dim", 0))


def _stack(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.stack(node, args[0], arg(args, kwargs, 1, "dim", 0))


def reshape_rule(literals: bool) -> Any:
    """A view/reshape; ``literals``: its integer size arguments are recorded as shape literals."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        return ctx.reshape(node, first_input(args, kwargs), literals=literals)

    return rule


def permute_rule(kind: str) -> Any:
    """``kind``: "permute", "transpose" (also swapaxes/swapdims), "t" or "movedim"."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        return ctx.permute_dims(node, kind, args[0], args[1:], kwargs)

    return rule


def split_rule(unbind: bool) -> Any:
    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        return ctx.split(node, args[0], unbind=unbind)

    return rule


def expand_rule(literals: bool) -> Any:
    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        return ctx.expand(node, args[0], literals=literals)

    return rule


def _roll(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.roll(node, args[0], arg(args, kwargs, 2, "dims", None))


def _matmul(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.matmul(node, args[0], args[1])


builtin(getattr, "size", "dim", "numel", "nelement", "type", "is_contiguous", "get_device",
        name="shape queries", family=FAMILY, rule=_none)
builtin(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
        "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zero_",
        name="fresh constants", family=FAMILY, rule=_constant)
builtin(operator.getitem, "__getitem__", name="getitem", family=FAMILY, rule=_getitem, views=True)
builtin(torch.cat, torch.concat, torch.concatenate, name="cat", family=FAMILY, rule=_cat)
builtin(torch.stack, name="stack", family=FAMILY, rule=_stack)
builtin(torch.reshape, "view", "reshape", name="view/reshape", family=FAMILY, rule=reshape_rule(True), views=True)
builtin(torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten,
        "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
        name="flatten/squeeze", family=FAMILY, rule=reshape_rule(False), views=True)
builtin(torch.permute, "permute", name="permute", family=FAMILY, rule=permute_rule("permute"), views=True)
builtin(torch.transpose, torch.swapaxes, "transpose", "swapaxes", "swapdims",
        name="transpose", family=FAMILY, rule=permute_rule("transpose"), views=True)
builtin(torch.t, "t", name="t", family=FAMILY, rule=permute_rule("t"), views=True)
builtin(torch.movedim, "movedim", "moveaxis", name="movedim", family=FAMILY, rule=permute_rule("movedim"), views=True)
builtin(torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split",
        name="split", family=FAMILY, rule=split_rule(False), views=True)
builtin(torch.unbind, "unbind", name="unbind", family=FAMILY, rule=split_rule(True), views=True)
builtin("expand", name="expand", family=FAMILY, rule=expand_rule(True), views=True)
builtin(torch.broadcast_to, "expand_as", "broadcast_to", name="broadcast_to", family=FAMILY, rule=expand_rule(False), views=True)
builtin(torch.roll, "roll", name="roll", family=FAMILY, rule=_roll)
builtin(torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", "__matmul__",
        name="matmul", family=FAMILY, rule=_matmul)
