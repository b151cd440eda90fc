"""Repair after merging: recompute BatchNorm running statistics on calibration data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fxmerge.distributed import check_group, collect_errors, raise_together, sum_
from fxmerge.progress import progress


class _BatchStatistics:
    """Per-channel sums over the batches a BatchNorm sees: of the batch means and of the
    unbiased batch variances (what a cumulative moving average averages), in float64."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        self.norm = norm
        self.mean_sum = torch.zeros(norm.num_features, dtype=torch.float64)
        self.var_sum = torch.zeros(norm.num_features, dtype=torch.float64)
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=1)
        self.mean_sum += mean.cpu()
        self.var_sum += var.cpu()
        self.count += 1


def reset_batchnorm(
    module: nn.Module, batches: Sequence[torch.Tensor], *, quiet: bool = False, process_group: Any = None
) -> int:
    """Recompute every BatchNorm's running mean/var as the cumulative average over ``batches``.

    Only the BatchNorm layers run in train mode (dropout and friends stay in eval mode, and each
    batch is normalised with its own statistics, as in training); no gradients. Each BatchNorm's
    running mean and variance become the average over the batches (every batch weighs the same,
    as with ``momentum=None``) of the batch mean and the unbiased batch variance of its input,
    accumulated in float64; ``num_batches_tracked`` counts the batches. The module is returned
    to eval mode. Returns the number of BatchNorm layers reset.

    ``process_group``: None, or a ``torch.distributed`` ProcessGroup whose processes each pass
    their own shard of the batches: the per-BatchNorm sums are summed over the processes, so
    every process sets the same statistics — those of all shards' batches. This is exact because
    in train mode a batch's statistics at every BatchNorm depend on that batch alone.
    """
    group = check_group(process_group)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    module.eval()
    saved_momentum = [m.momentum for m in norms]
    statistics = [_BatchStatistics(norm) for norm in norms]
    hooks = [norm.register_forward_pre_hook(stat) for norm, stat in zip(norms, statistics)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    error: BaseException | None = None
    try:
        with torch.no_grad():
            for batch in progress(batches, total=len(batches), description="batchnorm reset", quiet=quiet):
                module(batch)
    except collect_errors() as exc:
        if group is None:
            raise
        error = exc
    finally:
        for hook in hooks:
            hook.remove()
        for norm, momentum in zip(norms, saved_momentum):
            norm.momentum = momentum
            norm.eval()
    if group is not None:
        raise_together(error, group, "batchnorm reset", agree=[s.norm.num_features for s in statistics])
        packed = torch.cat([torch.cat([torch.tensor([float(s.count)], dtype=torch.float64), s.mean_sum, s.var_sum]) for s in statistics])
        sum_(packed, group)
        offset = 0
        for s in statistics:
            width = s.norm.num_features
            s.count = int(round(float(packed[offset])))
            s.mean_sum = packed[offset + 1 : offset + 1 + width]
            s.var_sum = packed[offset + 1 + width : offset + 1 + 2 * width]
            offset += 1 + 2 * width
    with torch.no_grad():
        for s in statistics:
            norm = s.norm
            if s.count == 0:  # never called on these inputs: left at the reset values
                continue
            norm.running_mean.copy_((s.mean_sum / s.count).to(norm.running_mean))
            norm.running_var.copy_((s.var_sum / s.count).to(norm.running_var))
            norm.num_batches_tracked.fill_(s.count)
    return len(norms)
