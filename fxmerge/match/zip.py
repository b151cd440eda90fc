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

Implementation, O(N^2 log N) time and O(N^2) memory, no full-matrix argmax per merge:

* the dense score matrix ``scores`` (N, N) is indexed by rep, which never changes for the surviving
  cluster of a merge; dead clusters' rows and columns are -inf, so ``scores[lo, hi]`` is always the
  current score of a live pair and -inf otherwise;
* every live cluster owns one *run* of candidate pairs involving it: at the start unit i's run holds
  its pairs (i, j > i); a merge gives the merged cluster a new run of all its new scores and drops the
  runs of both parts, whose scores were just rewritten or erased.  A run yields its pairs best first
  by the key (-score, rep_lo, rep_hi), sorting lazily a geometrically growing tier at a time (most
  runs die after yielding a few pairs), and a heap holds the head of every run, so the heap top is
  the best candidate overall;
* a candidate is stale when ``scores[lo, hi]`` no longer equals the score it was stored with (the
  other member merged, died, or the pair was forbidden by a spent budget).  Once stale it stays stale
  for this run: a later rewrite of that score is yielded by the rewriting cluster's newer run.  Stale
  entries are skipped in vectorised chunks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fxmerge.errors import ConfigError
from fxmerge.match.clusters import labels_by_smallest_member, unit_models


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
    scores = np.array(similarity, dtype=np.float64, copy=True)
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
    finite = np.isfinite(merged)
    merged[finite] = decay * merged[finite]
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


_FIRST_TIER_SIZE = 8


class _CandidateRun:
    """The pairs (owner, x) with their scores when the run was made, yielded best first.

    ``neg_scores`` (N,) holds -score of the pair (owner, x) at index x, +inf where there is no candidate
    (x dead, forbidden, x == owner, or, for a unit's initial run, x < owner, which the run of x holds).
    The key is (-score, min(owner, x), max(owner, x)); for x ascending the pairs are in
    (rep_lo, rep_hi) order (every x < owner gives (x, owner), before every (owner, x') with
    x' > owner), so a stable sort of -score over ascending x gives the full key order.

    Sorting happens a tier at a time: the best ``tier_size`` pairs not yet sorted, and every pair tied
    with the last of them, so that the pairs left unsorted (-score > ``sorted_through``) are strictly
    worse than the tier and ties keep their order across tiers.
    """

    __slots__ = ("owner", "neg_scores", "sorted_through", "tier_neg_scores", "tier_others", "position", "tier_size")

    def __init__(
        self,
        owner: int,
        neg_scores: np.ndarray,
        first_tier_others: np.ndarray | None = None,
        sorted_through: float = -np.inf,
    ) -> None:
        """first_tier_others: an already sorted first tier covering every -score <= sorted_through."""
        self.owner = owner
        self.neg_scores = neg_scores
        self.sorted_through = sorted_through
        if first_tier_others is None:
            first_tier_others = np.empty(0, dtype=np.int64)
        self.tier_others = first_tier_others
        self.tier_neg_scores = neg_scores[first_tier_others]
        self.position = 0
        self.tier_size = _FIRST_TIER_SIZE * 4 if len(first_tier_others) else _FIRST_TIER_SIZE

    def _sort_next_tier(self) -> bool:
        """Sort the next tier; False when every pair has been sorted already."""
        unsorted = np.flatnonzero((self.neg_scores > self.sorted_through) & (self.neg_scores != np.inf))
        if len(unsorted) == 0:
            return False
        unsorted_neg_scores = self.neg_scores[unsorted]
        if len(unsorted) > self.tier_size:
            threshold = np.partition(unsorted_neg_scores, self.tier_size - 1)[self.tier_size - 1]
            in_tier = unsorted_neg_scores <= threshold
            unsorted, unsorted_neg_scores = unsorted[in_tier], unsorted_neg_scores[in_tier]
            self.sorted_through = float(threshold)
        else:
            self.sorted_through = np.inf
        order = np.argsort(unsorted_neg_scores, kind="stable")
        self.tier_others = unsorted[order]
        self.tier_neg_scores = unsorted_neg_scores[order]
        self.position = 0
        self.tier_size *= 4
        return True

    def next_current(self, scores: np.ndarray) -> tuple[float, int, int] | None:
        """Advance to the first pair whose score is still current; its key, or None when none is left.

        Stale pairs are found a chunk at a time with numpy; the chunk grows while whole chunks are stale.
        """
        chunk = 8
        owner_scores = scores[self.owner]
        while True:
            if self.position == len(self.tier_others) and not self._sort_next_tier():
                return None
            end = min(self.position + chunk, len(self.tier_others))
            current = np.flatnonzero(
                owner_scores[self.tier_others[self.position : end]] == -self.tier_neg_scores[self.position : end]
            )
            if len(current):
                self.position += int(current[0])
                other = int(self.tier_others[self.position])
                return (float(self.tier_neg_scores[self.position]), min(self.owner, other), max(self.owner, other))
            self.position = end
            chunk *= 4


def _initial_runs(scores: np.ndarray) -> list[_CandidateRun]:
    """Unit i's run of pairs (i, j > i) for every unit, first tiers sorted for all units at once.

    scores: (N, N) initial scores (-inf diagonal and forbidden pairs).  Returns N runs (the last one
    empty).  Doing the first tiers with whole-matrix numpy calls avoids N small calls per unit.
    """
    n_units = scores.shape[0]
    upper_triangle = np.triu(np.ones((n_units, n_units), dtype=bool), k=1)
    neg_scores = np.where(upper_triangle, -scores, np.inf)  # pair (i, j < i) belongs to unit j's run
    tier_size = min(_FIRST_TIER_SIZE, n_units)
    thresholds = np.partition(neg_scores, tier_size - 1, axis=1)[:, tier_size - 1]
    in_first_tier = (neg_scores <= thresholds[:, None]) & (neg_scores != np.inf)
    owners, others = np.nonzero(in_first_tier)  # row-major: others ascending within each owner
    # Stable lexsort: by owner, then -score, then (from the nonzero order) other ascending.
    order = np.lexsort((neg_scores[owners, others], owners))
    owners, others = owners[order], others[order]
    tier_starts = np.searchsorted(owners, np.arange(n_units + 1))
    return [
        _CandidateRun(
            owner,
            neg_scores[owner],
            others[tier_starts[owner] : tier_starts[owner + 1]],
            # A row with fewer finite pairs than the tier size was sorted completely.
            float(thresholds[owner]) if np.isfinite(thresholds[owner]) else np.inf,
        )
        for owner in range(n_units)
    ]


def zip_matching(
    similarity: np.ndarray, sizes: Sequence[int], target_width: int, alpha: float, beta: float
) -> ZipMatching:
    """Greedy zip matching of the units of len(sizes) models down to target_width clusters.

    similarity: (N, N) finite symmetric float64, N = sum(sizes); arguments are assumed validated
    (see fxmerge.match.match).  Raises ConfigError when no allowed merge is left before target_width.
    """
    n_units = int(sum(sizes))
    scores = initial_scores(similarity)
    origins = unit_models(sizes)
    alive = np.ones(n_units, dtype=bool)
    budgets = zip_budgets(sizes, target_width, beta)
    for model, budget in enumerate(budgets):
        if budget <= 0:
            forbid_within_model(scores, alive, origins, model)

    members: list[list[int]] = [[unit] for unit in range(n_units)]
    merges: list[tuple[int, int, float]] = []
    run_of_cluster: dict[int, _CandidateRun] = {}
    # Each run's head as (-score, rep_lo, rep_hi, run serial, run).  Two runs can hold the same pair
    # with the same score (a rewrite that happens to reproduce it); the serial keeps the tuples
    # comparable without comparing runs, and either copy leads to the same merge.
    heap: list[tuple[float, int, int, int, _CandidateRun]] = []
    run_serials = itertools.count()

    def push_head(run: _CandidateRun) -> None:
        head = run.next_current(scores)
        if head is not None:
            heapq.heappush(heap, (*head, next(run_serials), run))

    def start_run(run: _CandidateRun) -> None:
        run_of_cluster[run.owner] = run
        push_head(run)

    for run in _initial_runs(scores):
        start_run(run)

    clusters_left = n_units
    while clusters_left > target_width:
        if not heap:
            raise unreachable_width_error(target_width, clusters_left, budgets)
        neg_score, kept, absorbed, _, run = heapq.heappop(heap)
        if run_of_cluster.get(run.owner) is not run:
            continue  # the run's owner merged since: all its pairs were rewritten or erased
        if scores[kept, absorbed] == -neg_score:
            merged_scores = decayed_merged_scores(scores, kept, absorbed, alpha)
            scores[absorbed, :] = -np.inf
            scores[:, absorbed] = -np.inf
            scores[kept, :] = merged_scores
            scores[:, kept] = merged_scores
            alive[absorbed] = False
            members[kept].extend(members[absorbed])
            members[absorbed] = []
            merges.append((kept, absorbed, -neg_score))
            clusters_left -= 1
            origin = int(origins[kept])
            if origin == origins[absorbed]:
                budgets[origin] -= 1
                if budgets[origin] <= 0:
                    forbid_within_model(scores, alive, origins, origin)
            run_of_cluster.pop(absorbed, None)
            run_of_cluster.pop(kept, None)
            if clusters_left > target_width:
                start_run(_CandidateRun(kept, -scores[kept]))
            continue  # the popped run belonged to kept or absorbed, so it is gone
        # A stale head: the run continues at its next current pair.
        push_head(run)

    labels = np.empty(n_units, dtype=np.int64)
    for rep in np.flatnonzero(alive):
        labels[members[rep]] = rep
    return ZipMatching(labels=labels_by_smallest_member(labels), merges=tuple(merges))


def zip_labels(
    similarity: np.ndarray, sizes: Sequence[int], target_width: int, alpha: float, beta: float
) -> np.ndarray:
    """Cluster labels (N,) of zip_matching, clusters ordered by their smallest global unit index."""
    return zip_matching(similarity, sizes, target_width, alpha, beta).labels

