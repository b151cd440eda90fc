"""Data types shared by the passes: axis layouts, channel spaces (groups) and their references.

Layout vocabulary. Every tensor axis (of an activation or of a parameter) is described by a
``Layout``: a tuple of *pieces* laid end to end (``torch.cat`` makes several pieces), each piece
a row-major product of *factors*. A factor is either a channel space, named by an ``int`` id, or
an ``Opaque(size)`` extent that is never permuted (batch, spatial positions, model inputs).

Examples, for a group ``g`` of 64 channels:
    conv weight dim 0                  ((g,),)
    Linear reading flatten(C=64, 7x7)  ((g, Opaque(49)),)         channel c -> c*49 .. c*49+48
    cat([a, b], dim=1)                 ((a,), (b,))
    in_proj rows of attention          ((h, dqk), (h, dqk), (h, dv))   q, k and v blocks
A permutation of every space acts on an axis as the Kronecker product of the factor
permutations inside each piece, block-diagonally over pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Opaque:
    """An extent of ``size`` indices that is never permuted or resized."""

    size: int


Factor = int | Opaque
Piece = tuple[Factor, ...]
Layout = tuple[Piece, ...]
Role = Literal["out", "in"]


def layout_size(layout: Layout, sizes: "list[int] | dict[int, int]") -> int:
    """Number of indices an axis with this layout has, given the size of every space."""
    total = 0
    for piece in layout:
        extent = 1
        for factor in piece:
            extent *= factor.size if isinstance(factor, Opaque) else sizes[factor]
        total += extent
    return total


def spaces_in(layout: Layout) -> list[int]:
    """The space ids a layout mentions, in order of first appearance."""
    seen: list[int] = []
    for piece in layout:
        for factor in piece:
            if not isinstance(factor, Opaque) and factor not in seen:
                seen.append(factor)
    return seen


@dataclass(frozen=True)
class AxisRef:
    """One axis of one parameter/buffer that a channel space appears in.

    ``role`` is "out" when the tensor *produces* values in the space along this axis (conv weight
    dim 0, biases, norm vectors, class tokens: transformed by the merge matrix M) and "in" when
    it *reads* them (conv/linear weight dim 1: transformed by the unmerge matrix U).
    ``layout`` is the whole axis in group names and opaque sizes: the index map. For example
    ``(("stage3.conv2:out", 4),)`` says channel c of the group owns indices c*4 .. c*4+3.
    """

    param: str
    axis: int
    role: Role
    layout: tuple[tuple[str | int, ...], ...]


@dataclass(frozen=True)
class Tap:
    """A graph node whose output carries a group's channels along ``dim`` (observed for statistics)."""

    node: str
    dim: int


@dataclass(frozen=True)
class ShapeLiteral:
    """An integer argument baked into the graph that equals the extent of channel spaces.

    A width change must rewrite it: ``node``'s argument at ``path`` (indices into args, or a
    keyword name first) holds ``value`` = product of the sizes of ``layout``'s factors.
    """

    node: str
    path: tuple[int | str, ...]
    value: int
    layout: tuple[tuple[str | int, ...], ...]


@dataclass(frozen=True)
class ChannelSpace:
    """A group: a set of axes that must be permuted (or zipped) together, with one size.

    ``factor_of`` names the composite structures this group is part of: e.g. the head index of
    an attention layer is a group of size ``num_heads`` and a factor of the q/k and v channel
    structures; a GroupNorm's channels factor into (groups x channels per group).
    """

    name: str
    size: int
    producers: tuple[AxisRef, ...]
    consumers: tuple[AxisRef, ...]
    taps: tuple[Tap, ...]
    fixed: bool
    reason: str | None = None
    factor_of: tuple[str, ...] = field(default=())
    kind: str = "channels"
