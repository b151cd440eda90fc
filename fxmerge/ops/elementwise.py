"""Elementwise ops: activations, dropout, unary math (layouts preserved) and binary ops (layouts
of broadcast operands unified)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.ops.registry import builtin, eval_identities, first_input, sums

FAMILY = "elementwise"


def preserve_rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """Every layout of the first tensor input passes through unchanged."""
    return ctx.preserve(first_input(args, kwargs))


def binary_rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    """Broadcasting operands: the dims that line up (same size > 1) share their layouts."""
    return ctx.broadcast(node, list(args) + [v for k, v in kwargs.items() if k != "alpha"])


def prelu_rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    x = first_input(args, kwargs)
    weight = ctx.module_param(str(node.target), "weight")
    if weight is not None and weight.shape[0] > 1:
        ctx.unify(weight.dims[0], x.dims[1 if x.ndim > 1 else 0], node)
    return ctx.preserve(x)


builtin(
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    name="activation/dropout modules", family=FAMILY, rule=preserve_rule,
)
builtin(nn.PReLU, name="PReLU", family=FAMILY, rule=prelu_rule)
builtin(
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
    F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.exp, torch.neg, operator.neg, operator.pos, torch.abs, torch.sqrt, torch.rsqrt,
    torch.square, torch.clamp, torch.clip, torch.clone, F.softmax, F.log_softmax, torch.softmax,
    torch.log_softmax, F.normalize, torch.erf, torch.log, torch.sin, torch.cos, torch.nan_to_num,
    name="unary functions", family=FAMILY, rule=preserve_rule,
)
builtin(
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "to", "type_as", "softmax", "log_softmax", "exp",
    "neg", "abs", "clamp", "clamp_", "clamp_min", "clamp_max", "sqrt", "rsqrt", "square", "erf",
    "log", "sin", "cos", "cpu", "cuda", "requires_grad_", "nan_to_num",
    name="unary methods", family=FAMILY, rule=preserve_rule,
)
builtin(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul,
    torch.multiply, torch.div, torch.divide, torch.true_divide, torch.maximum, torch.minimum,
    torch.where, torch.pow, operator.pow, torch.masked_fill,
    name="binary functions", family=FAMILY, rule=binary_rule,
)


def _binary_method_rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return ctx.broadcast(node, list(args) + list(kwargs.values()))


builtin(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "pow_",
    "maximum", "minimum", "masked_fill", "masked_fill_", "where", "__add__", "__mul__",
    "__radd__", "__rmul__",
    name="binary methods", family=FAMILY, rule=_binary_method_rule,
)

sums(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__")
eval_identities(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, F.dropout, "contiguous", "clone")
