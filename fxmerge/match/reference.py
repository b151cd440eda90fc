"""Slow, obviously-correct reference of the zip matcher, kept for the tests and the benchmark.

It spells out the rule documented in fxmerge/match/zip.py with the plainest algorithm: a dense score
matrix and a global argmax per merge, O(N^2) per merge and O(N^3) in all.  Do not use it in
production; fxmerge.match.zip.zip_matching makes exactly the same merges in O(N^2 log N).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fxmerge.match.clusters import labels_by_smallest_member, unit_models
from fxmerge.match.zip import (
    ZipMatching,
    decayed_merged_scores,
    forbid_within_model,
    initial_scores,
    unreachable_width_error,
    zip_budgets,
)


def naive_zip_matching(
    similarity: np.ndarray, sizes: Sequence[int], target_width: int, alpha: float, beta: float
) -> ZipMatching:
    """Greedy zip matching by repeated global argmax; same arguments and result as zip_matching.

    similarity: (N, N) finite symmetric float64, N = sum(sizes).
    """
    n_units = int(sum(sizes))
    # Rows and columns are indexed by cluster rep (its smallest unit); dead clusters are all -inf.
    scores = initial_scores(similarity)
    origins = unit_models(sizes)
    alive = np.ones(n_units, dtype=bool)
    budgets = zip_budgets(sizes, target_width, beta)
    for model, budget in enumerate(budgets):
        if budget <= 0:
            forbid_within_model(scores, alive, origins, model)

    cluster_of_unit = np.arange(n_units)
    merges: list[tuple[int, int, float]] = []
    for clusters_left in range(n_units, target_width, -1):
        # scores stays exactly symmetric, so the first maximum in row-major order is at (lo, hi) with
        # lo < hi, and it is the smallest such pair lexicographically: the specified tie-break.
        flat_best = int(np.argmax(scores))
        kept, absorbed = divmod(flat_best, n_units)
        best_score = float(scores[kept, absorbed])
        if best_score == -np.inf:
            raise unreachable_width_error(target_width, clusters_left, budgets)
        merged_scores = decayed_merged_scores(scores, kept, absorbed, alpha)
        scores[absorbed, :] = -np.inf
        scores[:, absorbed] = -np.inf
        scores[kept, :] = merged_scores
        scores[:, kept] = merged_scores
        alive[absorbed] = False
        cluster_of_unit[cluster_of_unit == absorbed] = kept
        merges.append((kept, absorbed, best_score))
        origin = int(origins[kept])
        if origin == origins[absorbed]:
            budgets[origin] -= 1
            if budgets[origin] <= 0:
                forbid_within_model(scores, alive, origins, origin)
    return ZipMatching(labels=labels_by_smallest_member(cluster_of_unit), merges=tuple(merges))
