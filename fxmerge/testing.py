"""Tools for testing function-preserving rewrites: random permutations of every free group."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fxmerge.passes.dependency import Analysis, analyze
from fxmerge.passes.rewrite import transform_state_dict


def random_permutations(analysis: Analysis, seed: int = 0) -> dict[int, torch.Tensor]:
    """One random permutation (LongTensor index) per free group, drawn in group order from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        analysis.space_ids[group.name]: torch.randperm(group.size, generator=generator)
        for group in analysis.groups
        if not group.fixed
    }


def permute_model(model: nn.Module, analysis: Analysis, permutations: dict[int, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with ``permutations`` (space id -> index) applied to its weights."""
    state = model.state_dict()
    new_state = transform_state_dict(
        state,
        analysis.param_layouts,
        analysis.param_roles,
        analysis.aliases,
        permutations,
        permutations,
        analysis.space_sizes,
    )
    twin = copy.deepcopy(model)
    twin.load_state_dict(new_state)
    return twin


def random_permute(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    seed: int = 0,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> nn.Module:
    """A new module computing the same function as ``model`` with every free group permuted.

    Attention heads get a head-order permutation shared by q, k, v and the output projection, a
    within-head order shared by q and k, and v's own within-head order mirrored into the output
    projection. ``model`` is not modified.
    """
    analysis = analyze(model, example_input, strict=strict, leaf_modules=leaf_modules)
    return permute_model(model, analysis, random_permutations(analysis, seed))
