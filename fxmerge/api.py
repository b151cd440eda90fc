"""``fxmerge.merge``: orchestrates the passes into one merged GraphModule."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.fx import GraphModule

from fxmerge.config import MergeConfig
from fxmerge.errors import CalibrationError, ConfigError, IncompatibleModelsError
from fxmerge.passes.dependency import Analysis, analyze_graph, state_name_map
from fxmerge.passes.depth import align_depth, extend
from fxmerge.passes.features import feature_statistics
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.passes.rewrite import load_state_resizing, rewrite_shape_literals
from fxmerge.passes.tails import split_tails, unmerge_matrices
from fxmerge.passes.units import find_units
from fxmerge.passes.width import GroupMatch, match_groups, merged_sizes, merged_state, unmerge_transforms
from fxmerge.trace import trace


@dataclass(frozen=True)
class GroupReport:
    """One group of the merge: its name, the models' widths, the merged width, how it was matched."""

    name: str
    sizes: tuple[int, ...]
    width: int
    fixed: bool
    similarity: float | None
    source: str


@dataclass(frozen=True)
class MergeResult:
    """What ``merge`` returns.

    ``module``: the merged ``torch.fx.GraphModule`` (eval mode). ``alignment``: one
    ``DepthAlignment`` per shallower model (CKA matrix, segments, objective value), or None when
    all depths are equal. ``groups``: one ``GroupReport`` per group.
    ``timings``: seconds per pass.
    """

    module: GraphModule
    groups: tuple[GroupReport, ...]
    timings: dict[str, float]
    config: MergeConfig
    alignment: Any = None
    matches: dict[str, GroupMatch] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report: config, groups, timings, depth alignment (see ``fxmerge.io``)."""
        from fxmerge.io import result_to_dict

        return result_to_dict(self)

    def save(self, directory: Any) -> Any:
        """Save the merged module and this report to ``directory`` (no pickle; ``fxmerge.load``)."""
        from fxmerge.io import save_module

        return save_module(self.module, directory, report=self.to_dict())


def _input_of(item: Any, index: int) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise CalibrationError(
        f"calibration batch {index} is of type {type(item).__name__}: calibration items must be tensors or "
        "(tensor, label) tuples"
    )


def calibration_inputs(calibration: Iterable[Any], limit: int) -> list[torch.Tensor]:
    """The first ``limit`` input batches of ``calibration``, checked to be finite and consistent.

    Raises ``CalibrationError`` naming the batch index for: a single tensor or a non-iterable
    instead of an iterable of batches, an item that is not a tensor / (tensor, label) tuple, a
    0-d or empty batch, a batch whose per-sample shape or dtype differs from batch 0's, NaN/Inf.
    No more than ``limit`` items are drawn from ``calibration``.
    """
    if isinstance(calibration, torch.Tensor):
        raise CalibrationError(
            "calibration must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            "not a single tensor: wrap it as [tensor]"
        )
    try:
        items = iter(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            f"got an object of type {type(calibration).__name__}"
        ) from None
    batches: list[torch.Tensor] = []
    for index, item in enumerate(items):
        batch = _input_of(item, index)
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise CalibrationError(
                f"calibration batch {index} has shape {tuple(batch.shape)}: a batch needs a leading "
                "batch dimension with at least one sample"
            )
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf")
        if batches and batch.shape[1:] != batches[0].shape[1:]:
            raise CalibrationError(
                f"calibration batch {index} has shape {tuple(batch.shape)}, batch 0 has {tuple(batches[0].shape)}"
            )
        if batches and (batch.dtype != batches[0].dtype or batch.device != batches[0].device):
            raise CalibrationError(
                f"calibration batch {index} is {batch.dtype} on {batch.device}, batch 0 is "
                f"{batches[0].dtype} on {batches[0].device}"
            )
        batches.append(batch)
        if len(batches) >= limit:
            break
    if not batches:
        raise CalibrationError("the calibration data is empty")
    return batches


def _model_list(models: Any) -> list[nn.Module]:
    """``models`` as a list of at least two nn.Modules, or ConfigError naming the offender."""
    if isinstance(models, nn.ModuleList):
        models = list(models)
    if isinstance(models, nn.Module):
        raise ConfigError(
            f"merge needs a list of at least 2 models, got a single {type(models).__name__}: pass [model_a, model_b]"
        )
    if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, Iterable):
        raise ConfigError(f"merge needs a list of at least 2 models, got an object of type {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"merge needs a list of at least 2 models, got {len(models)}")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"models[{index}] is a {type(model).__name__}, not an nn.Module")
    return models


def _tensor_kinds(model: nn.Module) -> tuple[tuple[torch.dtype, ...], tuple[torch.device, ...]]:
    """(floating dtypes of the parameters — of the buffers if it has none —, devices of both)."""
    params = [t for t in model.parameters() if t.is_floating_point()]
    buffers = [t for t in model.buffers() if t.is_floating_point()]
    dtypes = sorted({t.dtype for t in (params or buffers)}, key=str)
    devices = sorted({t.device for t in [*model.parameters(), *model.buffers()]}, key=str)
    return tuple(dtypes), tuple(devices)


def _describe(values: Sequence[Any]) -> str:
    return "/".join(str(v).replace("torch.", "") for v in values) if values else "no floating tensors"


def _check_dtypes_and_devices(
    models: Sequence[nn.Module], names: Sequence[str], batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The models must share one floating dtype and one device; returns the batches in that dtype.

    Models of different dtypes or devices: IncompatibleModelsError naming each model's dtype /
    device. Batches on another device than the models: CalibrationError. Floating batches of
    another dtype than the models (float64 data, float32 models) are cast to the models' dtype
    with a warning; integer batches (token ids) are passed as they are.
    """
    kinds = [_tensor_kinds(model) for model in models]
    for name, (_, devices) in zip(names, kinds):
        if len(devices) > 1:
            raise IncompatibleModelsError(
                f"{name} has tensors on several devices ({_describe(devices)}): move it to one device"
            )
    for label, index in (("dtype", 0), ("device", 1)):
        seen = [kind[index] for kind in kinds if kind[index]]
        if len(set(seen)) > 1:
            listing = ", ".join(f"{name} is {_describe(kind[index])}" for name, kind in zip(names, kinds))
            fix = "model.float() / .double()" if label == "dtype" else "model.to(device)"
            raise IncompatibleModelsError(
                f"the models must have one {label}: {listing}; convert them first (e.g. {fix})"
            )
    dtypes = next((kind[0] for kind in kinds if kind[0]), ())
    devices = next((kind[1] for kind in kinds if kind[1]), ())
    if devices and batches[0].device != devices[0]:
        raise CalibrationError(
            f"calibration batch 0 is on {batches[0].device}, the models are on {devices[0]}: "
            "move the batches to the models' device"
        )
    if len(dtypes) == 1 and batches[0].is_floating_point() and batches[0].dtype != dtypes[0]:
        warnings.warn(
            f"fxmerge.merge: calibration batches are {_describe([batches[0].dtype])}, the models "
            f"{_describe(dtypes)}: casting the batches to {_describe(dtypes)}",
            stacklevel=3,
        )
        batches = [batch.to(dtypes[0]) for batch in batches]
    return batches


def _check_runs_on(models: Sequence[nn.Module], names: Sequence[str], batch: torch.Tensor) -> None:
    """Run every model (in eval mode, no gradients) on calibration batch 0, before tracing.

    Some models fail, others not (e.g. a first conv that expects 3 channels, data with 1):
    IncompatibleModelsError naming the failing models. Every model fails: CalibrationError (the
    data does not fit). Training flags are restored; nothing else is touched.
    """
    failures: list[tuple[str, Exception]] = []
    for name, model in zip(names, models):
        flags = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                model(batch)
        except Exception as error:  # whatever torch raises (RuntimeError, ValueError, IndexError…)
            failures.append((name, error))
        finally:
            for module, training in flags:
                module.training = training
    if not failures:
        return
    name, error = failures[0]
    lines = str(error).strip().splitlines()
    why = f"{type(error).__name__}: {lines[0] if lines else ''}"
    data = f"calibration batch 0 (shape {tuple(batch.shape)}, {_describe([batch.dtype])})"
    if len(failures) == len(models):
        raise CalibrationError(f"no model accepts {data}; {name} fails with {why}") from error
    failing = ", ".join(n for n, _ in failures)
    accepting = ", ".join(n for n in names if n not in {f for f, _ in failures})
    raise IncompatibleModelsError(
        f"{failing} fail{'s' if len(failures) == 1 else ''} on {data}, which {accepting} "
        f"accept{'s' if len(names) - len(failures) == 1 else ''}: the models must take the same input "
        f"({name}: {why})"
    ) from error


def _structure(gm: GraphModule) -> list[tuple[str, str]]:
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            kind = type(modules[str(node.target)]).__name__
        elif node.op == "get_attr":
            kind = "get_attr"
        else:
            kind = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        out.append((node.op, kind))
    return out


def check_same_structure(graphs: Sequence[GraphModule], names: Sequence[str]) -> None:
    """The graphs must match node for node (op kinds); widths may differ."""
    reference = _structure(graphs[0])
    ref_nodes = list(graphs[0].graph.nodes)
    for k, gm in enumerate(graphs[1:], start=1):
        other = _structure(gm)
        other_nodes = list(gm.graph.nodes)
        for i, (a, b) in enumerate(zip(reference, other)):
            if a != b:
                raise IncompatibleModelsError(
                    f"{names[k]} differs from {names[0]} at graph node {i}: "
                    f"'{other_nodes[i].name}' is {b[0]} {b[1]}, expected {a[0]} {a[1]} "
                    f"('{ref_nodes[i].name}')"
                )
        if len(reference) != len(other):
            raise IncompatibleModelsError(
                f"{names[k]} has {len(other)} graph nodes, {names[0]} has {len(reference)}: "
                "the models are not of one architecture"
            )


def resolve_stop(gm: GraphModule, config: MergeConfig) -> str | None:
    """The spine node after which each model keeps its own tail, or None for a full merge."""
    units = find_units(gm)
    ends = [u.end for u in units]
    if config.stop_at is None:
        if config.output != "concat":
            return None
        if len(units) < 2:
            raise ConfigError("output='concat' needs a model with at least two units (a trunk and a head)")
        return units[-2].end
    if isinstance(config.stop_at, int):
        if not 0 <= config.stop_at < len(units):
            raise ConfigError(f"stop_at={config.stop_at}: the model has units 0..{len(units) - 1}")
        stop = ends[config.stop_at]
    else:
        if config.stop_at not in ends:
            raise ConfigError(f"stop_at={config.stop_at!r} is not a unit boundary; choose one of {ends}")
        stop = config.stop_at
    if stop == ends[-1]:
        if config.output == "concat":
            raise ConfigError("output='concat' needs stop_at before the last unit (the heads)")
        return None
    return stop


def merged_region_params(gm: GraphModule, analysis: Analysis, stop: str | None) -> set[str] | None:
    """Canonical names of the parameters used up to node ``stop`` (None: all are merged)."""
    if stop is None:
        return None
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            prefix = f"{node.target}."
            used.update(analysis.aliases.get(k, k) for k in analysis.aliases if k.startswith(prefix))
        elif node.op == "get_attr":
            used.add(analysis.aliases.get(str(node.target), str(node.target)))
        if node.name == stop:
            break
    return used


def _touches(group: Any, params: set[str]) -> bool:
    return any(ref.param in params for ref in group.producers + group.consumers)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def merge(
    models: Sequence[nn.Module],
    calibration: Iterable[Any],
    *,
    method: str = "zip",
    depth: str = "lma",
    width: str | int | float | Mapping[str, int] = "max",
    alpha: float = 0.5,
    beta: float = 1.0,
    balance: float = 0.5,
    output: str = "shared",
    stop_at: int | str | None = None,
    calibration_batches: int = 32,
    seed: int = 0,
    strict: bool = False,
    quiet: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    process_group: Any = None,
) -> MergeResult:
    """Merge two or more trained models into one ``torch.fx.GraphModule``, without training.

    Args:
        models: K >= 2 modules of one family (any widths); they are not modified.
        calibration: iterable of input batches — tensors or (tensor, label) tuples; the first
            ``calibration_batches`` are used for feature statistics and BatchNorm reset.
        method: "average" (plain weight averaging), "permute" (Hungarian alignment to one
            model, then average), "zip" (ZipIt! greedy zipping, within and across models) or
            "mudsc" (zip on balance * weight similarity + (1 - balance) * activation similarity).
        depth: "lma" | "sma": depth-alignment objective when depths differ.
        width: merged width per group: "max", "min", an int, a float multiple of the largest
            width, or a dict from group name to int.
        alpha, beta: zip budgets (decay of a merged feature's score; within-model merge budget).
        balance: MuDSC's weight-vs-activation factor.
        output: "shared" (outputs averaged: one label space) or "concat" (per-model heads,
            logits concatenated).
        stop_at: partial zipping: merge up to this unit index or node name.
        seed: reserved for randomised steps; the merge is deterministic for a given seed.
        strict: raise on ops the analysis does not understand instead of keeping them fixed.
        quiet: no progress bars.
        process_group: None (one process), or a ``torch.distributed`` ProcessGroup (e.g.
            ``torch.distributed.group.WORLD``, gloo for CPU models): every process of the group
            calls ``merge`` with the same models and options and ITS OWN shard of the calibration
            data (at least one batch per process; ``calibration_batches`` limits each shard).
            The sufficient statistics of the unit CKA, the feature statistics and the BatchNorm
            reset are summed over the processes, so every process returns the same merged model:
            the single-process merge on all shards' batches, up to float64 rounding.
    """
    config = MergeConfig(
        method=method, depth=depth, width=width, alpha=alpha, beta=beta, balance=balance, output=output,
        stop_at=stop_at, calibration_batches=calibration_batches, seed=seed, strict=strict, quiet=quiet,
        leaf_modules=tuple(leaf_modules),
    )
    models = _model_list(models)
    names = [f"models[{k}] ({type(m).__name__})" for k, m in enumerate(models)]
    timings: dict[str, float] = {}
    batches = calibration_inputs(calibration, config.calibration_batches)
    batches = _check_dtypes_and_devices(models, names, batches)
    _check_runs_on(models, names, batches[0])

    with _timed(timings, "trace"):
        graphs: list[GraphModule] = [trace(model, batches[0], config.leaf_modules) for model in models]
    sources: list[nn.Module] = list(models)
    alignment = None
    with _timed(timings, "depth"):
        depths = [len(find_units(gm)) for gm in graphs]
        if len(set(depths)) > 1:
            deepest = depths.index(max(depths))
            alignments = []
            for k, gm in enumerate(graphs):
                if depths[k] == depths[deepest]:
                    continue
                try:
                    aligned = align_depth(
                        graphs[deepest], gm, batches, config.depth, k, quiet=config.quiet, process_group=process_group
                    )
                except IncompatibleModelsError as error:
                    raise IncompatibleModelsError(
                        f"cannot align the depth of {names[k]}, {depths[k]} units ('B' below), to "
                        f"{names[deepest]}, {depths[deepest]} units ('A'): {error}"
                    ) from error
                graphs[k] = extend(gm, graphs[deepest], aligned, batches[0])
                sources[k] = graphs[k]
                alignments.append(aligned)
            alignment = tuple(alignments)
    with _timed(timings, "dependency"):
        analyses: list[Analysis] = [
            analyze_graph(gm, state_name_map(source), config.strict) for gm, source in zip(graphs, sources)
        ]
    with _timed(timings, "structure"):
        check_same_structure(graphs, names)
        stop = resolve_stop(graphs[0], config)
        region = merged_region_params(graphs[0], analyses[0], stop)
        included = [g.name for g in analyses[0].groups if region is None or _touches(g, region)]
    states = [{k: v.detach() for k, v in source.state_dict().items()} for source in sources]
    with _timed(timings, "features"):
        free = [[a.group(name) for name in included if not analyses[0].group(name).fixed] for a in analyses]
        statistics = {}
        if config.method != "average":
            statistics = feature_statistics(
                graphs, free, batches, num_batches=len(batches), quiet=config.quiet, process_group=process_group
            )
    with _timed(timings, "width"):
        matches = match_groups(
            analyses, states, statistics, method=config.method, width=config.width,
            alpha=config.alpha, beta=config.beta, balance=config.balance, include=set(included),
        )
    with _timed(timings, "rewrite"):
        merged = copy.deepcopy(graphs[0])
        load_state_resizing(merged, merged_state(analyses, states, matches, params=region))
        widths = merged_sizes(analyses[0], matches)
        rewrite_shape_literals(
            merged, analyses[0].shape_literals, {name: widths[i] for name, i in analyses[0].space_ids.items()}
        )
        if stop is not None:
            maps = [
                unmerge_matrices(
                    analyses[0].node_layouts.get(stop, ()), unmerge_transforms(analyses[0], matches, k),
                    merged_sizes(analyses[0], matches), next(iter(states[0].values())).dtype,
                )
                for k in range(len(models))
            ]
            split_tails(merged, stop, graphs, maps, config.output)
        merged.graph.lint()
        merged.recompile()
    with _timed(timings, "repair"):
        reset_batchnorm(merged, batches, quiet=config.quiet, process_group=process_group)
    merged.eval()
    reports = tuple(
        GroupReport(m.name, m.sizes, m.width, m.fixed, m.similarity, m.source) for m in matches.values()
    )
    return MergeResult(
        module=merged, groups=reports, timings=timings, config=config, alignment=alignment, matches=matches
    )
