"""``fxmerge.merge``: the merge as a short pipeline of named stages over one state per model.

``merge`` validates its inputs (``fxmerge.inputs``), then runs, in order: trace, depth alignment
(when depths differ: the shallower graphs are extended), analysis (of the possibly extended
graphs), structure check (and the merged region of a partial merge), feature statistics, width
matching, rewrite, tails (partial zipping / concat heads), repair (``repair=``). Each stage is a small
function over ``ModelState`` objects; its seconds go to ``MergeResult.timings`` under the keys
"trace", "depth", "dependency", "structure", "features", "width", "rewrite" (rewrite and tails)
and "repair". A data-free merge (``calibration=None``) has no "features" stage.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from fxmerge.config import MergeConfig
from fxmerge.errors import ConfigError, IncompatibleModelsError, TraceError
from fxmerge.evaluation import EvaluationTable, evaluate_models
from fxmerge.inputs import check_runs_on, checked_example, checked_inputs
from fxmerge.passes.dependency import Analysis, analyze_graph, state_name_map
from fxmerge.passes.depth import align_depth, extend, inert_groups
from fxmerge.passes.features import GroupStatistics, feature_statistics, observed_groups
from fxmerge.passes.outputs import balanced_output_weights, output_layer_params, output_rms
from fxmerge.passes.repair import node_moments, repair_sites, repair_units, reset_batchnorm
from fxmerge.passes.rewrite import load_state_resizing, rewrite_shape_literals
from fxmerge.passes.tails import split_tails, unmerge_matrices
from fxmerge.passes.units import analysis_for_units, find_units
from fxmerge.passes.width import (
    WEIGHT_MATCHING_ROUNDS, GroupMatch, match_groups, merged_channel_vectors, merged_sizes, merged_state,
    regression_unmerges, unmerge_transforms,
)
from fxmerge.threads import intra_op_threads
from fxmerge.trace import capture_of, trace


@dataclass(frozen=True, repr=False)
class GroupReport:
    """One group of the merge: its name, the models' widths, the merged width, how it was matched.

    ``labels[k][i]``: the merged unit that unit i of model k went to (the argmax of row i of
    U_k, (n_k, width)); -1 for a unit that no merged unit reconstructs (a zero row of U_k). A
    fixed group keeps its order: ``labels[k] == (0, 1, ..., n - 1)`` (the models' values are
    averaged). A group of a composite (attention heads x head channels) labels its flattened
    units (head-major).
    """

    name: str
    sizes: tuple[int, ...]
    width: int
    fixed: bool
    similarity: float | None
    source: str
    labels: tuple[tuple[int, ...], ...] = ()

    def __repr__(self) -> str:
        how = "fixed" if self.fixed else self.source
        similarity = "" if self.similarity is None else f", similarity {self.similarity:.3f}"
        return f"GroupReport({self.name!r}: {self.sizes} -> {self.width}, {how}{similarity})"


def _labels(match: GroupMatch) -> tuple[tuple[int, ...], ...]:
    """Per model, the merged unit of each of its units (see ``GroupReport.labels``)."""
    if match.clusters is None:
        return tuple(tuple(range(size)) for size in match.sizes)
    return tuple(tuple(clusters.tolist()) for clusters in match.clusters)


@dataclass(frozen=True, repr=False)
class MergeResult:
    """What ``merge`` returns.

    ``module``: the merged ``torch.fx.GraphModule`` (eval mode). ``alignment``: one
    ``DepthAlignment`` per shallower model (CKA matrix, segments, objective value), or None when
    all depths are equal. ``groups``: one ``GroupReport`` per group (widths, similarity, cluster
    labels). ``timings``: seconds per pass. ``matches``: per group name, the merge/unmerge matrices.
    ``capture``: per model, how it became a graph ("fx" or "export", see ``fxmerge.trace``).
    ``threads``: torch's intra-op thread count the merge ran with (what ``threads="auto"`` chose):
    pass it as ``threads=`` to get the same weights bit for bit, since the models' own forward
    passes can round differently at another count (``fxmerge.threads``).
    """

    module: GraphModule
    groups: tuple[GroupReport, ...]
    timings: dict[str, float]
    config: MergeConfig
    alignment: Any = None
    matches: dict[str, GroupMatch] = field(default_factory=dict)
    capture: tuple[str, ...] = ()
    threads: int | None = None
    _rebuild: Callable[[tuple[float, ...]], GraphModule] | None = field(default=None, compare=False)

    def interpolate(self, weights: Sequence[float]) -> GraphModule:
        """The merged module with the same matches but the models weighted by ``weights`` (one
        per model, normalised to sum 1) instead of equally; then repaired as ``config.repair``
        says (REPAIR's targets are re-weighted too).

        ``interpolate((1 - t, t))`` for t in [0, 1] walks from model 0 to model 1 in model 0's
        channel order (and depth): with ``method="permute"`` and equal widths, t = 0 and t = 1
        compute models 0 and 1, and the loss along t is the loss barrier of the aligned pair
        (``fxmerge.metrics``). For ``method="average"`` it is plain weight interpolation.
        """
        if self._rebuild is None:
            raise ConfigError("this MergeResult was not made by fxmerge.merge in this process: it cannot be re-weighted")
        config = replace(self.config, model_weights=tuple(weights))  # validates and normalises
        count = len(self.groups[0].sizes) if self.groups else len(config.model_weights)
        if len(config.model_weights) != count:
            raise ConfigError(f"weights={tuple(weights)!r}: give one weight per model ({count})")
        fitted = self.config.model_weights or (1.0 / count,) * count
        if self.config.unmerge == "regression" and not np.allclose(config.model_weights, fitted, rtol=0, atol=1e-12):
            raise ConfigError(
                "this merge's unmerge='regression' matrices are fitted to its own model weights "
                f"({self.config.model_weights or 'equal'}): merge again with model_weights={tuple(weights)!r}, "
                "or merge with unmerge='copy' to re-weight without re-matching"
            )
        return self._rebuild(config.model_weights)

    def evaluate(self, data: Any, *, tasks: Any = None, models: Sequence[nn.Module] | None = None,
                 head: nn.Module | None = None) -> EvaluationTable:
        """The merged model and, when ``models`` are given (the source models), each of them on
        the same labelled ``data``: an ``fxmerge.evaluation.EvaluationTable`` with rows "merged",
        "model 0", "model 1", ... (joint and per-task accuracy when ``tasks`` — a mapping name ->
        class ids, or a list of class-id lists — are given; mean cross-entropy, or MSE for float
        labels). ``data``: (inputs, labels) batches or one (inputs, labels) pair of tensors
        (``fxmerge.evaluation.labelled_batches``); ``head`` is applied to every model's outputs.
        ``report["evaluation"] = table.to_dict()`` puts it into a report dict.
        """
        named = {"merged": self.module, **{f"model {k}": m for k, m in enumerate(models or ())}}
        return evaluate_models(named, data, tasks=tasks, head=head)

    def __repr__(self) -> str:
        free = [g for g in self.groups if not g.fixed]
        models = len(self.groups[0].sizes) if self.groups else 0
        widths = sorted(g.width for g in free)
        width_text = f"merged widths {widths[0]}..{widths[-1]} (total {sum(widths)})" if widths else "no merged widths"
        depth = "yes" if self.alignment else "no"
        return (
            f"MergeResult({models} models, method={self.config.method!r}, {len(self.groups)} groups "
            f"({len(free)} free, {len(self.groups) - len(free)} fixed), {width_text}, "
            f"depth aligned: {depth}, captured by {'/'.join(dict.fromkeys(self.capture)) or '?'}, "
            f"{sum(self.timings.values()):.2f} s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report: config, groups, timings, depth alignment (see ``fxmerge.io``)."""
        from fxmerge.io import result_to_dict

        return result_to_dict(self)

    def save(self, directory: Any) -> Any:
        """Save the merged module and this report to ``directory`` (no pickle; ``fxmerge.load``).

        Besides what ``fxmerge.load`` reads (graph.json, weights.safetensors, report.json,
        manifest.json), writes ``code.py`` — the GraphModule's generated code, for reading only
        (loading never executes it) — and, when matplotlib is installed, ``groups.png`` and one
        ``alignment_<k>.png`` CKA heatmap per depth-aligned model; the manifest lists and hashes
        every one of them (``fxmerge.io``).
        """
        import importlib.util
        import tempfile
        from pathlib import Path

        from fxmerge.io import save_module

        extra = {
            "code.py": (
                "# Generated by torch.fx for reading; fxmerge.load rebuilds the module from graph.json.\n"
                + self.module.code
            ).encode("utf-8"),
        }
        if importlib.util.find_spec("matplotlib") is not None:  # the figures are optional
            from fxmerge.plots import plot_alignment, plot_groups

            with tempfile.TemporaryDirectory() as scratch:  # drawn first: the manifest hashes them
                figures = [plot_groups(self, Path(scratch) / "groups.png")]
                for alignment in self.alignment or ():
                    figures.append(plot_alignment(alignment, Path(scratch) / f"alignment_{alignment.model}.png"))
                extra |= {path.name: path.read_bytes() for path in figures}
        return save_module(self.module, directory, report=self.to_dict(), extra=extra)


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


def resolve_stop(gm: GraphModule, config: MergeConfig, analysis: Analysis | None = None) -> str | None:
    """The spine node after which each model keeps its own tail, or None for a full merge."""
    units = find_units(gm, analysis)
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




# ------------------------------------------------------------------------------------ the stages


@dataclass(frozen=True)
class ModelState:
    """One model on its way through the merge.

    ``model``: the user's module (never modified). ``graph``: its traced GraphModule — after the
    depth stage, the extended graph of a shallower model. ``source``: the module whose
    ``state_dict`` holds the weights ``graph`` reads (``model``, or the extended graph).
    ``analysis`` and ``state`` (detached tensors of ``source``) are set by the analysis stage.
    """

    index: int
    name: str
    model: nn.Module
    graph: GraphModule
    source: nn.Module
    analysis: Analysis | None = None
    state: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Region:
    """What the structure stage decides: where the merge stops and which groups it covers.

    ``stop``: the spine node after which each model keeps its own tail (None: full merge).
    ``params``: canonical names of the parameters up to ``stop`` (None: all). ``groups``: names
    of the reference analysis's groups that touch those parameters, in analysis order.
    """

    stop: str | None
    params: set[str] | None
    groups: tuple[str, ...]


def trace_models(
    models: Sequence[nn.Module], names: Sequence[str], batches: list[torch.Tensor], config: MergeConfig
) -> tuple[ModelState, ...]:
    """Stage "trace": every model traced on calibration batch 0 (``fxmerge.trace``). When one
    cannot be, ``check_runs_on`` first tells whether the data is what fails."""
    states = []
    for k, (model, name) in enumerate(zip(models, names)):
        try:
            graph = trace(model, batches[0], config.leaf_modules, config.capture)
        except TraceError:
            check_runs_on(models, names, batches[0])
            raise
        states.append(ModelState(k, name, model, graph, model))
    return tuple(states)


def align_depths(
    states: tuple[ModelState, ...], batches: list[torch.Tensor], config: MergeConfig, process_group: Any,
    data_free: bool = False,
) -> tuple[tuple[ModelState, ...], tuple[Any, ...] | None]:
    """Stage "depth": extend every shallower graph to the deepest one's structure.

    ``data_free``: ``batches`` is only the example input; the units are compared by the
    similarity of their weights (``unit_weight_similarity``) instead of the CKA of their outputs.

    Returns the states (a shallower model's ``graph`` and ``source`` become its extended graph)
    and one ``DepthAlignment`` per shallower model, or None when all depths are equal.
    """
    # the units read channel dims from an analysis of each graph (warnings: the "dependency" stage)
    unit_analyses = [analysis_for_units(s.graph) for s in states]
    depths = [len(find_units(s.graph, a)) for s, a in zip(states, unit_analyses)]
    if len(set(depths)) == 1:
        return states, None
    deepest = depths.index(max(depths))
    deep = states[deepest]
    alignments = []
    out = list(states)
    for k, state in enumerate(states):
        if depths[k] == max(depths):
            continue
        try:
            aligned = align_depth(
                deep.graph, state.graph, batches, config.depth, k, quiet=config.quiet, process_group=process_group,
                analyses=(unit_analyses[deepest], unit_analyses[k]), similarity="weights" if data_free else "cka",
            )
        except IncompatibleModelsError as error:
            raise IncompatibleModelsError(
                f"cannot align the depth of {state.name}, {depths[k]} units ('B' below), to "
                f"{deep.name}, {max(depths)} units ('A'): {error}"
            ) from error
        extended = extend(state.graph, deep.graph, aligned, batches[0], analyses=(unit_analyses[deepest], unit_analyses[k]))
        out[k] = replace(state, graph=extended, source=extended)
        alignments.append(aligned)
    return tuple(out), tuple(alignments)


def analyse(states: tuple[ModelState, ...], config: MergeConfig) -> tuple[ModelState, ...]:
    """Stage "dependency": the channel groups of every (extended) graph, and its weights."""
    return tuple(
        replace(
            s,
            # the graph's own state: a module the traced graph never calls (googlenet's auxiliary
            # heads in eval mode) or a second path to a shared module is not part of it
            analysis=analyze_graph(s.graph, state_name_map(s.graph), config.strict),
            state={k: v.detach() for k, v in s.graph.state_dict().items()},
        )
        for s in states
    )


def check_structure(states: tuple[ModelState, ...], config: MergeConfig) -> Region:
    """Stage "structure": the graphs match node for node; the merged region (``stop_at``)."""
    check_same_structure([s.graph for s in states], [s.name for s in states])
    reference = states[0]
    stop = resolve_stop(reference.graph, config, reference.analysis)
    params = merged_region_params(reference.graph, reference.analysis, stop)
    groups = tuple(g.name for g in reference.analysis.groups if params is None or _touches(g, params))
    return Region(stop, params, groups)


def collect_statistics(
    states: tuple[ModelState, ...], region: Region, batches: list[torch.Tensor], config: MergeConfig,
    process_group: Any,
) -> dict[str, GroupStatistics]:
    """Stage "features": activation statistics of the region's free groups (none for "average")."""
    if config.method == "average":
        return {}
    observed = observed_groups([s.analysis for s in states], region.groups)
    return feature_statistics(
        [s.graph for s in states], observed, batches, num_batches=len(batches), quiet=config.quiet,
        process_group=process_group, max_memory=config.max_memory, taps=config.taps,
    )


def match_widths(
    states: tuple[ModelState, ...], region: Region, statistics: Mapping[str, GroupStatistics], config: MergeConfig,
    rounds: int = 1,
) -> dict[str, GroupMatch]:
    """Stage "width": per group of the region, the merge/unmerge matrices (M_k, U_k); ``rounds``
    of re-matching the groups matched on weights (``match_groups``)."""
    matches = match_groups(
        [s.analysis for s in states], [s.state for s in states], statistics, method=config.method,
        width=config.width, alpha=config.alpha, beta=config.beta, balance=config.balance,
        include=set(region.groups), inert=_inert_models(states) if config.inserted == "inert" else None,
        rounds=rounds,
    )
    if config.unmerge == "regression":
        matches = regression_unmerges(states[0].analysis, matches, statistics, config.model_weights)
    return matches


def _inert_models(states: tuple[ModelState, ...]) -> dict[str, frozenset[int]]:
    """Group name -> the models whose units in it are the hidden channels of an inserted
    zero-residual unit (``depth.inert_groups``)."""
    inert: dict[str, set[int]] = {}
    for s in states:
        for name in inert_groups(s.graph, s.analysis):
            inert.setdefault(name, set()).add(s.index)
    return {name: frozenset(models) for name, models in inert.items()}


def measure_outputs(states: tuple[ModelState, ...], batches: list[Any]) -> list[float]:
    """Stage "outputs" (``output_balance="norm"`` only): the rms norm of every model's outputs on
    the calibration data (``fxmerge.passes.outputs.output_rms``)."""
    return output_rms([s.graph for s in states], batches)


def rewrite(
    states: tuple[ModelState, ...], region: Region, matches: Mapping[str, GroupMatch], config: MergeConfig,
    output_norms: Sequence[float] | None = None,
) -> GraphModule:
    """Stage "rewrite": a copy of the reference graph with the merged weights and widths; the
    output layers weighted by ``output_norms`` when given (``balanced_output_weights``)."""
    reference = states[0]
    merged = copy.deepcopy(reference.graph)
    output_params = output_weights = None
    if output_norms is not None:
        output_params = {reference.analysis.aliases.get(k, k) for k in output_layer_params(reference.graph)}
        output_weights = balanced_output_weights(output_norms, config.model_weights)
    state = merged_state(
        [s.analysis for s in states], [s.state for s in states], matches, params=region.params, weights=config.model_weights,
        output_params=output_params, output_weights=output_weights,
    )
    load_state_resizing(merged, state)
    widths = merged_sizes(reference.analysis, matches)
    rewrite_shape_literals(
        merged, reference.analysis.shape_literals,
        {name: widths[i] for name, i in reference.analysis.space_ids.items()},
    )
    return merged


def attach_tails(
    merged: GraphModule, states: tuple[ModelState, ...], region: Region, matches: Mapping[str, GroupMatch],
    config: MergeConfig,
) -> GraphModule:
    """Stage "tails" (timed with "rewrite"): after ``region.stop``, one tail per model fed U_k f*;
    then the graph is linted and recompiled."""
    if region.stop is not None:
        reference = states[0].analysis
        first = next(iter(states[0].state.values()))
        maps = [
            unmerge_matrices(
                reference.node_layouts.get(region.stop, ()), unmerge_transforms(reference, matches, s.index),
                merged_sizes(reference, matches), first.dtype, first.device,
            )
            for s in states
        ]
        split_tails(merged, region.stop, [s.graph for s in states], maps, config.output)
    merged.graph.lint()
    merged.recompile()
    return merged


def repair_stage(
    merged: GraphModule, batches: list[Any], config: MergeConfig, process_group: Any,
    states: tuple[ModelState, ...] = (), region: Region | None = None, matches: Mapping[str, GroupMatch] | None = None,
) -> GraphModule:
    """Stage "repair" (``config.repair``), then eval mode: "bn" recomputes the BatchNorm running
    statistics on the calibration data; "none" keeps the merged ones (``merged_state``); "repair"
    does "bn", then rescales every merged unit to the interpolated statistics of the models'
    units (``repair_to_models``)."""
    if config.repair == "none":
        return merged.eval()
    reset_batchnorm(merged, batches, quiet=config.quiet, process_group=process_group, strict=config.strict)
    if config.repair == "repair":
        repair_to_models(merged, states, region, matches or {}, batches, config)
    return merged.eval()


def repair_to_models(
    merged: GraphModule, states: tuple[ModelState, ...], region: Region | None, matches: Mapping[str, GroupMatch],
    batches: list[Any], config: MergeConfig,
) -> int:
    """REPAIR (Jordan et al., 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation
    Repair"): the merged units' pre-activations (``repair_sites``: outputs of layers and norms) get,
    per channel, the mean and std over the calibration data that the ``model_weights``-weighted
    average of the models' corresponding units has (their statistics measured on the same data,
    averaged through the merge matrices like a bias). Sites that cannot be rescaled are named in
    a warning (strict: ``UnsupportedOpError``). Returns the number of sites rescaled."""
    import warnings

    from fxmerge.errors import UnsupportedOpError

    reference = states[0]
    sites, problems = repair_sites(merged, reference.analysis, until=region.stop if region else None)
    for problem in problems:
        message = f"repair='repair': {problem}: its units are not rescaled"
        if config.strict:
            raise UnsupportedOpError(message)
        warnings.warn(message, stacklevel=3)
    # every graph matches the reference node for node: a site is the node at the same position
    positions = {n.name: i for i, n in enumerate(reference.graph.graph.nodes)}
    sites = [site for site in sites if site.node in positions]  # a tail's nodes are no merged units
    per_model = []
    names_per_model = []
    for state in states:
        nodes = list(state.graph.graph.nodes)
        names = {site.node: nodes[positions[site.node]].name for site in sites}
        names_per_model.append(names)
        per_model.append(node_moments(state.graph, {names[s.node]: s.dim for s in sites}, batches, quiet=config.quiet))
    targets = {}
    analyses = [s.analysis for s in states]
    for site in sites:
        if not all(names[site.node] in moments for names, moments in zip(names_per_model, per_model)):
            continue
        layouts = [s.analysis.node_layouts[names[site.node]][site.dim] for s, names in zip(states, names_per_model)]
        means = [moments[names[site.node]][0] for names, moments in zip(names_per_model, per_model)]
        stds = [moments[names[site.node]][1] for names, moments in zip(names_per_model, per_model)]
        targets[site.node] = (
            merged_channel_vectors(analyses, means, layouts, matches, config.model_weights),
            merged_channel_vectors(analyses, stds, layouts, matches, config.model_weights),
        )
    return repair_units(merged, sites, targets, batches, quiet=config.quiet)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _stage_runner(timings: dict[str, float]) -> Callable[..., Any]:
    """``run(key, stage, *args)``: ``stage(*args)``, its seconds added to ``timings[key]``."""

    def run(key: str, stage: Callable[..., Any], *args: Any) -> Any:
        with _timed(timings, key):
            return stage(*args)

    return run


def _threaded(threads: int | str | None, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with torch's intra-op threads set from ``threads`` (then restored)."""
    with intra_op_threads(threads):
        return function(*args)


def merge(
    models: Sequence[nn.Module],
    calibration: Iterable[Any] | None,
    *,
    method: str = "zip",
    depth: str = "lma",
    inserted: str = "inert",
    taps: str = "consumers",
    unmerge: str = "copy",
    width: str | int | float | Mapping[str, int] = "max",
    alpha: float = 0.5,
    beta: float = 1.0,
    balance: float = 0.5,
    output: str = "shared",
    output_balance: str = "none",
    stop_at: int | str | None = None,
    calibration_batches: int = 32,
    strict: bool = False,
    quiet: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    capture: str = "auto",
    model_weights: Sequence[float] | None = None,
    process_group: Any = None,
    max_memory: int | str | None = None,
    threads: int | str | None = "auto",
    repair: str = "bn",
    example_input: Any = None,
) -> MergeResult:
    """Merge two or more trained models into one ``torch.fx.GraphModule``, without training.

    Deterministic: the same models, data and options give bit-identical weights (nothing in a
    merge is random, so there is no seed).

    Args:
        models: K >= 2 modules of one family (any widths); they are not modified.
        calibration: iterable of input batches — tensors, dicts of keyword tensors (HF
            ``input_ids``/``attention_mask``/..., a ``BatchEncoding``; a ``"labels"`` key is
            dropped), or (input, label) tuples whose input is a tensor, tuple or dict; integer
            tensors are token ids. The first ``calibration_batches`` are used for feature
            statistics and BatchNorm reset; every batch has the inputs and per-sample shapes of
            batch 0. None: a data-free merge (lower quality than a merge on data): units are
            matched on the similarity of their weights (Git Re-Basin's weight matching, iterated
            over the groups until the matches stop changing, at most ``WEIGHT_MATCHING_ROUNDS``
            rounds), depths aligned on a weight-space similarity of the units, and BatchNorm
            statistics kept as merged (``repair="none"``); ``example_input`` is then required.
        method: "average" (plain weight averaging), "permute" (Hungarian alignment to one
            model, then average), "zip" (ZipIt! greedy zipping, within and across models) or
            "mudsc" (zip on balance * weight similarity + (1 - balance) * activation similarity).
        depth: "lma" | "sma": depth-alignment objective when depths differ.
        inserted: how the hidden channels of the zero-residual units inserted into a shallower
            model are merged: "inert" (they never reach that model's output, so the groups are
            matched over the other models and take their weights) or "matched" (matched and
            averaged with the deeper model's real units like any others, as in Xu et al.).
        taps: where a group's channels are observed: "consumers" (up to 4 of the places layers
            read them — a residual stream is read by every block — correlations averaged) or
            "last" (the last of them only, as ZipIt!).
        unmerge: what the layers that read a merged group see of each model's units. "copy"
            (ZipIt!'s unmerge U_k: each unit reads the merged unit it went to). "regression": U_k
            is the least-squares reconstruction of model k's units from all the merged units, on
            the group's calibration statistics, shrunk toward "copy"
            (``fxmerge.passes.width.regression_unmerge``); the merged units themselves (M_k) are
            the same. Groups observed on their own only (not attention heads, not groups matched
            on weights alone). On the x4 digits ResNets it lifts zip's per-task average
            by 3.6 points, to the ensemble's (``benchmarks/results/depth.md``). Needs calibration data and a
            method that observes features (not "average"); ``interpolate`` cannot re-weight it
            (U is fitted to the merge's ``model_weights``: merge again with the weights).
        width: merged width per group: "max", "min", an int, a float multiple of the largest
            width, or a dict from group name to int.
        alpha, beta: zip budgets (decay of a merged feature's score; within-model merge budget).
        balance: MuDSC's weight-vs-activation factor.
        output: "shared" (outputs averaged: one label space) or "concat" (per-model heads,
            logits concatenated).
        output_balance: "none" (default): the layers that compute the output are averaged as
            every other layer. "norm": model k's output layers weighted by 1 / rms_k, the root
            mean squared norm of its outputs per sample on the calibration data (times
            ``model_weights``, normalised; ``fxmerge.passes.outputs``), so that a model with
            larger outputs does not dominate a shared output: a deeper digits ResNet's embeddings
            have 2-3x a shallower one's norm, and balancing them raises the depth-heterogeneous
            merges of ``benchmarks/results/depth.md``. Costs one forward pass of each model over
            the calibration data; a model merged with its twin is unchanged (equal norms).
        stop_at: partial zipping: merge up to this unit index or node name.
        calibration_batches: how many batches of ``calibration`` are drawn.
        strict: raise on ops the analysis does not understand instead of keeping them fixed.
        quiet: no progress bars.
        leaf_modules: extra module classes or qualified module names kept as leaves in tracing.
        capture: "auto" (torch.fx, else torch.export), "fx" or "export" (``fxmerge.trace``);
            ``result.capture`` says which each model got. An exported merge is the exported
            program's GraphModule: it takes the models' args/kwargs and returns their output
            structure (an HF ``ModelOutput``).
        model_weights: one weight per model (normalised to sum 1) for a weighted instead of a plain
            average of the matched weights; ``result.interpolate`` re-weights without re-matching.
        process_group: None (one process), or a ``torch.distributed`` ProcessGroup (e.g.
            ``torch.distributed.group.WORLD``, gloo for CPU models): every process of the group
            calls ``merge`` with the same models and options and ITS OWN shard of the calibration
            data (at least one batch per process; ``calibration_batches`` limits each shard).
            The sufficient statistics of the unit CKA, the feature statistics and the BatchNorm
            reset are summed over the processes, so every process returns the same merged model:
            the single-process merge on all shards' batches, up to float64 rounding.
        max_memory: None, or a budget for the feature statistics: bytes, or a string such as
            "4GB" (powers of 1000) or "512MiB" (powers of 1024). When the float64 covariances of
            all observed groups do not fit, the groups are observed over several passes over the
            calibration data, each within the budget, with the same merged model as one pass, bit
            for bit. The budget counts the covariances, the update buffers and the groups'
            correlations kept for matching (on a GPU the finished ones go to host memory); not the
            models, the taps' features of one batch or the later stages. A budget too small for
            one group's covariance raises ``ConfigError`` with the size it needs.
        threads: torch's intra-op CPU threads while merging (every stage, and
            ``result.interpolate``): an int >= 1; "auto" (default): torch's setting, lowered to the
            CPUs this process may use minus the other load (``os.sched_getaffinity`` and the
            1-minute ``os.getloadavg``, at least 1; ``fxmerge.threads.auto_threads``) — OpenMP
            threads competing with other work for the cores slow a merge down
            (``benchmarks/results/threads.md``); None: torch's setting as it is.
            The caller's ``torch.get_num_threads()`` is restored afterwards, also when the merge
            raises. The inter-op threads cannot be changed once torch has started: they are left
            alone. Several merging processes on one machine: give each ``cores // processes``.
        repair: what follows the rewrite. "bn" (the default): every BatchNorm's running
            statistics recomputed on the calibration data; without calibration data it means
            "none" (``result.config.repair`` says "none"). "none": the merged statistics kept — running means
            averaged through the merge matrices like any bias, running variances as the square
            of the averaged stds (the variance of an average of perfectly correlated units; see
            ``fxmerge.passes.width.merged_state``): a model merged with its permuted twin is then
            the model itself, whatever data its statistics came from. "repair" (REPAIR, Jordan et
            al. 2022): "bn", then the output of every merged layer or norm (its pre-activation)
            rescaled per channel, in topological order, so that its mean and std on the
            calibration data are the ``model_weights``-weighted average of those of the models'
            units merged into it; folded into the layer's weight and bias, or an inserted affine
            node where it has none: for LayerNorm and norm-free nets too. A layer whose output
            cannot be rescaled is left as it is, with a warning naming it (strict: an error).
            Costs one pass over the calibration data per model, then one per rescaled layer (up
            to that layer); one process only (``process_group`` raises ``ConfigError``).
        example_input: for ``calibration=None`` only: one model input (a tensor such as
            ``torch.zeros(1, 3, 32, 32)``, a tuple of positional tensors or a dict of keyword
            tensors) whose shapes tracing records; its values are not used to match.

    The options are those of ``fxmerge.MergeConfig`` (``result.config``).
    """
    data_free = calibration is None
    if data_free and repair == "bn":
        repair = "none"  # nothing to recompute the statistics on: they are kept (result.config says so)
    config = MergeConfig(
        method=method, depth=depth, inserted=inserted, taps=taps, unmerge=unmerge, width=width, alpha=alpha, beta=beta, balance=balance, output=output, output_balance=output_balance,
        stop_at=stop_at, calibration_batches=calibration_batches, strict=strict, quiet=quiet,
        leaf_modules=leaf_modules, capture=capture, model_weights=None if model_weights is None else tuple(model_weights),
        max_memory=max_memory, threads=threads, repair=repair,
    )
    if data_free and config.repair != "none":
        raise ConfigError(
            f"repair={config.repair!r} measures statistics on calibration data, and calibration=None: a data-free "
            "merge keeps the merged statistics (repair='none'; the default 'bn' means 'none' without data)"
        )
    if config.unmerge == "regression" and (data_free or config.method == "average"):
        raise ConfigError(
            f"unmerge='regression' fits the unmerge to feature statistics, which "
            f"{'a data-free merge (calibration=None)' if data_free else 'method=' + repr(config.method)} does not "
            "measure: give calibration data and a method that matches on features (permute, zip, mudsc), or "
            "unmerge='copy'"
        )
    if config.output_balance == "norm" and data_free:
        raise ConfigError(
            "output_balance='norm' weights the models' output layers by the norms of their outputs on calibration "
            "data, and calibration=None: give calibration data, or output_balance='none'"
        )
    if config.repair == "repair" and process_group is not None:
        raise ConfigError("repair='repair' runs in one process: pass process_group=None, or use repair='bn'")
    if not data_free and example_input is not None:
        raise ConfigError(
            "example_input= is for data-free merges (calibration=None); with calibration data, tracing uses its "
            "first batch: drop example_input"
        )
    return _threaded(config.threads, _merged, models, calibration, example_input, config, process_group)


def _merged(
    models: Sequence[nn.Module], calibration: Iterable[Any] | None, example_input: Any, config: MergeConfig,
    process_group: Any,
) -> MergeResult:
    """``merge`` once its options are checked (under their thread count); ``calibration`` None:
    a data-free merge traced on ``example_input``."""
    data_free = calibration is None
    if data_free:
        models, names, batches = checked_example(models, example_input)
    else:
        models, names, batches = checked_inputs(models, calibration, config.calibration_batches)
    if config.model_weights is not None and len(config.model_weights) != len(models):
        raise ConfigError(f"model_weights={config.model_weights!r}: give one weight per model ({len(models)})")
    timings: dict[str, float] = {}
    run = _stage_runner(timings)
    states = run("trace", trace_models, models, names, batches, config)
    states, alignment = run("depth", align_depths, states, batches, config, process_group, data_free)
    states = run("dependency", analyse, states, config)
    region = run("structure", check_structure, states, config)
    statistics = {} if data_free else run("features", collect_statistics, states, region, batches, config, process_group)
    matches = run("width", match_widths, states, region, statistics, config, WEIGHT_MATCHING_ROUNDS if data_free else 1)
    del statistics  # one (N, N) correlation per group: not read past matching

    output_norms = run("outputs", measure_outputs, states, batches) if config.output_balance == "norm" else None

    def build(config: MergeConfig, run: Callable[..., Any] = run) -> GraphModule:
        merged = run("rewrite", rewrite, states, region, matches, config, output_norms)
        merged = run("rewrite", attach_tails, merged, states, region, matches, config)
        return run("repair", repair_stage, merged, batches, config, process_group, states, region, matches)

    merged = build(config)
    threads = torch.get_num_threads()  # the count in effect (``_threaded``): "auto" resolved once
    reports = tuple(
        GroupReport(m.name, m.sizes, m.width, m.fixed, m.similarity, m.source, _labels(m)) for m in matches.values()
    )
    return MergeResult(
        module=merged, groups=reports, timings=timings, config=config, alignment=alignment, matches=matches,
        capture=tuple(capture_of(s.graph) for s in states), threads=threads,
        # re-weighting repeats the last stages (their seconds are not this merge's) at the merge's
        # thread count: "auto" could pick another one now, and the repair pass's bits with it
        _rebuild=lambda weights: _threaded(threads, build, replace(config, model_weights=weights), _stage_runner({})),
    )
