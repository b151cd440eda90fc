"""The "zip" matcher: ZipIt!'s greedy feature matching, generalised to any widths and target width.

Rule (the same in the slow reference, fxmerge/match/reference.py, which the tests hold this to):

* every unit starts as its own cluster, represented by its global index ("rep");
  score(a, b) = similarity(a, b) for a != b;
* while there are more clusters than the target width, merge the pair with the highest score
  (ties: the smallest (rep_lo, rep_hi) pair); the merged cluster keeps the smaller rep and its score
  with every other cluster x becomes alpha * min(score(a, x), score(b, x)) (-inf stays -inf);
* a cluster's origin is its rep's model; merging two clusters of the same origin spends one unit of
  that model's budget, budget_k = int((N - r) * n_k / N * beta + 1e-4); a model whose budget is <= 0
  allows no more such merges (their scores become -inf).

Implementation: one (N, N) float64 score matrix and no full-matrix argmax per merge.  Up to
ROW_BESTS_MAX_UNITS units, unless most units' best partners are mutual (RUNS_MIN_MUTUAL_FRACTION),
every row's best partner (see _merge_by_row_bests): a few O(N) numpy operations per merge, O(N) rows
rescanned per merge at worst, so a tie-heavy matrix that makes it rescan too many rows hands the rest
of the matching over to the candidate runs.  Otherwise, or after a hand-over, the candidate runs,
O(N^2 log N) time:

* the dense score matrix ``scores`` (N, N) is indexed by rep, which never changes for the surviving
  cluster of a merge; a merge rewrites the kept cluster's row and column, and ``alive`` masks the
  absorbed cluster (its row and column are left as they were: nothing reads a dead row, and every
  read of a column checks ``alive``), so ``scores[lo, hi]`` of a live pair is always its current score;
* every live cluster owns one *run* of candidate pairs involving it: at the start unit i's run holds
  its pairs (i, j > i); a merge gives the merged cluster a new run of all its new scores and drops the
  runs of both parts, whose scores were just rewritten or erased.  A run yields its pairs best first
  by the key (-score, rep_lo, rep_hi), sorting lazily a tier at a time from the owner's current row
  (its best score first: most runs die after yielding one pair; then geometrically growing tiers),
  and a heap holds the head of every run, so the heap top is the best candidate overall;
* a candidate is stale when its other cluster died or ``scores[lo, hi]`` no longer equals the score
  it was yielded with (the other member merged, or the pair was forbidden by a spent budget).  A later
  rewrite of that score is yielded by the rewriting cluster's newer run.  Stale entries are skipped in
  vectorised chunks;
* the initial runs' first tiers are found by row blocks (ROW_BLOCK_ENTRIES), so there are no (N, N)
  temporaries: at N = 8192 the scores are 512 MiB and everything else a few MiB.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fxmerge.errors import ConfigError
from fxmerge.match.clusters import ROW_BLOCK_ENTRIES, index_blocks, labels_by_smallest_member, padded_square, unit_models


@dataclass(frozen=True)
class ZipMatching:
    """Outcome of the greedy zip matching.

    labels: (N,) int64 cluster index of every global unit, clusters ordered by their smallest unit.
    merges: the merges in the order they were made, as (kept rep, absorbed rep, score) with
        kept rep < absorbed rep; the score is the one the pair was chosen with.
    """

    labels: np.ndarray
    merges: tuple[tuple[int, int, float], ...]


def zip_budgets(sizes: Sequence[int], target_width: int, beta: float) -> list[int]:
    """Number of within-model merges each model may make.

    Proportional to the model's share of the units to remove: with K equal sizes and to_remove
    divisible by K this is ZipIt's (to_remove // K) * beta.  The 1e-4 keeps products that should be
    whole numbers (like 3 * 0.1 * 10) from rounding down.
    """
    total = sum(sizes)
    to_remove = total - target_width
    return [int(to_remove * n_k / total * beta + 1e-4) for n_k in sizes]


def initial_scores(similarity: np.ndarray) -> np.ndarray:
    """The (N, N) score matrix before any merge: the similarity with a -inf diagonal (no self-merge)."""
    scores = padded_square(len(similarity))  # rows an odd number of cache lines apart
    scores[...] = similarity
    np.fill_diagonal(scores, -np.inf)
    return scores


# Two units whose similarity is at least this are the same feature (e.g. a Net2Net copy): merging
# them is deduplication, not a new merge, so it does not spend ZipIt's alpha decay.
IDENTICAL = 1.0 - 1e-6


def decayed_merged_scores(scores: np.ndarray, kept: int, absorbed: int, alpha: float) -> np.ndarray:
    """Scores of the merged cluster with every cluster: alpha * min of its two parts' scores.

    ZipIt!'s decay keeps a feature from absorbing ever more units. fxmerge does not decay when the
    two parts are identical (score >= IDENTICAL): a duplicated feature is one feature, and decaying
    it would let two *different* features with correlation above alpha be merged before the
    duplicate's original — this is what makes a Net2Net-widened copy, or three permuted copies,
    recoverable at the default alpha.

    Returns a new (N,) row; -inf entries (dead, forbidden, or the two parts themselves) stay -inf, which
    a plain multiplication would turn into NaN when alpha == 0.  Shared with the reference so both
    round identically.
    """
    decay = 1.0 if scores[kept, absorbed] >= IDENTICAL else alpha
    merged = np.minimum(scores[kept], scores[absorbed])
    if decay == 0.0:
        np.multiply(merged, decay, out=merged, where=np.isfinite(merged))
    elif decay != 1.0:
        merged *= decay  # -inf * decay stays -inf for decay > 0 (and x * 1.0 is x: skipped)
    merged[kept] = -np.inf
    merged[absorbed] = -np.inf
    return merged


def forbid_within_model(scores: np.ndarray, alive: np.ndarray, origins: np.ndarray, model: int) -> np.ndarray:
    """Set every score between two live clusters of origin ``model`` to -inf; returns those clusters' reps."""
    reps = np.flatnonzero(alive & (origins == model))
    scores[np.ix_(reps, reps)] = -np.inf
    return reps


def unreachable_width_error(target_width: int, clusters_left: int, budgets_left: Sequence[int]) -> ConfigError:
    """The error for a zip matching that ran out of allowed merges before reaching the target width."""
    return ConfigError(
        f"method='zip' cannot reach target_width={target_width}: {clusters_left} clusters remain and no "
        f"allowed merge is left (within-model merge budgets left per model: {list(budgets_left)}); "
        f"raise beta to allow more within-model merges, or raise target_width"
    )


# After a run's first tier (its best score and the pairs tied at it), tiers grow from this size by 4x.
_NEXT_TIER_SIZE = 8


def _best_entries(values: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """The ``count`` largest entries of values (n,) and every entry tied with the last of them.

    -inf entries are not candidates.  Returns (their indices ordered by (-value, index), threshold):
    threshold is the smallest value taken, or -inf when every candidate was taken.  A bound from
    chunk maxima (the count-th largest of ~2 * count chunk maxima is <= the count-th largest entry)
    keeps the selection to one pass over values plus a partition of a few entries.
    """
    n_values = len(values)
    bound = -np.inf
    if n_values > 4 * count:
        chunk_maxima = np.maximum.reduceat(values, np.arange(0, n_values, n_values // (2 * count)))
        bound = np.partition(chunk_maxima, len(chunk_maxima) - count)[len(chunk_maxima) - count]
    chosen = np.flatnonzero(values >= bound) if bound > -np.inf else np.flatnonzero(values > -np.inf)
    chosen_values = values[chosen]
    if bound == -np.inf and len(chosen) <= count:
        threshold = -np.inf
    else:
        threshold = np.partition(chosen_values, len(chosen) - count)[len(chosen) - count]
        taken = chosen_values >= threshold
        chosen, chosen_values = chosen[taken], chosen_values[taken]
    order = np.argsort(-chosen_values, kind="stable")
    return chosen[order], float(threshold)


class _CandidateRun:
    """The pairs (owner, x), x >= ``start``, best first by the scores they had when the run was made.

    The run keeps no copy of the owner's scores: it reads the current row ``scores[owner]``.  An entry
    x whose score is still the one written when the run was made has kept its value; one that changed
    since (x merged as the kept cluster, died, or the pair was forbidden) is either -inf/dead, which
    excludes it, or carries x's newer score, which x's newer run also yields, so yielding it here too
    is a harmless duplicate of the same key.  ``start`` is owner + 1 for a unit's initial run (the
    pairs (x < owner, owner) belong to x's run) and 0 for a merged cluster's run.

    The key is (-score, min(owner, x), max(owner, x)); for x ascending the pairs are in
    (rep_lo, rep_hi) order (every x < owner gives (x, owner), before every (owner, x') with
    x' > owner), so a stable sort of -score over ascending x gives the full key order.

    Sorting happens a tier at a time: the best ``tier_size`` pairs not yet sorted, and every pair tied
    with the last of them, so that the pairs left unsorted (score < ``sorted_below``) are strictly
    worse than the tier and ties keep their order across tiers.  The first tier is the best score and
    its ties (most runs die after yielding one pair).
    """

    __slots__ = ("owner", "start", "sorted_below", "tier_scores", "tier_others", "position", "tier_size")

    def __init__(self, owner: int, start: int, best_others: np.ndarray, best_score: float) -> None:
        """best_others: ascending, every x >= start with the current best score ``best_score`` > -inf."""
        self.owner = owner
        self.start = start
        self.sorted_below = best_score
        self.tier_others = best_others
        self.tier_scores: np.ndarray | float = best_score  # the first tier's pairs all have the best score
        self.position = 0
        self.tier_size = _NEXT_TIER_SIZE

    def head(self) -> tuple[float, int, int]:
        """The key of the pair at the current position (of a tier just sorted: current)."""
        other = int(self.tier_others[self.position])
        score = self.tier_scores if isinstance(self.tier_scores, float) else self.tier_scores[self.position]
        return (-float(score), min(self.owner, other), max(self.owner, other))

    def _sort_next_tier(self, scores: np.ndarray, alive: np.ndarray) -> bool:
        """Sort the next tier; False when every pair has been sorted already."""
        if self.sorted_below == -np.inf:
            return False
        row = scores[self.owner, self.start :]
        candidates = (row < self.sorted_below) & (row > -np.inf) & alive[self.start :]
        others, self.sorted_below = _best_entries(np.where(candidates, row, -np.inf), self.tier_size)
        if len(others) == 0:
            return False
        self.tier_scores = row[others]
        self.tier_others = others + self.start
        self.position = 0
        self.tier_size *= 4
        return True

    def next_current(self, scores: np.ndarray, alive: np.ndarray) -> tuple[float, int, int] | None:
        """Advance to the first pair whose score is still current; its key, or None when none is left.

        Stale pairs are found a chunk at a time with numpy; the chunk grows while whole chunks are stale.
        """
        chunk = 8
        owner_scores = scores[self.owner]
        while True:
            if self.position == len(self.tier_others) and not self._sort_next_tier(scores, alive):
                return None
            end = min(self.position + chunk, len(self.tier_others))
            others = self.tier_others[self.position : end]
            scores_then = self.tier_scores if isinstance(self.tier_scores, float) else self.tier_scores[self.position : end]
            current = np.flatnonzero(alive[others] & (owner_scores[others] == scores_then))
            if len(current):
                self.position += int(current[0])
                return self.head()
            self.position = end
            chunk *= 4


def _initial_runs(scores: np.ndarray) -> list[_CandidateRun]:
    """Unit i's run of pairs (i, j > i) for every unit that has one, first tiers found block by block.

    scores: (N, N) initial scores (-inf diagonal and forbidden pairs); only read, by row blocks, so
    the temporaries stay small.
    """
    n_units = scores.shape[0]
    runs: list[_CandidateRun] = []
    for block in index_blocks(n_units, ROW_BLOCK_ENTRIES // n_units):
        first, size = block.start, block.stop - block.start
        rows = scores[block, first:]  # pairs (i, j >= first) of the block's units i
        leading = rows[:, :size].copy()
        leading[np.tri(size, dtype=bool)] = -np.inf  # pair (i, j <= i) is not i's
        best = leading.max(axis=1)
        if rows.shape[1] > size:
            np.maximum(best, rows[:, size:].max(axis=1), out=best)
        ties = np.empty(rows.shape, dtype=bool)
        np.equal(leading, best[:, None], out=ties[:, :size])
        np.equal(rows[:, size:], best[:, None], out=ties[:, size:])
        ties[best == -np.inf] = False
        owners, others = np.nonzero(ties)  # row-major: others ascending within each owner
        bounds = np.searchsorted(owners, np.arange(size + 1))
        for row in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            owner = first + row
            runs.append(_CandidateRun(owner, owner + 1, others[bounds[row] : bounds[row + 1]] + first, float(best[row])))
    return runs


# At most this many units, zip_matching keeps every live cluster's best partner (_merge_by_row_bests):
# a handful of O(N) numpy operations per merge instead of the candidate runs' Python heap work
# (recorded resnet18 / ViT merges: 1.4-3.5x faster at N = 128..1536).  Its strided column writes and
# row rescans grow with N, the runs' heap work does not: forced onto bench_matcher's synthetic pairs
# the row bests are 1.5x slower than the runs at N = 2048 and up to 1.8x at N = 4096.
ROW_BESTS_MAX_UNITS = 2048
# _merge_by_row_bests rescans a row when its best partner merged; tie-heavy scores can make most rows
# point at one cluster (O(N^2) per merge).  Once it has rescanned more than this many rows per merge
# made plus N / 32 merges' worth (2 N rows: two passes over the matrix), it hands the rest of the
# matching to the candidate runs, whose cost does not depend on ties.  Recorded real merges rescan
# 4-20 rows per merge.
ROW_BESTS_RESCANS_PER_MERGE = 64
# When most units' best partners are mutual (a clean permuted copy: each unit and its copy), the
# candidate runs pop about one candidate per merge and beat the row bests' fixed per-merge cost
# (bench_matcher's synthetic pairs: all mutual, one pop per merge; runs as fast at N <= 1024, 1.5x
# faster at N = 2048).  The scores of real merges have hubs (recorded resnet18 / ViT merges: 11-62%
# mutual, 3-6 pops per merge, row bests 1.4-3.5x faster).  Up to ROW_BESTS_MAX_UNITS, the runs are
# used when at least this fraction of the units is mutual.
RUNS_MIN_MUTUAL_FRACTION = 0.75


def zip_matching(
    similarity: np.ndarray,
    sizes: Sequence[int],
    target_width: int,
    alpha: float,
    beta: float,
    *,
    overwrite_similarity: bool = False,
) -> ZipMatching:
    """Greedy zip matching of the units of len(sizes) models down to target_width clusters.

    similarity: (N, N) finite symmetric float64, N = sum(sizes); arguments are assumed validated
    (see fxmerge.match.match).  overwrite_similarity: the caller's array is scratch and, when it is a
    writeable float64 array with contiguous rows (``padded_square``'s, or C-ordered), becomes the
    score matrix (saves an (N, N) copy).
    Raises ConfigError when no allowed merge is left before target_width.

    Memory: one (N, N) float64 score matrix (none with overwrite_similarity), O(N) per live cluster
    and row-block temporaries (ROW_BLOCK_ENTRIES).
    """
    n_units = int(sum(sizes))
    scores = _scores_in_place(similarity) if overwrite_similarity else None
    if scores is None:
        scores = initial_scores(similarity)
    state = _ZipState(scores, unit_models(sizes), np.ones(n_units, dtype=bool), zip_budgets(sizes, target_width, beta))
    for model, budget in enumerate(state.budgets):
        if budget <= 0:
            forbid_within_model(scores, state.alive, state.origins, model)
    if n_units <= ROW_BESTS_MAX_UNITS:
        partner = scores.argmax(axis=1)  # every row's smallest column with its best score
        mutual = np.count_nonzero(partner[partner] == np.arange(n_units))
        if mutual < RUNS_MIN_MUTUAL_FRACTION * n_units:
            _merge_by_row_bests(state, target_width, alpha, partner)
    if state.clusters_left > target_width:
        _merge_by_runs(state, target_width, alpha)

    labels = np.empty(n_units, dtype=np.int64)
    for rep in np.flatnonzero(state.alive):
        labels[state.members[rep]] = rep
    return ZipMatching(labels=labels_by_smallest_member(labels), merges=tuple(state.merges))


class _ZipState:
    """The matching so far, shared by both merge loops (the row-best loop may hand over to the runs).

    scores (N, N): current scores indexed by rep (see the module docstring for dead rows); origins (N,)
    model of each unit; alive (N,) bool; budgets: within-model merges left per model; members: units
    of each rep's cluster; merges: made so far.
    """

    __slots__ = ("scores", "origins", "alive", "budgets", "members", "merges", "clusters_left")

    def __init__(self, scores: np.ndarray, origins: np.ndarray, alive: np.ndarray, budgets: list[int]) -> None:
        self.scores, self.origins, self.alive, self.budgets = scores, origins, alive, budgets
        self.members: list[list[int]] = [[unit] for unit in range(len(alive))]
        self.merges: list[tuple[int, int, float]] = []
        self.clusters_left = len(alive)

    def merge(self, kept: int, absorbed: int, alpha: float, clear_absorbed: bool) -> np.ndarray | None:
        """Merge absorbed into kept: new scores, members, budget; returns the reps a spent budget forbade.

        clear_absorbed: also set the absorbed cluster's row and column to -inf (the row-best loop reads
        whole rows; the runs' loop masks dead clusters with ``alive`` instead).
        """
        scores = self.scores
        self.merges.append((kept, absorbed, float(scores[kept, absorbed])))
        merged_scores = decayed_merged_scores(scores, kept, absorbed, alpha)
        self.alive[absorbed] = False
        if clear_absorbed:
            scores[absorbed, :] = -np.inf
            scores[:, absorbed] = -np.inf
        else:
            merged_scores[~self.alive] = -np.inf
        scores[kept, :] = merged_scores
        scores[:, kept] = merged_scores
        self.members[kept].extend(self.members[absorbed])
        self.members[absorbed] = []
        self.clusters_left -= 1
        origin = int(self.origins[kept])
        if origin == self.origins[absorbed]:
            self.budgets[origin] -= 1
            if self.budgets[origin] <= 0:
                return forbid_within_model(scores, self.alive, self.origins, origin)
        return None


def _merge_by_row_bests(state: _ZipState, target_width: int, alpha: float, partner: np.ndarray) -> None:
    """Merge until target_width from every row's best partner; may stop early and leave the rest to the runs.

    partner (N,): scores.argmax(axis=1), updated in place.
    best (N,) is each row's largest score and partner (N,) its smallest column with it, so the row-major
    first maximum of the whole matrix (the rule's pair: scores are symmetric) is (argmax(best),
    partner[argmax(best)]).  A merge changes the kept cluster's row and column and clears the absorbed
    one's (dead rows and columns are -inf here), so a row's best changes only when its partner was
    one of the two (recomputed), when its new score with the kept cluster reaches its best (updated in
    place: decayed negative scores can rise) or when a spent budget forbade some of its pairs (recomputed).
    """
    scores = state.scores
    n_units = len(state.alive)
    best = scores[np.arange(n_units), partner]
    rescans, merges_before, slack_merges = 0, len(state.merges), n_units / 32
    while state.clusters_left > target_width:
        kept = int(best.argmax())
        if best[kept] == -np.inf:
            raise unreachable_width_error(target_width, state.clusters_left, state.budgets)
        absorbed = int(partner[kept])
        stale = partner == kept
        stale |= partner == absorbed
        forbidden = state.merge(kept, absorbed, alpha, clear_absorbed=True)
        if state.clusters_left == target_width:
            return
        if forbidden is not None:
            stale[forbidden] = True
        kept_scores = scores[kept]
        # Rows whose score with the kept cluster rose above their best, or ties it from a smaller column.
        takes = (kept_scores == best) & (partner > kept)
        takes |= kept_scores > best
        np.copyto(best, kept_scores, where=takes)
        np.copyto(partner, kept, where=takes)
        stale[kept] = True
        stale[absorbed] = False
        best[absorbed] = -np.inf
        partner[absorbed] = -1  # a dead row is never stale and never takes the kept cluster
        rows = np.flatnonzero(stale)
        rescans += len(rows)
        if rescans > ROW_BESTS_RESCANS_PER_MERGE * (len(state.merges) - merges_before + slack_merges):
            return
        row_partners = scores[rows].argmax(axis=1)
        partner[rows] = row_partners
        best[rows] = scores[rows, row_partners]


def _merge_by_runs(state: _ZipState, target_width: int, alpha: float) -> None:
    """Merge until target_width with the candidate runs (module docstring); state may be mid-way.

    A state handed over by _merge_by_row_bests has -inf rows and columns for its dead clusters, so the
    initial runs of its scores cover exactly the live pairs.
    """
    scores, alive = state.scores, state.alive
    run_of_cluster: dict[int, _CandidateRun] = {}
    # Each run's head as (-score, rep_lo, rep_hi, run serial, run).  Two runs can hold the same pair
    # with the same score (see _CandidateRun); the serial keeps the tuples comparable without
    # comparing runs, and either copy leads to the same merge.
    heap: list[tuple[float, int, int, int, _CandidateRun]] = []
    run_serials = itertools.count()

    for run in _initial_runs(scores):
        run_of_cluster[run.owner] = run
        heap.append((*run.head(), next(run_serials), run))
    heapq.heapify(heap)

    # Rows and columns of dead clusters are left as they were (nothing reads a dead row; ``alive``
    # masks dead columns), which saves a strided column write per merge.
    while state.clusters_left > target_width:
        if not heap:
            raise unreachable_width_error(target_width, state.clusters_left, state.budgets)
        neg_score, kept, absorbed, _, run = heapq.heappop(heap)
        if run_of_cluster.get(run.owner) is not run:
            continue  # the run's owner merged since: all its pairs were rewritten or erased
        if alive[kept] and alive[absorbed] and scores[kept, absorbed] == -neg_score:
            state.merge(kept, absorbed, alpha, clear_absorbed=False)
            run_of_cluster.pop(absorbed, None)
            run_of_cluster.pop(kept, None)
            if state.clusters_left > target_width:
                kept_scores = scores[kept]
                best_score = float(kept_scores.max())
                if best_score > -np.inf:
                    new_run = _CandidateRun(kept, 0, np.flatnonzero(kept_scores == best_score), best_score)
                    run_of_cluster[kept] = new_run
                    heapq.heappush(heap, (*new_run.head(), next(run_serials), new_run))
            continue  # the popped run belonged to kept or absorbed, so it is gone
        # A stale head: the run continues at its next current pair.
        head = run.next_current(scores, alive)
        if head is not None:
            heapq.heappush(heap, (*head, next(run_serials), run))


def _scores_in_place(similarity: np.ndarray) -> np.ndarray | None:
    """similarity itself as the initial scores (diagonal set to -inf), or None when it cannot be."""
    if not (
        isinstance(similarity, np.ndarray)
        and similarity.dtype == np.float64
        and similarity.ndim == 2
        and similarity.strides[1] == similarity.itemsize  # rows contiguous (``padded_square``: apart)
        and similarity.flags.writeable
    ):
        return None
    np.fill_diagonal(similarity, -np.inf)
    return similarity


def zip_labels(
    similarity: np.ndarray,
    sizes: Sequence[int],
    target_width: int,
    alpha: float,
    beta: float,
    *,
    overwrite_similarity: bool = False,
) -> np.ndarray:
    """Cluster labels (N,) of zip_matching, clusters ordered by their smallest global unit index."""
    return zip_matching(
        similarity, sizes, target_width, alpha, beta, overwrite_similarity=overwrite_similarity
    ).labels

