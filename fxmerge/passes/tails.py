"""Partial zipping and per-model heads: split a merged graph into K tails after a spine node.

Up to the stop node the models share merged weights; after it, each model k runs its own,
untouched tail on ``U_k f*`` (the merged feature unmerged into model k's basis), and the K tail
outputs are averaged (shared output space) or concatenated (separate label sets). The result is
one GraphModule — no hooks.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxmerge.errors import ConfigError
from fxmerge.groups import Layout
from fxmerge.passes.rewrite import transform_axis


class ChannelMap(nn.Module):
    """Applies a fixed matrix along one dimension: ``y = x`` with ``dim`` mapped by ``weight``.

    weight: (n_out, n_in); x: (..., n_in at ``dim``, ...) -> (..., n_out at ``dim``, ...).
    """

    def __init__(self, weight: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.movedim(self.dim, -1) @ self.weight.T).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, {self.weight.shape[1]} -> {self.weight.shape[0]}"


def unmerge_matrices(
    layouts: Sequence[Layout | None], unmerge: Mapping, merged_sizes: Mapping[int, int], dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> dict[int, torch.Tensor]:
    """dim -> full (n_k, n_merged) matrix taking the merged value at the stop node to model k's basis.

    ``unmerge`` maps a space id (or composite key) to U_k (n_k, r); dims without free groups are
    left out (identity).
    """
    result: dict[int, torch.Tensor] = {}
    for dim, layout in enumerate(layouts):
        if layout is None:
            continue
        keys = [f for piece in layout for f in piece if f in unmerge]
        keys += [tuple(piece[i : i + 2]) for piece in layout for i in range(len(piece) - 1) if tuple(piece[i : i + 2]) in unmerge]
        if not keys:
            continue
        extent = 0
        for piece in layout:
            size = 1
            for f in piece:
                size *= f.size if not isinstance(f, int) else merged_sizes[f]
            extent += size
        identity = torch.eye(extent, dtype=torch.float64, device=device)
        result[dim] = transform_axis(identity, 0, layout, unmerge, merged_sizes).to(dtype)
    return result


def _set_attribute(gm: nn.Module, qualified: str, value: torch.Tensor | nn.Module) -> None:
    owner_path, _, name = qualified.rpartition(".")
    owner = gm
    for part in owner_path.split(".") if owner_path else []:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)


def split_tails(
    merged: GraphModule,
    stop: str,
    sources: Sequence[GraphModule],
    unmerge_maps: Sequence[Mapping[int, torch.Tensor]],
    output: str,
) -> GraphModule:
    """Give each model its own tail after node ``stop`` (in place on ``merged``; returned).

    Args:
        merged: the merged GraphModule (reference structure).
        stop: name of a spine node of ``merged``: the last merged value.
        sources: the K models' own traced GraphModules (their tails' weights are copied).
        unmerge_maps: per model, dim -> (n_k, n_merged) matrix applied to the stop value.
        output: "shared" (average the tails' outputs) or "concat" (concatenate on the last dim).
    """
    graph = merged.graph
    nodes = list(graph.nodes)
    names = [n.name for n in nodes]
    if stop not in names:
        raise ConfigError(f"stop_at: no node named {stop!r} in the merged graph")
    stop_node = nodes[names.index(stop)]
    output_node = next(n for n in nodes if n.op == "output")
    tail = [n for n in nodes[names.index(stop) + 1 :] if n.op != "output"]
    result_arg = output_node.args[0]
    # a torch.export graph returns a flat tuple of its outputs (its codegen rebuilds the structure)
    results = list(result_arg) if isinstance(result_arg, (tuple, list)) else [result_arg]
    if not results or not all(isinstance(r, Node) for r in results):
        raise ConfigError("partial zipping and output='concat' need a model whose outputs are tensors")
    outputs: list[list[Node]] = []
    for k, (source, maps) in enumerate(zip(sources, unmerge_maps)):
        prefix = f"tail{k}"
        env: dict[Node, Node] = {}
        with graph.inserting_before(output_node):
            value: Node = stop_node
            for dim, matrix in sorted(maps.items()):
                target = f"{prefix}_unmerge_{dim}"
                merged.add_module(target, ChannelMap(matrix, dim))
                value = graph.call_module(target, (value,))
            env[stop_node] = value

            def own(arg: Node) -> Node:
                """The tail's value of ``arg``; a parameter read from before the tail (torch.export
                puts every get_attr first) becomes this model's own copy."""
                if arg in env:
                    return env[arg]
                if arg.op == "get_attr":
                    target = f"{prefix}.{arg.target}"
                    _set_attribute(merged, target, copy.deepcopy(_get(source, str(arg.target))))
                    env[arg] = graph.get_attr(target)
                    return env[arg]
                return arg

            for node in tail:
                copied = graph.node_copy(node, own)
                if node.op == "call_module":
                    copied.target = f"{prefix}.{node.target}"
                    _set_attribute(merged, copied.target, copy.deepcopy(source.get_submodule(str(node.target))))
                elif node.op == "get_attr":
                    copied.target = f"{prefix}.{node.target}"
                    _set_attribute(merged, copied.target, copy.deepcopy(_get(source, str(node.target))))
                env[node] = copied
        outputs.append([env.get(r, r) for r in results])
    combined_results = []
    with graph.inserting_before(output_node):
        for per_model in zip(*outputs):
            if output == "concat":
                combined = graph.call_function(torch.cat, (list(per_model),), {"dim": -1})
            else:
                combined = per_model[0]
                for other in per_model[1:]:
                    combined = graph.call_function(operator.add, (combined, other))
                combined = graph.call_function(operator.truediv, (combined, float(len(per_model))))
            combined_results.append(combined)
    output_node.args = (type(result_arg)(combined_results) if isinstance(result_arg, (tuple, list)) else combined_results[0],)
    for node in reversed(tail):
        if not node.users:
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):  # the reference's own tail parameters, now unread
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    merged.delete_all_unused_submodules()
    graph.lint()
    merged.recompile()
    return merged


def _get(module: nn.Module, qualified: str) -> torch.Tensor:
    value: object = module
    for part in qualified.split("."):
        value = getattr(value, part)
    return value  # type: ignore[return-value]
