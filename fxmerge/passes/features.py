"""Feature statistics: one streamed pass over calibration batches through every model.

For every free group, the pass observes the group's channels at its taps in every model,
concatenates them into joint features ``[f_1; ...; f_K]`` (conv features: every spatial
position is a sample), and accumulates their mean and covariance in float64 with a batch-wise
merge (Chan et al.), so memory does not grow with the number of batches. The result per group
is the correlation matrix over all models' units, averaged over the group's taps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from fxmerge import ops
from fxmerge.distributed import check_group, collect_errors, raise_together, sum_
from fxmerge.errors import CalibrationError
from fxmerge.groups import ChannelSpace, Tap
from fxmerge.inputs import as_batch
from fxmerge.progress import progress

# Samples are converted to float64 in chunks of at most this many bytes (rows x dim x 8).
DEFAULT_CHUNK_BYTES = 64 * 2**20


class NonFiniteSamples(ValueError):
    """``RunningMoments.update`` got a NaN or Inf sample (the statistics are left unchanged)."""


class RunningMoments:
    """Streaming mean and covariance of d-dimensional samples, in float64.

    ``update(x)`` takes a (samples, d) batch — or a sequence of (samples, d_k) blocks whose
    columns are concatenated (the models' features), so the joint feature matrix is never built —
    and merges it into the running statistics (Chan et al.). Memory is O(d^2) whatever the number
    of batches, and an update allocates no d x d temporary: samples are converted to float64
    ``chunk_rows`` rows at a time into one reusable (chunk_rows, d) buffer, their centred outer
    products are added to ``scatter`` in place (``addmm_``), and the rank-one correction for the
    shift of the mean rides along as one extra row of the last chunk. Peak memory of an update is
    ``scatter`` plus the chunk buffer (``chunk_bytes``, 64 MiB by default), whatever the number
    of samples. A NaN or Inf sample raises ``NonFiniteSamples`` and leaves the moments unchanged.

    ``count``, ``mean`` and ``scatter`` (the sum of outer products of the samples centred at
    ``mean``) are sufficient statistics: ``all_reduce_moments`` combines those of several
    processes exactly.
    """

    def __init__(
        self, dim: int, device: torch.device | str = "cpu", *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum of centred outer products
        self.chunk_bytes = chunk_bytes

    def chunk_rows(self) -> int:
        """Rows converted to float64 at a time: ``chunk_bytes`` worth, at least 64."""
        return max(64, self.chunk_bytes // (8 * max(self.dim, 1)))

    def update(self, samples: torch.Tensor | Sequence[torch.Tensor], *, chunk_rows: int | None = None) -> None:
        """Add a batch of samples: a (n, d) tensor or a sequence of (n, d_k) blocks, sum d_k = d."""
        blocks = [samples] if isinstance(samples, torch.Tensor) else list(samples)
        n = int(blocks[0].shape[0])
        widths = [int(b.shape[1]) for b in blocks]
        if any(b.dim() != 2 or b.shape[0] != n for b in blocks) or sum(widths) != self.dim:
            raise ValueError(
                f"RunningMoments.update: expected (n, d_k) blocks with one n and sum d_k = {self.dim}, "
                f"got shapes {[tuple(b.shape) for b in blocks]}"
            )
        if n == 0:
            return
        rows = min(n, chunk_rows if chunk_rows is not None else self.chunk_rows())
        offsets = np.cumsum([0, *widths]).tolist()
        # One spare row: the mean-shift correction rides along in the last chunk's product.
        buffer = torch.empty(rows + 1, self.dim, dtype=torch.float64, device=self.mean.device)

        def load(start: int) -> torch.Tensor:
            """Rows start..start+rows of the joint samples, as float64, in the reused buffer."""
            stop = min(start + rows, n)
            chunk = buffer[: stop - start]
            for block, lo, hi in zip(blocks, offsets[:-1], offsets[1:]):
                chunk[:, lo:hi].copy_(block[start:stop])
            return chunk

        # Pass 1: the batch mean. A float64 sum of float32 (or narrower) samples cannot overflow,
        # so it is finite exactly when every sample is: the finiteness check costs nothing more.
        batch_sum = torch.zeros(self.dim, dtype=torch.float64, device=self.mean.device)
        for start in range(0, n, rows):
            batch_sum += load(start).sum(dim=0)
        if not bool(torch.isfinite(batch_sum).all()):
            raise NonFiniteSamples("RunningMoments.update: the samples contain NaN or Inf")
        batch_mean = batch_sum.div_(n)
        total = self.count + n
        delta = batch_mean - self.mean
        # Pass 2: scatter += sum of outer products centred at the batch mean, plus the rank-one
        # correction (count * n / total) delta delta^T for the shift of the mean (Chan et al.),
        # as one extra row sqrt(count * n / total) delta of the last chunk.
        for start in range(0, n, rows):
            chunk = buffer[:n] if n <= rows else load(start)  # one chunk: still loaded by pass 1
            chunk.sub_(batch_mean)
            if start + rows >= n and self.count:
                extra = buffer[chunk.shape[0]]
                torch.mul(delta, math.sqrt(self.count * n / total), out=extra)
                chunk = buffer[: chunk.shape[0] + 1]
            self.scatter.addmm_(chunk.T, chunk)
        del buffer
        self.mean.add_(delta, alpha=n / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        """The sample covariance (d, d), a new tensor."""
        return self.scatter / max(self.count - 1, 1)

    def covariance_(self) -> torch.Tensor:
        """The sample covariance computed in place in ``scatter`` (the moments are consumed)."""
        return self.scatter.div_(max(self.count - 1, 1))


def all_reduce_moments(moments: Sequence[RunningMoments], group: Any) -> None:
    """Combine, in place, every process's moments into those of all processes' samples together.

    Exact (Chan's parallel formula, about the global mean, so no cancellation): with per-process
    counts n_r, means m_r and scatters S_r, the global mean is m = sum n_r m_r / N and the
    global scatter is sum_r [S_r + n_r (m_r - m)(m_r - m)^T]. Two collectives: one over all
    counts and weighted means, one per scatter. Every process ends with the same bits
    (``fxmerge.distributed.sum_``). ``moments`` must list the same statistics in the same order
    on every process.
    """
    if group is None or not moments:
        return
    device = moments[0].mean.device
    head = torch.cat(
        [torch.cat([torch.tensor([float(m.count)], dtype=torch.float64, device=device), m.mean * m.count]) for m in moments]
    )
    sum_(head, group)
    offset = 0
    for m in moments:
        total = float(head[offset])
        global_mean = head[offset + 1 : offset + 1 + m.dim] / max(total, 1.0)
        offset += 1 + m.dim
        if m.count:
            delta = m.mean - global_mean
            m.scatter.addr_(delta, delta, alpha=float(m.count))
        sum_(m.scatter, group)
        m.mean = global_mean.clone()
        m.count = int(round(total))


@dataclass(frozen=True)
class GroupStatistics:
    """Joint feature statistics of one group over all models.

    ``correlation`` is (N, N) with N = sum(sizes), model k's units at offset_k .. offset_k + n_k,
    averaged over ``taps``; ``samples`` counts the samples seen at the tap that saw the most
    (conv features: every position is one).
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
        # the registry's ``consumes`` flag: conv, linear and attention layers, modules or functions
        return any(ops.consumes(user, modules) for user in nodes[tap.node].users)

    chosen = [tap for tap in group.taps if consumed(tap)] or list(group.taps[-1:])
    if len(chosen) > limit:
        picks = np.linspace(0, len(chosen) - 1, limit).round().astype(int)
        chosen = [chosen[i] for i in sorted(set(picks.tolist()))]
    return chosen


def _flat_output_codegen(codegen: CodeGen) -> CodeGen:
    """The codegen of an extractor: ``gm``'s way of taking its inputs (a torch.export graph takes
    the user's args/kwargs through its pytree ``in_spec``), with the outputs left flat."""
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        info = codegen.pytree_info
        return _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
    return CodeGen()


def tap_extractor(gm: GraphModule, node_names: Sequence[str]) -> GraphModule:
    """A copy of ``gm`` whose output is a tuple of clones of the named nodes' values.

    The clones are taken right after each node, before any in-place op can overwrite the value.
    """
    graph = Graph()
    value_map: dict[Node, Node] = {}
    graph.graph_copy(gm.graph, value_map)
    graph._codegen = _flat_output_codegen(gm.graph._codegen)
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
    variance = torch.diagonal(moments.scatter) / max(moments.count - 1, 1)
    return variance <= 1e-12 * variance.max().clamp_min(1e-30)


def _input_independent(moments: RunningMoments) -> bool:
    """Whether every unit's standard deviation is below float32 rounding (1e-6) of the largest
    mean magnitude: the tap's values do not depend on the input."""
    variance = torch.diagonal(moments.scatter) / max(moments.count - 1, 1)
    scale = moments.mean.abs().max()
    return bool(scale > 0) and bool(variance.max() <= (1e-6 * scale) ** 2)


def _correlation_(cov: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    """``fxmerge.metrics.correlation(cov)`` computed in place in ``cov`` (the same values, bit for
    bit), with temporaries of ``block_rows`` rows instead of several (d, d) matrices."""
    std = torch.sqrt(torch.diagonal(cov).clamp(min=0.0))
    for start in range(0, cov.shape[0], block_rows):
        block = cov[start : start + block_rows]
        denominator = torch.outer(std[start : start + block_rows], std)
        positive = denominator > 0
        block.div_(torch.where(positive, denominator, 1.0))
        block.masked_fill_(~positive, 0.0)
    cov.clamp_(-1.0, 1.0)
    cov.fill_diagonal_(1.0)
    return cov


def _similarity_(moments: RunningMoments) -> torch.Tensor:
    """Correlation, with one addition: units that are constant on the calibration data (dead
    ReLUs) at the same value are identical features, so their similarity is 1 (correlation
    alone says 0 and would let a matcher merge a live unit into a dead one first).

    Computed in place in ``moments.scatter``: the moments are consumed.
    """
    constant = _constant_units(moments)
    corr = _correlation_(moments.covariance_())
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
    process_group: Any = None,
) -> dict[str, GroupStatistics]:
    """Correlation of every listed group's units across all models, from one pass over ``batches``.

    Args:
        models: K traced models (eval mode) whose tap node names correspond.
        groups: per model, the groups to observe, in the same order for every model (same names).
        batches: input batches (tensors), each fed to every model.
        process_group: None (one process), or a ``torch.distributed`` ProcessGroup: each process
            passes its own shard of the calibration batches (at least one), the moments of all
            shards are combined exactly (``all_reduce_moments``) and every process returns the
            same statistics — those of all shards' batches together.

    Memory: one float64 (d, d) scatter matrix per (group, tap), d = the group's joint width,
    held for the whole pass; per batch, the taps' features and one float64 chunk buffer
    (``RunningMoments``). The correlation of a group is computed in place in its first tap's
    scatter matrix, and each tap's matrix is released as soon as it is folded in.
    """
    group = check_group(process_group)
    reference = groups[0]
    tap_lists = {g.name: choose_taps(models[0], g) for g in reference}
    names = [t.node for taps in tap_lists.values() for t in taps]
    unique_names = list(dict.fromkeys(names))
    extractors = [tap_extractor(model, unique_names) for model in models]
    sizes = {g.name: tuple(model_groups[i].size for model_groups in groups) for i, g in enumerate(reference)}
    moments: dict[tuple[str, str], RunningMoments] = {}
    seen = 0
    error: BaseException | None = None
    try:
        with torch.no_grad():
            for batch in progress(batches, total=num_batches, description="feature statistics", quiet=quiet):
                values = [dict(zip(unique_names, as_batch(batch).run(extractor))) for extractor in extractors]
                for reference_group in reference:
                    for tap in tap_lists[reference_group.name]:
                        blocks = [_samples(v[tap.node], tap.dim) for v in values]
                        key = (reference_group.name, tap.node)
                        if key not in moments:
                            moments[key] = RunningMoments(sum(b.shape[1] for b in blocks), blocks[0].device)
                        try:
                            moments[key].update(blocks)
                        except NonFiniteSamples:
                            raise CalibrationError(
                                f"non-finite features at node '{tap.node}' (group {reference_group.name}): "
                                "check the calibration data and the models"
                            ) from None
                        del blocks
                del values
                seen += 1
        if seen == 0:
            raise CalibrationError("the calibration data yielded no batch")
    except collect_errors() as exc:
        if group is None:
            raise
        error = exc
    if group is not None:
        signature = [(name, tap, m.dim) for (name, tap), m in moments.items()]
        raise_together(error, group, "feature statistics", agree=signature)
        all_reduce_moments(list(moments.values()), group)
    result: dict[str, GroupStatistics] = {}
    for reference_group in reference:
        taps = tap_lists[reference_group.name]
        if not taps:
            continue
        keys = [(reference_group.name, t.node) for t in taps]
        # a tap where every unit is constant up to float32 rounding (a layer whose output does not
        # depend on the input: MobileViT's last stage at 1x1 resolution, random init) has
        # correlations of rounding noise: it informs nothing
        for key in [key for key in keys if _input_independent(moments[key])]:
            moments.pop(key)
            keys.remove(key)
        if not keys:  # unobserved, in effect: the group is matched on its weights
            continue
        samples = max(moments[key].count for key in keys)  # a tap with enough samples informs the average
        constant = torch.stack([_constant_units(moments[key]) for key in keys]).all(0).cpu().numpy()
        corr = _similarity_(moments.pop(keys[0]))
        for key in keys[1:]:
            corr.add_(_similarity_(moments.pop(key)))
        corr.div_(len(keys))
        result[reference_group.name] = GroupStatistics(
            name=reference_group.name,
            sizes=sizes[reference_group.name],
            correlation=corr.cpu().numpy(),
            taps=tuple(node for _, node in keys),
            samples=samples,
            constant=constant,
        )
    return result


def observed_groups(analyses: Sequence[Any], names: Sequence[str]) -> list[list[ChannelSpace]]:
    """Per model, the groups whose features ``feature_statistics`` observes, in one order for all.

    The free groups among ``names`` (by the reference model ``analyses[0]``), then the products of
    two of them that some tensor dim holds (``Analysis.composite_groups``: grouped convolutions,
    GroupNorm groups, attention heads), which the structured matcher needs as a whole.
    """
    reference = analyses[0]
    plain = [name for name in names if not reference.group(name).fixed]
    per_model = [{g.name: g for g in analysis.composite_groups(names)} for analysis in analyses]
    # a product observed in every model (graphs of one structure hold it at the same nodes)
    composites = [g.name for g in reference.composite_groups(names) if all(g.name in found for found in per_model)]
    return [
        [analysis.group(name) for name in plain] + [found[name] for name in composites]
        for analysis, found in zip(analyses, per_model)
    ]
