"""Unit matching: which units of K models become one merged unit.

``match`` is the single entry point the merging engine calls.  Each method produces a cluster
assignment over the units of all models concatenated (see ``clusters``); ``match`` validates the
arguments, handles block structure (``groups``) and turns the assignment into merge / unmerge
matrices.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from fxmerge.errors import ConfigError
from fxmerge.match.average import average_labels
from fxmerge.match.clusters import index_blocks, merge_matrices, padded_square, square_row_length
from fxmerge.match.groups import grouped_labels
from fxmerge.match.permute import check_permute_width, permute_labels, permute_reference_model
from fxmerge.match.zip import zip_labels

__all__ = ["METHODS", "match", "match_labels"]

METHODS = ("average", "permute", "zip")

# Correlation matrices computed with matmul can differ from their transpose in the last bits;
# anything beyond that is a caller bug worth reporting.
_SYMMETRY_RTOL = 1e-6
_SYMMETRY_ATOL = 1e-9
# Side of the square tiles the symmetry check works on: a tile and its mirror (2 x 128 KiB) stay in cache.
_SYMMETRY_TILE = 128


def match(
    similarity: np.ndarray,
    sizes: Sequence[int],
    target_width: int,
    *,
    method: str,
    alpha: float = 0.5,
    beta: float = 1.0,
    groups: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Match the units of K models and return one (M_k, U_k) pair per model.

    similarity: (N, N) finite symmetric similarity (typically correlation) of the units of all models
        concatenated, model k's units at rows offset_k .. offset_k + n_k, N = sum(sizes).
    sizes: the K >= 2 models' unit counts n_k >= 1.
    target_width: r, the number of merged units, 1 <= r <= N.
    method: "average" (unit c of every model; equal sizes, r = n), "permute" (assignment to the widest
        model; r = max(sizes)) or "zip" (greedy ZipIt! matching, any r).
    alpha: zip only, decay of a merged cluster's scores (alpha * min of its parts' scores), >= 0.
    beta: zip only, scale of the within-model merge budgets, >= 0 (0: no within-model merges).
    groups: g, when every model's units are g contiguous blocks that must stay together (heads,
        GroupNorm groups); every n_k and r must be divisible by g.

    Returns [(M_k, U_k)]: M_k (r, n_k) float64 with M_k[c, i] = 1/|c| when unit i of model k is in
    cluster c (|c| over all models), U_k (n_k, r) float64 one-hot rows; merged f* = sum_k M_k f_k and
    f_k ~ U_k f*.  Clusters are ordered by their smallest global unit (permute: by reference unit;
    with groups: block-major in the reference model's block order).
    Raises ConfigError on invalid arguments or when zip cannot reach the width.
    """
    labels = match_labels(similarity, sizes, target_width, method=method, alpha=alpha, beta=beta, groups=groups)
    return merge_matrices(labels, list(sizes), int(target_width))


def match_labels(
    similarity: np.ndarray,
    sizes: Sequence[int],
    target_width: int,
    *,
    method: str,
    alpha: float = 0.5,
    beta: float = 1.0,
    groups: int | None = None,
    workspace: np.ndarray | None = None,
) -> np.ndarray:
    """``match``'s clusters as labels (N,) int64: the merged unit (0 .. target_width - 1) of every
    unit of all models concatenated, without the (r, n_k) matrices.

    ``workspace``: a writeable C-contiguous float64 array of at least N * N entries, overwritten:
    the matcher's working copy of the similarity is made in it instead of in a new (N, N) array
    (a caller matching many groups in turn reuses one buffer)."""
    sizes = _checked_sizes(sizes)
    similarity = _checked_similarity(similarity, sum(sizes), _workspace_square(workspace, sum(sizes)))
    if method not in METHODS:
        raise ConfigError(f"unknown matching method {method!r}; expected one of {', '.join(METHODS)}")
    target_width = _checked_target_width(target_width, sum(sizes))
    alpha = _checked_non_negative("alpha", alpha)
    beta = _checked_non_negative("beta", beta)
    if groups is not None:
        _check_groups(groups, sizes, target_width)

    if method == "average":
        # Averaging never reorders anything, so unit c's block is already paired with block c: the
        # block structure is respected without pairing blocks.
        labels = average_labels(sizes, target_width)
    elif method == "permute":
        if groups is None or groups == 1:
            labels = permute_labels(similarity, sizes, target_width)
        else:
            # Checked on the whole layer first, so the error names its widths rather than a block's.
            check_permute_width(sizes, target_width)
            labels = grouped_labels(
                similarity, sizes, target_width, groups, permute_reference_model(sizes), permute_labels
            )
    else:

        def zip_block(block_similarity: np.ndarray, block_sizes: list[int], block_width: int) -> np.ndarray:
            return zip_labels(block_similarity, block_sizes, block_width, alpha, beta)

        if groups is None or groups == 1:
            # similarity is _checked_similarity's new array: zip may use it as its score matrix.
            labels = zip_labels(similarity, sizes, target_width, alpha, beta, overwrite_similarity=True)
        else:
            labels = grouped_labels(similarity, sizes, target_width, groups, 0, zip_block)
    return labels


def _checked_sizes(sizes: Sequence[int]) -> list[int]:
    try:
        checked = list(sizes)
    except TypeError:
        raise ConfigError(f"sizes must be a sequence of unit counts, got {sizes!r}") from None
    if len(checked) < 2:
        raise ConfigError(f"matching needs at least 2 models, got sizes {checked}")
    for size in checked:
        if not _is_integer(size) or size < 1:
            raise ConfigError(f"every model needs at least 1 unit; got size {size!r} in sizes {checked}")
    return [int(size) for size in checked]


def _workspace_square(workspace: np.ndarray | None, n_units: int) -> np.ndarray | None:
    """The (N, N) view of ``match_labels``' workspace, or None; ConfigError if it cannot serve.
    Its rows are ``square_row_length(N)`` entries apart when the workspace is that large
    (``padded_square``), else N."""
    if workspace is None:
        return None
    if not (
        isinstance(workspace, np.ndarray) and workspace.dtype == np.float64 and workspace.flags.c_contiguous
        and workspace.flags.writeable and workspace.size >= n_units * n_units
    ):
        raise ConfigError(
            f"workspace must be a writeable C-contiguous float64 numpy array of at least {n_units * n_units} entries "
            f"({n_units} units), got {type(workspace).__name__} {getattr(workspace, 'dtype', '')} of size "
            f"{getattr(workspace, 'size', '?')}"
        )
    if workspace.size >= n_units * square_row_length(n_units):
        return padded_square(n_units, workspace.reshape(-1))
    return workspace.reshape(-1)[: n_units * n_units].reshape(n_units, n_units)


def _checked_similarity(similarity: np.ndarray, n_units: int, out: np.ndarray | None = None) -> np.ndarray:
    """similarity as a new exactly symmetric (N, N) float64 array, (S + S.T) / 2 (in ``out``, an
    (N, N) float64 array that must not overlap it, when given); ConfigError if bad.

    One pass over square tiles checks finiteness and np.allclose(S, S.T) and writes the average: the
    only (N, N) allocation is the result, and a tile and its mirror are both in cache (a transposed
    row block would be read with a stride of one row per entry).  A tile whose entries differ from
    their mirror by at most atol passes without the relative test (NaN and inf never do).
    """
    try:
        array = np.asarray(similarity, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"similarity must be a float matrix, got {type(similarity).__name__}") from None
    if array.shape != (n_units, n_units):
        raise ConfigError(
            f"similarity has shape {array.shape}; expected ({n_units}, {n_units}) for the sizes' total of {n_units} units"
        )
    if out is not None and np.shares_memory(out, array):
        raise ConfigError("workspace must not share memory with the similarity")
    symmetric = padded_square(n_units) if out is None else out
    tiles = index_blocks(n_units, _SYMMETRY_TILE)
    for tile_index, rows in enumerate(tiles):
        for columns in tiles[tile_index:]:
            upper, lower = array[rows, columns], array[columns, rows].T
            difference = upper - lower  # NaN or inf (so nonzero) where an entry is not finite
            average = symmetric[rows, columns]
            if not difference.any():
                # finite and exactly symmetric already (fxmerge's own similarities are built
                # so): (a + a) / 2 is a, a copy
                average[...] = upper
                symmetric[columns, rows] = average.T
                continue
            np.abs(difference, out=difference)
            if not difference.max() <= _SYMMETRY_ATOL and not _allclose_both_ways(upper, lower, difference):
                raise _asymmetric_error(array)
            # Exact symmetry is what makes zip's tie-breaking well defined; average away last-bit
            # differences ((a + b) / 2 == (b + a) / 2 exactly, so the mirror tile is the transpose).
            np.add(upper, lower, out=average)
            average /= 2.0
            symmetric[columns, rows] = average.T
    return symmetric


def _allclose_both_ways(upper: np.ndarray, lower: np.ndarray, difference: np.ndarray) -> bool:
    """np.allclose(upper, lower) and np.allclose(lower, upper) for finite tiles; difference = |upper - lower|.

    allclose asks |a - b| <= atol + rtol * |b|; rounding is monotone, so both orders hold iff it holds
    for min(|a|, |b|).  False when an entry is not finite.
    """
    tolerance = np.minimum(np.abs(upper), np.abs(lower))
    tolerance *= _SYMMETRY_RTOL
    tolerance += _SYMMETRY_ATOL
    return bool((difference <= tolerance).all())


def _asymmetric_error(array: np.ndarray) -> ConfigError:
    """The error for a similarity that failed the symmetry check: non-finite entries are reported first."""
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        return ConfigError(f"similarity must be finite; entry {tuple(int(i) for i in bad)} is {array[tuple(bad)]}")
    worst = np.unravel_index(np.argmax(np.abs(array - array.T)), array.shape)
    return ConfigError(
        f"similarity must be symmetric; entries {tuple(int(i) for i in worst)} and its transpose differ "
        f"({array[worst]} vs {array[worst[::-1]]})"
    )


def _checked_target_width(target_width: int, n_units: int) -> int:
    if not _is_integer(target_width) or not 1 <= target_width <= n_units:
        raise ConfigError(f"target_width must be an integer in 1 .. {n_units} (all units), got {target_width!r}")
    return int(target_width)


def _checked_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_groups(groups: int, sizes: list[int], target_width: int) -> None:
    if not _is_integer(groups) or groups < 1:
        raise ConfigError(f"groups must be a positive integer or None, got {groups!r}")
    indivisible = [size for size in sizes if size % groups]
    if indivisible:
        raise ConfigError(f"groups={groups} does not divide the model widths {indivisible} (sizes {sizes})")
    if target_width % groups:
        raise ConfigError(f"groups={groups} does not divide target_width={target_width}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
