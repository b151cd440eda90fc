"""Dependency analysis: which parameter axes must be permuted (or zipped) together.

The pass is an abstract interpretation of a shape-annotated GraphModule (a ``torch.fx.Interpreter``
whose values are layouts): every dimension of every tensor value gets a ``Layout`` (see
``fxmerge.groups``). What each op does to layouts is its rule in the op registry
(``fxmerge.ops``): it *preserves* layouts (activations, norms), *produces* new spaces (a conv's
output channels), *unifies* layouts (residual add, a linear layer reading its input),
*concatenates*, *splits* or *reshapes* them, calling the layout machinery of ``_Analyzer``.
Parameters met through ``call_module`` or ``get_attr`` get fresh spaces that the rules unify with
the activations they meet. Each node's resulting leaf layouts are written on
``node.meta["fxmerge_layouts"]`` (as ShapeProp writes ``tensor_meta``).

It fails closed: an op without a rule — or whose rule leaves a layout that pieces of products
cannot express — fixes every space of its tensor inputs (no permutation) and warns with the node
name; ``strict=True`` raises ``UnsupportedOpError`` instead. The model inputs are opaque and the
model outputs are fixed.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from fxmerge import ops
from fxmerge.ops.registry import arg

from fxmerge.errors import UnsupportedOpError
from fxmerge.groups import (
    AxisRef,
    ChannelSpace,
    Layout,
    Opaque,
    Role,
    ShapeLiteral,
    Tap,
)
from fxmerge.passes.spaces import SpaceTable, Unrepresentable, normalize_piece, opaque_layout


@dataclass
class _Tensor:
    """What the analysis knows about a tensor value: its shape and one layout per dimension."""

    shape: tuple[int, ...]
    dims: list[Layout]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _opaque_tensor(shape: Sequence[int]) -> _Tensor:
    return _Tensor(tuple(shape), [opaque_layout(n) for n in shape])


def _target_name(node: Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    if node.op == "call_module":
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    return f"{module}.{name}" if module else name


# ----------------------------------------------------------------------------------------------
# The analysis result
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """Result of ``analyze``: the channel spaces (groups) of one model and how to rewrite it.

    ``param_layouts[name][axis]`` is the layout of that parameter axis in *leaf space ids*
    (``None``: never permuted). ``space_ids[group.name]`` is the leaf id of a group, so that
    transforms keyed by id can be applied with ``fxmerge.passes.rewrite``.
    """

    graph_module: GraphModule
    groups: tuple[ChannelSpace, ...]
    space_ids: dict[str, int]
    space_sizes: dict[int, int]
    param_layouts: dict[str, tuple[Layout | None, ...]]
    param_roles: dict[str, tuple[Role, ...]]
    aliases: dict[str, str]
    shape_literals: tuple[ShapeLiteral, ...]
    warnings: tuple[str, ...] = field(default=())
    layer_channel_groups: frozenset[str] = field(default=frozenset())
    node_layouts: dict[str, tuple[Layout | None, ...]] = field(default_factory=dict)
    # (heads group, head-channel group, embedding group): size(heads) * size(inner) == size(embedding)
    head_ties: tuple[tuple[str, str, str], ...] = field(default=())
    # (outer group, ..., inner group) -> taps whose dim holds that product of groups (block-major)
    composite_taps: dict[tuple[str, ...], tuple[Tap, ...]] = field(default_factory=dict)

    def group(self, name: str) -> ChannelSpace:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups]}")

    @property
    def free_groups(self) -> tuple[ChannelSpace, ...]:
        return tuple(g for g in self.groups if not g.fixed)

    def composite_groups(self, names: Sequence[str] | None = None) -> tuple[ChannelSpace, ...]:
        """The observed products of groups, as groups named ``"outer*inner"`` (``"a*b*c"``, ...).

        Unit ``b * n_inner + j`` of a product of two is channel j of block b (block-major, and
        row-major for more factors). Products with at least one free factor whose factors are all
        listed in ``names`` (when given) are returned; their taps are where a tensor dim holds
        exactly that product. A product with fixed factors still observes the free ones
        (``width.product_statistics``).
        """
        by_name = {g.name: g for g in self.groups}
        allowed = set(names) if names is not None else None
        found = []
        for key, taps in self.composite_taps.items():
            factors = [by_name[name] for name in key]
            if all(f.fixed for f in factors) or any(allowed is not None and f.name not in allowed for f in factors):
                continue
            found.append(
                ChannelSpace(
                    name="*".join(key),
                    size=math.prod(f.size for f in factors),
                    producers=(),
                    consumers=(),
                    taps=taps,
                    fixed=False,
                    factor_of=key,
                    kind="composite",
                )
            )
        return tuple(found)

    def coverage(self) -> float:
        """Fraction of hidden channels that belong to permutable groups.

        Hidden channels: the channels of every group except the model's input and output
        channels, fixed groups included — so a model whose ops all failed closed has coverage
        0.0, not 1.0. (Sequence or position axes of embeddings and kernel taps are opaque
        extents, not groups, and are not counted.) 1.0 when there is no hidden channel at all.
        """
        hidden = [g for g in self.groups if not _is_boundary(g)]
        total = sum(g.size for g in hidden)
        free = sum(g.size for g in hidden if not g.fixed)
        return free / total if total else 1.0

    def summary(self) -> str:
        """A readable table: group, size, kind, #producers, #consumers, fixed/why."""
        rows = [("group", "size", "kind", "prod", "cons", "status")]
        for g in self.groups:
            status = f"fixed: {g.reason}" if g.fixed else "free"
            rows.append((g.name, str(g.size), g.kind, str(len(g.producers)), str(len(g.consumers)), status))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        free = sum(1 for g in self.groups if not g.fixed)
        lines.append(f"{len(self.groups)} groups, {free} permutable; hidden-channel coverage {self.coverage():.1%}")
        for message in self.warnings:
            lines.append(f"warning: {message}")
        return "\n".join(lines)


_BOUNDARY_REASONS = ("model input", "model output")


def _is_boundary(group: ChannelSpace) -> bool:
    return bool(group.reason) and any(r in group.reason for r in _BOUNDARY_REASONS)


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------


class _Analyzer(Interpreter):
    """Abstract interpretation of the graph: the value of every node is its layouts (a ``_Tensor``,
    a tuple of them, or None), computed by the node's registry rule (``fxmerge.ops``). The rules
    receive this object as their context and call its layout machinery below."""

    def __init__(self, gm: GraphModule, state_names: dict[str, str], strict: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False  # errors (strict mode) keep their own message
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.state_names = state_names  # every state_dict key -> canonical key
        self.strict = strict
        self.table = SpaceTable()
        self.env: dict[Node, Any] = {}
        self.params: dict[str, _Tensor] = {}
        self.roles: dict[tuple[str, int], Role] = {}
        self.warnings: list[str] = []
        self.taps: list[tuple[str, int, Layout]] = []
        self.channel_layouts: list[Layout] = []
        self.node_dims: dict[str, tuple[Layout, ...]] = {}
        self.ties: list[tuple[int, int, int]] = []
        self.literals: list[tuple[str, tuple[int | str, ...], int, Layout]] = []
        self._undo: list[tuple[_Tensor, int, Layout]] = []  # (tensor, axis, layout) made opaque

    # -- helpers --------------------------------------------------------------------------------
    def param(self, name: str) -> _Tensor | None:
        """The layouts of a parameter/buffer by qualified name (fresh spaces on first use)."""
        canonical = self.state_names.get(name)
        if canonical is None:
            return None
        if canonical not in self.params:
            tensor = self.gm.get_parameter(name) if _is_parameter(self.gm, name) else self.gm.get_buffer(name)
            dims: list[Layout] = []
            for axis, size in enumerate(tensor.shape):
                if size > 1 and tensor.is_floating_point():
                    dims.append(((self.table.new(size, f"{canonical}[{axis}]"),),))
                else:
                    dims.append(opaque_layout(size))
            self.params[canonical] = _Tensor(tuple(tensor.shape), dims)
        return self.params[canonical]

    def module_param(self, target: str, attr: str) -> _Tensor | None:
        return self.param(f"{target}.{attr}" if target else attr)

    def make_opaque(self, tensor: _Tensor, axis: int, reason: str) -> None:
        """Declare a parameter axis that is never a channel axis (kernel taps, lookup rows)."""
        self.table.fix_all(self.table.spaces_of(tensor.dims[axis]), reason)
        self._undo.append((tensor, axis, tensor.dims[axis]))
        tensor.dims[axis] = opaque_layout(tensor.shape[axis])

    def set_role(self, name: str, axis: int, role: Role) -> None:
        canonical = self.state_names.get(name)
        if canonical is not None:
            self.roles[(canonical, axis)] = role

    def unify(self, a: Layout, b: Layout, node: Node) -> None:
        self.table.unify(a, b, f"coupled at {node.name} ({_target_name(node)})")

    def layer_axis(self, layout: Layout) -> Layout:
        """Note a layout as the channel axis of a layer (for coverage figures); returns it."""
        self.channel_layouts.append(layout)
        return layout

    def fix_tensor(self, value: Any, reason: str) -> None:
        for tensor in _tensors_in(value):
            for layout in tensor.dims:
                self.table.fix_all(self.table.spaces_of(layout), reason)

    def fix_param_tensors(self, target: str, reason: str) -> None:
        module = self.modules.get(target)
        if module is None:
            return
        for pname, _ in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
            tensor = self.param(f"{target}.{pname}")
            if tensor is not None:
                self.fix_tensor(tensor, reason)

    def meta_shape(self, node: Node) -> Any:
        meta = node.meta.get("tensor_meta")
        return _shapes_of(meta)

    def fail_closed(self, node: Node, why: str) -> Any:
        message = f"node '{node.name}' ({node.op} {_target_name(node)}): {why}; its channels are kept fixed"
        if self.strict:
            raise UnsupportedOpError(message)
        warnings.warn(message, stacklevel=3)
        self.warnings.append(message)
        reason = f"unsupported op at {node.name} ({_target_name(node)})"
        for value in _flatten_args((node.args, node.kwargs)):
            if isinstance(value, Node):
                self.fix_tensor(self.env.get(value), reason)
        if node.op == "call_module":
            self.fix_param_tensors(str(node.target), reason)
        # fresh fixed spaces rather than opaque extents: whatever reads the result is fixed with
        # this node's name as the reason
        return self._fixed_like(self.meta_shape(node), node.name, reason)

    def _fixed_like(self, shapes: Any, hint: str, reason: str) -> Any:
        if shapes is None:
            return None
        if not (isinstance(shapes, tuple) and all(isinstance(s, int) for s in shapes)):
            return tuple(self._fixed_like(s, f"{hint}.{i}", reason) for i, s in enumerate(shapes))
        dims: list[Layout] = []
        for axis, size in enumerate(shapes):
            if size > 1:
                space = self.table.new(size, f"{hint}[{axis}]")
                self.table.fix(space, reason)
                dims.append(((space,),))
            else:
                dims.append(opaque_layout(size))
        return _Tensor(shapes, dims)

    def model_input(self, node: Node) -> Any:
        """Input dims are fixed spaces (not opaque) so that what they couple to says why it is fixed."""
        shapes = self.meta_shape(node)
        if not (isinstance(shapes, tuple) and all(isinstance(s, int) for s in shapes)):
            return _opaque_like(shapes)
        dims: list[Layout] = []
        for axis, size in enumerate(shapes):
            if size > 1:
                space = self.table.new(size, f"input {node.name}[{axis}]")
                self.table.fix(space, f"model input {node.name}")
                dims.append(((space,),))
            else:
                dims.append(opaque_layout(size))
        return _Tensor(shapes, dims)

    def value(self, arg: Any) -> Any:
        if isinstance(arg, Node):
            return self.env.get(arg)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, dict):  # a graph returning {"logits": ...}: its values are outputs too
            return {k: self.value(v) for k, v in arg.items()}
        return arg

    # -- main loop ------------------------------------------------------------------------------
    def run(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("enable_io_processing", False)
        return super().run(*args, **kwargs)

    def run_node(self, node: Node) -> Any:
        if node.op == "placeholder":
            result: Any = self.model_input(node)
        elif node.op == "get_attr":
            result = self.param(str(node.target))
            if result is None:  # a constant that is not part of the state: never permuted
                result = _opaque_like(self.meta_shape(node))
        elif node.op == "output":
            for tensor in _tensors_in(self.value(node.args)):
                for layout in tensor.dims:
                    self.table.fix_all(self.table.spaces_of(layout), "model output")
            return None
        else:
            state = self._checkpoint()
            try:
                result = self.apply_rule(node)
                changed = self.table.structure_version != state[0][-1]
                why = self.table.representable(state[0]) if changed else None
            except Unrepresentable as error:
                why = str(error)
            if why is not None:
                # like an op without a rule: undo what the rule did, fix its inputs and outputs
                self._rollback(state)
                result = self.fail_closed(node, f"layout not representable ({why})")
            result = self._check(node, result)
        self.env[node] = result
        if isinstance(result, _Tensor):
            self.node_dims[node.name] = tuple(result.dims)
        for tensor_index, tensor in enumerate(_tensors_in(result)):
            # a parameter (get_attr) is not an activation: it has no samples to observe
            if tensor_index == 0 and isinstance(result, _Tensor) and node.op != "get_attr":
                for dim, layout in enumerate(tensor.dims):
                    if self.table.spaces_of(layout):
                        self.taps.append((node.name, dim, tuple(tensor.dims)))
        return result

    def _checkpoint(self) -> tuple:
        """What a rule may change: the table, new parameters, axes made opaque, roles, records."""
        return (
            self.table.checkpoint(), len(self.params), len(self._undo), dict(self.roles),
            len(self.literals), len(self.ties), len(self.channel_layouts),
        )

    def _rollback(self, state: tuple) -> None:
        table, params, undo, roles, literals, ties, channel_layouts = state
        self.table.rollback(table)
        for name in list(self.params)[params:]:
            del self.params[name]
        while len(self._undo) > undo:
            tensor, axis, layout = self._undo.pop()
            tensor.dims[axis] = layout
        self.roles = roles
        del self.literals[literals:], self.ties[ties:], self.channel_layouts[channel_layouts:]

    def _check(self, node: Node, result: Any) -> Any:
        """Guard every rule: the layouts it returns must match the recorded shapes."""
        shapes = self.meta_shape(node)
        if shapes is None:
            return result
        if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], int) or shapes == ():
            ok = isinstance(result, _Tensor) and result.shape == shapes and len(result.dims) == len(shapes)
            if ok:
                sizes = [self._layout_extent(layout) for layout in result.dims]
                ok = tuple(sizes) == tuple(shapes)
            if not ok:
                return self.fail_closed(node, "internal shape mismatch in rule")
        return result

    def _layout_extent(self, layout: Layout) -> int:
        return sum(self.table.piece_extent(p) for p in layout)

    # -- dispatch -------------------------------------------------------------------------------
    def apply_rule(self, node: Node) -> Any:
        """Run the registry rule of a call node (fail closed when the registry has none)."""
        args = self.value(node.args)
        kwargs = {k: self.value(v) for k, v in node.kwargs.items()}
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            entry = ops.module_entry(module)
            if entry is None or entry.rule is None:
                return self.fail_closed(node, f"no rule for module type {type(module).__name__}")
            return entry.rule(self, node, args, kwargs)
        if node.op == "call_method":
            if not isinstance(args[0], _Tensor):
                return None if self.meta_shape(node) is None else _opaque_like(self.meta_shape(node))
            entry = ops.method_entry(str(node.target))
            if entry is None or entry.rule is None:
                return self.fail_closed(node, "no rule for this method")
            return entry.rule(self, node, args, kwargs)
        if not any(_tensors_in((args, kwargs))):
            # Pure Python/shape arithmetic (x.shape[1] * 2, torch._assert, zeros(...)) carries no
            # channels of any input; a fresh tensor from it is a constant.
            return _opaque_like(self.meta_shape(node))
        entry = ops.function_entry(node.target)
        if entry is None or entry.rule is None:
            if not self.carries_channels((args, kwargs)):
                # no input has a free channel space (token ids, masks, position tables computed
                # from shapes): no channel order can reach the result, whatever the op computes;
                # whatever couples the result to channels pairs them with an opaque axis, which fixes them
                return _opaque_like(self.meta_shape(node))
            return self.fail_closed(node, "no rule for this function")
        return entry.rule(self, node, args, kwargs)

    def carries_channels(self, value: Any) -> bool:
        """Whether a tensor in ``value`` has a channel space that is not already fixed."""
        return any(
            self.table.fixed_reason(space) is None
            for tensor in _tensors_in(value) for layout in tensor.dims for space in self.table.spaces_of(layout)
        )

    # -- for the rules ------------------------------------------------------------------------------
    def module_of(self, node: Node) -> nn.Module:
        """The module a call_module node calls."""
        return self.modules[str(node.target)]

    def tensor(self, shape: Sequence[int], dims: Sequence[Layout]) -> _Tensor:
        """A value with these layouts, one per dim."""
        return _Tensor(tuple(shape), list(dims))

    def opaque(self, shape: Sequence[int]) -> _Tensor:
        """A value carrying no channels (every dim an opaque extent)."""
        return _opaque_tensor(shape)

    def opaque_like(self, shapes: Any) -> Any:
        """``opaque`` for a shape or a nested tuple of shapes (None stays None)."""
        return _opaque_like(shapes)

    @staticmethod
    def is_tensor(value: Any) -> bool:
        return isinstance(value, _Tensor)

    def attr_name(self, arg: Any) -> str | None:
        """The qualified name of a get_attr node argument (a parameter or buffer), else None."""
        return self._attr_name(arg)

    def layout_extent(self, layout: Layout) -> int:
        return self._layout_extent(layout)

    # -- generic rules ----------------------------------------------------------------------------
    def preserve(self, value: Any) -> Any:
        if isinstance(value, _Tensor):
            return _Tensor(value.shape, list(value.dims))
        return value

    def broadcast(self, node: Node, operands: list[Any]) -> Any:
        shape = self.meta_shape(node)
        tensors = [t for t in operands if isinstance(t, _Tensor)]
        out_dims: list[Layout] = []
        for out_dim, size in enumerate(shape):
            layouts = []
            for tensor in tensors:
                dim = out_dim - (len(shape) - tensor.ndim)
                if dim >= 0 and tensor.shape[dim] == size and size > 1:
                    layouts.append(tensor.dims[dim])
            for other in layouts[1:]:
                self.unify(layouts[0], other, node)
            out_dims.append(layouts[0] if layouts else opaque_layout(size))
        return _Tensor(tuple(shape), out_dims)

    def getitem(self, node: Node, container: Any, index: Any) -> Any:
        if isinstance(container, (tuple, list)):
            return container[index]
        if not isinstance(container, _Tensor):
            return None
        shape = self.meta_shape(node)
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, (_Tensor, list)) or (not isinstance(i, (int, slice)) and i not in (None, Ellipsis)) for i in items):
            return self.fail_closed(node, "advanced (tensor) indexing")
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + [slice(None)] * (container.ndim - explicit) + items[at + 1 :]
        items += [slice(None)] * (container.ndim - sum(1 for i in items if i is not None))
        out_dims: list[Layout] = []
        in_dim = 0
        reason = f"indexed at {node.name}"
        for item in items:
            if item is None:
                out_dims.append(opaque_layout(1))
                continue
            layout = container.dims[in_dim]
            if isinstance(item, int):
                self.table.fix_all(self.table.spaces_of(layout), reason)
            elif item == slice(None):
                out_dims.append(layout)
            else:
                self.table.fix_all(self.table.spaces_of(layout), reason)
                out_dims.append(opaque_layout(shape[len(out_dims)]))
            in_dim += 1
        return _Tensor(tuple(shape), out_dims)

    def cat(self, node: Node, tensors: Sequence[Any], dim: int) -> Any:
        tensors = [t for t in tensors if isinstance(t, _Tensor)]
        shape = self.meta_shape(node)
        dim = dim % len(shape)
        out_dims: list[Layout] = []
        for d, size in enumerate(shape):
            if d == dim:
                pieces = tuple(p for t in tensors for p in t.dims[d] if t.shape[d] > 0)
                out_dims.append(pieces)
            else:
                for t in tensors[1:]:
                    self.unify(tensors[0].dims[d], t.dims[d], node)
                out_dims.append(tensors[0].dims[d])
        return _Tensor(tuple(shape), out_dims)

    def stack(self, node: Node, tensors: Sequence[Any], dim: int) -> Any:
        tensors = [t for t in tensors if isinstance(t, _Tensor)]
        shape = self.meta_shape(node)
        dim = dim % len(shape)
        for t in tensors[1:]:
            for a, b in zip(tensors[0].dims, t.dims):
                self.unify(a, b, node)
        dims = list(tensors[0].dims)
        dims.insert(dim, opaque_layout(shape[dim]))
        return _Tensor(tuple(shape), dims)

    def reshape(self, node: Node, tensor: _Tensor, literals: bool = False) -> Any:
        """Any view/reshape; ``literals``: record its integer size arguments (``view(n, 768, -1)``)
        as shape literals that a width change rewrites."""
        out_shape = tuple(self.meta_shape(node))
        dims = self._reshape_layouts(node, tensor, out_shape)
        result = _Tensor(out_shape, dims)
        if literals:
            self._record_literals(node, result)
        return result

    def _reshape_layouts(self, node: Node, tensor: _Tensor, out_shape: tuple[int, ...]) -> list[Layout]:
        table = self.table
        in_dims = [(s, tensor.dims[i]) for i, s in enumerate(tensor.shape) if s != 1]
        out_positions = [i for i, s in enumerate(out_shape) if s != 1]
        out_sizes = [out_shape[i] for i in out_positions]
        result: list[Layout] = [opaque_layout(1)] * len(out_shape)
        i = j = 0
        while i < len(in_dims) or j < len(out_sizes):
            i0, j0 = i, j
            prod_in = in_dims[i][0] if i < len(in_dims) else 1
            prod_out = out_sizes[j] if j < len(out_sizes) else 1
            i += 1
            j += 1
            while prod_in != prod_out:
                if prod_in < prod_out:
                    prod_in *= in_dims[i][0]
                    i += 1
                else:
                    prod_out *= out_sizes[j]
                    j += 1
            merged: Layout = ((),)
            for _, layout in in_dims[i0:i]:
                merged = self._times(table.expand(merged), table.expand(layout))
            chunk = out_sizes[j0:j]
            if len(chunk) == 1:
                result[out_positions[j0]] = merged
                continue
            if len(merged) == chunk[0] > 1 and len({table.piece_extent(piece) for piece in merged}) == 1:
                # k equal pieces viewed as (k, n): a block index times ONE channel space, which
                # holds when the pieces share their permutation (ShuffleNet's cat + shuffle)
                for piece in merged[1:]:
                    self.unify((merged[0],), (piece,), node)
                merged = (normalize_piece((Opaque(len(merged)),) + table.expand((merged[0],))[0]),)
            if len(merged) != 1:
                table.fix_all(table.spaces_of(merged), f"reshape at {node.name} splits concatenated channels")
                for k, size in enumerate(chunk):
                    result[out_positions[j0 + k]] = opaque_layout(size)
                continue
            groups = table.cut(merged[0], chunk)
            if groups is None:
                table.fix_all(table.spaces_of(merged), f"reshape at {node.name} does not factor the channels")
                groups = [normalize_piece((Opaque(s),)) for s in chunk]
            for k, group in enumerate(groups):
                result[out_positions[j0 + k]] = (group,)
        return result

    def _times(self, outer: Layout, inner: Layout) -> Layout:
        return tuple(normalize_piece(p) for p in self.table._times(list(outer), list(inner)))

    def _record_literals(self, node: Node, result: _Tensor) -> None:
        """Remember integer size arguments (``node.args[1:]``, or one list of them) that equal a
        channel extent (a width change rewrites them)."""
        sizes = node.args[1:]
        base = 1
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes, base = tuple(sizes[0]), None  # type: ignore[assignment]
        for k, value in enumerate(sizes):
            if isinstance(value, int) and value > 1 and k < len(result.dims):
                layout = result.dims[k]
                if self.table.spaces_of(layout):
                    path = (1 + k,) if base is not None else (1, k)
                    self.literals.append((node.name, path, value, layout))

    def permute_dims(self, node: Node, name: str, tensor: _Tensor, rest: tuple, kwargs: dict) -> Any:
        n = tensor.ndim
        order = list(range(n))
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            dims = kwargs.get("dims", dims)
            order = [d % n for d in dims]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = (rest[0] % n, rest[1] % n) if len(rest) >= 2 else (kwargs["dim0"] % n, kwargs["dim1"] % n)
            order[a], order[b] = order[b], order[a]
        elif name == "t":
            order = order[::-1]
        else:  # movedim / moveaxis
            source, destination = (rest[0], rest[1]) if len(rest) >= 2 else (kwargs["source"], kwargs["destination"])
            source = [source] if isinstance(source, int) else list(source)
            destination = [destination] if isinstance(destination, int) else list(destination)
            source = [s % n for s in source]
            destination = [d % n for d in destination]
            remaining = [d for d in range(n) if d not in source]
            order = [-1] * n
            for s, d in zip(source, destination):
                order[d] = s
            it = iter(remaining)
            order = [o if o >= 0 else next(it) for o in order]
        return _Tensor(tuple(tensor.shape[o] for o in order), [tensor.dims[o] for o in order])

    def split(self, node: Node, tensor: _Tensor, unbind: bool = False) -> Any:
        """split/chunk (``dim`` argument 2) or, with ``unbind``, unbind (``dim`` argument 1)."""
        shapes = self.meta_shape(node)
        if unbind:
            dim = arg(node.args, node.kwargs, 1, "dim", 0) % tensor.ndim
            self.table.fix_all(self.table.spaces_of(tensor.dims[dim]), f"unbound at {node.name}")
            rest = tensor.dims[:dim] + tensor.dims[dim + 1 :]
            return tuple(_Tensor(tuple(s), list(rest)) for s in shapes)
        dim = arg(node.args, node.kwargs, 2, "dim", 0) % tensor.ndim
        sizes = [s[dim] for s in shapes]
        bounds = list(itertools_accumulate(sizes))
        layout = self.table.expand(tensor.dims[dim])
        split = self.table.split_layout(layout, bounds)
        outputs = []
        if split is None:
            self.table.fix_all(self.table.spaces_of(layout), f"split at {node.name} cuts through channels")
            return tuple(_opaque_tensor(s) for s in shapes)
        split = self.table.expand(split)
        offset = 0
        pieces = list(split)
        for shape in shapes:
            taken: list = []
            extent = 0
            while extent < shape[dim]:
                piece = pieces.pop(0)
                taken.append(piece)
                extent += self.table.piece_extent(piece)
            dims = list(tensor.dims)
            dims[dim] = tuple(taken) if taken else opaque_layout(0)
            outputs.append(_Tensor(tuple(shape), dims))
            offset += shape[dim]
        return tuple(outputs)

    def reduce(self, node: Node, tensor: _Tensor, dim: Any, name: str) -> Any:
        shape = self.meta_shape(node)
        if dim is None:
            reduced = set(range(tensor.ndim))
        else:
            reduced = {d % tensor.ndim for d in ([dim] if isinstance(dim, int) else dim)}
        keepdim = len(shape) == tensor.ndim
        dims = []
        for d in range(tensor.ndim):
            if d in reduced:
                if keepdim:
                    dims.append(opaque_layout(1))
            else:
                dims.append(tensor.dims[d])
        return _Tensor(tuple(shape), dims)

    def max_min(self, node: Node, args: tuple, kwargs: dict) -> Any:
        tensor = args[0]
        other = arg(args, kwargs, 1, "dim", None)
        if isinstance(other, _Tensor):
            return self.broadcast(node, [tensor, other])
        shapes = self.meta_shape(node)
        if other is None:
            return _opaque_like(shapes)
        values_shape = shapes[0]
        values = self.reduce(_ShapeOverride(node, values_shape), tensor, other, "max")
        self.table.fix_all(self.table.spaces_of(tensor.dims[other % tensor.ndim]), f"arg-max/min at {node.name}")
        return (values, _Tensor(tuple(values_shape), list(values.dims)))

    def spatial(self, node: Node, tensor: _Tensor, spatial_dims: int) -> Any:
        """Pooling, resizing, padding: channel and batch dims kept, spatial dims new."""
        shape = self.meta_shape(node)
        if spatial_dims < 0:
            spatial_dims = max(tensor.ndim - 2, 1)
        keep = tensor.ndim - spatial_dims
        for d in range(keep, tensor.ndim):
            self.table.fix_all(self.table.spaces_of(tensor.dims[d]), f"spatial op at {node.name}")
        dims = list(tensor.dims[:keep]) + [opaque_layout(s) for s in shape[keep:]]
        return _Tensor(tuple(shape), dims)

    def pad(self, node: Node, tensor: _Tensor, pad: Sequence[int]) -> Any:
        shape = self.meta_shape(node)
        dims = list(tensor.dims)
        for k in range(len(pad) // 2):
            d = tensor.ndim - 1 - k
            if pad[2 * k] or pad[2 * k + 1] or shape[d] != tensor.shape[d]:
                self.table.fix_all(self.table.spaces_of(dims[d]), f"padded at {node.name}")
                dims[d] = opaque_layout(shape[d])
        return _Tensor(tuple(shape), dims)

    def roll(self, node: Node, tensor: _Tensor, dims: Any) -> Any:
        if dims is None:
            return self.fail_closed(node, "roll over the flattened tensor")
        dims = [dims] if isinstance(dims, int) else list(dims)
        for d in dims:
            self.table.fix_all(self.table.spaces_of(tensor.dims[d % tensor.ndim]), f"rolled at {node.name}")
        return self.preserve(tensor)

    def expand(self, node: Node, tensor: _Tensor, literals: bool = False) -> Any:
        shape = self.meta_shape(node)
        lead = len(shape) - tensor.ndim
        dims = []
        for d, size in enumerate(shape):
            src = d - lead
            if src >= 0 and tensor.shape[src] == size:
                dims.append(tensor.dims[src])
            else:
                dims.append(opaque_layout(size))
        if literals:
            self._record_literals(node, _Tensor(tuple(shape), dims))
        return _Tensor(tuple(shape), dims)

    def matmul(self, node: Node, a: Any, b: Any) -> Any:
        if not (isinstance(a, _Tensor) and isinstance(b, _Tensor)) or a.ndim < 2 or b.ndim < 1:
            return self.fail_closed(node, "matmul of this rank")
        shape = self.meta_shape(node)
        # a parameter read through its contracted axis (x @ W, W @ x) consumes channels there
        for position, axis in ((0, a.ndim - 1), (1, max(b.ndim - 2, 0))):
            name = self._attr_name(node.args[position]) if len(node.args) > position else None
            if name is not None:
                self.set_role(name, axis, "in")
        if b.ndim == 1:
            self.unify(a.dims[-1], b.dims[0], node)
            return _Tensor(tuple(shape), list(a.dims[:-1]))
        self.unify(a.dims[-1], b.dims[-2], node)
        batch = len(shape) - 2
        dims: list[Layout] = []
        for d in range(batch):
            layouts = []
            for t in (a, b):
                src = d - (batch - (t.ndim - 2))
                if src >= 0 and t.shape[src] == shape[d] and shape[d] > 1:
                    layouts.append(t.dims[src])
            for other in layouts[1:]:
                self.unify(layouts[0], other, node)
            dims.append(layouts[0] if layouts else opaque_layout(shape[d]))
        dims += [a.dims[-2], b.dims[-1]]
        return _Tensor(tuple(shape), dims)

    def _attr_name(self, arg: Any) -> str | None:
        node = arg if isinstance(arg, Node) else None
        return str(node.target) if node is not None and node.op == "get_attr" else None

    # -- attention ----------------------------------------------------------------------------------
    def tie_heads(self, heads: int, inners: Sequence[int], embedding: Layout) -> None:
        """Record that heads x head width must equal the embedding width (the layer computes
        head_dim = embed_dim // num_heads), so a width change keeps them consistent."""
        spaces = self.table.spaces_of(embedding)
        if len(embedding) == 1 and len(spaces) == 1:
            for inner in inners:
                self.ties.append((heads, inner, spaces[0]))

    def head_spaces(self, prefix: str, heads: int, head_dim: int) -> tuple[int, int, int]:
        table = self.table
        return (
            table.new(heads, f"{prefix}:heads", "heads"),
            table.new(head_dim, f"{prefix}:qk", "head_channels"),
            table.new(head_dim, f"{prefix}:v", "head_channels"),
        )

    # -- finalisation ---------------------------------------------------------------------------------
    def finish(self) -> Analysis:
        table = self.table
        layer_channels: set[int] = set()
        for layout in self.channel_layouts:
            try:
                layer_channels.update(table.spaces_of(table.expand(layout)))
            except Unrepresentable:
                continue
        # Leaves that only ever met opaque extents (the spatial part of a Linear reading a
        # flatten, a position embedding's sequence axis) and are no layer's channels are opaque
        # extents themselves, not groups; so are leaves of size 1.
        as_opaque: set[int] = set()
        for space in table.opaque_paired:
            try:
                as_opaque.update(table.spaces_of(table.expand(((space,),))))
            except Unrepresentable:
                continue
        as_opaque -= layer_channels

        def leaf_layout(layout: Layout) -> Layout:
            return tuple(
                normalize_piece(
                    Opaque(table.sizes[f]) if not isinstance(f, Opaque) and (f in as_opaque or table.sizes[f] == 1) else f
                    for f in piece
                )
                for piece in table.expand(layout)
            )

        param_layouts: dict[str, tuple[Layout | None, ...]] = {}
        param_roles: dict[str, tuple[Role, ...]] = {}
        for name, tensor in self.params.items():
            layouts: list[Layout | None] = []
            for axis, layout in enumerate(tensor.dims):
                try:
                    expanded = leaf_layout(layout)
                except Unrepresentable:
                    table.fix_all(table.spaces_of(layout), f"{name} axis {axis} has an unrepresentable layout")
                    expanded = None
                layouts.append(expanded)
            param_layouts[name] = tuple(layouts)
            param_roles[name] = tuple(self.roles.get((name, axis), "out") for axis in range(tensor.ndim))
        leaf_fixed = table.ancestors_fixed()
        used: list[int] = []
        for layouts in param_layouts.values():
            for layout in layouts:
                for piece in layout or ():
                    for factor in piece:
                        if not isinstance(factor, Opaque) and factor not in used and table.sizes[factor] > 1:
                            used.append(factor)
        names: dict[int, str] = {}
        taken: set[str] = set()
        for space in sorted(used):
            # "conv.weight[0]" -> "conv:out": name a weight axis by its role (an embedding's or a
            # transposed conv's axes are not the (out, in) of a conv or linear layer)
            base = re.sub(
                r"^(.*)\.weight\[(\d+)\]",
                lambda m: f"{m[1]}:{param_roles.get(m[1] + '.weight', ('out',) * (int(m[2]) + 1))[int(m[2])]}",
                table.hints[space],
            )
            name, suffix = base, 1
            while name in taken:
                suffix += 1
                name = f"{base}#{suffix}"
            taken.add(name)
            names[space] = name

        def public(layout: Layout, sized: bool = False) -> tuple[tuple[str | int, ...], ...]:
            # ``sized``: a space that is no group (on no parameter axis) cannot change its width,
            # so it stands as its size (a shape literal over it, maxvit's, is then rewritten right)
            def name(f: Any) -> str | int:
                if isinstance(f, Opaque):
                    return f.size
                return names[f] if f in names else (table.sizes[f] if sized else f"?{f}")

            return tuple(tuple(name(f) for f in piece) for piece in layout)

        producers: dict[int, list[AxisRef]] = {s: [] for s in used}
        consumers: dict[int, list[AxisRef]] = {s: [] for s in used}
        for pname, layouts in param_layouts.items():
            for axis, layout in enumerate(layouts):
                if layout is None:
                    continue
                role = param_roles[pname][axis]
                ref = AxisRef(pname, axis, role, public(layout))
                for space in dict.fromkeys(f for piece in layout for f in piece if f in producers):
                    (producers if role == "out" else consumers)[space].append(ref)
        taps: dict[int, list[Tap]] = {s: [] for s in used}
        composite_taps: dict[tuple[int, ...], list[Tap]] = {}
        for node_name, dim, all_dims in self.taps:
            # A tap is usable when its dim holds exactly one group and no other dim of the tensor
            # holds a free group: then every other position is a sample aligned across models.
            try:
                expanded = table.expand(all_dims[dim])
                others = [s for d, layout in enumerate(all_dims) if d != dim for s in table.spaces_of(table.expand(layout))]
            except Unrepresentable:
                continue
            if any(s not in leaf_fixed and table.sizes[s] > 1 for s in others):
                continue
            # exactly one factor: a dim that also holds opaque extents (a flatten's channel x
            # positions) does not carry the group's n units along it
            if len(expanded) == 1 and len(expanded[0]) == 1:
                space = expanded[0][0]
                if not isinstance(space, Opaque) and space in taps:
                    taps[space].append(Tap(node_name, dim))
            elif len(expanded) == 1 and len(expanded[0]) >= 2 and all(f in taps for f in expanded[0]):
                # one dim holding a product of groups (groups x channels per group of a grouped
                # conv or GroupNorm, heads x head channels, a GroupNorm over a grouped conv's
                # output): its features, block-major, observe the product as a whole
                composite_taps.setdefault(tuple(expanded[0]), []).append(Tap(node_name, dim))
        composite_of: dict[int, list[str]] = {s: [] for s in used}
        for root in table.roots():
            structure = table.structure(root)
            if structure is None:
                continue
            for leaf in (f for piece in table.expand(((root,),)) for f in piece if not isinstance(f, Opaque)):
                if leaf in composite_of:
                    composite_of[leaf].append(table.hints[root])
        groups = tuple(
            ChannelSpace(
                name=names[s],
                size=table.sizes[s],
                producers=tuple(producers[s]),
                consumers=tuple(consumers[s]),
                taps=tuple(dict.fromkeys(taps[s])),
                fixed=s in leaf_fixed,
                reason=leaf_fixed.get(s),
                factor_of=tuple(composite_of[s]),
                kind=table.kinds[s],
            )
            for s in sorted(used)
        )
        node_layouts: dict[str, tuple[Layout | None, ...]] = {}
        for node_name, dims in self.node_dims.items():
            expanded_dims: list[Layout | None] = []
            for layout in dims:
                try:
                    expanded_dims.append(table.expand(layout))
                except Unrepresentable:
                    expanded_dims.append(None)
            node_layouts[node_name] = tuple(expanded_dims)
        literals = []
        for node_name, path, value, layout in self.literals:
            try:
                literals.append(ShapeLiteral(node_name, path, value, public(leaf_layout(layout), sized=True)))
            except Unrepresentable:
                continue
        return Analysis(
            graph_module=self.gm,
            groups=groups,
            space_ids={names[s]: s for s in used},
            space_sizes={s: table.sizes[s] for s in used},
            param_layouts=param_layouts,
            param_roles=param_roles,
            aliases=dict(self.state_names),
            shape_literals=tuple(literals),
            warnings=tuple(self.warnings),
            layer_channel_groups=frozenset(names[s] for s in used if s in layer_channels),
            node_layouts=node_layouts,
            composite_taps={
                tuple(names[f] for f in key): tuple(dict.fromkeys(found)) for key, found in composite_taps.items()
            },
            head_ties=tuple(
                (names[table.find(h)], names[table.find(i)], names[table.find(e)])
                for h, i, e in self.ties
                if all(table.find(x) in names for x in (h, i, e))
            ),
        )


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


class _ShapeOverride:
    """A stand-in node whose recorded shape is one element of a tuple output."""

    def __init__(self, node: Node, shape: Sequence[int]) -> None:
        self.name = node.name
        self.meta = {"tensor_meta": _FakeMeta(tuple(shape))}


@dataclass
class _FakeMeta:
    shape: tuple[int, ...]


def itertools_accumulate(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        total += s
        out.append(total)
    return out


def _is_parameter(gm: GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _shapes_of(meta: Any) -> Any:
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (list, tuple)):
        return tuple(_shapes_of(m) for m in meta)
    if isinstance(meta, dict):
        return None
    return None


def _opaque_like(shapes: Any) -> Any:
    if shapes is None:
        return None
    if isinstance(shapes, tuple) and all(isinstance(s, int) for s in shapes):
        return _opaque_tensor(shapes)
    return tuple(_opaque_like(s) for s in shapes)


def _tensors_in(value: Any) -> list[_Tensor]:
    if isinstance(value, _Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


def _flatten_args(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _flatten_args(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _flatten_args(v)]
    return [value]


def state_name_map(model: nn.Module) -> dict[str, str]:
    """Every state_dict key (and parameter alias) -> the canonical key of the tensor it holds.

    Tied parameters (one tensor under several names) map to one canonical name, so the analysis
    couples them and the rewrite transforms them once.
    """
    canonical_by_tensor: dict[int, str] = {}
    names: dict[str, str] = {}
    state_keys = set(model.state_dict().keys())
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if name not in state_keys:
            continue  # non-persistent buffer: not part of the model's state, treated as constant
        canonical = canonical_by_tensor.setdefault(id(tensor), name)
        names[name] = canonical
    return names


def analyze_graph(gm: GraphModule, state_names: dict[str, str], strict: bool = False) -> Analysis:
    """Run the dependency analysis on a traced, shape-annotated GraphModule."""
    analyzer = _Analyzer(gm, state_names, strict)
    analyzer.run()
    analysis = analyzer.finish()
    # like ShapeProp's ``tensor_meta``: each node's layouts in leaf space ids (see ``Analysis``)
    for node in gm.graph.nodes:
        if node.name in analysis.node_layouts:
            node.meta["fxmerge_layouts"] = analysis.node_layouts[node.name]
        else:
            node.meta.pop("fxmerge_layouts", None)
    return analysis



def analyze(
    model: nn.Module,
    example_input: Any,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    capture: str = "auto",
) -> Analysis:
    """Capture ``model`` and find its channel spaces (groups). The model itself is not modified.

    Args:
        model: a module torch.fx or torch.export can capture (``fxmerge.trace``).
        example_input: an input batch — a (N, C, H, W) tensor, a tuple of positional tensors or a
            dict of keyword tensors (``input_ids=...``) —, used to record shapes.
        strict: raise ``UnsupportedOpError`` on an op without a rule instead of fixing its
            channels with a warning.
        leaf_modules: extra module types or paths to keep opaque (their channels become fixed).
        capture: "auto" | "fx" | "export" (``fxmerge.trace``).
    """
    from fxmerge.trace import trace

    gm = trace(model, example_input, leaf_modules, capture)
    return analyze_graph(gm, state_name_map(model), strict)
