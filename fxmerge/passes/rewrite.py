"""The weight-rewrite core: apply per-channel-space transforms to every parameter axis.

A transform for a space of size n is either a permutation (1-D LongTensor ``index`` of length n:
new[i] = old[index[i]]) or a dense matrix (r, n) applied along the axis (new = A @ old). For a
parameter axis whose layout is a product of factors, each factor is transformed on its own
(Kronecker structure: never materialise the (r*49) x (n*49) matrix of a flatten), and pieces of
a concatenation are transformed block by block.

Roles: on an "out" axis the caller passes M (r, n); on an "in" axis U^T (r, n), so that
W* = M W U for a weight (out, in). For a permutation both are the same index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fxmerge.groups import Layout, Opaque

@dataclass(frozen=True, repr=False)
class ClusterMap:
    """A transform (r, n) with at most one nonzero entry per column, as index arrays: what the
    merge (M_k) and unmerge (U_k^T) matrices of a clustering are. ``new[c] = sum over the units j
    with rows[j] == c of weights[j] * old[j]``; applied with one gather and one ``index_add_``
    (O(tensor) work) instead of a dense (r, n) product over the whole tensor.

    ``columns``, ``rows`` (m,) int64 and ``weights`` (m,) float64: the nonzero entries. When every
    row has exactly one entry (a cross-model pair's M_k: weight 1/2 at its unit; a permutation)
    ``order`` (r,) int64 holds them row by row and the map is a gather, ``new = old[order] *
    row_weights`` (``row_weights`` None when they are all 1): no zeros and no scatter. Otherwise,
    when every column has its entry (every unit of the model is in a cluster, as in U_k^T),
    ``column_rows`` (n,) int64 holds each column's row and the map is one scatter of the whole
    tensor, ``new.index_add_(column_rows, old * column_weights)`` (``column_weights`` None when
    they are all 1): no gather. Both forms add each row's terms in ascending column order, as
    the general gather-and-scatter does, so they give its bits.
    """

    rows: torch.Tensor
    columns: torch.Tensor
    weights: torch.Tensor
    width: int
    order: torch.Tensor | None
    row_weights: torch.Tensor | None = None
    column_rows: torch.Tensor | None = None
    column_weights: torch.Tensor | None = None

    @staticmethod
    def of(matrix: torch.Tensor) -> "ClusterMap | torch.Tensor":
        """The ClusterMap of a dense (r, n) matrix, or the matrix itself when a column has two
        or more nonzero entries."""
        nonzero = matrix != 0
        if bool((nonzero.sum(dim=0) > 1).any()):
            return matrix
        rows, columns = nonzero.nonzero(as_tuple=True)  # row-major: rows ascending
        return ClusterMap._of_entries(rows, columns, matrix[rows, columns].to(torch.float64), int(matrix.shape[0]))

    @staticmethod
    def of_assignment(clusters: np.ndarray, weights: np.ndarray | None, width: int) -> "ClusterMap":
        """The map (width, n) with entry ``weights[j]`` (1 when None) at (clusters[j], j) for every
        unit j with clusters[j] >= 0: what ``of`` gives for that dense matrix, without making it."""
        units = np.flatnonzero(clusters >= 0) if weights is None else np.flatnonzero((clusters >= 0) & (weights != 0))
        rows = clusters[units]
        order = np.lexsort((units, rows))  # row-major, as a dense matrix's nonzero entries
        rows, columns = torch.from_numpy(rows[order].astype(np.int64)), torch.from_numpy(units[order].astype(np.int64))
        values = torch.ones(len(columns), dtype=torch.float64) if weights is None else torch.from_numpy(
            np.ascontiguousarray(weights[units[order]], dtype=np.float64))
        return ClusterMap._of_entries(rows, columns, values, int(width))

    @staticmethod
    def _of_entries(rows: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor, width: int) -> "ClusterMap":
        """The map of nonzero entries given row-major; a selection when every row has one."""
        order = row_weights = column_rows = column_weights = None
        ones = bool((weights == 1).all())
        if len(rows) == width and bool((rows == torch.arange(width, device=rows.device)).all()):
            order = columns
            row_weights = None if ones else weights
        elif len(columns) and int(columns.max()) + 1 == len(columns):  # columns distinct: 0 .. m - 1
            by_column = torch.argsort(columns)
            column_rows = rows[by_column]
            column_weights = None if ones else weights[by_column]
        return ClusterMap(rows, columns, weights, width, order, row_weights, column_rows, column_weights)

    def __repr__(self) -> str:
        kind = "selection" if self.order is not None else "scatter" if self.column_rows is not None else "clusters"
        return f"ClusterMap({kind}, {len(self.columns)} entries -> {self.width})"


Transform = torch.Tensor | ClusterMap  # (n,) long index, (r, n) floating matrix, or a ClusterMap


def _apply_factor(segment: torch.Tensor, dim: int, transform: Transform) -> torch.Tensor:
    if isinstance(transform, torch.Tensor) and transform.dim() == 2:
        # a dense matrix given by a caller: its ClusterMap when it is one (callers that apply one
        # transform many times pass the ClusterMap, made once)
        transform = ClusterMap.of(transform)
    if isinstance(transform, ClusterMap):
        device = segment.device
        shape = [1] * segment.dim()
        shape[dim] = -1
        if transform.order is not None:
            picked = segment.index_select(dim, transform.order.to(device))
            if transform.row_weights is not None:
                picked.mul_(transform.row_weights.to(device=device, dtype=segment.dtype).reshape(shape))
            return picked
        out_shape = list(segment.shape)
        out_shape[dim] = transform.width
        if transform.column_rows is not None and transform.column_rows.numel() == segment.shape[dim]:
            source = segment
            if transform.column_weights is not None:
                source = segment * transform.column_weights.to(device=device, dtype=segment.dtype).reshape(shape)
            return segment.new_zeros(out_shape).index_add_(dim, transform.column_rows.to(device), source)
        picked = segment.index_select(dim, transform.columns.to(device))
        picked.mul_(transform.weights.to(device=device, dtype=segment.dtype).reshape(shape))
        return segment.new_zeros(out_shape).index_add_(dim, transform.rows.to(device), picked)
    if transform.dim() == 1:
        return segment.index_select(dim, transform.to(segment.device))
    moved = segment.movedim(dim, -1)
    result = moved @ transform.to(device=segment.device, dtype=segment.dtype).T
    return result.movedim(-1, dim)


def _piece_transformed(piece: tuple, transforms: Mapping) -> bool:
    if any(not isinstance(f, Opaque) and f in transforms for f in piece):
        return True
    return any(tuple(piece[k : k + 2]) in transforms for k in range(len(piece) - 1))


def transform_axis(
    tensor: torch.Tensor, axis: int, layout: Layout, transforms: Mapping, sizes: Mapping[int, int]
) -> torch.Tensor:
    """Transform ``tensor`` along ``axis`` whose indices are laid out by ``layout``.

    Args:
        tensor: any shape; ``tensor.shape[axis]`` equals the layout's extent under ``sizes``.
        layout: leaf-level layout (pieces of factors).
        transforms: space id (or a tuple of two consecutive space ids: a composite) -> Transform;
            spaces without one are left as they are.
        sizes: space id -> current size n (the input extent of every space in the layout).

    Returns:
        The tensor with ``axis`` of extent sum over pieces of prod(new factor sizes).
    """
    if not any(_piece_transformed(piece, transforms) for piece in layout):
        return tensor
    outputs = []
    offset = 0
    for piece in layout:
        extents = [f.size if isinstance(f, Opaque) else sizes[f] for f in piece]
        extent = 1
        for e in extents:
            extent *= e
        segment = tensor.narrow(axis, offset, extent)
        offset += extent
        if _piece_transformed(piece, transforms):
            # Split the axis into its factors; a transform keyed by two consecutive factors (a
            # composite such as heads x head-channels) acts on both at once.
            shape = list(segment.shape)
            units: list[int] = []
            k = 0
            while k < len(piece):
                pair = tuple(piece[k : k + 2])
                if len(pair) == 2 and pair in transforms:
                    units.append(extents[k] * extents[k + 1])
                    k += 2
                else:
                    units.append(extents[k])
                    k += 1
            segment = segment.reshape(shape[:axis] + units + shape[axis + 1 :])
            k = position = 0
            while k < len(piece):
                pair = tuple(piece[k : k + 2])
                if len(pair) == 2 and pair in transforms:
                    segment = _apply_factor(segment, axis + position, transforms[pair])
                    k += 2
                else:
                    if not isinstance(piece[k], Opaque) and piece[k] in transforms:
                        segment = _apply_factor(segment, axis + position, transforms[piece[k]])
                    k += 1
                position += 1
            new_shape = list(segment.shape)
            segment = segment.reshape(new_shape[:axis] + [-1] + new_shape[axis + len(units) :])
        outputs.append(segment)
    if offset != tensor.shape[axis]:
        raise ValueError(f"layout extent {offset} does not match axis {axis} of size {tensor.shape[axis]}")
    return torch.cat(outputs, dim=axis) if len(outputs) > 1 else outputs[0]


def transform_tensor(
    tensor: torch.Tensor,
    layouts: tuple[Layout | None, ...],
    roles: tuple[str, ...],
    out_transforms: Mapping[int, Transform],
    in_transforms: Mapping[int, Transform],
    sizes: Mapping[int, int],
) -> torch.Tensor:
    """Transform every axis of one parameter: "out" axes by ``out_transforms``, "in" by ``in_transforms``."""
    result = tensor
    for axis, (layout, role) in enumerate(zip(layouts, roles)):
        if layout is None:
            continue
        chosen = out_transforms if role == "out" else in_transforms
        result = transform_axis(result, axis, layout, chosen, sizes)
    return result


def transform_state_dict(
    state: Mapping[str, torch.Tensor],
    param_layouts: Mapping[str, tuple[Layout | None, ...]],
    param_roles: Mapping[str, tuple[str, ...]],
    aliases: Mapping[str, str],
    out_transforms: Mapping[int, Transform],
    in_transforms: Mapping[int, Transform],
    sizes: Mapping[int, int],
) -> dict[str, torch.Tensor]:
    """A new state dict with every analysed parameter transformed (tied names transformed once).

    The module versions that ``state_dict()`` records in ``_metadata`` are kept: some modules
    (torchvision's MNASNet, BatchNorm of old checkpoints) read them in ``load_state_dict``.
    """
    done: dict[str, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = OrderedDict()
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]
    for key, value in state.items():
        canonical = aliases.get(key, key)
        if canonical not in param_layouts:
            result[key] = value.clone()
            continue
        if canonical not in done:
            done[canonical] = transform_tensor(
                value, param_layouts[canonical], param_roles[canonical], out_transforms, in_transforms, sizes
            )
        result[key] = done[canonical]
    return result


def _update_layer_attributes(module: torch.nn.Module) -> None:
    """Keep a layer's size attributes consistent with its (possibly resized) parameters."""
    from fxmerge import ops

    ops.update_attributes(module)  # each registry entry's ``resize`` (out_channels, num_features, ...)


def load_state_resizing(gm: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put ``state`` into ``gm``, replacing parameters/buffers whose shapes changed.

    ``load_state_dict`` refuses new shapes; a width change needs them, so each tensor is set on
    its owning module (as a new ``nn.Parameter`` where it was one) and layer size attributes
    (``out_channels``, ``in_features``, ``num_features``, ``normalized_shape``…) follow.
    """
    from torch import nn

    touched: set[str] = set()
    created: dict[int, nn.Parameter] = {}  # one new Parameter per tensor: tied names stay tied
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters and owner._parameters[attr] is not None:
            old = owner._parameters[attr]
            if id(value) not in created:
                created[id(value)] = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
            owner._parameters[attr] = created[id(value)]
        elif attr in owner._buffers:
            owner._buffers[attr] = value.detach().clone()
        else:
            setattr(owner, attr, value.detach().clone())
        touched.add(owner_name)
    for name in touched:
        _update_layer_attributes(gm.get_submodule(name) if name else gm)


def rewrite_shape_literals(gm: torch.fx.GraphModule, literals, sizes_by_name: Mapping[str, int]) -> int:
    """Set every recorded integer size argument to the extent its layout has at the new widths.

    ``literals``: ``ShapeLiteral``s of the reference analysis; ``sizes_by_name``: group name ->
    merged width. Returns the number of arguments changed.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for literal in literals:
        node = nodes.get(literal.node)
        if node is None:
            continue
        value = sum(
            _product(factor if isinstance(factor, int) else sizes_by_name[factor] for factor in piece)
            for piece in literal.layout
        )
        if value == literal.value:
            continue
        node.args = _replace_at(node.args, literal.path, value) if isinstance(literal.path[0], int) else node.args
        if isinstance(literal.path[0], str):
            kwargs = dict(node.kwargs)
            kwargs[literal.path[0]] = _replace_at(kwargs[literal.path[0]], literal.path[1:], value)
            node.kwargs = kwargs
        changed += 1
    return changed


def _product(values) -> int:
    total = 1
    for v in values:
        total *= v
    return total


def _replace_at(container, path, value):
    if not path:
        return value
    items = list(container)
    items[path[0]] = _replace_at(items[path[0]], path[1:], value)
    return type(container)(items) if not isinstance(container, list) else items
