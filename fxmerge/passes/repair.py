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


# ------------------------------------------------------------------------------------------ REPAIR


@dataclass(frozen=True)
class RepairSite:
    """A node whose output channels REPAIR rescales (``repair="repair"``).

    ``dim``: the channel axis of the node's output (N, ..., C, ...). ``scaled``: (qualified
    parameter name, its output-channel axis) of the parameters that scale the output per channel
    (the registry's ``rescale_params``); ``shift``: the parameter the per-channel shift is added
    to. Empty ``scaled``: the correction is an inserted ``x * scale + shift`` node instead.
    """

    node: str
    dim: int
    scaled: tuple[tuple[str, int], ...] = ()
    shift: str | None = None

    def __repr__(self) -> str:
        how = "folded into " + ", ".join(name for name, _ in self.scaled) if self.scaled else "inserted affine"
        return f"RepairSite({self.node!r}, dim {self.dim}, {how})"


def repair_sites(gm: GraphModule, analysis: Any, *, until: str | None = None) -> tuple[list[RepairSite], list[str]]:
    """The nodes of ``gm`` whose outputs are merged units' pre-activations, in topological order,
    and the problems (strings naming a node) of the ones that cannot be rescaled.

    A site is a layer (conv, linear: ``fxmerge.ops.is_layer``) or a normalisation
    (``fxmerge.ops.normalises``) whose output has one channel axis of a free group
    (``analysis.node_layouts``); a node whose every user is a normalisation is left to that norm
    (a conv before its BatchNorm). The correction is folded into the registry's weight and bias
    when both exist, are not shared with another layer and have an output axis laid out as the
    channels; otherwise an affine node is inserted. A layer whose output is not one tensor with one
    such axis (an attention module's tuple), or a normalisation the registry cannot fold into
    (``fxmerge.ops.rescale_params``: timm's ``BatchNormAct2d``), cannot be rescaled: it is named
    in the problems.
    ``until``: sites up to this node only (partial zipping: the tails are not merged units).
    """
    from fxmerge.groups import spaces_in

    modules = dict(gm.named_modules())
    free = {analysis.space_ids[g.name] for g in analysis.groups if not g.fixed}
    # a parameter under two names, or a module called at two sites, is not one unit's: never folded into
    canonical_count: dict[str, int] = {}
    for name, canonical in analysis.aliases.items():
        canonical_count[canonical] = canonical_count.get(canonical, 0) + 1
    uses: dict[str, int] = {}  # module path or get_attr target -> the call nodes reading it
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            uses[str(node.target)] = uses.get(str(node.target), 0) + len(node.users)
    sites: list[RepairSite] = []
    problems: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            found = ops.rescale_params(node, modules)
            reads = [str(node.target)] if node.op == "call_module" else list(found[0] if found else ())
            if found is not None and any(uses.get(name, 1) > 1 for name in reads):
                found = ((), found[1])  # its affine map, but shared: an inserted node corrects this call
            layer = ops.is_layer(node, modules)
            if found is not None or layer or ops.normalises(node, modules):
                for target, params in _outputs(node, found):
                    site = _site(target, params, layer, analysis, free, canonical_count, modules, problems, spaces_in)
                    if site is not None:
                        sites.append(site)
        if node.name == until:
            break
    return sites, problems


def _outputs(node: Node, found: Any) -> list[tuple[Node, Any]]:
    """The nodes holding a site's output tensors: the node itself, or, for a layer returning a
    tuple (an attention module: (output, weights)), its ``getitem`` users (corrected by an
    inserted affine node: no parameter of the layer scales one item alone)."""
    import operator

    if getattr(node.meta.get("tensor_meta"), "shape", None) is not None:
        return [(node, found)]
    items = [
        user for user in node.users if user.op == "call_function" and user.target is operator.getitem
        # an unused item that is no tensor (the None of need_weights=False) is no unit
        and (getattr(user.meta.get("tensor_meta"), "shape", None) is not None or user.users)
    ]
    return [(item, None) for item in items] or [(node, found)]


def _site(node: Node, found: Any, layer: bool, analysis: Any, free: set[int], canonical_count: dict[str, int],
          modules: dict[str, nn.Module], problems: list[str], spaces_in: Any) -> RepairSite | None:
    layouts = analysis.node_layouts.get(node.name)
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if layouts is None or shape is None or len(layouts) != len(shape):
        problems.append(f"node {node.name!r}: its output is not one tensor with known channels")
        return None
    dims = [d for d, layout in enumerate(layouts) if layout is not None and set(spaces_in(layout)) & free]
    if not dims:
        return None  # fixed channels (the logits): nothing was merged
    if len(dims) > 1 or any(layout is None for layout in layouts):
        problems.append(f"node {node.name!r}: its output has no single channel axis (axes {dims})")
        return None
    users = list(node.users)
    if users and all(ops.normalises(user, modules) for user in users):
        return None  # the norm after it is the pre-activation
    dim = dims[0]
    if found is None and not layer:
        # a normalisation fxmerge cannot fold into (a subclass computing more than its affine map):
        # an affine node after it would not be its pre-activation
        problems.append(f"node {node.name!r}: a normalisation whose affine map the registry cannot rescale")
        return None
    if found is None:
        return RepairSite(node.name, dim)
    names, _ = found
    if not names:
        return RepairSite(node.name, dim)
    scaled = []
    for name in names:
        canonical = analysis.aliases.get(name, name)
        param_layouts = analysis.param_layouts.get(canonical)
        roles = analysis.param_roles.get(canonical)
        if param_layouts is None or canonical_count.get(canonical, 1) > 1:
            return RepairSite(node.name, dim)  # absent (bias=False) or tied: insert instead
        axes = [a for a, (layout, role) in enumerate(zip(param_layouts, roles)) if role == "out" and layout == layouts[dim]]
        if len(axes) != 1:
            return RepairSite(node.name, dim)
        scaled.append((name, axes[0]))
    return RepairSite(node.name, dim, tuple(scaled), names[-1])


class _Moments:
    """Per-channel float64 sums (count, sum, sum of squares) of a node's output over batches."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().movedim(self.dim, -1).reshape(-1, x.shape[self.dim]).to(torch.float64)
        total, squares = flat.sum(dim=0).cpu(), flat.square().sum(dim=0).cpu()
        self.sum = total if self.sum is None else self.sum + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += flat.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, population std), each (C,) float64."""
        mean = self.sum / self.count  # type: ignore[operator]
        return mean, (self.squares / self.count - mean.square()).clamp_min(0).sqrt()  # type: ignore[operator]


class _Reached(Exception):
    pass


class _Observer(Interpreter):
    """Runs a GraphModule and accumulates the moments of the named nodes' outputs; stops after the
    last of them (nothing after it is needed)."""

    def __init__(self, gm: GraphModule, moments: dict[str, _Moments]) -> None:
        super().__init__(gm)
        self.moments = moments
        self.last = max((i for i, n in enumerate(gm.graph.nodes) if n.name in moments), default=-1)
        self.position = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.position = 0
        try:
            return super().run(*args, **kwargs)
        except _Reached:
            return None

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        if n.name in self.moments:
            self.moments[n.name].add(value)
        if self.position == self.last:
            raise _Reached
        self.position += 1
        return value


def node_moments(gm: GraphModule, dims: dict[str, int], batches: Sequence[Any], *, quiet: bool = True,
                 description: str = "unit statistics") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per named node, the (mean, std) (C,) float64 of its output over ``batches``, every
    position along the axes other than ``dims[name]`` a sample (eval mode, no gradients)."""
    moments = {name: _Moments(dim) for name, dim in dims.items()}
    observer = _Observer(gm, moments)
    forward = _forward_through(observer, gm)
    with torch.no_grad():
        for batch in progress(batches, total=len(batches), description=description, quiet=quiet):
            as_batch(batch).run(forward)
    return {name: m.mean_std() for name, m in moments.items() if m.count}


def repair_units(
    gm: GraphModule, sites: Sequence[RepairSite], targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Sequence[Any], *, quiet: bool = False,
) -> int:
    """REPAIR (Jordan et al., 2022): rescale every site's output channels, in topological order,
    so that their mean and std over ``batches`` are ``targets[site.node]`` ((C,) each).

    Each site is measured after the sites before it are corrected (a pass over the batches up to
    the site), then y -> a * y + b per channel with a = target std / std and b = target mean -
    a * mean, folded into the site's weight and bias or inserted as an affine node. A channel
    that is constant on the batches (std 0) is only shifted. Returns the number of sites changed.
    """
    import operator

    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for index, site in enumerate(sites):
        if site.node not in targets:
            continue
        measured = node_moments(gm, {site.node: site.dim}, batches, quiet=quiet, description=f"repair {site.node}")
        if site.node not in measured:
            continue  # never run on these inputs
        mean, std = measured[site.node]
        target_mean, target_std = targets[site.node]
        scale = torch.where(std > 1e-12 * (1 + mean.abs()), target_std / std.clamp_min(1e-300), torch.ones_like(std))
        shift = target_mean - scale * mean
        with torch.no_grad():
            if site.scaled:
                for name, axis in site.scaled:
                    tensor = _tensor(gm, name)
                    view = [1] * tensor.dim()
                    view[axis] = -1
                    tensor.mul_(scale.reshape(view).to(tensor))
                _tensor(gm, site.shift).add_(shift.to(_tensor(gm, site.shift)))  # type: ignore[arg-type]
            else:
                node = nodes[site.node]
                rank = len(node.meta["tensor_meta"].shape)
                like = next(iter(gm.parameters()), torch.empty(0))
                view = [-1] + [1] * (rank - site.dim - 1)
                prefix = f"_repair{index}_{site.node}"
                gm.register_buffer(f"{prefix}_scale", scale.reshape(view).to(like))
                gm.register_buffer(f"{prefix}_shift", shift.reshape(view).to(like))
                with gm.graph.inserting_after(node):
                    scale_node = gm.graph.get_attr(f"{prefix}_scale")
                with gm.graph.inserting_after(scale_node):
                    shift_node = gm.graph.get_attr(f"{prefix}_shift")
                with gm.graph.inserting_after(shift_node):
                    scaled = gm.graph.call_function(operator.mul, (node, scale_node))
                with gm.graph.inserting_after(scaled):
                    shifted = gm.graph.call_function(operator.add, (scaled, shift_node))
                node.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not scaled)
                gm.graph.lint()
        changed += 1
    gm.recompile()
    return changed


def _tensor(gm: nn.Module, qualified: str) -> torch.Tensor:
    owner_path, _, attr = qualified.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, attr)
