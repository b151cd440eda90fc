"""Units along the spine: where a network can be cut, and what each piece between cuts is.

The spine is the dominator chain of the output node: the nodes every input-to-output path goes
through. Between two consecutive spine nodes lies one *step*: a single op on a chain (VGG) or a
whole residual block (ResNet, transformer sub-block). A *unit* is one step that contains a
layer (conv, linear, attention) together with the layer-free steps that follow it (norm,
activation, pooling), so a VGG is cut into conv+bn+relu(+pool) units and a ResNet into blocks,
without any per-architecture code.

Which dims of a tensor hold channels is read from the dependency analysis
(``Analysis.node_layouts``), never guessed from the tensor's rank or from sizes: a dim is a
channel axis when its layout holds a channel space of some layer (``channel_dims``). A step that
moves the channel axis (a channels-last permute) therefore changes the layout whatever the sizes,
even when C == H == W.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx
from torch import nn
from torch.fx import GraphModule, Node

from fxmerge import ops
from fxmerge.groups import Opaque

if TYPE_CHECKING:
    from fxmerge.passes.dependency import Analysis


@dataclass(frozen=True)
class Unit:
    """One unit of the spine.

    ``start`` is the spine node whose value enters the unit (a placeholder for the first unit),
    ``end`` the spine node whose value leaves it; ``nodes`` all graph nodes strictly after
    ``start`` up to and including ``end``. ``kind`` is "residual" (the unit has parallel paths that
    meet again), "plain" (a chain) or "other". ``in_shape``/``out_shape`` are the tensor shapes at
    ``start`` and ``end``; ``in_channel_dims``/``out_channel_dims`` the dims of those shapes that
    hold channels and ``in_channels``/``out_channels`` how many channels they hold (0: none), both
    from the analysis; ``preserves_shape`` tells whether the unit could become an identity.
    """

    index: int
    start: str
    end: str
    nodes: tuple[str, ...]
    kind: str
    layers: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_channel_dims: tuple[int, ...] = ()
    out_channel_dims: tuple[int, ...] = ()
    in_channels: int = 0
    out_channels: int = 0

    @property
    def preserves_shape(self) -> bool:
        """Same shape and the channels on the same dims (a channels-last permute at C == H == W
        keeps the shape, not the layout)."""
        return self.in_shape == self.out_shape and self.in_channel_dims == self.out_channel_dims

    @property
    def layout_change(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input shape, output shape) with every channel dim's size replaced by -1: what two units
        of models of different widths share when they have one structure."""
        return _masked(self.in_shape, self.in_channel_dims), _masked(self.out_shape, self.out_channel_dims)

    @property
    def shape_change(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input shape, output shape) without the batch dimension."""
        return self.in_shape[1:], self.out_shape[1:]


def _graph(gm: GraphModule, analysis: Analysis | None = None) -> nx.DiGraph:
    """The data-flow graph of the tensors that depend on the inputs.

    Parameters (get_attr) and shape arithmetic (``x.shape[0]``) are not data paths: a class token
    expanded to the batch size must not look like a second path around the patch embedding.
    With an ``analysis``, neither is a side input without channels into an op that has a channel
    input: an attention mask built from the inputs reaches every layer's attention, and would
    otherwise bypass all the layers before it.
    """
    channels = None if analysis is None else {
        n.name for n in gm.graph.nodes if n.op != "get_attr" and channel_dims(analysis, n.name)
    }
    graph = nx.DiGraph()
    root = "__root__"
    graph.add_node(root)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            graph.add_edge(root, node.name)
            continue
        sources = [
            s for s in node.all_input_nodes if s.op != "get_attr" and (s.op == "placeholder" or _is_tensor(s))
        ]
        if channels is not None and any(s.name in channels for s in sources):
            sources = [s for s in sources if s.name in channels]
        for source in sources:
            graph.add_edge(source.name, node.name)
    reachable = nx.descendants(graph, root) | {root}
    return graph.subgraph(reachable).copy()


def _is_tensor(node: Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and not isinstance(meta, dict)


def spine(gm: GraphModule, analysis: Analysis | None = None) -> list[str]:
    """Names of the spine nodes in topological order (the placeholder first, the output last).
    ``analysis``: the graph's dependency analysis, to tell side inputs without channels apart."""
    graph = _graph(gm, analysis)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    dominators = nx.immediate_dominators(graph, "__root__")
    chain = []
    current = output.name
    while current != "__root__":
        chain.append(current)
        current = dominators[current]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _is_layer(node: Node, modules: dict[str, nn.Module]) -> bool:
    return ops.is_layer(node, modules)  # the registry's ``layer`` flag: conv, linear, attention


def _shape(node: Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else ()


def _masked(shape: tuple[int, ...], channel_dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-1 if d in channel_dims else size for d, size in enumerate(shape))


def channel_dims(analysis: Analysis, node: str) -> tuple[int, ...]:
    """The dims of ``node``'s value that hold channels: their layout has a factor that is a channel
    space of some layer (conv, linear, norm, attention; fixed ones included, e.g. the model input's
    channels). Batch, spatial and sequence dims hold only opaque extents or spaces no layer reads.
    A dim whose layout the analysis could not represent counts as a channel dim (it is not known to
    be anything else). () for a node without a recorded layout."""
    layouts = analysis.node_layouts.get(node) or ()
    channels = _channel_spaces(analysis)
    return tuple(
        d for d, layout in enumerate(layouts)
        if layout is None or any(f in channels for piece in layout for f in piece if not isinstance(f, Opaque))
    )


def channel_count(analysis: Analysis, node: str) -> int:
    """How many channels ``node``'s value has: over its channel dims, the product of the channel
    extents, each the sum over the dim's pieces of the product of its channel-space sizes (opaque
    factors, e.g. the positions a flatten folds in, excluded). 0 when it has no channel dim."""
    layouts = analysis.node_layouts.get(node) or ()
    channels = _channel_spaces(analysis)
    count = 0
    for d in channel_dims(analysis, node):
        layout = layouts[d]
        if layout is None:
            return 0
        extent = 0
        for piece in layout:
            factors = [analysis.space_sizes[f] for f in piece if not isinstance(f, Opaque) and f in channels]
            extent += math.prod(factors) if factors else 0
        count = extent if count == 0 else count * extent
    return count


def _channel_spaces(analysis: Analysis) -> set[int]:
    return {analysis.space_ids[name] for name in analysis.layer_channel_groups if name in analysis.space_ids}


def analysis_for_units(gm: GraphModule) -> Analysis:
    """The dependency analysis ``find_units`` reads channel axes from, when it is not given one.

    Its fail-closed warnings are not repeated here: the merge's own analysis of the same graph
    reports them.
    """
    # imported here, not at the top: the analysis module may come to import this one
    from fxmerge.passes.dependency import analyze_graph, state_name_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze_graph(gm, state_name_map(gm))


def find_units(gm: GraphModule, analysis: Analysis | None = None) -> list[Unit]:
    """Cut the spine of a traced, shape-annotated graph into units (see the module docstring).

    ``analysis``: the dependency analysis of ``gm`` (``analyze_graph``), for its channel axes;
    computed when not given.
    """
    if analysis is None:
        analysis = analysis_for_units(gm)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    chain = [name for name in spine(gm, analysis) if by_name[name].op != "output"]
    steps: list[tuple[str, str, list[str]]] = []
    for a, b in zip(chain, chain[1:]):
        between = [n.name for n in nodes[order[a] + 1 : order[b] + 1] if n.op not in ("get_attr",)]
        steps.append((a, b, between))
    # A step with a layer starts a unit. A layer-free step that changes the shape (pooling,
    # flatten, token selection) belongs to an "other" unit of its own, so that a block's
    # structure does not depend on whether it is the last one of the network. A shape-preserving
    # layer-free step joins the unit before it, except that a norm after a residual block (a
    # final LayerNorm) also goes to an "other" unit. A step reshapes when the shape or the dims
    # holding channels change (a permute to channels-last and back, whatever the sizes).
    units: list[list[tuple[str, str, list[str]]]] = []
    kinds: list[str] = []

    def layout(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return _shape(by_name[name]), channel_dims(analysis, name)

    for step in steps:
        a, b, names = step
        has_layer = any(_is_layer(by_name[name], modules) for name in names)
        reshapes = layout(a) != layout(b)
        has_params = any(_has_parameters(by_name[name], modules) for name in names)
        if has_layer:
            units.append([step])
            kinds.append("layer")
        elif not units:
            units.append([step])
            kinds.append("other")
        elif reshapes or (has_params and not _plain(units[-1], by_name)):
            if kinds[-1] == "other":
                units[-1].append(step)
            else:
                units.append([step])
                kinds.append("other")
        else:
            units[-1].append(step)
    # A norm between two layer units belongs to the unit before it: a post-norm transformer
    # (BERT: x -> LayerNorm(x + f(x))) is cut into its sub-blocks, each ending with its norm.
    # A norm that ends the network's blocks (pre-norm's final LayerNorm) keeps its own unit.
    for index in range(len(units) - 2, 0, -1):
        shape_preserving = all(layout(a) == layout(b) for a, b, _ in units[index])
        if kinds[index] == "other" and kinds[index - 1] == "layer" and kinds[index + 1] == "layer" and shape_preserving:
            units[index - 1].extend(units.pop(index))
            kinds.pop(index)
    result: list[Unit] = []
    for index, group in enumerate(units):
        start, end = group[0][0], group[-1][1]
        names = tuple(name for step in group for name in step[2])
        residual = any(len(step[2]) > 1 and _has_parallel_paths(by_name, step) for step in group)
        layers = tuple(name for name in names if _is_layer(by_name[name], modules))
        kind = "other" if kinds[index] == "other" else ("residual" if residual else "plain")
        result.append(
            Unit(
                index, start, end, names, kind, layers, _shape(by_name[start]), _shape(by_name[end]),
                channel_dims(analysis, start), channel_dims(analysis, end),
                channel_count(analysis, start), channel_count(analysis, end),
            )
        )
    return result


def _has_parameters(node: Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return any(True for _ in modules[str(node.target)].parameters())
    return any(source.op == "get_attr" for source in node.all_input_nodes)


def _plain(unit: list[tuple[str, str, list[str]]], by_name: dict[str, Node]) -> bool:
    return not any(len(step[2]) > 1 and _has_parallel_paths(by_name, step) for step in unit)


def _has_parallel_paths(by_name: dict[str, Node], step: tuple[str, str, list[str]]) -> bool:
    """True when the step's end reads the step's start through more than one path (a residual)."""
    start, end, between = step
    inside = set(between) | {start}

    def tensor_inputs(name: str) -> int:
        return sum(1 for s in by_name[name].all_input_nodes if s.name in inside and (s.op == "placeholder" or _is_tensor(s)))

    return any(tensor_inputs(name) > 1 for name in between)
