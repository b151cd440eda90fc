"""Width matching: per group, merge (M_k) and unmerge (U_k) matrices, and the merged weights.

Groups are matched in topological order (the order of ``Analysis.groups``), so the weight-space
similarity of MuDSC can use the transforms already chosen for neighbouring groups. The merged
weight of a layer with output group g and input group h is W* = sum_k M_k^g W_k U_k^h; vectors
(biases, norms) are sum_k M_k^g v_k; fixed groups keep the identity on their side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
import warnings
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from fxmerge.errors import ConfigError
from fxmerge.groups import ChannelSpace, Opaque
from fxmerge.match import match_labels
from fxmerge.match.clusters import checked_cluster_sizes, square_row_length
from fxmerge.match.groups import mean_matched_similarity
from fxmerge.passes.dependency import Analysis
from fxmerge.passes.features import GroupStatistics, symmetric_gram
from fxmerge.passes.rewrite import ClusterMap, Transform, transform_axis, transform_tensor

WidthSpec = str | int | float | Mapping[str, int]

# Weight of weight-space similarity when it only breaks ties between units that activations
# cannot tell apart; small enough never to reorder units that activations do distinguish.
_TIE_BREAK = 1e-3
# Two units of one model at least this correlated (in absolute value) cannot be told apart by
# their activations: the feature statistics' float32 products give correlations to about 1e-6
# (fxmerge.passes.features), so a pair within 1e-5 of collinear may be collinear — e.g. two ReLU
# units that fire on the same one of 32 samples — and could outrank an exact twin at 1 - 1e-6.
_COLLINEAR = 1.0 - 1e-5
# unmerge="regression": the ridge that shrinks U toward the copy unmerge, relative to the mean
# variance of the merged units. Measured on the x4 digits ResNets (homogeneous zip, deep pair,
# seeds 0-1): 1e-4, 1e-2 and 1e-1 give 95.7, 95.8 and 95.2 per-task average (copy: 90.7); so
# does a plain ridge toward 0 instead of toward the copy (95.7 at 1e-4 and 1e-2), which would not
# keep a twin's unmerge exact.
UNMERGE_RIDGE = 1e-2
# Rows per block of the in-place (N, N) steps: block temporaries of 256 x N.
_ROW_BLOCK = 256
# A data-free merge (no activations) re-matches its groups on weights until no match changes, at
# most this many rounds over all groups (Git Re-Basin's weight matching iterates likewise).
WEIGHT_MATCHING_ROUNDS = 10


@dataclass(frozen=True, eq=False, repr=False)
class GroupMatch:
    """How one group was merged: widths, similarity and, per model, which merged unit each unit
    went to.

    ``clusters[k]`` (n_k,) int64: the merged unit (0 .. width - 1) of each unit of model k, -1
    for none (an inert model); ``weights[k]`` (n_k,) float64: that unit's entry of M_k. U_k is
    one-hot on the same entries. ``merge[k]`` / ``unmerge[k]``: M_k (width, n_k) and U_k (n_k,
    width) as dense float64 tensors, made on each access (the merge itself never makes them).
    Both None for a fixed group (identity, and the models' values are averaged).
    ``unmerge_matrices[k]`` (n_k, r) float64: U_k when it is not one-hot (``unmerge="regression"``,
    ``regression_unmerge``), else None.
    """

    name: str
    sizes: tuple[int, ...]
    width: int
    fixed: bool
    similarity: float | None
    source: str
    clusters: tuple[np.ndarray, ...] | None
    weights: tuple[np.ndarray, ...] | None
    factors: tuple[str, ...] = ()
    unmerge_matrices: tuple[np.ndarray, ...] | None = None

    @staticmethod
    def of_labels(
        name: str, sizes: Sequence[int], width: int, labels: np.ndarray, similarity: float | None, source: str,
        factors: tuple[str, ...] = (),
    ) -> "GroupMatch":
        """The match of a clustering: ``labels`` (N,) the merged unit of every unit of all models
        concatenated; M_k averages each cluster (1/|c| over all models)."""
        labels = np.asarray(labels, dtype=np.int64)
        counts = checked_cluster_sizes(labels, width)
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        clusters = tuple(labels[offsets[k] : offsets[k + 1]] for k in range(len(sizes)))
        weights = tuple(1.0 / counts[c] for c in clusters)
        return GroupMatch(name, tuple(sizes), width, False, similarity, source, clusters, weights, factors)

    @property
    def merge(self) -> tuple[torch.Tensor, ...] | None:
        if self.clusters is None or self.weights is None:
            return None
        return tuple(_dense(c, w, self.width) for c, w in zip(self.clusters, self.weights))

    @property
    def unmerge(self) -> tuple[torch.Tensor, ...] | None:
        if self.clusters is None:
            return None
        if self.unmerge_matrices is not None:
            return tuple(torch.from_numpy(u) for u in self.unmerge_matrices)
        return tuple(_dense(c, None, self.width).T.contiguous() for c in self.clusters)

    @cached_property
    def maps(self) -> tuple[tuple[Transform, Transform], ...]:
        """Per model, (M_k, U_k^T) as the rewrite applies them: ``ClusterMap``s (index arrays),
        made once however many parameters they transform."""
        if self.clusters is None or self.weights is None:
            return ()
        if self.unmerge_matrices is not None:
            return tuple(
                (ClusterMap.of_assignment(c, w, self.width), torch.from_numpy(np.ascontiguousarray(u.T)))
                for c, w, u in zip(self.clusters, self.weights, self.unmerge_matrices)
            )
        return tuple(
            (ClusterMap.of_assignment(c, w, self.width), ClusterMap.of_assignment(c, None, self.width))
            for c, w in zip(self.clusters, self.weights)
        )

    def __repr__(self) -> str:
        how = "fixed" if self.fixed else self.source
        similarity = "" if self.similarity is None else f", similarity {self.similarity:.3f}"
        return f"GroupMatch({self.name!r}: {self.sizes} -> {self.width}, {how}{similarity})"


def _dense(clusters: np.ndarray, weights: np.ndarray | None, width: int) -> torch.Tensor:
    """(width, n) float64 with ``weights[j]`` (1 when None) at (clusters[j], j) where clusters[j] >= 0."""
    matrix = torch.zeros(width, len(clusters), dtype=torch.float64)
    units = np.flatnonzero(clusters >= 0)
    values = torch.ones(len(units), dtype=torch.float64) if weights is None else torch.from_numpy(weights[units].astype(np.float64))
    matrix[torch.from_numpy(clusters[units]), torch.from_numpy(units)] = values
    return matrix


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
        # a multiple of the largest width, capped at keeping every unit (zipping never splits one)
        width = min(max(int(round(spec * max(sizes))), 1), sum(sizes))
    else:
        raise ConfigError(f"width={spec!r}: expected 'max', 'min', an int, a float multiple of the largest width, or a dict")
    if not 1 <= width <= sum(sizes):
        raise ConfigError(f"group {name}: target width {width} outside 1..{sum(sizes)} (sizes {tuple(sizes)})")
    return width


def unit_weight_features(
    analysis: Analysis,
    state: Mapping[str, torch.Tensor],
    key: tuple[int, ...],
    done: Mapping[str, "GroupMatch"],
    model: int,
) -> list[torch.Tensor] | None:
    """Every unit's weights as blocks (units, F_b), one per parameter slice in which ``key``
    appears (their concatenation along dim 1 is the unit's feature vector).

    ``key`` is one space id, or consecutive ids of a composite (heads x head channels). A piece
    of a parameter axis qualifies when it is ``key`` possibly between non-free factors (the
    q/k/v split of a fused projection); the other axes are brought into the merged basis with the
    transforms already computed, and parameters touching a free group that is not matched yet
    are left out. Each parameter's block is scaled to unit norm so that large layers do not
    drown small ones.
    """
    free = {analysis.space_ids[g.name] for g in analysis.groups if not g.fixed}
    matched = _transform_keys(analysis, done)
    out_t, in_t = _transforms_for(analysis, done, model)
    sizes_now = merged_sizes(analysis, done)  # the matched spaces' extents once transformed
    n_units = 1
    for space in key:
        n_units *= analysis.space_sizes[space]
    blocks: list[torch.Tensor] = []
    for pname, layouts in analysis.param_layouts.items():
        if pname not in state:
            continue
        for axis, layout in enumerate(layouts):
            if layout is None or not any(_contains(piece, key) for piece in layout):
                continue
            if not _others_ready(layouts, axis, key, free, matched):
                continue
            # float32 is enough for a similarity whose decisions are made at 1e-3 (tie-breaks) or
            # mixed half and half with activations (MuDSC): half the cost of float64
            tensor = state[pname].detach()
            tensor = tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)
            roles = analysis.param_roles[pname]
            for other, other_layout in enumerate(layouts):
                if other_layout is None:
                    continue
                chosen = out_t if roles[other] == "out" else in_t
                if other == axis:
                    # the other factors of the key's own axis (the blocks of a grouped conv's
                    # channels, say) are brought into the merged basis too, so that slice b of
                    # every model holds the same merged block
                    chosen = {k: t for k, t in chosen.items() if not set(k if isinstance(k, tuple) else (k,)) & set(key)}
                tensor = transform_axis(tensor, other, other_layout, chosen, analysis.space_sizes)
            moved = tensor.movedim(axis, 0)
            offset = 0
            for piece in layout:
                extent = 1
                for f in piece:
                    extent *= f.size if isinstance(f, Opaque) else sizes_now[f]
                if _contains(piece, key):
                    at = _position(piece, key)
                    outer = extent // n_units
                    inner = 1
                    for f in piece[at + len(key) :]:
                        inner *= f.size if isinstance(f, Opaque) else sizes_now[f]
                    outer //= inner
                    segment = moved[offset : offset + extent].reshape(outer, n_units, inner, -1)
                    rows = segment.permute(1, 0, 2, 3).reshape(n_units, -1)
                    norm = rows.norm()
                    if norm > 0:
                        blocks.append(rows / norm)
                offset += extent
    return blocks or None


def _contains(piece: tuple, key: tuple[int, ...]) -> bool:
    return _position(piece, key) >= 0


def _position(piece: tuple, key: tuple[int, ...]) -> int:
    for start in range(len(piece) - len(key) + 1):
        if tuple(piece[start : start + len(key)]) == key:
            return start
    return -1


def _others_ready(layouts, axis: int, key: tuple[int, ...], free: set[int], matched: set) -> bool:
    """Every free space on the parameter, outside ``key`` on this axis, already has a transform."""
    for other, layout in enumerate(layouts):
        if layout is None:
            continue
        for piece in layout:
            at = _position(piece, key) if other == axis else -1
            if other == axis and at < 0:
                continue  # only the slices holding the key are read
            for index, factor in enumerate(piece):
                if at >= 0 and at <= index < at + len(key):
                    continue
                if isinstance(factor, Opaque) or factor not in free:
                    continue
                pair_ok = any(tuple(piece[i : i + 2]) in matched for i in (index - 1, index))
                if factor not in matched and not pair_ok:
                    return False
    return True


def similarity_of(features: Sequence[Sequence[torch.Tensor]], workspace: "_Workspace | None" = None) -> np.ndarray | None:
    """Pearson correlation (N, N) between the units' feature vectors, float64.

    ``features[k]``: model k's blocks (n_k, F_b), with the same widths F_b for every model; a
    unit's feature vector is its rows of the blocks concatenated (never built: the products and
    sums are taken block by block). Products (upper block triangle, ``symmetric_gram``) and
    per-block sums are float32 (the blocks' dtype), accumulated over the blocks in float64; the
    centring is applied to the products (cov = dot - sum_i sum_j / F), so no centred copy of the
    features is made. ``workspace``: the result is made in its Gram buffer (valid until the
    workspace's next use) instead of a new array.
    """
    widths = [tuple(int(b.shape[1]) for b in blocks) for blocks in features]
    if len(set(widths)) != 1:
        return None
    count = sum(widths[0])
    stacked = [torch.cat([blocks[b] for blocks in features], dim=0) for b in range(len(widths[0]))]  # (N, F_b)
    dot = symmetric_gram(stacked, None if workspace is None else workspace.gram(len(stacked[0]), stacked[0].device))
    # float32 sums: 40x faster than a dtype=float64 reduction
    sums = torch.stack([block.sum(dim=1) for block in stacked]).to(torch.float64).sum(dim=0)
    squares = torch.stack([torch.linalg.vector_norm(block, dim=1) for block in stacked]).to(torch.float64).pow(2).sum(dim=0)
    variance = (squares - sums * sums / count).clamp_min(0.0)  # (N,) times count
    # every variance above 1e-20, so every denominator above 1e-20 (far from the 1e-24 floor):
    # no masks, and clamping would change nothing (the same bits)
    every_positive = bool(variance.min() > 1e-20)
    # in place, by blocks of rows: (N, N) temporaries would be several times the result
    for start in range(0, len(sums), _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        block = dot[rows]
        block.sub_(torch.outer(sums[rows], sums) / count)  # the covariance
        denominator = torch.sqrt(torch.outer(variance[rows], variance))
        if every_positive:
            block.div_(denominator)
            continue
        positive = denominator > 1e-24
        block.div_(denominator.clamp_min_(1e-24)).masked_fill_(~positive, 0.0)
    return dot.clamp_(-1, 1).cpu().numpy()  # symmetric: the Gram matrix is mirrored


def weight_similarity(
    name: str, analyses: Sequence[Analysis], states: Sequence[Mapping[str, torch.Tensor]], done: Mapping[str, "GroupMatch"],
    workspace: "_Workspace | None" = None,
) -> np.ndarray | None:
    """MuDSC's weight-space similarity of one group's units over all models, or None
    (``workspace``: see ``similarity_of``)."""
    features = []
    for k, (analysis, state) in enumerate(zip(analyses, states)):
        blocks = unit_weight_features(analysis, state, (analysis.space_ids[name],), done, k)
        if blocks is None:
            return None
        features.append(blocks)
    return similarity_of(features, workspace)


class _Workspace:
    """Float64 (N, N) buffers that every group of one ``match_groups`` call reuses, each grown to
    the largest group that needed it: ``gram`` holds a group's weight similarity
    (``similarity_of``), ``scores`` the matcher's working copy of its similarity
    (``match_labels(workspace=)``). Memory a process touches for the first time is slow (about
    2 s per GiB on the benchmark machine, ``benchmarks/results/first_touch.md``); without these,
    a ViT-B/16 merge allocated two fresh 302 MB arrays per MLP group."""

    def __init__(self) -> None:
        self._grams: dict[torch.device, torch.Tensor] = {}
        self._scores = np.empty(0)

    def gram(self, count: int, device: torch.device) -> torch.Tensor:
        flat = self._grams.get(device)
        if flat is None or flat.numel() < count * count:
            self._grams.pop(device, None)  # released before the larger one is made
            flat = self._grams[device] = torch.empty(count * count, dtype=torch.float64, device=device)
        return flat[: count * count].view(count, count)

    def scores(self, count: int) -> np.ndarray:
        """At least count x ``square_row_length(count)`` entries: the matcher's rows are padded."""
        entries = count * square_row_length(count)
        if self._scores.size < entries:
            self._scores = np.empty(0)
            self._scores = np.empty(entries)
        return self._scores[:entries]


def _transform_keys(analysis: Analysis, done: Mapping[str, "GroupMatch"]) -> set:
    keys: set = set()
    for name, result in done.items():
        if result.clusters is None:
            continue
        factors = result.factors or (name,)
        if all(f in analysis.space_ids for f in factors):
            ids = tuple(analysis.space_ids[f] for f in factors)
            keys.add(ids if len(ids) > 1 else ids[0])
    return keys


def _transforms_for(
    analysis: Analysis, done: Mapping[str, "GroupMatch"], model: int, *, dense: bool = False
) -> tuple[dict, dict]:
    """Key -> M_k (for "out" axes) and key -> U_k^T (for "in" axes) of the matched free groups,
    as ``GroupMatch.maps`` (``dense``: the float64 matrices).

    A key is a space id, or a tuple of ids for a composite matched as a whole.
    """
    out_t: dict = {}
    in_t: dict = {}
    for name, result in done.items():
        if result.clusters is None:
            continue
        factors = result.factors or (name,)
        if not all(f in analysis.space_ids for f in factors):
            continue
        ids = tuple(analysis.space_ids[f] for f in factors)
        key = ids if len(ids) > 1 else ids[0]
        if dense:
            out_t[key], in_t[key] = result.merge[model], result.unmerge[model].T  # type: ignore[index]
        else:
            out_t[key], in_t[key] = result.maps[model]
    return out_t, in_t


def _mean_merged_similarity(similarity: np.ndarray, assignment: np.ndarray) -> float | None:
    """Mean pairwise similarity inside the clusters that merged two or more units (each
    cluster's mean over its pairs, averaged over the clusters in label order); ``assignment``
    (N,): the cluster of every unit of all models concatenated."""
    order = np.argsort(assignment, kind="stable")  # by cluster, members ascending
    starts = np.flatnonzero(np.diff(assignment[order], prepend=-1))
    counts = np.diff(np.append(starts, len(order)))
    values = np.full(len(starts), np.nan)
    pairs = counts == 2  # most merged clusters: one pair, read at once
    values[pairs] = similarity[order[starts[pairs]], order[starts[pairs] + 1]]
    for cluster in np.flatnonzero(counts > 2):
        members = order[starts[cluster] : starts[cluster] + counts[cluster]]
        values[cluster] = similarity[np.ix_(members, members)][np.triu_indices(len(members), 1)].mean()
    merged = values[counts > 1]
    return float(np.mean(merged)) if len(merged) else None


@dataclass(frozen=True)
class Structure:
    """Groups that appear right after ``outer`` in a product (heads x head channels, GroupNorm
    groups x channels per group, a grouped conv's groups x channels per group): the outer blocks
    are paired first, then each inner group is matched (MuDSC's group-aware way).

    ``shared``: the inners that also appear on their own (a grouped conv's weight reads its
    input channels per group without the group index). One transform of such an inner acts on
    every block (the layout is a Kronecker product), so it is matched once, on the similarity
    averaged over paired blocks; the other inners are matched inside each pair of blocks.
    """

    outer: str
    inners: tuple[str, ...]
    shared: tuple[str, ...] = ()


def find_structures(analysis: Analysis) -> list[Structure]:
    """The composite structures among the free groups of one analysis."""
    free = {analysis.space_ids[g.name]: g.name for g in analysis.groups if not g.fixed}
    before: dict[int, set[int | None]] = {}
    for layouts in analysis.param_layouts.values():
        for layout in layouts:
            for piece in layout or ():
                for index, factor in enumerate(piece):
                    if factor in free:
                        previous = piece[index - 1] if index > 0 and piece[index - 1] in free else None
                        before.setdefault(factor, set()).add(previous)
    inners_of: dict[int, list[int]] = {}
    shared: set[int] = set()
    for space, previous in before.items():
        outers = previous - {None}
        if len(outers) == 1:
            (outer,) = outers
            inners_of.setdefault(outer, []).append(space)  # type: ignore[arg-type]
            if None in previous:
                shared.add(space)
    nested = {inner for inners in inners_of.values() for inner in inners}
    return [
        Structure(
            free[outer],
            tuple(free[i] for i in sorted(inners)),
            tuple(free[i] for i in sorted(inners) if i in shared),
        )
        for outer, inners in sorted(inners_of.items())
        if outer not in nested
    ]


def _shared_similarity(similarity: np.ndarray, inner_sizes: Sequence[int], pairing: np.ndarray) -> np.ndarray:
    """The similarity of inner units shared by all blocks: (sum d_k, sum d_k).

    ``similarity`` is over the composite units (sum h * d_k), block-major per model; entry
    ((k, j), (l, j')) of the result is the mean over paired blocks t of the similarity of
    (block pairing[k, t], unit j) of model k and (block pairing[l, t], unit j') of model l.
    """
    blocks = pairing.shape[1]
    composite_offsets = np.concatenate(([0], np.cumsum([blocks * d for d in inner_sizes])))
    inner_offsets = np.concatenate(([0], np.cumsum(inner_sizes)))
    result = np.zeros((inner_offsets[-1], inner_offsets[-1]))
    for k, dk in enumerate(inner_sizes):
        for l, dl in enumerate(inner_sizes):
            total = np.zeros((dk, dl))
            for t in range(blocks):
                rows = composite_offsets[k] + pairing[k, t] * dk
                columns = composite_offsets[l] + pairing[l, t] * dl
                total += similarity[rows : rows + dk, columns : columns + dl]
            result[inner_offsets[k] : inner_offsets[k + 1], inner_offsets[l] : inner_offsets[l + 1]] = total / blocks
    return result


def _match_structure(
    structure: Structure,
    analyses: Sequence[Analysis],
    states: Sequence[Mapping[str, torch.Tensor]],
    done: Mapping[str, GroupMatch],
    statistics: Mapping[str, GroupStatistics],
    *,
    method: str,
    width: WidthSpec,
    alpha: float,
    beta: float,
    balance: float,
) -> list[GroupMatch]:
    """Pair the outer blocks (heads) across models, then match each inner group: inside paired
    blocks, or once for all blocks when the inner is shared (see ``Structure``)."""
    from scipy.optimize import linear_sum_assignment

    matcher = "zip" if method == "mudsc" else method
    count = len(analyses)
    blocks = tuple(a.group(structure.outer).size for a in analyses)
    if len(set(blocks)) != 1:
        raise ConfigError(f"{structure.outer}: models have different numbers of blocks {blocks}; not supported yet")
    h = blocks[0]
    inner_sizes = {d: tuple(a.group(d).size for a in analyses) for d in structure.inners}
    similarities: dict[str, np.ndarray | None] = {}
    sources: dict[str, str] = {}
    for inner in structure.inners:

        def weights(inner: str = inner) -> np.ndarray | None:
            features = []
            for k, (analysis, state) in enumerate(zip(analyses, states)):
                key = (analysis.space_ids[structure.outer], analysis.space_ids[inner])
                features.append(unit_weight_features(analysis, state, key, done, k))
            return None if any(f is None for f in features) else similarity_of(features)  # type: ignore[arg-type]

        activation = product_statistics((structure.outer, inner), analyses, statistics, done)
        similarities[inner], sources[inner] = unit_similarity(activation, weights, method=method, balance=balance)
    # composite units are block-major: unit (b, j) of model k is offset_k + b * d_k + j
    pairing = np.tile(np.arange(h), (count, 1))
    usable = {d: s for d, s in similarities.items() if s is not None}
    if usable and method != "average":
        for k in range(1, count):
            scores = np.zeros((h, h))
            for inner, sim in usable.items():
                sizes = [h * d for d in inner_sizes[inner]]
                offsets = np.concatenate(([0], np.cumsum(sizes)))
                d0, dk = inner_sizes[inner][0], inner_sizes[inner][k]
                for a in range(h):
                    for b in range(h):
                        cross = sim[offsets[0] + a * d0 : offsets[0] + (a + 1) * d0, offsets[k] + b * dk : offsets[k] + (b + 1) * dk]
                        scores[a, b] += mean_matched_similarity(cross)
            rows, cols = linear_sum_assignment(scores, maximize=True)
            pairing[k, rows] = cols
    results: list[GroupMatch] = []
    head_clusters = tuple(np.argsort(pairing[k]) for k in range(count))  # block pairing[k, t] of model k -> merged block t
    head_weights = tuple(np.full(h, 1.0 / count) for _ in range(count))
    results.append(GroupMatch(structure.outer, blocks, h, False, None, "blocks paired", head_clusters, head_weights))
    ties = {inner: embedding for outer, inner, embedding in analyses[0].head_ties if outer == structure.outer}
    for inner in structure.inners:
        sizes = inner_sizes[inner]
        target = resolve_width(width, inner, sizes)
        if inner in ties and ties[inner] in done:
            # an attention layer computes head_dim = embed_dim // num_heads: follow the embedding
            embedding_width = done[ties[inner]].width
            if embedding_width % h:
                raise ConfigError(
                    f"{inner}: merged embedding width {embedding_width} of {ties[inner]} is not divisible by "
                    f"{h} heads; choose a width that is"
                )
            target = embedding_width // h
        sim = similarities[inner]
        if inner in structure.shared:
            results.append(_match_plain(inner, sizes, target, None if sim is None else _shared_similarity(sim, sizes, pairing),
                                        f"{sources[inner]}, shared by all blocks", matcher, alpha, beta))
            continue
        offsets = np.concatenate(([0], np.cumsum([h * d for d in sizes])))
        labels = np.empty(offsets[-1], dtype=np.int64)  # of the composite units, all models concatenated
        scores: list[float] = []
        for t in range(h):
            units = np.concatenate([offsets[k] + pairing[k, t] * sizes[k] + np.arange(sizes[k]) for k in range(count)])
            if sim is None:
                # nothing to compare (e.g. an inserted identity unit): keep the order when the
                # widths agree, otherwise any valid zipping is as good as another
                same = len(set(sizes)) == 1 and target == sizes[0]
                block_sim = np.eye(len(units)) if same else np.zeros((len(units), len(units)))
                block_matcher = "average" if same else matcher
            else:
                block_sim, block_matcher = sim[np.ix_(units, units)], matcher
            block_labels = match_labels(block_sim, list(sizes), target, method=block_matcher, alpha=alpha, beta=beta)
            labels[units] = t * target + block_labels
            value = _mean_merged_similarity(block_sim, block_labels)
            if value is not None and sim is not None:
                scores.append(value)
        results.append(
            GroupMatch.of_labels(
                f"{structure.outer}*{inner}",
                tuple(h * d for d in sizes),
                h * target,
                labels,
                float(np.mean(scores)) if scores else None,
                f"{sources[inner]}, block-wise" if sim is not None else "none: identity",
                factors=(structure.outer, inner),
            )
        )
    return results


def unit_similarity(
    activation: GroupStatistics | None,
    weights: Callable[[], np.ndarray | None],
    *,
    method: str,
    balance: float,
) -> tuple[np.ndarray | None, str]:
    """The similarity a group's units are matched on, and where it came from.

    Activations (correlation of features on the calibration data) when the group was observed;
    MuDSC adds ``balance`` times the weight similarity. A group whose activations cannot tell
    some units apart (``_indistinct``: dead or collinear units, or too few samples) gets the
    weight similarity as a small term on every pair (``_TIE_BREAK``), which breaks the ties.
    ``weights`` is called only when the weights are needed.

    Every pair, not only the tied units' rows: on the digits VGG pairs, the tie-break restricted
    to the tied units' rows and columns (cheaper) lost 1.3 to 3.9 points of zip's per-task
    average on each of 3 seeds — the small weight term also orders near-ties among live units.
    """
    weight_similarity_ = weights() if method == "mudsc" or activation is None or _indistinct(activation) else None
    # in place in the weight similarity (a fresh array): (N, N) temporaries are large
    if activation is not None and weight_similarity_ is not None and method == "mudsc":
        weight_similarity_ *= balance
        correlation = activation.correlation
        for start in range(0, len(correlation), _ROW_BLOCK):  # (1 - b) corr a block of rows at a time, in cache
            rows = slice(start, start + _ROW_BLOCK)
            weight_similarity_[rows] += (1 - balance) * correlation[rows]
        return weight_similarity_, f"mudsc(balance={balance})"
    if activation is not None and weight_similarity_ is not None:
        weight_similarity_ *= _TIE_BREAK
        weight_similarity_ += activation.correlation
        return weight_similarity_, "activations (+weights for ties)"
    if activation is not None:
        return activation.correlation, "activations"
    if weight_similarity_ is not None:
        return weight_similarity_, "weights"
    return None, "none"


def _match_plain(
    name: str, sizes: tuple[int, ...], target: int, similarity: np.ndarray | None, source: str,
    matcher: str, alpha: float, beta: float, workspace: _Workspace | None = None,
) -> GroupMatch:
    """Match one group's units (no block structure) on ``similarity`` (None: nothing to compare)."""
    if similarity is None:
        similarity, source = np.zeros((sum(sizes), sum(sizes))), "none: arbitrary"
        if len(set(sizes)) == 1 and target == sizes[0]:
            similarity, source, matcher = np.eye(sum(sizes)), "none: identity", "average"
    scores = None if workspace is None else workspace.scores(sum(sizes))
    labels = match_labels(similarity, sizes, target, method=matcher, alpha=alpha, beta=beta, workspace=scores)
    return GroupMatch.of_labels(name, sizes, target, labels, _mean_merged_similarity(similarity, labels), source)


def _match_live(
    name: str, sizes: tuple[int, ...], live: Sequence[int], similarity: np.ndarray | None, source: str,
    width: WidthSpec, matcher: str, alpha: float, beta: float, workspace: _Workspace | None = None,
) -> GroupMatch:
    """``_match_plain`` over the ``live`` models' units only; the others get zero M_k and U_k, so
    their weights take no part in the merged parameters of this group."""
    live_sizes = tuple(sizes[k] for k in live)
    if similarity is not None:
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        rows = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in live])
        similarity = similarity[np.ix_(rows, rows)]
    inert = f"; models {sorted(set(range(len(sizes))) - set(live))} inert"
    if len(live) == 1:  # nothing to match: the live model's units, as they are
        return _own_units(name, sizes, live[0], source + inert)
    target = resolve_width(width, name, live_sizes)
    sub = _match_plain(name, live_sizes, target, similarity, source, matcher, alpha, beta, workspace)
    assert sub.clusters is not None and sub.weights is not None
    clusters = tuple(sub.clusters[live.index(k)] if k in live else np.full(size, -1) for k, size in enumerate(sizes))
    weights = tuple(sub.weights[live.index(k)] if k in live else np.zeros(size) for k, size in enumerate(sizes))
    return replace(sub, sizes=sizes, source=sub.source + inert, clusters=clusters, weights=weights)


def _own_units(name: str, sizes: tuple[int, ...], live: int, source: str, factors: tuple[str, ...] = ()) -> GroupMatch:
    """Model ``live``'s units as they are (identity M and U); every other model's inert (zero)."""
    clusters = tuple(np.arange(size) if k == live else np.full(size, -1) for k, size in enumerate(sizes))
    weights = tuple(np.ones(size) if k == live else np.zeros(size) for k, size in enumerate(sizes))
    return GroupMatch(name, sizes, sizes[live], False, None, source, clusters, weights, factors=factors)


def _own_structure(
    structure: Structure, analyses: Sequence[Analysis], done: Mapping[str, GroupMatch],
    inert: Mapping[str, frozenset[int]], width: WidthSpec,
) -> list[GroupMatch] | None:
    """A structure (attention heads x head channels) inert in every model but one — the
    attention of an inserted zero-residual unit — as that model's own blocks and channels
    (identity M_k and U_k; zero for the others), when those are the widths asked for; else None."""
    names = (structure.outer, *structure.inners)
    count = len(analyses)
    dead = set.intersection(*(set(inert.get(name, ())) for name in names))
    live = [k for k in range(count) if k not in dead]
    if not dead or len(live) != 1:
        return None
    (k_live,) = live
    ties = {inner: embedding for outer, inner, embedding in analyses[0].head_ties if outer == structure.outer}
    blocks = tuple(a.group(structure.outer).size for a in analyses)
    if len(set(blocks)) != 1:
        return None
    h = blocks[0]
    inner_sizes = {d: tuple(a.group(d).size for a in analyses) for d in structure.inners}
    for inner, sizes in inner_sizes.items():
        target = done[ties[inner]].width // h if inner in ties and ties[inner] in done else resolve_width(width, inner, sizes)
        if target != sizes[k_live]:
            return None
    source = f"the model's own; models {sorted(dead)} inert"
    results = [_own_units(structure.outer, blocks, k_live, source)]
    for inner, sizes in inner_sizes.items():
        if inner in structure.shared:
            results.append(_own_units(inner, sizes, k_live, source))
        else:
            results.append(_own_units(f"{structure.outer}*{inner}", tuple(h * d for d in sizes), k_live, source, (structure.outer, inner)))
    return results


def _warn_too_few_samples(starved: Sequence[GroupStatistics]) -> None:
    """One warning for every group observed on no more samples than it has units per model."""
    if not starved:
        return
    shown = ", ".join(f"{s.name} ({s.samples} samples, {max(s.sizes)} units)" for s in starved[:8])
    more = f" and {len(starved) - 8} more" if len(starved) > 8 else ""
    warnings.warn(
        f"{len(starved)} group(s) had no more calibration samples at their taps than units per model: "
        f"{shown}{more}. Their covariance is rank-deficient, so activations cannot tell every unit apart; "
        "weight similarity breaks the ties and the merge may not be exact. Pass more calibration data "
        "(more batches, or larger inputs: conv features count every position as a sample).",
        stacklevel=3,
    )


def too_few_samples(activation: GroupStatistics) -> bool:
    """Whether a group was observed on no more samples than one model has units: its covariance
    is then rank-deficient, and correlations cannot be trusted to tell every unit apart."""
    return activation.samples <= max(activation.sizes)


def _indistinct(activation: GroupStatistics) -> bool:
    """Whether activations cannot tell some units of one model apart: a unit is constant on the
    calibration data (dead), two units are collinear (|correlation| within ``_COLLINEAR`` of 1;
    e.g. channels that are dead before a LayerNorm, which maps each of them to an affine function
    of the same statistics), or there are too few samples for the width (``too_few_samples``)."""
    if activation.constant.any() or too_few_samples(activation):
        return True
    offset = 0
    for size in activation.sizes:
        block = np.abs(activation.correlation[offset : offset + size, offset : offset + size])
        offset += size
        # off the diagonal: all entries at the threshold minus the diagonal's (no masked copy)
        if np.count_nonzero(block >= _COLLINEAR) > np.count_nonzero(np.diagonal(block) >= _COLLINEAR):
            return True
    return False


def _labels_of(key: tuple[str, ...], analysis: Analysis, done: Mapping[str, GroupMatch], model: int) -> np.ndarray | None:
    """Model ``model``'s units of the product ``key`` -> their merged units (row-major), or None
    while a free factor of ``key`` is not matched yet. Fixed factors keep their order."""
    labels = np.zeros(1, dtype=np.int64)
    position = 0
    while position < len(key):
        pair = "*".join(key[position : position + 2])
        if position + 1 < len(key) and pair in done:
            matched, step = done[pair], 2
        elif key[position] in done:
            matched, step = done[key[position]], 1
        elif analysis.group(key[position]).fixed:
            size = analysis.group(key[position]).size
            labels, position = (labels[:, None] * size + np.arange(size)[None, :]).reshape(-1), position + 1
            continue
        else:
            return None
        if matched.clusters is None:
            own, width = np.arange(matched.sizes[model]), matched.sizes[model]
        else:
            own, width = matched.clusters[model], matched.width
        labels = (labels[:, None] * width + own[None, :]).reshape(-1)
        position += step
    return labels


def product_statistics(
    key: tuple[str, ...],
    analyses: Sequence[Analysis],
    statistics: Mapping[str, GroupStatistics],
    done: Mapping[str, GroupMatch] | None = None,
) -> GroupStatistics | None:
    """The statistics of the units of ``key`` (one group, or a product such as outer x inner):
    observed directly, or read off an observed product that contains ``key`` as consecutive
    factors (a GroupNorm whose groups are fixed; a GroupNorm over a grouped conv's output).

    The factors before ``key`` must be fixed (their order is the same in every model) or already
    matched (``done``): the similarity of two units of ``key`` is averaged over the blocks those
    factors pair across models. The factors after it are summarised, per pair of units, by the
    diagonal mean when they are fixed and by the mean matched similarity (an optimal one-to-one
    assignment) otherwise.
    """
    name = "*".join(key)
    if name in statistics:
        return statistics[name]
    for factors in analyses[0].composite_taps:
        product = statistics.get("*".join(factors))
        at = next((i for i in range(len(factors) - len(key) + 1) if factors[i : i + len(key)] == key), None)
        if product is None or at is None:
            continue
        found = _read_off(product, factors, at, len(key), analyses, done or {})
        if found is not None:
            return found
    return None


def _read_off(
    product: GroupStatistics, factors: tuple[str, ...], at: int, length: int, analyses: Sequence[Analysis],
    done: Mapping[str, GroupMatch],
) -> GroupStatistics | None:
    """The statistics of ``factors[at : at + length]`` from those of their observed ``product``
    (see ``product_statistics``), or None while a factor before them is not matched yet or the
    summary would cost too much."""
    count = len(analyses)
    key, prefix, suffix = factors[at : at + length], factors[:at], factors[at + length :]
    prefix_labels = [_labels_of(prefix, a, done, k) if prefix else np.zeros(1, dtype=np.int64) for k, a in enumerate(analyses)]
    if any(labels is None for labels in prefix_labels):
        return None

    def size(names: tuple[str, ...], k: int) -> int:
        return math.prod(analyses[k].group(f).size for f in names)

    key_sizes = tuple(size(key, k) for k in range(count))
    suffix_sizes = [size(suffix, k) for k in range(count)]
    fixed_suffix = all(analyses[0].group(f).fixed for f in suffix)
    matched_suffix = not fixed_suffix and max(suffix_sizes) > 1
    if max(key_sizes) ** 2 * count**2 * (max(suffix_sizes) if matched_suffix else 1) > 4_000_000:
        return None  # one assignment per pair of units: more than the tie it would settle is worth
    offsets = np.concatenate(([0], np.cumsum([size(factors, k) for k in range(count)])))
    starts = np.concatenate(([0], np.cumsum(key_sizes)))
    correlation = np.zeros((starts[-1], starts[-1]))
    constant = []
    for k in range(count):
        units_k = (len(prefix_labels[k]), key_sizes[k], suffix_sizes[k])
        constant.append(product.constant[offsets[k] : offsets[k + 1]].reshape(units_k).all(axis=(0, 2)))
        for l in range(count):
            units_l = (len(prefix_labels[l]), key_sizes[l], suffix_sizes[l])
            full = product.correlation[offsets[k] : offsets[k + 1], offsets[l] : offsets[l + 1]].reshape(*units_k, *units_l)
            total, blocks = np.zeros((key_sizes[k], key_sizes[l])), 0
            for merged in np.intersect1d(prefix_labels[k], prefix_labels[l]):
                if merged < 0:
                    continue  # units of an inert model: no merged block
                pk, pl = np.flatnonzero(prefix_labels[k] == merged)[0], np.flatnonzero(prefix_labels[l] == merged)[0]
                sub = full[pk, :, :, pl, :, :]  # (key_k, suffix_k, key_l, suffix_l)
                if not matched_suffix and suffix_sizes[k] == 1:
                    total += sub[:, 0, :, 0]
                elif not matched_suffix:
                    total += np.einsum("ajbj->ab", sub) / suffix_sizes[k]
                else:
                    total += np.array(
                        [[mean_matched_similarity(sub[a, :, b, :]) for b in range(key_sizes[l])] for a in range(key_sizes[k])]
                    )
                blocks += 1
            if not blocks:
                return None
            correlation[starts[k] : starts[k + 1], starts[l] : starts[l + 1]] = total / blocks
    return GroupStatistics("*".join(key), key_sizes, correlation, product.taps, product.samples, np.concatenate(constant))


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
    include: set[str] | None = None,
    inert: Mapping[str, frozenset[int]] | None = None,
    rounds: int = 1,
) -> dict[str, GroupMatch]:
    """Match every group of the reference analysis (``analyses[0]``) across all models.

    ``include``: the groups of the merged region (partial zipping); others are left alone.
    ``inert``: group name -> the models whose units in it do not reach their output (the hidden
    channels of an inserted zero-residual unit, ``depth.inert_groups``): the group is matched
    over the other models only, and the inert models' M_k and U_k are zero.
    ``rounds``: how many times the groups matched on weights are re-matched with their
    neighbours' latest matches, in the same deterministic order; it stops earlier at a round that
    changes no match (Git Re-Basin's weight matching, which a data-free merge iterates).
    """
    inert = inert or {}
    if isinstance(width, Mapping):
        known = {g.name for g in analyses[0].groups}
        unknown = sorted(set(width) - known)
        if unknown:
            raise ConfigError(f"width: no group named {', '.join(map(repr, unknown))}; groups: {sorted(known)}")
    results: dict[str, GroupMatch] = {}
    # one group's similarity lives in it until the next group is matched (nothing keeps it)
    workspace = _Workspace()
    matcher = "zip" if method == "mudsc" else method
    structures = {s.outer: s for s in find_structures(analyses[0])}
    in_structure = {name for s in structures.values() for name in (s.outer, *s.inners)}
    # One item per plain group or structure, in topological order.
    items: list[ChannelSpace] = []
    for group in analyses[0].groups:
        if include is not None and group.name not in include:
            continue
        if group.name in in_structure and group.name not in structures:
            continue
        items.append(group)

    def tier(group: ChannelSpace) -> int:
        """0: activations tell the units apart; 1: observed, with ties; 2: observed inside a
        product of groups; 3: not observed."""
        names = [group.name]
        if group.name in structures:
            structure = structures[group.name]
            names = [f"{structure.outer}*{inner}" for inner in structure.inners]
        keys = [tuple(name.split("*")) for name in names]
        found = [product_statistics(key, analyses, statistics) for key in keys]
        if all(stats is not None for stats in found):
            return 1 if any(_indistinct(stats) for stats in found) else 0  # type: ignore[arg-type]
        # observed inside a product whose other factors must be matched first
        inside = any(set(key) <= set(factors) for key in keys for factors in analyses[0].composite_taps)
        return 2 if inside else 3

    # Groups whose activations tell their units apart are matched first, then groups with ties,
    # then groups never observed: the weight features that the later ones need (attention heads
    # inside a layer, dead or tied units) then see their neighbours in the merged basis, whatever
    # the topological order. Within a tier, topological order.
    def match_item(group: ChannelSpace, done: Mapping[str, GroupMatch]) -> list[GroupMatch]:
        sizes = tuple(a.group(group.name).size for a in analyses)
        if any(a.group(group.name).fixed for a in analyses):
            if len(set(sizes)) != 1:
                raise ConfigError(
                    f"group {group.name} is fixed ({group.reason}) but its sizes differ across models {sizes}"
                )
            return [GroupMatch(group.name, sizes, sizes[0], True, None, "fixed", None, None)]
        if group.name in structures:
            own = _own_structure(structures[group.name], analyses, done, inert, width)
            return own if own is not None else _match_structure(
                structures[group.name], analyses, states, done, statistics,
                method=method, width=width, alpha=alpha, beta=beta, balance=balance,
            )
        similarity, source = unit_similarity(
            product_statistics((group.name,), analyses, statistics, done),
            lambda: weight_similarity(group.name, analyses, states, done, workspace),
            method=method,
            balance=balance,
        )
        target = resolve_width(width, group.name, sizes)
        live = [k for k in range(len(sizes)) if k not in inert.get(group.name, ())]
        # one live model keeps its own units: only when that is the width asked for (merging a
        # model's own units needs the matcher, with every model)
        if live and len(live) < len(sizes) and (len(live) > 1 or target == sizes[live[0]]):
            return [_match_live(group.name, sizes, live, similarity, source, width, matcher, alpha, beta, workspace)]
        return [_match_plain(group.name, sizes, target, similarity, source, matcher, alpha, beta, workspace)]

    order = sorted(items, key=tier)
    matched: dict[str, list[GroupMatch]] = {}
    inputs: dict[str, tuple] = {}
    for group in order:
        inputs[group.name] = _neighbour_matches(analyses[0], group.name, structures, results)
        matched[group.name] = match_item(group, results)
        results.update((result.name, result) for result in matched[group.name])
    _warn_too_few_samples([s for s in statistics.values() if too_few_samples(s)])
    # A group matched on weights (alone, or to break ties) saw only the neighbours matched before
    # it: match it once more with every other group in the merged basis (one step of Git
    # Re-Basin's weight matching). A group whose neighbours' matches are the very ones it saw
    # would be matched again on the same input. MuDSC keeps its single pass, as in the paper. So
    # does zip for the groups whose activations decide all but their tied units ("+weights for
    # ties"): matched again, they changed no zip match in 24 digits merges (x4 ResNets and VGGs,
    # 3 seeds) nor in random-init torchvision resnet18, where it cost 0.75 s of a 4.1 s merge
    # (permute's assignments do change: it keeps the step).
    def rematched(match: GroupMatch) -> bool:
        return match.source.startswith("weights") or ("+weights" in match.source and method == "permute")

    for _ in range(rounds):
        changed = False
        for group in order:
            if not any(map(rematched, matched[group.name])):
                continue
            own = {m.name for m in matched[group.name]}
            done = {k: v for k, v in results.items() if k not in own}
            now = _neighbour_matches(analyses[0], group.name, structures, done)
            if len(now) == len(inputs[group.name]) and all(a == b and c is d for (a, c), (b, d) in zip(now, inputs[group.name])):
                continue
            inputs[group.name] = now
            fresh = match_item(group, done)
            if len(fresh) == len(matched[group.name]) and all(map(_same_match, fresh, matched[group.name])):
                continue  # the same matrices: the old objects stay, so the neighbours see no change
            changed = True
            matched[group.name] = fresh
            results.update((result.name, result) for result in fresh)
        if not changed:
            break
    return {result.name: result for group in items for result in matched[group.name]}


def _same_match(a: GroupMatch, b: GroupMatch) -> bool:
    """Whether two matches of one group have the same merge and unmerge matrices."""
    if (a.clusters is None) != (b.clusters is None):
        return False
    if a.clusters is None or a.weights is None or b.clusters is None or b.weights is None:
        return True
    return all(map(np.array_equal, a.clusters + a.weights, b.clusters + b.weights))


def _neighbour_matches(
    analysis: Analysis, name: str, structures: Mapping[str, Structure], done: Mapping[str, GroupMatch]
) -> tuple[tuple[str, GroupMatch | None], ...]:
    """What matching the item ``name`` (a group, or a structure's outer group) reads of the other
    groups' matches: (name, match or None) of every group that shares a parameter or an observed
    product with its spaces — the weight features (``unit_weight_features``), the statistics read
    off a product (``product_statistics``) and an attention layer's embedding width depend on
    nothing else in ``done``."""
    own = {name, *(structures[name].inners if name in structures else ())}
    ids = {analysis.space_ids[n] for n in own}
    spaces: set[int] = set()
    for layouts in analysis.param_layouts.values():
        found = {f for layout in layouts if layout for piece in layout for f in piece if not isinstance(f, Opaque)}
        if found & ids:
            spaces |= found
    names = {n for n, i in analysis.space_ids.items() if i in spaces}
    for factors in analysis.composite_taps:
        if own & set(factors):
            names |= set(factors)
    names -= own
    # composites matched as a whole (heads x head channels) that hold a neighbouring space
    composites = {k for k, m in done.items() if m.factors and set(m.factors) & names and not set(m.factors) & own}
    return tuple((k, done.get(k)) for k in sorted(names | composites))


def unmerge_transforms(analysis: Analysis, matches: Mapping[str, GroupMatch], model: int) -> dict:
    """Key -> U_k (n_k, r) of every matched free group (keys as in ``_transforms_for``)."""
    _, in_t = _transforms_for(analysis, matches, model, dense=True)
    return {key: matrix.T for key, matrix in in_t.items()}


def merged_sizes(analysis: Analysis, matches: Mapping[str, GroupMatch]) -> dict[int, int]:
    """Space id -> merged width (a composite's inner width is its width over the outer's)."""
    sizes = dict(analysis.space_sizes)
    for name, result in matches.items():
        if result.factors:
            outer, inner = result.factors
            outer_width = matches[outer].width if outer in matches else sizes[analysis.space_ids[outer]]
            sizes[analysis.space_ids[inner]] = result.width // outer_width
        elif name in analysis.space_ids:
            sizes[analysis.space_ids[name]] = result.width
    return sizes


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return tensor if scale == 1.0 else tensor * scale


def _work_dtype(value: torch.Tensor) -> torch.dtype:
    """The dtype a merged parameter is computed in: its own, at least float32 (half models are
    merged in float32 and rounded once)."""
    return torch.promote_types(value.dtype, torch.float32)


def running_variances(analysis: Analysis) -> set[str]:
    """Canonical names of the running-variance buffers of every batch norm in the analysed graph."""
    from fxmerge import ops

    return {analysis.aliases.get(r.var, r.var) for r in ops.running_stats(analysis.graph_module)}


def _weighted_merge(
    tensors: Sequence[torch.Tensor], layouts: Sequence[tuple], roles: Sequence[tuple], analyses: Sequence[Analysis],
    per_model: Sequence[tuple[dict, dict]], scales: Sequence[float],
) -> torch.Tensor:
    """sum_k T_k(tensors[k]) (in the tensors' dtype), normalised by the total weight the M_k give
    each merged entry (see ``merged_state``); ``layouts[k]``/``roles[k]``: the axes of model k's
    tensor."""
    total = None
    weight = None
    for k, (analysis, tensor) in enumerate(zip(analyses, tensors)):
        out_t, in_t = per_model[k]
        term = transform_tensor(tensor, layouts[k], roles[k], out_t, in_t, analysis.space_sizes)
        # How much each merged "out" entry is weighted in total: M_k applied to ones. One matched
        # factor per piece gives 1 summed over the models (M's rows average a cluster), no
        # transformed "out" axis gives count; a product of separately matched factors (a conv's
        # output read by a grouped conv: groups x in-channels-per-group) gives the product of
        # their averaging weights, e.g. 1/count**2 each, which must be normalised away.
        ones_shape = [
            size if role == "out" and layout is not None else 1
            for size, layout, role in zip(tensor.shape, layouts[k], roles[k])
        ]
        ones = transform_tensor(
            torch.ones(ones_shape, dtype=torch.float64, device=tensor.device), layouts[k], roles[k], out_t, {},
            analysis.space_sizes,
        )
        # in place where the term is this function's own (transform_tensor returns its input when
        # no axis changes): fewer fresh (r, ...) float64 tensors, the same values
        owned = term is not tensor
        if scales[k] != 1.0:
            term = term.mul_(scales[k]) if owned else term * scales[k]
            owned = True
        ones = _scaled(ones, scales[k])
        if total is None:
            total = term if owned else term.clone()
        else:
            total.add_(term)
        weight = ones if weight is None else weight + ones
    weight = torch.where(weight > 0, weight, torch.ones_like(weight)).to(total.dtype)  # type: ignore[union-attr]
    # one matched factor per axis: every entry's weights sum to 1 and x / 1 == x
    return total if bool((weight == 1).all()) else total.div_(weight)  # type: ignore[union-attr]


def merged_channel_vectors(
    analyses: Sequence[Analysis], vectors: Sequence[torch.Tensor], layouts: Sequence[tuple],
    matches: Mapping[str, GroupMatch], weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-channel values of one node in every model, merged like a bias of that node would be:
    ``vectors[k]`` (n_k,) along model k's channel axis of layout ``layouts[k]`` -> (r,) float64,
    the ``weights``-weighted average over the models of what M_k gives each merged unit (REPAIR's
    interpolated statistics)."""
    count = len(analyses)
    scales = [1.0] * count if weights is None else [float(w) * count for w in weights]
    per_model = [_transforms_for(a, matches, k) for k, a in enumerate(analyses)]
    return _weighted_merge(
        [v.to(torch.float64) for v in vectors], [(layout,) for layout in layouts], [("out",)] * count,
        analyses, per_model, scales,
    )


def merged_state(
    analyses: Sequence[Analysis],
    states: Sequence[Mapping[str, torch.Tensor]],
    matches: Mapping[str, GroupMatch],
    params: set[str] | None = None,
    weights: Sequence[float] | None = None,
    output_params: set[str] | None = None,
    output_weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged model's state dict (keys and names of ``analyses[0]``'s model).

    W* = sum_k T_k(W_k), where T_k applies M_k on "out" axes and U_k on "in" axes. A parameter
    with no free group on an "out" axis (e.g. a classifier whose outputs are fixed) has no M to
    average the models, so its terms are weighted 1/K. In general every merged entry is divided by
    the total weight the M_k give it (sum_k M_k 1, which is 1 for one matched factor per axis): a
    product of separately matched factors on one axis (groups x channels per group) must still
    average the models once. ``params``: only these canonical names are merged (partial zipping);
    the others keep the reference model's values. ``weights``: one weight per model, summing to 1:
    every merged entry is the ``weights``-weighted average of what the models give it instead of
    the plain average (a merge "interpolated" between the models; (1, 0): model 0, (0, 1): model
    1 in model 0's channel order). ``output_params`` (canonical names): the parameters of the
    output layers, averaged with ``output_weights`` instead (``output_balance="norm"``,
    ``fxmerge.passes.outputs``).

    Running variances (``fxmerge.ops.running_stats``) are merged as standard deviations: a merged
    unit's variance is the square of the (weighted) average of its source units' running stds.
    That is the variance of an average of perfectly correlated units (what matching pairs), and,
    for a model merged with its permuted twin, the model's own variance. The average of the
    variances would be larger than that for any two units of different stds. Units that are not
    perfectly correlated average to a smaller variance still: ``repair="bn"`` measures it,
    ``repair="none"`` keeps this estimate.

    Precision: each parameter is merged in its own dtype (at least float32; ``_work_dtype``). A
    merged entry is a weighted sum of the few entries its cluster holds (two for a cross-model
    pair, whose average is then the correctly rounded one, as in float64), so it is within a few
    float32 roundings of the float64 merge; the float64 version cost twice the time and memory
    (resnet18 pair: 0.34 s against 0.18 s) for bits the float32 model cannot keep.
    """
    count = len(analyses)
    plain = [1.0] * count if weights is None else [float(w) * count for w in weights]
    balanced = None if output_weights is None else [float(w) * count for w in output_weights]
    reference = analyses[0]
    per_model = [_transforms_for(a, matches, k) for k, a in enumerate(analyses)]
    variances = running_variances(reference)
    merged: dict[str, torch.Tensor] = {}
    for key, value in states[0].items():
        canonical = reference.aliases.get(key, key)
        scales = balanced if balanced is not None and canonical in (output_params or ()) else plain
        if params is not None and canonical not in params:
            merged[key] = value.clone()  # a tail's parameter: each model keeps its own
            continue
        if canonical in merged:
            merged[key] = merged[canonical]
            continue
        if canonical not in reference.param_layouts:
            if value.is_floating_point():
                terms = [s[key].to(_work_dtype(value)) for s in states]
                if canonical in variances:
                    terms = [t.clamp_min(0).sqrt() for t in terms]
                total = sum(_scaled(t, c) for t, c in zip(terms, scales)).div(count)
                merged[key] = (total.square() if canonical in variances else total).to(value.dtype)
            else:
                merged[key] = value.clone()
            continue
        tensors = [state[canonical].to(_work_dtype(value)) for state in states]
        if canonical in variances:
            tensors = [tensor.clamp_min(0).sqrt() for tensor in tensors]
        total = _weighted_merge(
            tensors, [a.param_layouts[canonical] for a in analyses], [a.param_roles[canonical] for a in analyses],
            analyses, per_model, scales,
        )
        if canonical in variances:
            total = total.square()
        merged[key] = total.to(value.dtype)
        merged[canonical] = merged[key]
    return {key: merged[key] for key in states[0]}



def regression_unmerge(
    match: GroupMatch, activation: GroupStatistics, model_weights: Sequence[float] | None = None,
    ridge: float = UNMERGE_RIDGE,
) -> GroupMatch:
    """``match`` with U_k fitted to the data: the least-squares reconstruction of every model's
    features from the merged ones, shrunk toward the copy unmerge U0 (ZipIt!'s).

    With x (N,) the units of all models at the group's taps (covariance C = D R D from
    ``activation``: correlation R, stds D) and m = M x the merged units (M (r, N) the merge
    matrices as the rewrite weights them, ``model_weights`` included), the consumers of model
    k's units read U_k m instead of x_k. U = U0 + (C M^T - U0 C_mm)(C_mm + ridge s I)^-1, C_mm =
    M C M^T, s = tr(C_mm) / r: the minimiser of E||x - U m||^2 + ridge s ||U - U0||^2. Where a
    merged unit has no variance it stays U0 (which carries a dead unit's constant along), a
    model merged with its permuted twin gets U0 exactly (C M^T = U0 C_mm), and with
    uncorrelated unit-variance features U = U0. M, and so the merged units, are unchanged.

    Returns ``match`` itself for a fixed group or one without unit stds (a product's statistics).
    Cost: O(N^2) to read R, O(r^3 + r^2 N) for the solve, float64; U is (N, r) float64.
    """
    if match.clusters is None or match.weights is None or activation.std is None or match.factors:
        return match
    r = match.width
    clusters = np.concatenate(match.clusters)
    live = clusters >= 0
    if not live.any() or np.bincount(clusters[live], minlength=r).max() < 2:
        return match  # nothing merged: U0 already reconstructs every unit
    # the weight each unit gets in its merged unit, as ``_weighted_merge`` normalises it
    count = len(match.sizes)
    scales = np.ones(count) if model_weights is None else np.asarray(model_weights, dtype=np.float64) * count
    entry = np.concatenate([w * scales[k] for k, w in enumerate(match.weights)]).astype(np.float64)
    entry[~live] = 0.0
    total = np.zeros(r)
    np.add.at(total, clusters[live], entry[live])
    entry[live] /= np.where(total > 0, total, 1.0)[clusters[live]]
    units = torch.from_numpy(np.flatnonzero(live))
    rows = torch.from_numpy(clusters[live])
    std = torch.from_numpy(np.asarray(activation.std, dtype=np.float64))
    correlation = torch.from_numpy(activation.correlation)
    n = len(clusters)
    # C M^T (N, r) = D R (D M^T), D M^T one entry per live unit: summed columns of R, by row blocks
    column_scale = (std * torch.from_numpy(entry))[units]
    cross = torch.zeros(n, r, dtype=torch.float64)
    for start in range(0, n, _ROW_BLOCK):
        block = correlation[start : start + _ROW_BLOCK].index_select(1, units).mul_(column_scale)
        cross[start : start + _ROW_BLOCK].index_add_(1, rows, block)
    cross.mul_(std[:, None])
    merged = torch.zeros(r, r, dtype=torch.float64).index_add_(0, rows, cross[units].mul_(torch.from_numpy(entry)[units, None]))
    merged = (merged + merged.T).mul_(0.5)  # symmetric up to rounding: make it exactly so
    # C M^T - U0 C_mm: U0 C_mm is each live unit's merged unit's row of C_mm
    residual = cross.index_add_(0, units, merged.index_select(0, rows), alpha=-1)
    mean_variance = float(torch.trace(merged)) / r
    if not mean_variance > 0:
        return match  # every merged unit constant: nothing to regress on
    merged.diagonal().add_(ridge * mean_variance)
    factor = torch.linalg.cholesky(merged)
    correction = torch.cholesky_solve(residual.T.contiguous(), factor).T  # (N, r)
    correction[~torch.from_numpy(live)] = 0.0  # inert units stay out of the merge
    correction[units, rows] += 1.0  # + U0
    offsets = np.concatenate(([0], np.cumsum(match.sizes)))
    matrices = tuple(correction[offsets[k] : offsets[k + 1]].numpy().copy() for k in range(count))
    return replace(match, unmerge_matrices=matrices, source=match.source + ", regression unmerge")


def regression_unmerges(
    analysis: Analysis, matches: Mapping[str, GroupMatch], statistics: Mapping[str, GroupStatistics],
    model_weights: Sequence[float] | None = None,
) -> dict[str, GroupMatch]:
    """``matches`` with ``regression_unmerge`` applied to every group observed on its own (its
    activations took part in the match: permute, zip, mudsc); not the groups of a block structure
    (heads and their channels are matched as products, whose unmerge stays one-to-one)."""
    in_structure = {name for st in find_structures(analysis) for name in (st.outer, *st.inners)}
    return {
        name: regression_unmerge(match, statistics[name], model_weights)
        if name in statistics and name not in in_structure and not match.source.startswith(("weights", "none")) else match
        for name, match in matches.items()
    }
