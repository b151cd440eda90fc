"""Depth alignment: extend a shallower model so it is structurally the deeper model.

1. Both models are cut into units along their spines (``units.py``).
2. A CKA matrix between every deep unit output and every shallow unit output is measured on
   calibration data (linear CKA, unbiased minibatch HSIC).
3. The dynamic program (``segmentation.py``) assigns each shallow unit a segment of deep units;
   the first unit of a segment must have the same structure and shape change, the others must
   be shape-preserving.
4. The *extension* is the deep graph carrying the shallow weights: the first unit of segment i
   gets shallow unit i's weights; every other deep unit becomes an identity — plain units get
   identity kernels and identity norms, residual units a zeroed residual branch (their last
   parametric layer before the residual add is set to zero, so ``x + 0`` passes through). The
   extension is checked to compute exactly what the shallow model computes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from fxmerge import ops
from fxmerge.distributed import check_group, collect_errors, raise_together, sum_
from fxmerge.errors import CalibrationError, IncompatibleModelsError, InvarianceError
from fxmerge.inputs import as_batch, tensor_leaves
from fxmerge.metrics import MIN_CKA_BATCH, CKAAccumulator
from fxmerge.passes.dependency import Analysis
from fxmerge.passes.features import tap_extractor
from fxmerge.passes.rewrite import load_state_resizing
from fxmerge.passes.segmentation import Segmentation, segment
from fxmerge.passes.units import Unit, analysis_for_units, find_units
from fxmerge.progress import progress


# GraphModule.meta key of an extension: the parameter and buffer names of its inserted
# zero-residual units (``inert_groups``).
INERT_PARAMS = "fxmerge_inert_params"


@dataclass(frozen=True)
class DepthAlignment:
    """How one shallower model was aligned to the deepest (reference) model.

    ``cka``: (m, n) CKA between deep unit outputs (rows) and shallow unit outputs (columns).
    ``segmentation``: the optimal segments (deep unit indices per shallow unit).
    ``deep_modules``: per deep unit, the modules and get_attr tensors it uses (the paths that
    become identities when it is inserted; for reports).
    """

    model: int
    deep_units: tuple[str, ...]
    shallow_units: tuple[str, ...]
    cka: np.ndarray
    segmentation: Segmentation
    deep_modules: tuple[tuple[str, ...], ...] = ()

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        return self.segmentation.segments

    @property
    def objective_value(self) -> float:
        return self.segmentation.value


def _signature(gm: GraphModule, unit: Unit) -> tuple:
    """The op kinds of a unit's nodes, in order: two units with one signature are isomorphic."""
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    kinds = []
    for name in unit.nodes:
        node = nodes[name]
        if node.op == "call_module":
            kinds.append(("module", type(modules[str(node.target)]).__name__))
        elif node.op == "call_method":
            kinds.append(("method", str(node.target)))
        else:
            kinds.append((node.op, getattr(node.target, "__name__", str(node.target))))
    return tuple(kinds)


def compatibility(
    deep: GraphModule, deep_units: Sequence[Unit], shallow: GraphModule, shallow_units: Sequence[Unit]
) -> tuple[np.ndarray, np.ndarray]:
    """(first_ok (m, n), extra_ok (m,)) constraints of the depth DP.

    Units are compared by op kinds, kind and ``Unit.layout_change`` (shapes with the channel dims,
    read from the analysis, masked): whether the channel count changes is not compared, since with
    models of different widths it is a coincidence (a head mapping 4 -> 4 channels in one model,
    5 -> 4 in the other). A deep unit that changes its channels can never be an inserted identity
    (``extra_ok``), which is what keeps stages aligned.
    """
    deep_sigs = [(_signature(deep, u), u.kind, u.layout_change) for u in deep_units]
    shallow_sigs = [(_signature(shallow, u), u.kind, u.layout_change) for u in shallow_units]
    first_ok = np.array([[d == s for s in shallow_sigs] for d in deep_sigs], dtype=bool)
    extra_ok = np.array([u.preserves_shape and u.kind in ("residual", "plain") for u in deep_units], dtype=bool)
    return first_ok, extra_ok


def unit_cka(
    deep: GraphModule,
    deep_units: Sequence[Unit],
    shallow: GraphModule,
    shallow_units: Sequence[Unit],
    batches: Sequence[torch.Tensor],
    *,
    quiet: bool = False,
    process_group: Any = None,
) -> np.ndarray:
    """(m, n) linear CKA between unit outputs, averaged over calibration batches (unbiased HSIC).

    Batches of fewer than ``MIN_CKA_BATCH`` (4) samples are skipped: the unbiased estimator is
    undefined on them (a data set's last, partial batch); CalibrationError if no batch is left.

    ``process_group``: None, or a ``torch.distributed`` ProcessGroup whose processes each pass
    their own shard of the batches: the accumulators' sums (``CKAAccumulator.state()``) are
    summed over the processes, so every process returns the same matrix — the CKA over all
    shards' batches (a process may have no usable batch as long as some process has one).
    """
    group = check_group(process_group)
    batches = [as_batch(batch) for batch in batches]
    usable = [batch for batch in batches if batch.size >= MIN_CKA_BATCH]
    no_batch = CalibrationError(
        f"depth alignment needs calibration batches of at least {MIN_CKA_BATCH} samples for the unbiased "
        f"CKA estimator; got batch sizes {sorted({b.size for b in batches})}"
    )
    if not usable and group is None:
        raise no_batch
    accumulator = CKAAccumulator(len(deep_units), len(shallow_units))
    error: BaseException | None = None
    try:
        deep_taps = tap_extractor(deep, [u.end for u in deep_units])
        shallow_taps = tap_extractor(shallow, [u.end for u in shallow_units])
        with torch.no_grad():
            for batch in progress(usable, total=len(usable), description="unit CKA", quiet=quiet):
                rows = [v.reshape(v.shape[0], -1) for v in batch.run(deep_taps)]
                cols = [v.reshape(v.shape[0], -1) for v in batch.run(shallow_taps)]
                accumulator.update(rows, cols)
    except collect_errors() as exc:
        if group is None:
            raise
        error = exc
    if group is not None:
        raise_together(error, group, "unit CKA", agree=(len(deep_units), len(shallow_units)))
        state = accumulator.state()
        accumulator.load_state(sum_(state, group))
        if accumulator.num_batches == 0:
            raise CalibrationError(f"{no_batch} (on every process of the process group)")
    return accumulator.matrix()


def unit_weight_similarity(
    deep: GraphModule, deep_units: Sequence[Unit], shallow: GraphModule, shallow_units: Sequence[Unit]
) -> np.ndarray:
    """(m, n) similarity of units from their weights alone (a data-free merge's stand-in for CKA).

    Linear CKA between two layers' weight features W_a (n_a, F_a) and W_b, seen through their Gram
    matrices W W^T, depends on how the units of the two models correspond — unknown before
    matching. Maximised over every orthogonal correspondence (permutations included) it is the
    cosine of the two Grams' sorted eigenvalue spectra, a similarity invariant to any channel
    order. A unit's spectrum pools those of its weights (parameters of two or more dims, reshaped
    to (out, rest)): each normalised to sum 1 / (number of weights), all sorted together; two
    units' similarity is the cosine of their zero-padded spectra, in [0, 1]. Much weaker than
    the CKA of activations: it sees how a unit's weights spread their energy, not what they compute.
    """

    def spectrum(gm: GraphModule, unit: Unit) -> torch.Tensor:
        values = []
        for kind, target in _unit_targets(gm, unit):
            tensors = (
                [p for _, p in gm.get_submodule(target).named_parameters(recurse=True)]
                if kind == "module" else [_get_tensor(gm, target)]
            )
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.is_floating_point():
                    matrix = tensor.detach().to(torch.float64).reshape(tensor.shape[0], -1)
                    eigen = torch.linalg.svdvals(matrix).square()
                    if eigen.sum() > 0:
                        values.append(eigen / eigen.sum())
        if not values:
            return torch.zeros(1, dtype=torch.float64)
        return torch.sort(torch.cat(values) / len(values), descending=True).values

    rows = [spectrum(deep, u) for u in deep_units]
    cols = [spectrum(shallow, u) for u in shallow_units]
    out = np.zeros((len(rows), len(cols)))
    for j, a in enumerate(rows):
        for i, b in enumerate(cols):
            common = min(len(a), len(b))  # the zero padding of the shorter adds nothing to the product
            denominator = float(a.norm() * b.norm())
            out[j, i] = float(a[:common] @ b[:common]) / denominator if denominator > 0 else 0.0
    return out


def align_depth(
    deep: GraphModule,
    shallow: GraphModule,
    batches: Sequence[torch.Tensor],
    objective: str,
    model: int,
    *,
    quiet: bool = False,
    process_group: Any = None,
    analyses: tuple[Analysis, Analysis] | None = None,
    similarity: str = "cka",
) -> DepthAlignment:
    """Measure CKA between units and solve the depth DP for one shallower model.

    ``process_group``: see ``unit_cka`` (every process gets the same alignment).
    ``analyses``: (deep, shallow) dependency analyses of the two graphs, for the units' channel
    axes (computed when not given). ``similarity``: "cka" (of unit outputs on ``batches``) or
    "weights" (``unit_weight_similarity``: no data; ``batches`` is not read), stored in the
    alignment's ``cka``.
    """
    deep_analysis, shallow_analysis = analyses or (None, None)
    deep_units, shallow_units = find_units(deep, deep_analysis), find_units(shallow, shallow_analysis)
    if len(deep_units) < len(shallow_units):
        raise IncompatibleModelsError("align_depth: the first model must be the deeper one")
    first_ok, extra_ok = compatibility(deep, deep_units, shallow, shallow_units)
    if similarity == "weights":
        cka = unit_weight_similarity(deep, deep_units, shallow, shallow_units)
    else:
        cka = unit_cka(deep, deep_units, shallow, shallow_units, batches, quiet=quiet, process_group=process_group)
    segmentation = segment(
        cka,
        objective,
        first_ok,
        extra_ok,
        deep_names=[u.end for u in deep_units],
        shallow_names=[u.end for u in shallow_units],
    )
    return DepthAlignment(
        model, tuple(u.end for u in deep_units), tuple(u.end for u in shallow_units), cka, segmentation,
        tuple(tuple(target for _, target in _unit_targets(deep, u)) for u in deep_units),
    )


# ------------------------------------------------------------------------------------------------
# Extension
# ------------------------------------------------------------------------------------------------


def _unit_targets(gm: GraphModule, unit: Unit) -> list[tuple[str, str]]:
    """(kind, target) of the modules and get_attr tensors a unit's nodes use, in node order."""
    nodes = {n.name: n for n in gm.graph.nodes}
    targets: list[tuple[str, str]] = []
    for name in unit.nodes:
        node = nodes[name]
        for source in node.all_input_nodes:
            if source.op == "get_attr" and ("attr", str(source.target)) not in targets:
                targets.append(("attr", str(source.target)))
        if node.op == "call_module" and ("module", str(node.target)) not in targets:
            targets.append(("module", str(node.target)))
    return targets


def _get_tensor(gm: nn.Module, qualified: str) -> torch.Tensor:
    value: object = gm
    for part in qualified.split("."):
        value = getattr(value, part)
    return value  # type: ignore[return-value]


def _residual_branch_end(gm: GraphModule, unit: Unit) -> set[str] | None:
    """The targets (a module, or the get_attr tensors of a functional layer) whose zeroing zeroes
    the residual branch: the nearest node with parameters (its last norm/linear) walking back from
    the residual add's non-shortcut input. None when there is none."""
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    inside = set(unit.nodes)
    adds = [nodes[n] for n in unit.nodes if _is_residual_join(nodes[n], inside, unit.start)]
    if not adds:
        return None
    join = adds[-1]
    branch = [a for a in join.all_input_nodes if a.name != unit.start]
    current: Node | None = branch[0] if branch else None
    while current is not None and current.name in inside:
        if current.op == "call_module" and any(True for _ in modules[str(current.target)].parameters()):
            return {str(current.target)}
        params = [a for a in current.all_input_nodes if a.op == "get_attr"]
        if params and current.op == "call_function" and ops.is_layer(current, modules):
            # a functional linear/conv (torch.export graphs): zero weight and bias give zero
            return {str(a.target) for a in params}
        tensors = [a for a in current.all_input_nodes if a.op != "get_attr" and a.name in inside | {unit.start}]
        if len(tensors) != 1:
            return None
        current = tensors[0]
    return None


def _norm_affine(node: Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """The (weight, bias) get_attr targets of a normalisation node with both, else None."""
    arguments = ops.affine_arguments(node, modules)
    if arguments is None or len(arguments) != 2 or not all(isinstance(a, Node) and a.op == "get_attr" for a in arguments):
        return None
    return str(arguments[0].target), str(arguments[1].target)


def _move_norm_affine(gm: GraphModule, inserted: Sequence[Unit], state: dict[str, torch.Tensor]) -> None:
    """Make inserted post-norm units (``x -> LayerNorm(x + f(x))``, f zeroed) identities.

    LayerNorm(x) is not x, but it is when x is already normalised with weight 1 and bias 0. So
    the norm that ends the unit before the run (weight g, bias b) gets 1 and 0, every inserted
    unit's norm 1 and 0, and the last one g and b: the run's output is the original one (up to
    the norms' eps, ~eps / variance). ``inserted``: one run of consecutive inserted units.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    affines = [_norm_affine(nodes[u.end], modules) for u in inserted if u.kind == "residual"]
    post_norms = [affine for affine in affines if affine is not None]
    if not post_norms:
        return
    previous = nodes[inserted[0].start]
    while ops.is_eval_identity(previous, modules) and previous.all_input_nodes:
        previous = previous.all_input_nodes[0]
    before = _norm_affine(previous, modules)
    if before is None:
        raise IncompatibleModelsError(
            f"cannot make the post-norm unit ending at '{inserted[0].end}' an identity: the value entering it "
            f"('{inserted[0].start}') does not come from a LayerNorm with weight and bias"
        )
    weight, bias = state[before[0]], state[before[1]]
    state[before[0]], state[before[1]] = torch.ones_like(weight), torch.zeros_like(bias)
    for k, (norm_weight, norm_bias) in enumerate(post_norms):
        last = k == len(post_norms) - 1
        state[norm_weight] = weight.clone() if last else torch.ones_like(weight)
        state[norm_bias] = bias.clone() if last else torch.zeros_like(bias)


def _is_residual_join(node: Node, inside: set[str], start: str) -> bool:
    return ops.is_sum(node) and any(a.name == start for a in node.all_input_nodes)


def _identity_parameter(module: nn.Module, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A parameter of ``module`` that makes the layer an identity map (for a square layer)."""
    return ops.identity_parameter(module, name, shape, like)  # the registry entry's ``identity``


def _resizer(deep_width: int, shallow_width: int):
    """Maps a deep unit's channel extent to the shallow model's: the stream width exactly, others
    (hidden widths) scaled by the same ratio, so an inserted identity unit fits the shallow model."""
    if deep_width == shallow_width:  # also a unit without channel dims (0 == 0): nothing to resize
        return lambda size: size
    if deep_width == 0 or shallow_width == 0:
        raise IncompatibleModelsError(
            f"cannot fit an inserted unit of {deep_width} channels to the shallower model's {shallow_width}: "
            "the analysis found a channel axis in only one of them"
        )
    ratio = shallow_width / deep_width

    def resize(size: int) -> int:
        return shallow_width if size == deep_width else max(1, round(size * ratio))

    return resize


def _resized_shape(module: nn.Module | None, shape: torch.Size, resize) -> torch.Size:
    if not shape or (module is not None and not shape[0] > 1 and len(shape) == 1):
        return shape
    if module is None:  # a get_attr tensor: every axis of more than one entry is a channel axis
        return torch.Size(resize(s) if s > 1 else s for s in shape)
    return ops.resized_shape(module, shape, resize)  # the registry entry's ``resized_shape``


def _rewrite_literals_for_widths(analysis: Analysis, extended: GraphModule) -> None:
    """Shape literals of the deep graph (``reshape(x, n, 768, -1)``, from its ``analysis``) at the
    extension's widths."""
    from fxmerge.passes.rewrite import rewrite_shape_literals

    if not analysis.shape_literals:
        return
    tensors = dict(extended.named_parameters()) | dict(extended.named_buffers())
    sizes: dict[str, int] = {}
    for group in analysis.groups:
        for ref in group.producers + group.consumers:
            if ref.layout == ((group.name,),) and ref.param in tensors:
                sizes[group.name] = tensors[ref.param].shape[ref.axis]
                break
        else:
            sizes[group.name] = group.size
    rewrite_shape_literals(extended, analysis.shape_literals, sizes)
    extended.recompile()


def extend(
    shallow: GraphModule,
    deep: GraphModule,
    alignment: DepthAlignment,
    example: Any,
    *,
    analyses: tuple[Analysis, Analysis] | None = None,
) -> GraphModule:
    """The deep graph carrying the shallow model's weights, plus identity units (see module doc).

    Inserted units take the shallow model's width at their position (their hidden widths scale
    with it; channel counts read from the analyses); ``example`` is used to check that the
    extension computes what the shallow model computes (``InvarianceError`` otherwise).
    ``analyses``: (deep, shallow) dependency analyses, as for ``align_depth``.
    """
    deep_analysis, shallow_analysis = analyses or (analysis_for_units(deep), None)
    deep_units, shallow_units = find_units(deep, deep_analysis), find_units(shallow, shallow_analysis)
    extended = copy.deepcopy(deep)
    state: dict[str, torch.Tensor] = {}
    inert: set[str] = set()
    deep_state = deep.state_dict()
    shallow_tensors = dict(shallow.named_parameters()) | dict(shallow.named_buffers())
    for i, segment_units in enumerate(alignment.segments):
        first, *extras = segment_units
        deep_targets = _unit_targets(deep, deep_units[first])
        shallow_targets = _unit_targets(shallow, shallow_units[i])
        if [k for k, _ in deep_targets] != [k for k, _ in shallow_targets]:
            raise IncompatibleModelsError(
                f"unit '{shallow_units[i].end}' of the shallower model and unit '{deep_units[first].end}' "
                "of the deeper model use different parameters"
            )
        for (kind, deep_target), (_, shallow_target) in zip(deep_targets, shallow_targets):
            if kind == "attr":
                state[deep_target] = shallow_tensors[shallow_target].detach().clone()
                continue
            prefix = f"{deep_target}."
            for key in deep_state:
                if key.startswith(prefix):
                    state[key] = shallow_tensors[shallow_target + "." + key[len(prefix):]].detach().clone()
        shallow_channels = shallow_units[i].out_channels
        for j in extras:
            unit = deep_units[j]
            resize = _resizer(unit.in_channels, shallow_channels)
            zeroed = _residual_branch_end(deep, unit) if unit.kind == "residual" else None
            if unit.kind == "residual" and zeroed is None:
                raise IncompatibleModelsError(
                    f"cannot make deep unit '{unit.end}' an identity: no parametric layer ends its residual branch"
                )
            for kind, target in _unit_targets(deep, unit):
                module = deep.get_submodule(target) if kind == "module" else None
                names = (
                    [(f"{target}.{n}", n) for n, _ in module.named_parameters()] + [(f"{target}.{n}", n) for n, _ in module.named_buffers()]
                    if module is not None
                    else [(target, target)]
                )
                if zeroed is not None:
                    inert.update(key for key, _ in names)
                for key, local in names:
                    like = deep_state[key]
                    shape = _resized_shape(module, like.shape, resize)
                    # the registry says which parameters to zero for a zero output (attention: out_proj)
                    zero_all = zeroed is not None and target in zeroed
                    if zero_all and like.is_floating_point() and ops.zeroes_output(module, local):
                        state[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
                    elif module is not None:
                        state[key] = _identity_parameter(module, local, shape, like)
                    else:
                        state[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    for i, segment_units in enumerate(alignment.segments):
        _move_norm_affine(deep, [deep_units[j] for j in segment_units[1:]], state)
    missing = [key for key in deep_state if key not in state]
    for key in missing:  # tensors outside every unit (rare): the shallow model's own, by name
        if key in shallow_tensors:
            state[key] = shallow_tensors[key].detach().clone()
        else:
            raise IncompatibleModelsError(f"no value for '{key}' of the deeper model in the extension")
    load_state_resizing(extended, state)
    _rewrite_literals_for_widths(deep_analysis, extended)
    extended.meta[INERT_PARAMS] = frozenset(inert)
    extended.eval()
    example = as_batch(example)
    with torch.no_grad():
        ShapeProp(extended).propagate(*example.placeholders(extended))  # the deep graph's shapes, at the shallow widths
        expected, got = tensor_leaves(example.run(shallow)), tensor_leaves(example.run(extended))
    scale = max(float(e.abs().max()) for e in expected) or 1e-12
    error = max(float((e - g).abs().max()) for e, g in zip(expected, got)) / max(scale, 1e-12)
    if error > 1e-4:
        raise InvarianceError(
            f"the depth extension of model {alignment.model} changes its outputs (relative error {error:.2e}): "
            "an inserted unit is not an identity on these inputs"
        )
    return extended


def inert_groups(gm: GraphModule, analysis: Analysis) -> set[str]:
    """The groups of an extension whose units do not reach its output: every producer and
    consumer of the group lies inside one inserted zero-residual unit (its hidden channels,
    whatever they compute, end in the zeroed layer). Empty for a graph that ``extend`` did not
    make."""
    inside = gm.meta.get(INERT_PARAMS, frozenset())
    if not inside:
        return set()
    return {
        g.name for g in analysis.groups
        if g.producers and all(ref.param in inside for ref in g.producers + g.consumers)
    }


def depth_of(gm: GraphModule, analysis: Analysis | None = None) -> int:
    return len(find_units(gm, analysis))
