"""Embedding lookups: the table's rows are looked up by data-dependent indices (never permuted);
its columns produce the channels."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from fxmerge.ops.registry import arg, builtin
from fxmerge.passes.spaces import opaque_layout

FAMILY = "embedding"


def embedding_out(ctx: Any, node: Any, weight: Any) -> Any:
    shape = ctx.meta_shape(node)
    if weight is None:
        return ctx.opaque(shape)
    # rows are looked up by data-dependent indices: never permuted
    ctx.make_opaque(weight, 0, f"embedding rows at {node.name}")
    dims = [opaque_layout(s) for s in shape[:-1]] + [weight.dims[1]]
    return ctx.tensor(shape, dims)


def _module(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
    return embedding_out(ctx, node, ctx.param(f"{node.target}.weight"))


def embedding_rule(position: int) -> Any:
    """A functional embedding whose table is argument ``position`` (1 for F.embedding, 0 in ATen)."""

    def rule(ctx: Any, node: Any, args: tuple, kwargs: dict) -> Any:
        return embedding_out(ctx, node, arg(args, kwargs, position, "weight", None))

    return rule


def _resize(module: Any) -> None:
    module.num_embeddings, module.embedding_dim = module.weight.shape


builtin(nn.Embedding, name="Embedding", family=FAMILY, rule=_module, resize=_resize)
builtin(F.embedding, name="F.embedding", family=FAMILY, rule=embedding_rule(1))
