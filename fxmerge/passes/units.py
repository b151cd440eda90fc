"""Units along the spine: where a network can be cut, and what each piece between cuts is.

The spine is the dominator chain of the output node: the nodes every input-to-output path goes
through. Between two consecutive spine nodes lies one *step*: a single op on a chain (VGG) or a
whole residual block (ResNet, transformer sub-block). A *unit* is one step that contains a
layer (conv, linear, attention) together with the layer-free steps that follow it (norm,
activation, pooling), so a VGG is cut into conv+bn+relu(+pool) units and a ResNet into blocks,
without any per-architecture code.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from torch import nn
from torch.fx import GraphModule, Node

from fxmerge import ops


@dataclass(frozen=True)
class Unit:
    """One unit of the spine.

    ``start`` is the spine node whose value enters the unit (a placeholder for the first unit),
    ``end`` the spine node whose value leaves it; ``nodes`` all graph nodes strictly after
    ``start`` up to and including ``end``. ``kind`` is "residual" (the unit has parallel paths that
    meet again), "plain" (a chain) or "other". ``in_shape``/``out_shape`` are the tensor shapes at
    ``start`` and ``end``; ``preserves_shape`` tells whether the unit could become an identity.
    """

    index: int
    start: str
    end: str
    nodes: tuple[str, ...]
    kind: str
    layers: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def preserves_shape(self) -> bool:
        return self.in_shape == self.out_shape

    @property
    def shape_change(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input shape, output shape) without the batch dimension."""
        return self.in_shape[1:], self.out_shape[1:]


def _graph(gm: GraphModule) -> nx.DiGraph:
    """The data-flow graph of the tensors that depend on the inputs.

    Parameters (get_attr) and shape arithmetic (``x.shape[0]``) are not data paths: a class token
    expanded to the batch size must not look like a second path around the patch embedding.
    """
    graph = nx.DiGraph()
    root = "__root__"
    graph.add_node(root)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            graph.add_edge(root, node.name)
            continue
        for source in node.all_input_nodes:
            if source.op != "get_attr" and (source.op == "placeholder" or _is_tensor(source)):
                graph.add_edge(source.name, node.name)
    reachable = nx.descendants(graph, root) | {root}
    return graph.subgraph(reachable).copy()


def _is_tensor(node: Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and not isinstance(meta, dict)


def spine(gm: GraphModule) -> list[str]:
    """Names of the spine nodes in topological order (the placeholder first, the output last)."""
    graph = _graph(gm)
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


def find_units(gm: GraphModule) -> list[Unit]:
    """Cut the spine of a traced, shape-annotated graph into units (see the module docstring)."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    chain = [name for name in spine(gm) if by_name[name].op != "output"]
    steps: list[tuple[str, str, list[str]]] = []
    for a, b in zip(chain, chain[1:]):
        between = [n.name for n in nodes[order[a] + 1 : order[b] + 1] if n.op not in ("get_attr",)]
        steps.append((a, b, between))
    # A step with a layer starts a unit. A layer-free step that changes the shape (pooling,
    # flatten, token selection) belongs to an "other" unit of its own, so that a block's
    # structure does not depend on whether it is the last one of the network. A shape-preserving
    # layer-free step joins the unit before it, except that a norm after a residual block (a
    # final LayerNorm) also goes to an "other" unit.
    units: list[list[tuple[str, str, list[str]]]] = []
    kinds: list[str] = []
    for step in steps:
        a, b, names = step
        has_layer = any(_is_layer(by_name[name], modules) for name in names)
        reshapes = _shape(by_name[a]) != _shape(by_name[b])
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
    result: list[Unit] = []
    for index, group in enumerate(units):
        start, end = group[0][0], group[-1][1]
        names = tuple(name for step in group for name in step[2])
        residual = any(len(step[2]) > 1 and _has_parallel_paths(by_name, step) for step in group)
        layers = tuple(name for name in names if _is_layer(by_name[name], modules))
        kind = "other" if kinds[index] == "other" else ("residual" if residual else "plain")
        result.append(
            Unit(index, start, end, names, kind, layers, _shape(by_name[start]), _shape(by_name[end]))
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
