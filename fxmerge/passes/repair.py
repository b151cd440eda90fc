"""Repair after merging: recompute BatchNorm running statistics on calibration data.

A batch norm appears in three forms, and every one is reset the same way:

* a ``_BatchNorm`` module (``BatchNorm2d``, or a subclass kept as a leaf such as timm's
  ``BatchNormAct2d``), called by a ``call_module`` node or from inside any module;
* a functional call in a GraphModule's graph whose running statistics are ``get_attr`` buffers —
  ``batch_norm(x, running_mean, running_var, ...)`` of torch's functional API, what fx leaves when it traces into timm's
  ``BatchNormAct2d`` — or one of the ATen forms torch.export produces
  (``aten.batch_norm.default``, ``aten._native_batch_norm_legit_no_training.default``, ...).

Functional sites are recomputed by running their GraphModule through an ``fx.Interpreter`` that
normalises those nodes with the batch's own statistics (what a BatchNorm module does in train
mode) and accumulates them, so the result equals resetting the equivalent ``BatchNorm2d`` module. A
batch norm that cannot be reset (running statistics computed in the graph or held as parameters,
a training flag that is not a constant, running-statistics buffers no batch norm reads) gets a
warning naming it; ``strict=True`` raises instead.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from fxmerge import ops
from fxmerge.distributed import check_group, collect_errors, raise_together, sum_
from fxmerge.errors import UnsupportedOpError
from fxmerge.inputs import as_batch
from fxmerge.ops.registry import BatchNormSchema
from fxmerge.progress import progress

def _batch_norm_op(target: Any) -> BatchNormSchema | None:
    return ops.batch_norm_schema(target)  # the registry knows the functional batch norms


# ---------------------------------------------------------------------------------- statistics


class _BatchStatistics:
    """Per-channel sums over the batches one set of running statistics sees: of the batch means and
    of the unbiased batch variances (what a cumulative moving average averages), in float64."""

    def __init__(self, name: str, running_mean: torch.Tensor, running_var: torch.Tensor,
                 num_batches_tracked: torch.Tensor | None = None) -> None:
        self.name = name
        self.running_mean = running_mean
        self.running_var = running_var
        self.num_batches_tracked = num_batches_tracked
        self.num_features = running_mean.numel()
        self.mean_sum = torch.zeros(self.num_features, dtype=torch.float64)
        self.var_sum = torch.zeros(self.num_features, dtype=torch.float64)
        self.count = 0
        self._tracked: int | None = None  # the module's counter before its current call

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch ``x`` of shape (N, C, *spatial)."""
        x = x.detach()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=1)
        self.mean_sum += mean.cpu()
        self.var_sum += var.cpu()
        self.count += 1

    def add_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Accumulate one batch's mean and unbiased variance (C,), computed by someone else."""
        self.mean_sum += mean.detach().to(device="cpu", dtype=torch.float64)
        self.var_sum += var.detach().to(device="cpu", dtype=torch.float64)
        self.count += 1

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._tracked = int(module.num_batches_tracked) if module.num_batches_tracked is not None else None

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """After a call in train mode with momentum 1: the module's running statistics ARE this
        batch's (mean, unbiased variance), computed by its own kernel — reading them costs
        nothing, where recomputing them from the input costs as much as the norm itself. A
        module that did not update them (its counter did not move) is measured on its input."""
        tracked = self._tracked
        if tracked is not None and int(module.num_batches_tracked) == tracked + 1:
            self.add_statistics(module.running_mean, module.running_var)
        else:
            self.add(args[0])

    def write(self) -> None:
        if self.count == 0:  # never called on these inputs: left as they are
            return
        self.running_mean.copy_((self.mean_sum / self.count).to(self.running_mean))
        self.running_var.copy_((self.var_sum / self.count).to(self.running_var))
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.fill_(self.count)


@dataclass(frozen=True)
class _Site:
    """A functional batch-norm node whose running statistics are get_attr buffers."""

    op: BatchNormSchema
    statistics: _BatchStatistics


class _Recalibration(Interpreter):
    """Runs a GraphModule, normalising its functional batch-norm nodes with each batch's own
    statistics (train-mode BatchNorm) and accumulating those statistics."""

    def __init__(self, gm: GraphModule, sites: dict[Node, _Site]) -> None:
        super().__init__(gm)
        self.sites = sites

    def run_node(self, n: Node) -> Any:
        site = self.sites.get(n)
        if site is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        bound = site.op.bind(args, kwargs)
        x, eps = bound["input"], bound["eps"]
        out, batch_mean, batch_var = site.op.normalise(x, bound["weight"], bound["bias"], eps)
        site.statistics.add_statistics(batch_mean, batch_var)
        if not site.op.returns_tuple:
            return out
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return out, mean, torch.rsqrt(var + eps)


def _describe(value: Any, gm: GraphModule) -> str:
    if isinstance(value, Node):
        if value.op == "get_attr":
            owner_path, _, attr = value.target.rpartition(".")
            try:
                owner = gm.get_submodule(owner_path) if owner_path else gm
            except AttributeError:
                return f"get_attr {value.target!r}, which does not exist"
            if attr in owner._parameters:
                return f"get_attr {value.target!r}, a parameter"
            return f"get_attr {value.target!r}, a plain attribute"
        return f"computed by node {value.name!r} ({value.op} {getattr(value.target, '__name__', value.target)})"
    return f"the constant {value!r}"


def _buffer(value: Any, gm: GraphModule) -> torch.Tensor | None:
    """The floating-point buffer a get_attr node reads, or None."""
    if not isinstance(value, Node) or value.op != "get_attr":
        return None
    owner_path, _, attr = value.target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return None
    buffer = owner._buffers.get(attr)
    return buffer if isinstance(buffer, torch.Tensor) and buffer.is_floating_point() else None


def _functional_sites(
    gm: GraphModule, where: str, keyed: dict[int, _BatchStatistics], problems: list[str], named: set[int]
) -> dict[Node, _Site]:
    """The functional batch-norm nodes of ``gm``'s own graph that can be reset; the others are
    described in ``problems`` (their buffers' ids added to ``named``). Nodes sharing running
    buffers share one ``_BatchStatistics``."""
    sites: dict[Node, _Site] = {}
    for node in gm.graph.nodes:
        op = _batch_norm_op(node.target) if node.op == "call_function" else None
        if op is None:
            continue
        bound = op.bind(node.args, node.kwargs)
        name = f"batch norm node {node.name!r} in {where}"
        training = bound["training"]
        mean_node, var_node = bound.get("running_mean"), bound.get("running_var")
        if training is True:
            continue  # normalises with batch statistics in eval mode too: nothing to recompute
        mean, var = _buffer(mean_node, gm), _buffer(var_node, gm)
        named.update(id(t) for t in (mean, var) if t is not None)
        if training is not False:
            problems.append(f"{name}: its training flag is {_describe(training, gm)}, not a constant")
            continue
        if mean is None or var is None:
            bad, value = ("running_mean", mean_node) if mean is None else ("running_var", var_node)
            problems.append(f"{name}: its {bad} is {_describe(value, gm)}, not a buffer")
            continue
        if mean.dim() != 1 or mean.shape != var.shape:
            problems.append(f"{name}: running statistics of shapes {tuple(mean.shape)} and {tuple(var.shape)}")
            continue
        statistics = keyed.get(id(mean))
        if statistics is None:
            statistics = keyed[id(mean)] = _BatchStatistics(f"{name} ({mean_node.target})", mean, var)
        sites[node] = _Site(op, statistics)
    return sites


def _forward_through(interpreter: _Recalibration, gm: GraphModule) -> Any:
    signature = inspect.signature(type(gm).forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            bound = signature.bind(gm, *args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())[1:]
        return interpreter.run(*args)

    return forward


def reset_batchnorm(
    module: nn.Module, batches: Sequence[torch.Tensor], *, quiet: bool = False, process_group: Any = None,
    strict: bool = False,
) -> int:
    """Recompute every batch norm's running mean/var as the cumulative average over ``batches``.

    Covers ``_BatchNorm`` modules with ``track_running_stats`` and the functional batch norms of
    every GraphModule in ``module`` (the functional and ATen forms the registry ``fxmerge.ops`` knows)
    whose running statistics are ``get_attr`` buffers. Only the batch norms run in train mode
    (dropout and friends stay in eval mode, and each batch is normalised with its own statistics,
    as in training); no gradients. Each running mean and variance becomes the average over the
    batches (every batch weighs the same, as with ``momentum=None``; a batch norm called twice per
    batch counts both calls) of the batch mean and the unbiased batch variance of its input,
    accumulated in float64; a module's ``num_batches_tracked`` counts the batches. The module is
    returned to eval mode. Returns the number of batch norms reset (modules plus distinct sets of
    functional running statistics).

    A batch norm that cannot be reset is named in a ``UserWarning`` (``strict=True``: an
    ``UnsupportedOpError``): running statistics that are not buffers, a non-constant training
    flag, or ``running_mean``/``running_var`` buffers that no resettable batch norm reads (a
    custom leaf module's own batch norm; frozen batch norms, without ``momentum``, are left alone).

    ``process_group``: None, or a ``torch.distributed`` ProcessGroup whose processes each pass
    their own shard of the batches: the per-batch-norm sums are summed over the processes, so
    every process sets the same statistics — those of all shards' batches. This is exact because
    in train mode a batch's statistics at every batch norm depend on that batch alone.
    """
    group = check_group(process_group)
    names = {id(m): path for path, m in module.named_modules()}
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    keyed: dict[int, _BatchStatistics] = {}
    statistics = []
    for norm in norms:
        stat = _BatchStatistics(f"module {names[id(norm)]!r}", norm.running_mean, norm.running_var, norm.num_batches_tracked)
        keyed[id(norm.running_mean)] = stat
        statistics.append(stat)
    problems: list[str] = []
    named: set[int] = set()  # buffers of batch norms already named in ``problems``
    interpreted: list[tuple[GraphModule, _Recalibration]] = []
    for gm in module.modules():
        if not isinstance(gm, GraphModule):
            continue
        where = f"GraphModule {names[id(gm)]!r}" if names[id(gm)] else "the root GraphModule"
        before = len(keyed)
        sites = _functional_sites(gm, where, keyed, problems, named)
        statistics.extend(list(keyed.values())[before:])
        if sites:
            interpreted.append((gm, _Recalibration(gm, sites)))
    _check_unread_statistics(module, names, keyed, problems, named)
    for problem in problems:
        message = (
            f"{problem}: its running statistics are not recomputed and keep their merged (averaged) values, "
            "so the merged model may be wrong; make them buffers read by get_attr, or keep the layer "
            "as a BatchNorm module"
        )
        if strict:
            raise UnsupportedOpError(message)
        warnings.warn(message, stacklevel=2)
    if not statistics:
        return 0
    _eval(module)
    saved_momentum = [m.momentum for m in norms]
    hooks = [norm.register_forward_pre_hook(keyed[id(norm.running_mean)].before) for norm in norms]
    hooks += [norm.register_forward_hook(keyed[id(norm.running_mean)].after) for norm in norms]
    saved_forward = []
    for gm, interpreter in interpreted:
        saved_forward.append(gm.__dict__.get("forward"))
        gm.forward = _forward_through(interpreter, gm)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = 1.0  # after each call, the running statistics are that batch's
        norm.train()
    error: BaseException | None = None
    try:
        with torch.no_grad():
            for batch in progress(batches, total=len(batches), description="batchnorm reset", quiet=quiet):
                as_batch(batch).run(module)
    except collect_errors() as exc:
        if group is None:
            raise
        error = exc
    finally:
        for hook in hooks:
            hook.remove()
        for (gm, _), forward in zip(interpreted, saved_forward):
            if forward is None:
                del gm.forward
            else:
                gm.forward = forward
        for norm, momentum in zip(norms, saved_momentum):
            norm.momentum = momentum
            norm.eval()
    if group is not None:
        raise_together(error, group, "batchnorm reset", agree=[s.num_features for s in statistics])
        packed = torch.cat([torch.cat([torch.tensor([float(s.count)], dtype=torch.float64), s.mean_sum, s.var_sum]) for s in statistics])
        sum_(packed, group)
        offset = 0
        for s in statistics:
            width = s.num_features
            s.count = int(round(float(packed[offset])))
            s.mean_sum = packed[offset + 1 : offset + 1 + width]
            s.var_sum = packed[offset + 1 + width : offset + 1 + 2 * width]
            offset += 1 + 2 * width
    with torch.no_grad():
        for s in statistics:
            s.write()
    return len(statistics)


def _eval(module: nn.Module) -> None:
    try:
        module.eval()
    except NotImplementedError:  # torch.export's module(): its mode was fixed at capture
        pass


def _check_unread_statistics(
    module: nn.Module, names: dict[int, str], keyed: dict[int, _BatchStatistics], problems: list[str],
    named: set[int],
) -> None:
    """Describe in ``problems`` every ``running_mean``/``running_var`` buffer no resettable batch
    norm reads (reset ones are keyed by their running mean; their running var goes with it).

    A module without a ``momentum`` attribute never updates its statistics (torchvision's and
    timm's frozen batch norms): they are fixed parameters, as in training, and are left alone.
    """
    covered = {id(s.running_var) for s in keyed.values()} | set(keyed) | named
    for sub in module.modules():
        if not hasattr(sub, "momentum"):
            continue
        for attr in ("running_mean", "running_var"):
            buffer = sub._buffers.get(attr)
            if isinstance(buffer, torch.Tensor) and id(buffer) not in covered:
                path = names[id(sub)] or "the root module"
                problems.append(
                    f"module {path!r} ({type(sub).__name__}) holds a {attr!r} buffer that no batch norm "
                    "fxmerge can reset reads (a custom layer's own batch norm)"
                )
                break
