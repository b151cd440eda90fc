"""Matching that respects a block structure of the units (attention heads, GroupNorm groups).

When every model's units form g contiguous blocks that must stay together (block-major: unit i of
model k is in block i // (n_k / g)), units may only be matched inside paired blocks.  Blocks are
paired to the reference model's blocks by an assignment on MuDSC's "mean matched correlation", then
each tuple of paired blocks is matched on its own and the merged output is laid out block-major in
the reference's block order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from fxmerge.errors import ConfigError
from fxmerge.match.clusters import unit_offsets

#: Matches the units of one tuple of paired blocks: (similarity (n, n), block sizes, target width)
#: -> (n,) labels in 0 .. target width - 1.
BlockMatcher = Callable[[np.ndarray, list[int], int], np.ndarray]


def mean_matched_similarity(cross: np.ndarray) -> float:
    """Mean similarity of the unit pairs an optimal one-to-one assignment picks in a block pair.

    cross: (a, b) similarity between the units of two blocks; min(a, b) pairs are matched.
    """
    rows, columns = linear_sum_assignment(cross, maximize=True)
    return float(cross[rows, columns].mean())


def pair_blocks(similarity: np.ndarray, sizes: Sequence[int], groups: int, reference: int) -> np.ndarray:
    """Which block of each model goes with each block of the reference model.

    similarity: (N, N), N = sum(sizes), every size divisible by groups.
    Returns (K, groups) int64: entry [k, p] is the block of model k paired with reference block p
    (row ``reference`` is the identity).
    """
    offsets = unit_offsets(sizes)
    reference_block = sizes[reference] // groups
    pairing = np.tile(np.arange(groups, dtype=np.int64), (len(sizes), 1))
    for k, n_k in enumerate(sizes):
        if k == reference:
            continue
        model_block = n_k // groups
        block_scores = np.empty((groups, groups))
        for p in range(groups):
            reference_start = offsets[reference] + p * reference_block
            reference_units = slice(reference_start, reference_start + reference_block)
            for q in range(groups):
                model_start = offsets[k] + q * model_block
                cross = similarity[reference_units, model_start : model_start + model_block]
                block_scores[p, q] = mean_matched_similarity(cross)
        reference_blocks, model_blocks = linear_sum_assignment(block_scores, maximize=True)
        pairing[k, reference_blocks] = model_blocks
    return pairing


def grouped_labels(
    similarity: np.ndarray,
    sizes: Sequence[int],
    target_width: int,
    groups: int,
    reference: int,
    match_block: BlockMatcher,
) -> np.ndarray:
    """Cluster labels when units are matched only inside paired blocks.

    similarity: (N, N), every size and target_width divisible by groups (validated by the caller).
    Returns (N,) int64 labels; merged features p * (target_width / groups) ..
    (p + 1) * (target_width / groups) - 1 come from the block tuple of reference block p.
    """
    offsets = unit_offsets(sizes)
    block_sizes = [n_k // groups for n_k in sizes]
    block_target = target_width // groups
    pairing = pair_blocks(similarity, sizes, groups, reference)
    labels = np.empty(offsets[-1], dtype=np.int64)
    for p in range(groups):
        units = np.concatenate(
            [
                offsets[k] + pairing[k, p] * block_sizes[k] + np.arange(block_sizes[k])
                for k in range(len(sizes))
            ]
        )
        try:
            block_labels = match_block(similarity[np.ix_(units, units)], block_sizes, block_target)
        except ConfigError as error:
            # The matcher only saw one block tuple; say which, or its widths make no sense to the caller.
            raise ConfigError(
                f"groups={groups}: matching block tuple {p} ({block_target} of {sum(block_sizes)} units "
                f"kept) failed: {error}"
            ) from error
        labels[units] = p * block_target + block_labels
    return labels
