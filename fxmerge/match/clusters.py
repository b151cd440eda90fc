"""Cluster assignments shared by every matcher, and their merge / unmerge matrices.

Every matcher works on the units of all K models concatenated: model k's units are the global
indices ``offsets[k] .. offsets[k + 1]``.  A matcher's answer is a *label* per global unit, the
index of the merged feature (cluster) the unit belongs to; ``merge_matrices`` turns labels into
the (M_k, U_k) pairs the merging engine consumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fxmerge.errors import ConfigError


# Whole-matrix passes over (N, N) similarities work on row blocks of about this many entries, so
# that their temporaries stay small (no (N, N) temporaries; 2 MiB of float64 per block).
ROW_BLOCK_ENTRIES = 1 << 18


def square_row_length(n_units: int) -> int:
    """The row length (entries) of an (N, N) float64 working matrix: N rounded up so that a row
    spans an odd number of 64-byte cache lines. A matcher writes whole columns of its score
    matrix (one entry per row); with rows a multiple of 4 KiB apart (N a multiple of 512, as
    most layer widths are) every entry of a column falls in the same few cache sets, and a
    column write of N = 1536 took 24.5 us against 14.4 us with rows 1544 entries apart."""
    lines = -(-n_units // 8)
    return 8 * (lines + 1 - lines % 2)


def padded_square(n_units: int, buffer: np.ndarray | None = None) -> np.ndarray:
    """An (N, N) float64 view whose rows are ``square_row_length(N)`` entries apart, in
    ``buffer`` (1-D float64, at least N * square_row_length(N) entries) or a new array."""
    length = square_row_length(n_units)
    base = np.empty(n_units * length) if buffer is None else buffer[: n_units * length]
    return base.reshape(n_units, length)[:, :n_units]


def index_blocks(length: int, block_size: int) -> list[slice]:
    """Consecutive slices of at most block_size (>= 1) indices covering 0 .. length."""
    block_size = max(1, block_size)
    return [slice(first, min(first + block_size, length)) for first in range(0, length, block_size)]


def unit_offsets(sizes: Sequence[int]) -> np.ndarray:
    """Start of each model's units in the concatenation.

    Returns an int64 array of shape (K + 1,): model k owns global units offsets[k] .. offsets[k + 1].
    """
    return np.concatenate(([0], np.cumsum(np.asarray(sizes, dtype=np.int64))))


def unit_models(sizes: Sequence[int]) -> np.ndarray:
    """The model each global unit comes from: an int64 array of shape (N,)."""
    return np.repeat(np.arange(len(sizes), dtype=np.int64), np.asarray(sizes, dtype=np.int64))


def labels_by_smallest_member(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters so that cluster order follows the smallest global index of their members.

    labels: (N,) arbitrary non-negative cluster ids.  Returns (N,) ids 0 .. C-1 where cluster 0 holds
    unit 0, cluster 1 holds the first unit not in cluster 0, and so on.
    """
    labels = np.asarray(labels, dtype=np.int64)
    # np.unique's return_index gives the first (= smallest) unit of each id; ranking those orders the ids.
    unique_ids, first_unit, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank_of_unique = np.empty(len(unique_ids), dtype=np.int64)
    rank_of_unique[np.argsort(first_unit, kind="stable")] = np.arange(len(unique_ids))
    return rank_of_unique[inverse.reshape(-1)]


def checked_cluster_sizes(labels: np.ndarray, target_width: int) -> np.ndarray:
    """(target_width,) the number of units in each cluster of ``labels`` (N,); ConfigError unless
    the labels cover exactly target_width non-empty clusters."""
    cluster_sizes = np.bincount(labels, minlength=target_width)
    if len(cluster_sizes) != target_width or np.any(cluster_sizes == 0):
        # A matcher bug, not a user error, but ConfigError keeps the caller's handling in one place.
        raise ConfigError(
            f"internal: cluster labels do not cover exactly {target_width} non-empty clusters "
            f"(cluster sizes {cluster_sizes.tolist()})"
        )
    return cluster_sizes


def merge_matrices(
    labels: np.ndarray, sizes: Sequence[int], target_width: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merge / unmerge matrices of a cluster assignment.

    labels: (N,) cluster index in 0 .. target_width-1 of every global unit; every cluster non-empty.
    Returns one (M_k, U_k) per model, float64: M_k (target_width, n_k) averages the cluster members
    (M_k[c, i] = 1/|c| with |c| counted over all models), U_k (n_k, target_width) copies the merged
    feature back (U_k[i, c] = 1), so that sum_k M_k @ U_k is the identity of size target_width.
    """
    labels = np.asarray(labels, dtype=np.int64)
    cluster_sizes = checked_cluster_sizes(labels, target_width)
    offsets = unit_offsets(sizes)
    matrices: list[tuple[np.ndarray, np.ndarray]] = []
    for k, n_k in enumerate(sizes):
        model_labels = labels[offsets[k] : offsets[k + 1]]
        units = np.arange(n_k)
        unmerge = np.zeros((n_k, target_width), dtype=np.float64)
        unmerge[units, model_labels] = 1.0
        # Written directly rather than as unmerge.T / sizes: no strided transpose copy, same values.
        merge = np.zeros((target_width, n_k), dtype=np.float64)
        merge[model_labels, units] = 1.0 / cluster_sizes[model_labels]
        matrices.append((merge, unmerge))
    return matrices
