"""Width matching: per group, merge (M_k) and unmerge (U_k) matrices, and the merged weights.

Groups are matched in topological order (the order of ``Analysis.groups``), so the weight-space
similarity of MuDSC can use the transforms already chosen for neighbouring groups. The merged
weight of a layer with output group g and input group h is W* = sum_k M_k^g W_k U_k^h; vectors
(biases, norms) are sum_k M_k^g v_k; fixed groups keep the identity on their side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fxmerge.errors import ConfigError
from fxmerge.groups import ChannelSpace, Opaque
from fxmerge.match import match
from fxmerge.passes.dependency import Analysis
from fxmerge.passes.features import GroupStatistics
from fxmerge.passes.rewrite import transform_axis, transform_tensor

WidthSpec = str | int | float | Mapping[str, int]


@dataclass(frozen=True)
class GroupMatch:
    """How one group was merged: widths, similarity and the per-model matrices.

    ``merge[k]`` is M_k (width, n_k) and ``unmerge[k]`` is U_k (n_k, width), float64; both are
    None for a fixed group (identity, and the models' values are averaged).
    """

    name: str
    sizes: tuple[int, ...]
    width: int
    fixed: bool
    similarity: float | None
    source: str
    merge: tuple[torch.Tensor, ...] | None
    unmerge: tuple[torch.Tensor, ...] | None


def resolve_width(spec: WidthSpec, name: str, sizes: Sequence[int]) -> int:
    """The merged width r of a group for a ``width=`` option (see ``fxmerge.merge``)."""
    if isinstance(spec, Mapping):
        if name not in spec:
            return max(sizes)
        spec = spec[name]
    if spec == "max":
        width = max(sizes)
    elif spec == "min":
        width = min(sizes)
    elif isinstance(spec, bool):
        raise ConfigError(f"width={spec!r} is not a width")
    elif isinstance(spec, int):
        width = spec
    elif isinstance(spec, float):
        width = int(round(spec * max(sizes)))
    else:
        raise ConfigError(f"width={spec!r}: expected 'max', 'min', an int, a float multiple of the largest width, or a dict")
    if not 1 <= width <= sum(sizes):
        raise ConfigError(f"group {name}: target width {width} outside 1..{sum(sizes)} (sizes {tuple(sizes)})")
    return width


def weight_similarity(
    name: str, analyses: Sequence[Analysis], states: Sequence[Mapping[str, torch.Tensor]], done: Mapping[str, GroupMatch]
) -> np.ndarray | None:
    """Pearson correlation (N, N) of every unit's weights over all models (MuDSC's weight space).

    A unit's weight vector concatenates every parameter slice in which the group is the whole
    axis, with the other axes brought into the merged basis by the transforms already computed
    (parameters touching a free group that is not yet matched are left out). Returns None when
    no parameter qualifies.
    """
    per_model: list[torch.Tensor] = []
    for analysis, state in zip(analyses, states):
        space = analysis.space_ids[name]
        blocks: list[torch.Tensor] = []
        for pname, layouts in analysis.param_layouts.items():
            axis = next((a for a, lay in enumerate(layouts) if lay is not None and lay == ((space,),)), None)
            if axis is None or pname not in state:
                continue
            tensor = state[pname].detach().to(torch.float64)
            usable = True
            for other, layout in enumerate(layouts):
                if other == axis or layout is None:
                    continue
                for factor in (f for piece in layout for f in piece if not isinstance(f, Opaque)):
                    group = _group_of(analysis, factor)
                    if group is None or analysis.space_sizes[factor] <= 1:
                        continue
                    if not group.fixed and group.name not in done:
                        usable = False
            if not usable:
                continue
            roles = analysis.param_roles[pname]
            for other, layout in enumerate(layouts):
                if other == axis or layout is None:
                    continue
                out_t, in_t = _transforms_for(analysis, done, analyses.index(analysis))
                chosen = out_t if roles[other] == "out" else in_t
                tensor = transform_axis(tensor, other, layout, chosen, analysis.space_sizes)
            rows = tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)
            norm = rows.norm()
            if norm > 0:
                blocks.append(rows / norm)
        if not blocks:
            return None
        per_model.append(torch.cat(blocks, dim=1))
    widths = {b.shape[1] for b in per_model}
    if len(widths) != 1:
        return None
    features = torch.cat(per_model, dim=0)
    centred = features - features.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = centred / norms
    return (unit @ unit.T).clamp(-1, 1).numpy()


def _group_of(analysis: Analysis, space: int) -> ChannelSpace | None:
    for group in analysis.groups:
        if analysis.space_ids[group.name] == space:
            return group
    return None


def _transforms_for(
    analysis: Analysis, done: Mapping[str, GroupMatch], model: int
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Space id -> M_k (for "out" axes) and -> U_k^T (for "in" axes) of the matched free groups."""
    out_t: dict[int, torch.Tensor] = {}
    in_t: dict[int, torch.Tensor] = {}
    for name, result in done.items():
        if result.merge is None or name not in analysis.space_ids:
            continue
        space = analysis.space_ids[name]
        out_t[space] = result.merge[model]
        in_t[space] = result.unmerge[model].T  # type: ignore[index]
    return out_t, in_t


def _mean_merged_similarity(similarity: np.ndarray, unmerge: Sequence[np.ndarray]) -> float | None:
    """Mean pairwise similarity inside the clusters that merged two or more units."""
    assignment = np.concatenate([u.argmax(axis=1) for u in unmerge])
    values = []
    for cluster in np.unique(assignment):
        members = np.flatnonzero(assignment == cluster)
        if len(members) > 1:
            block = similarity[np.ix_(members, members)]
            values.append(block[np.triu_indices(len(members), 1)].mean())
    return float(np.mean(values)) if values else None


def match_groups(
    analyses: Sequence[Analysis],
    states: Sequence[Mapping[str, torch.Tensor]],
    statistics: Mapping[str, GroupStatistics],
    *,
    method: str,
    width: WidthSpec,
    alpha: float,
    beta: float,
    balance: float,
) -> dict[str, GroupMatch]:
    """Match every group of the reference analysis (``analyses[0]``) across all models."""
    results: dict[str, GroupMatch] = {}
    matcher = "zip" if method == "mudsc" else method
    for group in analyses[0].groups:
        sizes = tuple(a.group(group.name).size for a in analyses)
        fixed = any(a.group(group.name).fixed for a in analyses)
        if fixed:
            if len(set(sizes)) != 1:
                raise ConfigError(
                    f"group {group.name} is fixed ({group.reason}) but its sizes differ across models {sizes}"
                )
            results[group.name] = GroupMatch(group.name, sizes, sizes[0], True, None, "fixed", None, None)
            continue
        activation = statistics.get(group.name)
        weights = None
        if method == "mudsc" or activation is None:
            weights = weight_similarity(group.name, analyses, states, results)
        if activation is not None and weights is not None and method == "mudsc":
            similarity = balance * weights + (1 - balance) * activation.correlation
            source = f"mudsc(balance={balance})"
        elif activation is not None:
            similarity, source = activation.correlation, "activations"
        elif weights is not None:
            similarity, source = weights, "weights"
        elif len(set(sizes)) == 1:
            similarity, source = np.eye(sum(sizes)), "none: identity"
            matcher_for_group = "average"
        else:
            raise ConfigError(f"group {group.name}: no features and no weights to match unequal widths {sizes}")
        target = resolve_width(width, group.name, sizes)
        matcher_for_group = "average" if source == "none: identity" else matcher
        pairs = match(similarity, sizes, target, method=matcher_for_group, alpha=alpha, beta=beta)
        merge_mats = tuple(torch.from_numpy(np.ascontiguousarray(m)) for m, _ in pairs)
        unmerge_mats = tuple(torch.from_numpy(np.ascontiguousarray(u)) for _, u in pairs)
        results[group.name] = GroupMatch(
            group.name,
            sizes,
            target,
            False,
            _mean_merged_similarity(similarity, [u for _, u in pairs]),
            source,
            merge_mats,
            unmerge_mats,
        )
    return results


def merged_state(
    analyses: Sequence[Analysis], states: Sequence[Mapping[str, torch.Tensor]], matches: Mapping[str, GroupMatch]
) -> dict[str, torch.Tensor]:
    """The merged model's state dict (keys and names of ``analyses[0]``'s model).

    W* = sum_k T_k(W_k), where T_k applies M_k on "out" axes and U_k on "in" axes. A parameter
    with no free group on an "out" axis (e.g. a classifier whose outputs are fixed) has no M to
    average the models, so its terms are weighted 1/K.
    """
    count = len(analyses)
    reference = analyses[0]
    per_model = [_transforms_for(a, matches, k) for k, a in enumerate(analyses)]
    merged: dict[str, torch.Tensor] = {}
    for key, value in states[0].items():
        canonical = reference.aliases.get(key, key)
        if canonical in merged:
            merged[key] = merged[canonical]
            continue
        if canonical not in reference.param_layouts:
            if value.is_floating_point():
                merged[key] = sum(s[key].to(torch.float64) for s in states).div(count).to(value.dtype)
            else:
                merged[key] = value.clone()
            continue
        total = None
        for k, (analysis, state) in enumerate(zip(analyses, states)):
            layouts = analysis.param_layouts[canonical]
            roles = analysis.param_roles[canonical]
            out_t, in_t = per_model[k]
            term = transform_tensor(state[canonical].to(torch.float64), layouts, roles, out_t, in_t, analysis.space_sizes)
            averaged = any(
                role == "out" and layout is not None and any(f in out_t for piece in layout for f in piece)
                for layout, role in zip(layouts, roles)
            )
            if not averaged:
                term = term / count
            total = term if total is None else total + term
        merged[key] = total.to(value.dtype)  # type: ignore[union-attr]
        merged[canonical] = merged[key]
    return {key: merged[key] for key in states[0]}
