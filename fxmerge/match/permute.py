"""The "permute" matcher (Git Re-Basin's weight/activation matching, one layer at a time).

Every model is aligned to a reference model (the widest) by an optimal one-to-one assignment of its
units to reference units.  Narrower models leave some reference units unmatched; those stay
singleton clusters, so the merged width is the reference width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from fxmerge.errors import ConfigError
from fxmerge.match.clusters import unit_offsets


def permute_reference_model(sizes: Sequence[int]) -> int:
    """Index of the reference model: the widest, the first one on ties."""
    return int(np.argmax(np.asarray(sizes)))


def check_permute_width(sizes: Sequence[int], target_width: int) -> None:
    """Raise ConfigError unless target_width is the widest model's width (permute never changes it)."""
    widest = max(sizes)
    if target_width != widest:
        raise ConfigError(
            f"method='permute' keeps the widest model's width {widest}; "
            f"target_width={target_width} is not allowed (use method='zip' to change the width)"
        )


def permute_labels(similarity: np.ndarray, sizes: Sequence[int], target_width: int) -> np.ndarray:
    """Cluster labels of the assignment of every model to the widest one.

    similarity: (N, N) symmetric unit similarity, N = sum(sizes).
    Returns (N,) int64 labels: cluster c holds reference unit c and the units assigned to it, so the
    merged features come in the reference's unit order.  Raises ConfigError unless
    target_width == max(sizes).
    """
    check_permute_width(sizes, target_width)
    reference = permute_reference_model(sizes)
    reference_width = sizes[reference]
    offsets = unit_offsets(sizes)
    reference_units = slice(offsets[reference], offsets[reference + 1])
    labels = np.empty(offsets[-1], dtype=np.int64)
    labels[reference_units] = np.arange(reference_width)
    for k in range(len(sizes)):
        if k == reference:
            continue
        cross = similarity[reference_units, offsets[k] : offsets[k + 1]]  # (n_ref, n_k), n_k <= n_ref
        reference_rows, model_columns = linear_sum_assignment(cross, maximize=True)
        labels[offsets[k] + model_columns] = reference_rows
    return labels
