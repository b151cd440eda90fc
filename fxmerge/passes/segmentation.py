"""Depth alignment: split the deeper model's units into one segment per unit of the shallower model.

The deeper model A has units 0..m-1 and the shallower model B has units 0..n-1, m >= n >= 1.
A segmentation is a list of boundaries 0 = b_0 < b_1 < ... < b_n = m; segment i holds the A
units b_i .. b_{i+1}-1 and is aligned to B unit i. B's real unit i is merged with the FIRST unit
of its segment (A unit b_i); every other unit of the segment is merged with an identity unit
inserted into B, which is why those units must be shape-preserving.

With ``cka[j, i]`` the similarity of A unit j and B unit i, two objectives are supported:

* "sma" (segment-wise, last unit): maximise sum_i cka[b_{i+1} - 1, i]
* "lma" (layer-wise, all units):   maximise sum_i sum_{j in segment i} cka[j, i]

The optimum is found by a dynamic program over (B unit, start of its segment) in O(m^2 n) time.
Written from the definition above, not from the published pseudo-code (which has index errors).

Tie-breaking: among optimal segmentations the one whose boundary tuple (b_1, ..., b_n) is
lexicographically smallest is returned, i.e. earlier segments are kept as short as possible.
"Optimal" compares the floating-point sums the program computes (each segment's score added to
the best value of the segments after it) with exact equality, so ties are exact for
integer-valued or otherwise exactly representable similarity matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fxmerge.errors import ConfigError, IncompatibleModelsError

__all__ = ["Segmentation", "segment", "OBJECTIVES"]

OBJECTIVES = ("lma", "sma")


@dataclass(frozen=True)
class Segmentation:
    """An optimal depth alignment of a deeper model A (m units) to a shallower model B (n units).

    boundaries:  (n,) exclusive ends b_1..b_n of the segments, 0-based; the last one equals m
    segments:    n tuples of the 0-based A unit indices of each segment, in order
    objective:   "lma" or "sma"
    value:       the objective's value at the optimum
    first_units: (n,) the A unit each real B unit is merged with (the first unit of its segment)
    """

    boundaries: tuple[int, ...]
    segments: tuple[tuple[int, ...], ...]
    objective: str
    value: float
    first_units: tuple[int, ...]


def _unit_label(index: int, names: Sequence[str] | None) -> str:
    return f"{index} ({names[index]!r})" if names is not None else str(index)


def _unit_list(indices: Sequence[int], names: Sequence[str] | None, limit: int = 8) -> str:
    shown = [_unit_label(int(j), names) for j in indices[:limit]]
    more = f", ... ({len(indices) - limit} more)" if len(indices) > limit else ""
    return ", ".join(shown) + more


def _validated_inputs(
    cka: np.ndarray,
    objective: str,
    first_ok: np.ndarray | None,
    extra_ok: np.ndarray | None,
    deep_names: Sequence[str] | None,
    shallow_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks the arguments; returns (cka (m, n) float64, first_ok (m, n) bool, extra_ok (m,) bool)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"segmentation objective must be one of {OBJECTIVES}, got {objective!r}")
    similarity = np.asarray(cka, dtype=np.float64)
    if similarity.ndim != 2:
        raise ConfigError(f"the similarity matrix must be 2-D (deep units, shallow units), got shape {similarity.shape}")
    m, n = similarity.shape
    if n < 1:
        raise ConfigError("the shallower model has no unit to align")
    if m < n:
        raise ConfigError(
            f"the similarity matrix has {m} rows and {n} columns: rows must be the units of the deeper model (m >= n)"
        )
    if not np.all(np.isfinite(similarity)):
        raise ConfigError("the similarity matrix contains NaN or infinite values")

    first = np.ones((m, n), dtype=bool) if first_ok is None else np.asarray(first_ok, dtype=bool)
    if first.shape != (m, n):
        raise ConfigError(f"first_ok must have shape {(m, n)}, got {first.shape}")
    extra = np.ones(m, dtype=bool) if extra_ok is None else np.asarray(extra_ok, dtype=bool)
    if extra.shape != (m,):
        raise ConfigError(f"extra_ok must have shape {(m,)}, got {extra.shape}")
    if deep_names is not None and len(deep_names) != m:
        raise ConfigError(f"deep_names has {len(deep_names)} entries for {m} units")
    if shallow_names is not None and len(shallow_names) != n:
        raise ConfigError(f"shallow_names has {len(shallow_names)} entries for {n} units")
    return similarity, first, extra


def _infeasibility_reason(
    first_ok: np.ndarray,
    extra_ok: np.ndarray,
    deep_names: Sequence[str] | None,
    shallow_names: Sequence[str] | None,
) -> str:
    """Explains why no segmentation satisfies the constraints, naming the B unit that cannot be placed.

    Walks forward through B's units keeping the set of A units where the current segment may
    start; the first B unit whose set becomes empty (or the end of A not being reachable) is
    the one reported.
    """
    m, n = first_ok.shape
    reachable = np.zeros(m + 1, dtype=bool)  # positions where segment i may start
    reachable[0] = True
    for i in range(n):
        shallow = _unit_label(i, shallow_names)
        # Segment i must leave at least one A unit for each of the n - 1 - i later segments.
        latest_start = m - (n - i)
        window = np.arange(i, latest_start + 1)
        starts = [int(s) for s in np.flatnonzero(reachable[: latest_start + 1] & first_ok[: latest_start + 1, i])]
        if not starts:
            compatible = [int(j) for j in window if first_ok[j, i]]
            if not compatible:
                return (
                    f"no unit of the deeper model can start the segment of B unit {shallow}: none of the "
                    f"A units {_unit_list(window.tolist(), deep_names)} has its kind and shape change"
                )
            where_reached = [int(s) for s in np.flatnonzero(reachable)]
            blocking = [j for j in range(where_reached[0], max(compatible)) if not extra_ok[j]]
            why = (
                f"; A units {_unit_list(blocking, deep_names)} are not shape-preserving, so no segment can "
                f"extend over them with identity copies in B"
                if blocking
                else " (the earlier B units can only be placed further down the deeper model)"
            )
            return (
                f"no unit of the deeper model can start the segment of B unit {shallow}: the A units with its "
                f"kind and shape change ({_unit_list(compatible, deep_names)}) cannot be reached, the previous "
                f"segments can only end right before A units {_unit_list(where_reached, deep_names)}{why}"
            )
        latest_end = m - (n - 1 - i)
        next_reachable = np.zeros(m + 1, dtype=bool)
        for start in starts:
            end = start + 1
            while end <= latest_end:
                next_reachable[end] = True
                if end == m or not extra_ok[end]:
                    break
                end += 1
        reachable = next_reachable
    if reachable[m]:  # pragma: no cover - only called when the dynamic program found no solution
        raise AssertionError("segmentation: infeasibility diagnosis found a feasible segmentation")
    # Every possible start of the last segment is followed by a unit that cannot be an extra.
    last = _unit_label(n - 1, shallow_names)
    blocking = sorted({next(j for j in range(start + 1, m) if not extra_ok[j]) for start in starts})
    return (
        f"no segmentation covers the deeper model: the segment of the last B unit {last} cannot extend "
        f"to the end, A units {_unit_list(blocking, deep_names)} are not shape-preserving, so they could "
        f"only start a segment and B has no unit left for them"
    )


def segment(
    cka: np.ndarray,
    objective: str = "lma",
    first_ok: np.ndarray | None = None,
    extra_ok: np.ndarray | None = None,
    *,
    deep_names: Sequence[str] | None = None,
    shallow_names: Sequence[str] | None = None,
) -> Segmentation:
    """Optimal segmentation of the deeper model's units, one segment per shallower-model unit.

    cka:       (m, n) similarity of A unit j (rows, deeper model) and B unit i (columns), m >= n >= 1
    objective: "lma" (sum over all units of each segment) or "sma" (last unit of each segment)
    first_ok:  (m, n) bool, A unit j may be the first unit of segment i (default all True)
    extra_ok:  (m,) bool, A unit j may be a non-first unit of a segment (default all True)
    deep_names, shallow_names: unit names for error messages (lengths m and n)

    Raises ConfigError for malformed arguments and IncompatibleModelsError, naming the B unit
    that cannot be placed, when no segmentation satisfies the constraints. Ties are broken
    towards the lexicographically smallest boundary tuple (see the module docstring).
    """
    similarity, first, extra = _validated_inputs(cka, objective, first_ok, extra_ok, deep_names, shallow_names)
    m, n = similarity.shape

    starts = np.arange(m)[:, None]  # (m, 1) first A unit of a segment
    ends = np.arange(m + 1)[None, :]  # (1, m+1) exclusive end of a segment
    # Number of A units that may NOT be extras among units 0..k-1, so a segment [s, e) has only
    # allowed extras (units s+1..e-1) iff the count does not change between s+1 and e.
    blocked_before = np.concatenate([[0], np.cumsum(~extra)])
    extras_allowed = blocked_before[ends] == blocked_before[starts + 1]  # (m, m+1), meaningful for e > s
    nonempty = ends > starts  # (m, m+1)

    if objective == "lma":
        prefix = np.concatenate([np.zeros((1, n)), np.cumsum(similarity, axis=0)])  # (m+1, n)
    else:
        # Score of a segment ending (exclusively) at e is similarity[e-1, i]; row 0 is never used.
        last_unit_score = np.concatenate([np.zeros((1, n)), similarity])  # (m+1, n)

    # best_after[s]: best value of segments i..n-1 when segment i starts at A unit s (position m
    # is only valid once all B units are placed). Filled from the last B unit backwards.
    best_after = np.full(m + 1, -np.inf)
    best_after[m] = 0.0
    chosen_end = np.zeros((n, m), dtype=np.int64)  # chosen_end[i, s]: end of segment i if it starts at s
    for i in range(n - 1, -1, -1):
        if objective == "lma":
            segment_score = prefix[ends, i] - prefix[starts, i]  # (m, m+1)
        else:
            segment_score = np.broadcast_to(last_unit_score[ends, i], (m, m + 1))
        valid = nonempty & extras_allowed & first[:, i][:, None]
        candidates = np.where(valid, segment_score + best_after[None, :], -np.inf)  # (m, m+1)
        # argmax returns the first maximum: the shortest segment among equally good ones,
        # which yields the lexicographically smallest boundaries.
        chosen_end[i] = np.argmax(candidates, axis=1)
        best_here = np.full(m + 1, -np.inf)
        best_here[:m] = candidates[np.arange(m), chosen_end[i]]
        best_after = best_here

    if best_after[0] == -np.inf:
        raise IncompatibleModelsError(_infeasibility_reason(first, extra, deep_names, shallow_names))

    boundaries: list[int] = []
    segments: list[tuple[int, ...]] = []
    start = 0
    for i in range(n):
        end = int(chosen_end[i, start])
        boundaries.append(end)
        segments.append(tuple(range(start, end)))
        start = end
    return Segmentation(
        boundaries=tuple(boundaries),
        segments=tuple(segments),
        objective=objective,
        value=float(best_after[0]),
        first_units=tuple(seg[0] for seg in segments),
    )
