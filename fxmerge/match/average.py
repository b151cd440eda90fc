"""The "average" matcher: no alignment, unit c of every model forms merged feature c.

This is the naive weight-averaging baseline; it only makes sense when all models have the same
width and the merged model keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fxmerge.errors import ConfigError


def average_labels(sizes: Sequence[int], target_width: int) -> np.ndarray:
    """Cluster labels of plain averaging.

    Returns (N,) int64 labels with N = sum(sizes): unit i of every model is in cluster i.
    Raises ConfigError unless every size equals target_width.
    """
    if len(set(sizes)) != 1:
        raise ConfigError(f"method='average' needs models of equal width, got sizes {list(sizes)}")
    width = sizes[0]
    if target_width != width:
        raise ConfigError(
            f"method='average' keeps the models' width {width}; target_width={target_width} is not allowed"
        )
    return np.tile(np.arange(width, dtype=np.int64), len(sizes))
