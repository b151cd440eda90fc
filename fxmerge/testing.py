"""Tools for testing function-preserving rewrites: random permutations of every free group, and
Net2Net widening (every free channel duplicated)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fxmerge.groups import ChannelSpace, Opaque
from fxmerge.passes.dependency import Analysis, analyze
from fxmerge.passes.rewrite import load_state_resizing, transform_state_dict


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
    example_input: Any,
    seed: int = 0,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    return_permutations: bool = False,
    capture: str = "auto",
) -> nn.Module | tuple[nn.Module, dict[str, torch.Tensor]]:
    """A new module computing the same function as ``model`` with every free group permuted.

    Attention heads get a head-order permutation shared by q, k, v and the output projection, a
    within-head order shared by q and k, and v's own within-head order mirrored into the output
    projection. ``model`` is not modified. ``example_input`` and ``capture``: as for
    ``fxmerge.trace`` (a tensor, tuple or dict of keyword tensors; "auto" | "fx" | "export").

    ``return_permutations=True``: returns ``(twin, permutations)`` with ``permutations[name]`` the
    LongTensor index applied to group ``name``: unit j of the twin is unit ``permutations[name][j]``
    of ``model`` (e.g. ``twin_weight = weight[perm]`` on a producer axis).
    """
    analysis = analyze(model, example_input, strict=strict, leaf_modules=leaf_modules, capture=capture)
    permutations = random_permutations(analysis, seed)
    twin = permute_model(model, analysis, permutations)
    if not return_permutations:
        return twin
    names = {space: name for name, space in analysis.space_ids.items()}
    return twin, {names[space]: perm for space, perm in permutations.items()}


def net2net_groups(analysis: Analysis) -> list[ChannelSpace]:
    """The free groups ``net2net_widen`` duplicates (see there for the ones it leaves alone)."""
    outer: set[int] = set()
    for layouts in analysis.param_layouts.values():
        for layout in layouts:
            for piece in layout or ():
                for factor, following in zip(piece, piece[1:]):
                    if not isinstance(factor, Opaque) and not isinstance(following, Opaque):
                        outer.add(factor)
    return [
        group
        for group in analysis.free_groups
        if group.kind == "channels" and group.consumers and analysis.space_ids[group.name] not in outer
    ]


def net2net_widen(
    model: nn.Module, example: torch.Tensor, factor: int = 2, target: nn.Module | None = None
) -> nn.Module:
    """A model ``factor`` times as wide as ``model`` in its free channel groups, same function.

    For each widened group of size n (``fxmerge.analyze``), "out" axes get the duplication matrix
    D = [I; I; ...] (factor*n, n): copy j of channel i is channel j*n + i, producer rows, biases,
    norm entries and BatchNorm running statistics copied; "in" axes get D / factor, dividing each
    consumer's input weights between the copies. Left alone, because duplicating them would change
    the function or a layer's structure: attention heads and head channels (``kind`` other than
    "channels"), groups that no parameter reads (q/k channels of an explicit attention, contracted
    between two activations), and outer factors of a product (attention heads, GroupNorm groups,
    the groups of a grouped conv: their count is a module attribute or a shape literal). Inner
    factors (channels per group) and pieces of a concatenation are widened; a depthwise conv's
    ``groups`` follows its channels. ``target``: a module of the widened shapes to load into
    (e.g. the same factory at ``width_multiplier=factor``); without it, a deep copy of ``model``
    is resized.
    """
    analysis = analyze(model, example)
    out_t: dict[int, torch.Tensor] = {}
    in_t: dict[int, torch.Tensor] = {}
    for group in net2net_groups(analysis):
        duplicate = torch.cat([torch.eye(group.size)] * factor, dim=0)
        out_t[analysis.space_ids[group.name]] = duplicate
        in_t[analysis.space_ids[group.name]] = duplicate / factor
    state = transform_state_dict(
        model.state_dict(), analysis.param_layouts, analysis.param_roles, analysis.aliases, out_t, in_t,
        analysis.space_sizes,
    )
    if target is None:
        wide = copy.deepcopy(model)
        load_state_resizing(wide, state)
    else:
        wide = target
        wide.load_state_dict(state)
    return wide.eval()
