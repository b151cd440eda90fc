"""Feature statistics: streamed passes over calibration batches through every model.

For every free group, the pass observes the group's channels at its taps in every model,
concatenates them into joint features ``[f_1; ...; f_K]`` (conv features: every spatial
position is a sample), and accumulates their mean and covariance in float64 with a batch-wise
merge (Chan et al.; float32 products of centred samples within a batch, see ``RunningMoments``),
so memory does not grow with the number of batches. The result per group is the correlation
matrix over all models' units, averaged over the group's taps. One pass observes every group;
under a memory budget (``max_memory``) the groups are spread over several passes
(``plan_passes``) with the same result, bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from fxmerge import ops
from fxmerge.distributed import check_group, collect_errors, raise_together, sum_
from fxmerge.config import TAP_CHOICES
from fxmerge.errors import CalibrationError, ConfigError
from fxmerge.groups import ChannelSpace, Tap
from fxmerge.inputs import as_batch, module_device
from fxmerge.progress import progress

# An update's chunks: at most this many bytes of float64 rows (rows x dim x 8; the float32 chunk
# buffer takes half of it).
DEFAULT_CHUNK_BYTES = 64 * 2**20
# At most this many rows enter one float32 product (the n of the error bound in RunningMoments).
FLOAT32_ROWS = 2**14
# A batch of fewer samples is multiplied in float64: float32 products would not be faster (the
# (d, d) float64 accumulation costs as much as the products).
FLOAT64_BELOW = 128
# A float32 chunk whose centred values leave this range in some unit (max |c| of a unit outside
# it, and not 0) is accumulated in float64: squares above 2^100 times 2^14 rows could overflow
# float32, products below 2^-120 are subnormal (they lose relative precision).
FLOAT32_RANGE = (2.0**-60, 2.0**50)


class NonFiniteSamples(ValueError):
    """``RunningMoments.update`` got a NaN or Inf sample (the statistics are left unchanged)."""


def _panels(dim: int) -> list[tuple[int, int]]:
    """The row ranges of the upper-triangle panels of a (dim, dim) Gram matrix: panel (lo, hi) is
    rows lo..hi, columns lo..dim; about 8 panels, of 32 to 256 rows. Summed over its P panels a
    Gram matrix costs (P + 1) / 2P of the full product (56% for 8, less for wider matrices), in
    products wide enough to run at full speed; a panel's product (and its float64 copy when it is
    added to the scatter) takes at most 12 x 256 x dim bytes."""
    width = min(256, max(32, -(-dim // 8)))
    return [(lo, min(lo + width, dim)) for lo in range(0, dim, width)]


@contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """float32 products in float32 (no TF32 or bfloat16 shortcut a user may have enabled)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class RunningMoments:
    """Streaming mean and covariance of d-dimensional samples, accumulated in float64.

    ``update(x)`` takes a (samples, d) batch — or a sequence of (samples, d_k) blocks whose
    columns are concatenated (the models' features), so the joint feature matrix is never built —
    and merges it into the running statistics (Chan et al.). Memory is O(d^2) whatever the number
    of batches; an update adds at most ``chunk_bytes`` (64 MiB by default) and one panel product
    (``_panels``), whatever the number of samples. A NaN or Inf sample raises ``NonFiniteSamples`` and
    leaves the moments unchanged.

    How a batch of n samples is added: its mean m is computed in float64 (exact to float64
    rounding); the samples are centred at m rounded to their own precision, r (x - r: exact when
    x is within a factor 2 of r, else rounded to a relative 2^-24); their Gram matrix
    ``sum (x - r)(x - r)^T`` is computed chunk by chunk (at most ``chunk_rows`` rows) and added to
    the float64 ``scatter``, with two float64 rank-one terms that make it the scatter about the
    new running mean: ``- n (m - r)(m - r)^T`` and Chan's ``(count n / total) (m - mean)(m -
    mean)^T``. Only the upper block triangle of the symmetric Gram is computed (``_panels``:
    56% of the flops or less); ``scatter`` mirrors it when read.

    Precision. float64 samples, and batches of fewer than ``FLOAT64_BELOW`` (128) samples, are
    multiplied in float64 (r = m). float32 (or narrower) samples are multiplied in float32 and
    the products summed in float64, chunk by chunk. For a chunk of n
    rows (n <= ``FLOAT32_ROWS`` = 2^14) an entry sum_i c_ai c_bi of its Gram matrix carries a
    rounding error of about sqrt(n) 2^-24 ||c_a|| ||c_b|| (typically; n 2^-24 at worst), with
    ||c_a|| the norm of unit a's centred values over the chunk. The samples being centred before
    the product, ||c_a||^2 is the unit's own scatter over the chunk whatever its mean: a mean
    offset costs no precision (an uncentred Gram would lose a factor (mean / spread)^2). The
    chunks are added in float64, so (Cauchy-Schwarz over the chunks) the error of S_ab stays
    below the same relative bound times sqrt(S_aa S_bb) however many batches are added, and a
    correlation S_ab / sqrt(S_aa S_bb) is within about 2 sqrt(n) 2^-24 of the float64 one
    (~1e-6..1e-5; measured ~1e-7 on a small ViT's activations and ~5e-7 with a mean offset
    10^4 times the spread, ``tests/test_features.py``). A chunk with a unit whose centred values
    leave ``FLOAT32_RANGE`` (float32 products could overflow or underflow) is multiplied in
    float64 instead. Products run in IEEE float32 whatever ``torch.set_float32_matmul_precision``
    says (no TF32 or bfloat16).

    ``count``, ``mean`` and ``scatter`` (the sum of outer products of the samples centred at
    ``mean``) are sufficient statistics: ``all_reduce_moments`` combines those of several
    processes exactly. The same samples in the same order give the same bits.
    """

    def __init__(
        self, dim: int, device: torch.device | str = "cpu", *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        # Sum of centred outer products; updates write its upper block triangle only (``_panels``),
        # ``scatter`` mirrors it into the lower one when read. Left unset until the first update
        # writes its products into it (``_written``): zeroing fresh memory and then adding to it
        # makes three passes over it where one write does (ten 134 MB matrices: 1.0-3.1 s against 0.41 s).
        self._scatter = torch.empty(dim, dim, dtype=torch.float64, device=device)
        self._written = False
        self._mirrored = True
        self.chunk_bytes = chunk_bytes

    @property
    def scatter(self) -> torch.Tensor:
        """The (d, d) sum of outer products of the samples centred at ``mean`` (symmetric)."""
        if not self._written:  # no sample yet
            self._scatter.zero_()
            self._written = True
        if not self._mirrored:
            mirror_upper_gram_(self._scatter, _panels(self.dim))
            self._mirrored = True
        return self._scatter

    @staticmethod
    def nbytes(
        dim: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, exact: bool = False, samples: int | None = None
    ) -> tuple[int, int]:
        """(what the moments of ``dim`` units hold, the most an update of ``samples`` samples adds —
        None: any number) in bytes: the float64 scatter and mean; the chunk buffers (float32
        samples, ``exact`` False: at most ``FLOAT32_ROWS`` rows), the widest panel product and a
        few vectors."""
        width = _panels(max(dim, 1))[0][1]
        rows = max(64, chunk_bytes // (8 * max(dim, 1)))
        rows = min(rows if exact else min(rows, FLOAT32_ROWS), samples if samples is not None else rows)
        return 8 * dim * (dim + 1), 8 * dim * rows + 12 * width * dim + 64 * dim

    def chunk_rows(self) -> int:
        """Rows per chunk: ``chunk_bytes`` worth of float64 rows, at least 64 (float32 samples:
        at most ``FLOAT32_ROWS``)."""
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
        # float64 products for float64 samples, and for a batch too small for float32 products to
        # pay (their cost is then the (d, d) float64 accumulation, which float64 products share)
        exact = any(b.dtype == torch.float64 for b in blocks) or n < FLOAT64_BELOW
        dtype = torch.float64 if exact else torch.float32
        rows = min(n, chunk_rows if chunk_rows is not None else self.chunk_rows())
        rows = rows if exact else min(rows, FLOAT32_ROWS)
        offsets = np.cumsum([0, *widths]).tolist()
        spans = list(zip(blocks, offsets[:-1], offsets[1:]))
        device = self.mean.device

        # Pass 1: the batch mean in float64 (a (rows, d_k) piece converted at a time). A float64
        # sum of float32 (or narrower) samples cannot overflow, so it is finite exactly when
        # every sample is: the finiteness check costs nothing more.
        batch_sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        for block, lo, hi in spans:
            batch_sum[lo:hi] = _float64_column_sums(block)
        if not bool(torch.isfinite(batch_sum).all()):
            raise NonFiniteSamples("RunningMoments.update: the samples contain NaN or Inf")
        batch_mean = batch_sum.div_(n)
        reference = batch_mean.to(dtype)  # where the samples are centred: m in their precision, r
        total = self.count + n
        delta = batch_mean - self.mean
        # Chan et al.'s correction for the shift of the mean, (count n / total) delta delta^T, as
        # one more row of the samples
        chan = delta * math.sqrt(self.count * n / total) if self.count else None

        def load(buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            """Rows start..stop of the joint samples minus ``reference``, in ``buffer``'s dtype;
            float64 products: with the ``chan`` row after the last sample."""
            chunk = buffer[: stop - start]
            centre = reference.to(buffer.dtype)  # the difference computed in the buffer's dtype
            for block, lo, hi in spans:  # one pass: the bits of a copy and then a subtraction
                torch.sub(block[start:stop], centre[lo:hi], out=chunk[:, lo:hi])
            if exact and stop == n and chan is not None:
                buffer[stop - start].copy_(chan)
                return buffer[: stop - start + 1]
            return chunk

        # Pass 2: scatter += the Gram matrix of the centred samples, chunk by chunk.
        panels = _panels(self.dim)

        # float32 products: the float64 rank-one terms - n (m - r)(m - r)^T (the samples were
        # centred at r, not m) and Chan's, one product per panel, added after the last chunk's
        # products (with them, while the panel is in cache: the same additions in the same order)
        rank_one = None
        if not exact:
            shift = (batch_mean - reference.double()).mul_(math.sqrt(n))
            rank_one = (
                torch.stack([shift, *([] if chan is None else [chan])]),
                torch.stack([-shift, *([] if chan is None else [chan])]),
            )

        def accumulate(chunk: torch.Tensor, then: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
            _add_upper_gram_(self._scatter, chunk, panels, overwrite=not self._written, then=then)
            self._written = True

        buffer = torch.empty(rows + exact, self.dim, dtype=dtype, device=device)
        with _ieee_float32_matmul():
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                chunk = load(buffer, start, stop)
                if not exact and not _in_float32_range(chunk):
                    # multiplied in float64, half the rows at a time (within ``chunk_bytes``)
                    del chunk
                    half = max(1, rows // 2)
                    wide = torch.empty(half, self.dim, dtype=torch.float64, device=device)
                    for part in range(start, stop, half):
                        accumulate(load(wide, part, min(part + half, stop)))
                    del wide
                    continue
                accumulate(chunk, then=rank_one if stop == n else None)
                if stop == n:
                    rank_one = None  # added
        del buffer
        if rank_one is not None:  # the last chunk was multiplied in float64
            _add_upper_gram_(self._scatter, rank_one[0], panels, rank_one[1])
        self._mirrored = False
        self.mean.add_(delta, alpha=n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """The sample variance of each dimension (d,): the covariance's diagonal, a new tensor."""
        return torch.diagonal(self.scatter) / max(self.count - 1, 1)

    def covariance(self) -> torch.Tensor:
        """The sample covariance (d, d), a new tensor."""
        return self.scatter / max(self.count - 1, 1)

    def covariance_(self) -> torch.Tensor:
        """The sample covariance computed in place in ``scatter`` (the moments are consumed)."""
        return self.scatter.div_(max(self.count - 1, 1))


def _float64_column_sums(block: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (d,) float64: the column sums, every value converted to float64 before it is
    added. On the CPU numpy's float64 reduction of float32 values converts as it adds (about 3x
    faster than torch's ``.to(float64).sum``, which converts a copy first; a torch reduction with
    ``dtype=float64`` is slower still); elsewhere (CUDA) torch's, at most 2^20 values at a time."""
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(block.detach().numpy().sum(axis=0, dtype=np.float64))
    total = torch.zeros(block.shape[1], dtype=torch.float64, device=block.device)
    piece = max(1, 2**20 // max(block.shape[1], 1))
    for start in range(0, block.shape[0], piece):
        total += block[start : start + piece].to(torch.float64).sum(dim=0)
    return total


def _in_float32_range(chunk: torch.Tensor) -> bool:
    """Whether every unit's largest centred value |c| is 0 or within ``FLOAT32_RANGE``."""
    largest = torch.maximum(chunk.amax(dim=0), chunk.amin(dim=0).neg_())  # (aminmax over dim 0: 10x slower)
    low, high = FLOAT32_RANGE
    return not bool(((largest > high) | ((largest < low) & (largest > 0))).any())


def _add_upper_gram_(
    scatter: torch.Tensor, chunk: torch.Tensor, panels: Sequence[tuple[int, int]], other: torch.Tensor | None = None,
    *, overwrite: bool = False, then: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """scatter[lo:hi, lo:] += chunk[:, lo:hi]^T other[:, lo:] (``other``: ``chunk``) for every
    panel, the product in ``chunk``'s dtype, the sum in float64. ``overwrite``: the panels are
    set to the products instead (``scatter`` holds no value yet), with the bits of adding them
    to zeros. ``then``: float64 (left, right), added as left[:, lo:hi]^T right[:, lo:] to each
    panel right after its product (the bits of a second call, one pass over the panels fewer)."""
    other = chunk if other is None else other
    for lo, hi in panels:
        target = scatter[lo:hi, lo:]
        if chunk.dtype == torch.float64:
            if overwrite:
                target.zero_()  # then addmm_: the bits of every update adding to a zeroed scatter
            target.addmm_(chunk[:, lo:hi].T, other[:, lo:])
        elif overwrite:
            target.copy_(chunk[:, lo:hi].T @ other[:, lo:])  # 0.0 + x in float64 is x
        else:
            target.add_(chunk[:, lo:hi].T @ other[:, lo:])
        if then is not None:
            target.addmm_(then[0][:, lo:hi].T, then[1][:, lo:])


def mirror_upper_gram_(gram: torch.Tensor, panels: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Complete, in place, a (d, d) Gram matrix of which only the upper block triangle of
    ``panels`` was accumulated (``_add_upper_gram_``): exactly symmetric afterwards."""
    for lo, hi in panels:
        diagonal = gram[lo:hi, lo:hi]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        gram[hi:, lo:hi].copy_(gram[lo:hi, hi:].T)
    return gram


def symmetric_gram(blocks: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_b blocks[b] @ blocks[b].T, (N, N) float64, for blocks (N, F_b): float32 products (the
    blocks' dtype) over the upper block triangle only (about half the flops), summed in float64,
    then mirrored — the Gram matrix of N feature vectors given in pieces. ``out``: an (N, N)
    float64 tensor on the blocks' device to hold it (overwritten) instead of a new one."""
    count = int(blocks[0].shape[0])
    panels = _panels(count)
    gram = torch.empty(count, count, dtype=torch.float64, device=blocks[0].device) if out is None else out
    with _ieee_float32_matmul():
        for index, block in enumerate(blocks):
            _add_upper_gram_(gram, block.T, panels, overwrite=index == 0)  # the first block sets it
    return mirror_upper_gram_(gram, panels)


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
    std: np.ndarray | None = None  # (N,) float64: each unit's standard deviation (rms over the taps)
    mean: np.ndarray | None = None  # (N,) float64: each unit's mean (averaged over the taps)


def choose_taps(gm: GraphModule, group: ChannelSpace, limit: int = 4, choice: str = "consumers") -> list[Tap]:
    """The taps whose values a layer reads (the features the next layer sees), at most ``limit``
    spread over the group's taps; ``choice="last"``: only the last of them (ZipIt!'s choice for a
    residual stream, which many blocks read).

    Conv output and its BatchNorm output have the same correlations (a per-channel affine map), so
    observing where a consumer reads the channels is both cheaper and what ZipIt! observes.
    """
    if choice not in TAP_CHOICES:
        raise ConfigError(f"taps={choice!r}: expected one of {TAP_CHOICES}")
    nodes = {node.name: node for node in gm.graph.nodes}
    modules = dict(gm.named_modules())

    def consumed(tap: Tap) -> bool:
        # the registry's ``consumes`` flag: conv, linear and attention layers, modules or functions
        return any(ops.consumes(user, modules) for user in nodes[tap.node].users)

    chosen = [tap for tap in group.taps if consumed(tap)] or list(group.taps[-1:])
    if choice == "last":
        return chosen[-1:]
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


def _version(value: Any) -> int | None:
    """A tensor's version counter (PyTorch bumps it at every in-place write to the tensor or to a
    view of its storage); None where there is none to read (an inference tensor, not a tensor)."""
    try:
        return int(value._version)
    except (AttributeError, RuntimeError):
        return None


def _may_be_overwritten(tap: Node, position: Mapping[Node, int], modules: dict[str, torch.nn.Module]) -> bool:
    """Whether an op that runs after node ``tap`` (``position``: the graph order) may write into
    its value: an in-place op (``ops.writes_in_place``) on the value, on a view of it, or on what
    it is a view of (``ops.returns_view``, followed both ways)."""
    bases, stack = {tap}, [tap]
    while stack:  # what the value may be a view of
        node = stack.pop()
        if ops.returns_view(node, modules):  # False for a placeholder
            for source in node.all_input_nodes[:1]:
                if source not in bases:
                    bases.add(source)
                    stack.append(source)
    aliases, stack = set(bases), list(bases)
    while stack:  # and every view of those
        for user in stack.pop().users:
            if ops.writes_in_place(user, modules) and position[user] > position[tap]:
                return True
            if user not in aliases and ops.returns_view(user, modules):
                aliases.add(user)
                stack.append(user)
    return False


def _extractor_module(gm: GraphModule, node_names: Sequence[str], cloned: frozenset[str]) -> GraphModule:
    """A copy of ``gm`` whose output is (value of each named node..., its version right after the
    node ran, or None...): the nodes in ``cloned`` give a clone taken right after them."""
    graph = Graph()
    value_map: dict[Node, Node] = {}
    graph.graph_copy(gm.graph, value_map)
    graph._codegen = _flat_output_codegen(gm.graph._codegen)
    by_name = {old.name: new for old, new in value_map.items()}
    values, versions = [], []
    for name in node_names:
        node = by_name[name]
        with graph.inserting_after(node):
            if name in cloned:
                values.append(graph.call_method("clone", (node,)))
                versions.append(None)
            else:
                versions.append(graph.call_function(_version, (node,)))
                values.append(node)
    graph.output((*values, *versions))
    extractor = GraphModule(gm, graph)
    extractor.eval()
    return extractor


class TapExtractor(torch.nn.Module):
    """One forward of ``gm`` that returns the values of the named nodes (a tuple, in order) as
    they were right after each node ran.

    A value is kept as it is, not copied, unless an op after it may write into it
    (``_may_be_overwritten``: in-place ops as PyTorch names them, through views): those are
    cloned right after their node. Every value kept as is is checked after the forward by its
    tensor's version counter: one that changed (an op that wrote into it without being named
    in-place, a leaf module adding into its input) or that has no counter (inference tensors) is
    cloned from then on, and the forward is run again, so what is returned is always the value
    the node produced. ``cloned``: the node names whose values are copies.
    """

    def __init__(self, gm: GraphModule, node_names: Sequence[str]) -> None:
        super().__init__()
        self.node_names = tuple(node_names)
        self._source = (gm,)  # in a tuple: not a submodule (``module`` holds gm's modules already)
        modules = dict(gm.named_modules())
        position = {node: index for index, node in enumerate(gm.graph.nodes)}
        by_name = {node.name: node for node in position}
        self.cloned = frozenset(
            name for name in self.node_names if _may_be_overwritten(by_name[name], position, modules)
        )
        self.module = _extractor_module(gm, self.node_names, self.cloned)
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        count = len(self.node_names)
        while True:  # at most once more per name: a name found overwritten is cloned from then on
            outputs = self.module(*args, **kwargs)
            values, versions = tuple(outputs[:count]), outputs[count:]
            overwritten = frozenset(
                name for name, value, version in zip(self.node_names, values, versions)
                if name not in self.cloned and isinstance(value, torch.Tensor)
                and (version is None or _version(value) != version)
            )
            if not overwritten:
                return values
            del outputs, values
            self.cloned |= overwritten
            self.module = _extractor_module(self._source[0], self.node_names, self.cloned)


def tap_extractor(gm: GraphModule, node_names: Sequence[str]) -> TapExtractor:
    """``TapExtractor(gm, node_names)``: the values of the named nodes of ``gm`` in one forward."""
    return TapExtractor(gm, node_names)


def _constant_units(moments: RunningMoments) -> torch.Tensor:
    variance = torch.diagonal(moments.scatter) / max(moments.count - 1, 1)
    return variance <= 1e-12 * variance.max().clamp_min(1e-30)


def _input_independent(moments: RunningMoments) -> bool:
    """Whether every unit's standard deviation is below float32 rounding (1e-6) of the largest
    mean magnitude: the tap's values do not depend on the input."""
    variance = moments.variance()
    scale = moments.mean.abs().max()
    return bool(scale > 0) and bool(variance.max() <= (1e-6 * scale) ** 2)


def _correlation_(cov: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    """``fxmerge.metrics.correlation(cov)`` computed in place in ``cov`` (the same values, bit for
    bit), with temporaries of ``block_rows`` rows instead of several (d, d) matrices."""
    std = torch.sqrt(torch.diagonal(cov).clamp(min=0.0))
    # no unit without variance (and no product of two stds that underflows to 0): no masks
    every_positive = bool((std > 1e-150).all())
    for start in range(0, cov.shape[0], block_rows):
        block = cov[start : start + block_rows]
        denominator = torch.outer(std[start : start + block_rows], std)
        if every_positive:
            block.div_(denominator)
            continue
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


def _floating_dtype(model: GraphModule) -> torch.dtype | None:
    """The floating dtype of the model's tensors (None: it holds none)."""
    return next((t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)


Key = tuple[str, str]  # (group name, tap node)


@dataclass(frozen=True)
class Footprint:
    """The memory the statistics of each (group, tap) take (``RunningMoments.nbytes``).

    ``dims``: the joint width of each group; ``samples``: the most samples a batch gives at each
    (group, tap) (a key not listed: any number, the chunk size bounds the buffers); ``exact``:
    float64 samples; ``results_on_device``: the statistics are on the CPU, in the memory where
    the finished groups' correlations (which ``feature_statistics`` returns) stay too.
    """

    dims: Mapping[str, int]
    samples: Mapping[Key, int] = field(default_factory=dict)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    exact: bool = False
    results_on_device: bool = True

    def __repr__(self) -> str:
        return f"Footprint({len(self.dims)} groups, widest {max(self.dims.values(), default=0)})"

    def need(self, keys: Sequence[Key], first: int, stop: int) -> int:
        """Bytes held during a pass over ``keys[first:stop]`` (an empty one: what the passes
        before ``first`` keep): its moments, the largest update's buffers and the correlation of
        every group begun before it (a group's correlation is computed in place in its first
        tap's scatter and kept until its last tap is folded in; with ``results_on_device``, until
        the end)."""
        last = {name: index for index, (name, _) in enumerate(keys)}
        begun = {name for name, _ in keys[:first]}
        kept = sum(8 * self.dims[name] ** 2 for name in begun if self.results_on_device or last[name] >= first)
        sizes = [
            RunningMoments.nbytes(self.dims[key[0]], self.chunk_bytes, exact=self.exact, samples=self.samples.get(key))
            for key in keys[first:stop]
        ]
        return kept + sum(held for held, _ in sizes) + max((update for _, update in sizes), default=0)


def plan_passes(keys: Sequence[Key], footprint: Footprint, max_memory: int | None) -> list[list[Key]]:
    """Split the (group, tap) statistics, in order, into passes that each fit ``max_memory``.

    Passes are filled greedily in the given order (``Footprint.need`` bytes each), so the
    moments are folded in the same order as in one pass. None: one pass. A key that does not fit
    even in a pass of its own raises ``ConfigError`` naming it, the bytes it needs and
    ``smallest_max_memory``.
    """
    if max_memory is None or not keys:
        return [list(keys)] if keys else []
    passes: list[list[Key]] = []
    first = 0
    for index, key in enumerate(keys):
        if index > first and footprint.need(keys, first, index + 1) <= max_memory:
            continue  # joins the current pass
        if index > first:
            passes.append(list(keys[first:index]))
            first = index
        if footprint.need(keys, index, index + 1) > max_memory:
            name, node = key
            dim, kept, smallest = footprint.dims[name], footprint.need(keys, index, index), smallest_max_memory(keys, footprint)
            why = f", {_mib(kept)} of them the correlations of the groups before it" if kept else ""
            raise ConfigError(
                f"max_memory={max_memory} bytes ({_mib(max_memory)}) is too small for the feature statistics of "
                f"group {name!r} at node {node!r}: {dim} units over all models need "
                f"{_mib(footprint.need(keys, index, index + 1))} in a pass of their own ({dim} x {dim} float64, "
                f"the update buffers{why}); give max_memory >= {smallest} ({_mib(smallest)})"
            )
    passes.append(list(keys[first:]))
    return passes


def smallest_max_memory(keys: Sequence[Key], footprint: Footprint) -> int:
    """A ``max_memory`` with which ``plan_passes`` succeeds: every key fits in a pass of its own
    (then the greedy plan fits: a key either joins a pass within the budget or starts one)."""
    return max((footprint.need(keys, index, index + 1) for index in range(len(keys))), default=0)


def _samples_per_batch(
    gm: GraphModule, keys: Sequence[Key], tap_dims: Mapping[Key, int], batches: Iterable[Any]
) -> dict[Key, int]:
    """The most samples a batch gives at each key: the tap's recorded shape (``tensor_meta``, of
    the example ``gm`` was traced on) without its channel dim, scaled by the largest batch over
    that example's batch size. Empty when ``batches`` is not a sequence or a shape is missing."""
    if not isinstance(batches, Sequence) or not batches:
        return {}
    nodes = {node.name: node for node in gm.graph.nodes}
    example = next((n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"), None)
    if not hasattr(example, "shape") or len(example.shape) == 0 or example.shape[0] < 1:
        return {}
    largest = max(as_batch(batch).size for batch in batches)
    out = {}
    for key in keys:
        meta = nodes[key[1]].meta.get("tensor_meta")
        if not hasattr(meta, "shape"):
            return {}
        shape = list(meta.shape)
        channels = shape.pop(tap_dims[key])
        out[key] = -(-math.prod(shape) * largest // int(example.shape[0])) if channels else 0
    return out


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@dataclass
class _Fold:
    """A group's correlation being averaged over its taps, one tap at a time, in tap order."""

    corr: torch.Tensor | None = None
    taps: tuple[str, ...] = ()
    samples: int = 0
    constant: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    mean: torch.Tensor | None = None

    def add(self, node: str, moments: RunningMoments) -> None:
        # a tap where every unit is constant up to float32 rounding (a layer whose output does not
        # depend on the input: MobileViT's last stage at 1x1 resolution, random init) has
        # correlations of rounding noise: it informs nothing
        if _input_independent(moments):
            return
        self.samples = max(self.samples, moments.count)  # a tap with enough samples informs the average
        constant = _constant_units(moments)
        self.constant = constant if self.constant is None else self.constant & constant
        variance = moments.variance().clamp_(min=0.0)
        self.variance = variance if self.variance is None else self.variance.add_(variance)
        self.mean = moments.mean.clone() if self.mean is None else self.mean.add_(moments.mean)
        similarity = _similarity_(moments)
        self.corr = similarity if self.corr is None else self.corr.add_(similarity)
        self.taps += (node,)


def _observe(
    models: Sequence[GraphModule], keys: Sequence[Key], tap_dims: Mapping[Key, int], batches: Iterable[Any], *,
    num_batches: int | None, quiet: bool, group: Any, description: str,
) -> dict[Key, RunningMoments]:
    """One pass over ``batches``: the moments of every (group, tap) in ``keys`` (in that order),
    from one forward of each model per batch, summed over the process group."""
    nodes = list(dict.fromkeys(node for _, node in keys))
    extractors = [tap_extractor(model, nodes) for model in models]
    device = module_device(models[0])
    moments: dict[Key, RunningMoments] = {}
    seen = 0
    error: BaseException | None = None
    try:
        with torch.no_grad():
            for batch in progress(batches, total=num_batches, description=description, quiet=quiet):
                inputs = as_batch(batch).on(device)  # moved once for all the models
                values = [dict(zip(nodes, inputs.run(extractor))) for extractor in extractors]
                del inputs
                for key in keys:
                    name, node = key
                    blocks = [_samples(v[node], tap_dims[key]) for v in values]
                    if key not in moments:
                        moments[key] = RunningMoments(sum(b.shape[1] for b in blocks), blocks[0].device)
                    try:
                        moments[key].update(blocks)
                    except NonFiniteSamples:
                        raise CalibrationError(
                            f"non-finite features at node '{node}' (group {name}): check the calibration data and the models"
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
        signature = (description, [(name, node, m.dim) for (name, node), m in moments.items()])
        raise_together(error, group, "feature statistics", agree=signature)
        all_reduce_moments(list(moments.values()), group)
    return moments


def _tap_keys(
    models: Sequence[GraphModule], groups: Sequence[Sequence[ChannelSpace]], taps: str = "consumers"
) -> tuple[list[Key], dict[Key, int]]:
    """Every observed (group, tap), in the order their moments are folded into the groups'
    correlations, and the channel dim of each tap (``taps``: see ``choose_taps``)."""
    taps = [(g.name, tap) for g in groups[0] for tap in choose_taps(models[0], g, choice=taps)]
    return [(name, tap.node) for name, tap in taps], {(name, tap.node): tap.dim for name, tap in taps}


def statistics_footprint(
    models: Sequence[GraphModule], groups: Sequence[Sequence[ChannelSpace]], batches: Iterable[Any],
    taps: str = "consumers",
) -> tuple[list[Key], Footprint]:
    """The (group, tap) keys ``feature_statistics`` observes, in order, and what their statistics
    take (``plan_passes``, ``smallest_max_memory``)."""
    keys, tap_dims = _tap_keys(models, groups, taps)
    device, dtype = module_device(models[0]), _floating_dtype(models[0])
    dims = {g.name: sum(model_groups[i].size for model_groups in groups) for i, g in enumerate(groups[0])}
    return keys, Footprint(
        dims, _samples_per_batch(models[0], keys, tap_dims, batches), exact=dtype == torch.float64,
        results_on_device=device is None or device.type == "cpu",
    )


def feature_statistics(
    models: Sequence[GraphModule],
    groups: Sequence[Sequence[ChannelSpace]],
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    quiet: bool = False,
    process_group: Any = None,
    max_memory: int | None = None,
    taps: str = "consumers",
) -> dict[str, GroupStatistics]:
    """Correlation of every listed group's units across all models, from passes over ``batches``.

    Args:
        models: K traced models (eval mode) whose tap node names correspond.
        groups: per model, the groups to observe, in the same order for every model (same names).
        batches: input batches (tensors, tuples, dicts or ``Batch``es), each fed to every model;
            batches on another device than the models are moved there one at a time.
        process_group: None (one process), or a ``torch.distributed`` ProcessGroup: each process
            passes its own shard of the calibration batches (at least one), the moments of all
            shards are combined exactly (``all_reduce_moments``) and every process returns the
            same statistics — those of all shards' batches together.
        max_memory: None, or a budget in bytes for what the statistics hold (``plan_passes``):
            when the moments of every (group, tap) do not fit together, the groups are observed
            over several passes over all batches, each within the budget. The result is the same,
            bit for bit: every (group, tap) gets the same updates in the same order, and the
            taps are folded into the groups' correlations in the same order.
        taps: which of a group's taps are observed (``choose_taps``): "consumers" (up to 4 of
            the places a layer reads the channels, averaged) or "last".

    Memory: one float64 (d, d) scatter matrix per (group, tap) observed in a pass, d = the
    group's joint width, held for the whole pass; per batch, the taps' features and one update's
    buffers (``RunningMoments``). The correlation of a group is computed in place in its first
    tap's scatter matrix, and each tap's matrix is released as soon as it is folded in. Every
    tensor lives on the device of the tap values (the models'); the correlations are returned as
    numpy arrays.
    """
    group = check_group(process_group)
    reference = groups[0]
    sizes = {g.name: tuple(model_groups[i].size for model_groups in groups) for i, g in enumerate(reference)}
    keys, tap_dims = _tap_keys(models, groups, taps)
    passes = [keys] if max_memory is None else plan_passes(keys, statistics_footprint(models, groups, batches, taps)[1], max_memory)
    if len(passes) > 1 and not isinstance(batches, Sequence):
        batches = list(batches)  # every pass iterates over them
    folds = {name: _Fold() for name, _ in keys}
    remaining = {name: sum(1 for other, _ in keys if other == name) for name in folds}
    result: dict[str, GroupStatistics] = {}
    for index, pass_keys in enumerate(passes):
        description = "feature statistics" + (f" (pass {index + 1} of {len(passes)})" if len(passes) > 1 else "")
        moments = _observe(
            models, pass_keys, tap_dims, batches, num_batches=num_batches, quiet=quiet, group=group,
            description=description,
        )
        for key in pass_keys:
            name, node = key
            folds[name].add(node, moments.pop(key))
            remaining[name] -= 1
            fold = folds[name]
            if remaining[name] == 0 and fold.corr is not None:  # unobserved, in effect: matched on its weights
                result[name] = GroupStatistics(
                    name=name,
                    sizes=sizes[name],
                    correlation=fold.corr.div_(len(fold.taps)).cpu().numpy(),
                    taps=fold.taps,
                    samples=fold.samples,
                    constant=fold.constant.cpu().numpy(),
                    std=fold.variance.div_(len(fold.taps)).sqrt_().cpu().numpy(),
                    mean=fold.mean.div_(len(fold.taps)).cpu().numpy(),
                )
                folds[name] = _Fold()
    return {g.name: result[g.name] for g in reference if g.name in result}


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
