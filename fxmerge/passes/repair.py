"""Repair after merging: recompute BatchNorm running statistics on calibration data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fxmerge.progress import progress


def reset_batchnorm(module: nn.Module, batches: Sequence[torch.Tensor], *, quiet: bool = False) -> int:
    """Recompute every BatchNorm's running mean/var as the cumulative average over ``batches``.

    Only the BatchNorm layers run in train mode (dropout and friends stay in eval mode); no
    gradients. The module is returned to eval mode. Returns the number of BatchNorm layers reset.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    module.eval()
    saved_momentum = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch weighs the same
        norm.train()
    with torch.no_grad():
        for batch in progress(batches, total=len(batches), description="batchnorm reset", quiet=quiet):
            module(batch)
    for norm, momentum in zip(norms, saved_momentum):
        norm.momentum = momentum
        norm.eval()
    return len(norms)
