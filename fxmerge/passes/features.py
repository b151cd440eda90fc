"""Feature statistics: one streamed pass over calibration batches through every model.

For every free group, the pass observes the group's channels at its taps in every model,
concatenates them into joint features ``[f_1; ...; f_K]`` (conv features: every spatial
position is a sample), and accumulates their mean and covariance in float64 with a batch-wise
merge (Chan et al.), so memory does not grow with the number of batches. The result per group
is the correlation matrix over all models' units, averaged over the group's taps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxmerge.errors import CalibrationError
from fxmerge.groups import ChannelSpace, Tap
from fxmerge.metrics import correlation
from fxmerge.progress import progress

_CONSUMER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention, nn.ConvTranspose2d)


class RunningMoments:
    """Streaming mean and covariance of d-dimensional samples, in float64.

    ``update(x)`` takes a (samples, d) batch; memory is O(d^2) whatever the number of batches.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum of centred outer products

    def update(self, samples: torch.Tensor) -> None:
        samples = samples.to(torch.float64)
        n = samples.shape[0]
        if n == 0:
            return
        batch_mean = samples.mean(dim=0)
        centred = samples - batch_mean
        batch_scatter = centred.T @ centred
        total = self.count + n
        delta = batch_mean - self.mean
        self.scatter += batch_scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        return self.scatter / max(self.count - 1, 1)


@dataclass(frozen=True)
class GroupStatistics:
    """Joint feature statistics of one group over all models.

    ``correlation`` is (N, N) with N = sum(sizes), model k's units at offset_k .. offset_k + n_k,
    averaged over ``taps``; ``samples`` counts the samples seen at one tap.
    """

    name: str
    sizes: tuple[int, ...]
    correlation: np.ndarray
    taps: tuple[str, ...]
    samples: int
    constant: np.ndarray  # (N,) bool: units constant at every tap (dead on the calibration data)


def choose_taps(gm: GraphModule, group: ChannelSpace, limit: int = 4) -> list[Tap]:
    """The taps whose values a layer reads (the features the next layer sees), at most ``limit``.

    Conv output and its BatchNorm output have the same correlations (a per-channel affine map), so
    observing where a consumer reads the channels is both cheaper and what ZipIt! observes.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    modules = dict(gm.named_modules())

    def consumed(tap: Tap) -> bool:
        for user in nodes[tap.node].users:
            if user.op == "call_module" and isinstance(modules.get(str(user.target)), _CONSUMER_MODULES):
                return True
            if user.op == "call_function" and getattr(user.target, "__name__", "") in ("linear", "conv2d", "conv1d"):
                return True
        return False

    chosen = [tap for tap in group.taps if consumed(tap)] or list(group.taps[-1:])
    if len(chosen) > limit:
        picks = np.linspace(0, len(chosen) - 1, limit).round().astype(int)
        chosen = [chosen[i] for i in sorted(set(picks.tolist()))]
    return chosen


def tap_extractor(gm: GraphModule, node_names: Sequence[str]) -> GraphModule:
    """A copy of ``gm`` whose output is a tuple of clones of the named nodes' values.

    The clones are taken right after each node, before any in-place op can overwrite the value.
    """
    graph = Graph()
    value_map: dict[Node, Node] = {}
    graph.graph_copy(gm.graph, value_map)
    by_name = {old.name: new for old, new in value_map.items()}
    outputs = []
    for name in node_names:
        node = by_name[name]
        with graph.inserting_after(node):
            outputs.append(graph.call_method("clone", (node,)))
    graph.output(tuple(outputs))
    extractor = GraphModule(gm, graph)
    extractor.eval()
    return extractor


def _constant_units(moments: RunningMoments) -> torch.Tensor:
    variance = torch.diagonal(moments.covariance())
    return variance <= 1e-12 * variance.max().clamp_min(1e-30)


def _similarity(moments: RunningMoments) -> torch.Tensor:
    """Correlation, with one addition: units that are constant on the calibration data (dead
    ReLUs) at the same value are identical features, so their similarity is 1 (correlation
    alone says 0 and would let a matcher merge a live unit into a dead one first)."""
    cov = moments.covariance()
    corr = correlation(cov)
    constant = _constant_units(moments)
    if constant.any():
        means = moments.mean[constant]
        same = (means[:, None] - means[None, :]).abs() <= 1e-6 * (1 + means.abs().max())
        index = torch.nonzero(constant).squeeze(1)
        corr[index[:, None], index[None, :]] = torch.where(same, 1.0, corr[index[:, None], index[None, :]])
    return corr


def _samples(value: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., n, ...) -> (samples, n): every other position is one sample."""
    moved = value.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1])


def feature_statistics(
    models: Sequence[GraphModule],
    groups: Sequence[Sequence[ChannelSpace]],
    batches: Iterable[torch.Tensor],
    *,
    num_batches: int | None = None,
    quiet: bool = False,
) -> dict[str, GroupStatistics]:
    """Correlation of every listed group's units across all models, from one pass over ``batches``.

    Args:
        models: K traced models (eval mode) whose tap node names correspond.
        groups: per model, the groups to observe, in the same order for every model (same names).
        batches: input batches (tensors), each fed to every model.
    """
    reference = groups[0]
    tap_lists = {g.name: choose_taps(models[0], g) for g in reference}
    names = [t.node for taps in tap_lists.values() for t in taps]
    unique_names = list(dict.fromkeys(names))
    extractors = [tap_extractor(model, unique_names) for model in models]
    sizes = {g.name: tuple(model_groups[i].size for model_groups in groups) for i, g in enumerate(reference)}
    moments: dict[tuple[str, str], RunningMoments] = {}
    seen = 0
    with torch.no_grad():
        for batch in progress(batches, total=num_batches, description="feature statistics", quiet=quiet):
            values = [dict(zip(unique_names, extractor(batch))) for extractor in extractors]
            for group in reference:
                for tap in tap_lists[group.name]:
                    joint = torch.cat([_samples(v[tap.node], tap.dim) for v in values], dim=1)
                    if not torch.isfinite(joint).all():
                        raise CalibrationError(
                            f"non-finite features at node '{tap.node}' (group {group.name}): "
                            "check the calibration data and the models"
                        )
                    key = (group.name, tap.node)
                    if key not in moments:
                        moments[key] = RunningMoments(joint.shape[1], joint.device)
                    moments[key].update(joint)
            seen += 1
    if seen == 0:
        raise CalibrationError("the calibration data yielded no batch")
    result: dict[str, GroupStatistics] = {}
    for group in reference:
        taps = tap_lists[group.name]
        if not taps:
            continue
        corr = sum(_similarity(moments[(group.name, t.node)]) for t in taps) / len(taps)
        result[group.name] = GroupStatistics(
            name=group.name,
            sizes=sizes[group.name],
            correlation=corr.cpu().numpy(),
            taps=tuple(t.node for t in taps),
            samples=moments[(group.name, taps[0].node)].count,
            constant=torch.stack([_constant_units(moments[(group.name, t.node)]) for t in taps]).all(0).cpu().numpy(),
        )
    return result


def as_mapping(groups: Sequence[ChannelSpace]) -> Mapping[str, ChannelSpace]:
    return {g.name: g for g in groups}
