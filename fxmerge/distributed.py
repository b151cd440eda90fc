"""Summing sufficient statistics over the processes of a ``torch.distributed`` process group.

fxmerge's statistics passes (feature statistics, unit CKA, BatchNorm reset) accept a process
group: each process feeds only ITS shard of the calibration batches, and the passes combine the
shards' sufficient statistics so that every process ends with the statistics of all batches —
bit-identical on every process, so every process computes the same merged model.

Rules for callers (every process of the group):

* calls the same passes in the same order with the same models (collectives must line up);
* has at least one calibration batch;
* uses a backend that supports the statistics' device (``gloo`` for CPU tensors).

Bit-identity: an all-reduce is not guaranteed to leave identical bits on every process (the
reduction order may differ per rank), so ``sum_`` all-reduces and then broadcasts the result of
the group's rank 0 to everyone.
"""

from __future__ import annotations

from typing import Any

import torch

from fxmerge.errors import CalibrationError, ConfigError, FxMergeError, IncompatibleModelsError

__all__ = ["check_group", "collect_errors", "raise_together", "sum_"]


def check_group(group: Any) -> Any:
    """``group`` if it is None (single process) or a usable ``torch.distributed`` ProcessGroup."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("process_group was given but torch.distributed is not initialised (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise ConfigError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) or None, "
            f"got {type(group).__name__}"
        )
    return group


def _root(group: Any) -> int:
    """The global rank of the group's rank 0 (``broadcast`` takes global ranks)."""
    import torch.distributed as dist

    return dist.get_global_rank(group, 0)


def sum_(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """In place: ``tensor`` becomes the sum of every process's ``tensor``, the same bits everywhere."""
    if group is None:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    if dist.get_world_size(group) > 1:
        dist.broadcast(tensor, src=_root(group), group=group)
    return tensor


def raise_together(error: BaseException | None, group: Any, what: str, *, agree: Any = None) -> None:
    """A collective error check: if any process of ``group`` failed, every process raises.

    A process that fails alone before a collective leaves the others waiting in it until the
    group's timeout; passes therefore catch their data errors, call this, and only then run
    their collectives. The failing process re-raises its own error; the others raise a
    ``CalibrationError`` naming the failing rank and its message. ``agree``: a picklable value
    (e.g. the list of statistics about to be reduced, with their sizes) that must be equal on
    every process; otherwise every process raises ``IncompatibleModelsError``.
    """
    if group is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    local = None if error is None else f"{type(error).__name__}: {error}"
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, (local, agree), group=group)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(reports) if message is not None]
    if failed:
        rank, message = failed[0]
        raise CalibrationError(f"{what}: process {rank} of the process group failed: {message}")
    different = [rank for rank, (_, value) in enumerate(reports) if value != reports[0][1]]
    if different:
        raise IncompatibleModelsError(
            f"{what}: process {different[0]} of the process group would combine different statistics than process 0 "
            "(every process must merge the same models, with calibration batches of one shape)"
        )


def collect_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a pass converts into a collective failure (data and configuration errors)."""
    return (FxMergeError, ValueError, RuntimeError)
