"""Union-find over channel spaces, with product and sum structure (the algebra of the analysis).

A *space* is an id with a size. ``union`` says two spaces are one (they share every
permutation). A space can be refined into a row-major product of smaller spaces (attention heads:
``E = heads x head_dim``; GroupNorm: ``C = groups x channels_per_group``) or into a direct sum
(``torch.split``). The permutations then allowed on it are the Kronecker products (or block
diagonals) of its children's permutations. Only *leaves* — roots without structure — get a
permutation of their own.

Everything here is pure bookkeeping; the rules that decide *what* to unify live in
``dependency.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fxmerge.groups import Factor, Layout, Opaque, Piece


class Unrepresentable(Exception):
    """A layout that pieces of products cannot express; the caller fails closed."""


def extent(factor: Factor, sizes: Sequence[int]) -> int:
    return factor.size if isinstance(factor, Opaque) else sizes[factor]


def normalize_piece(factors: Iterable[Factor]) -> Piece:
    """Drop unit extents and fuse neighbouring opaque extents (so equal layouts compare equal)."""
    out: list[Factor] = []
    for factor in factors:
        if isinstance(factor, Opaque):
            if factor.size == 1:
                continue
            if out and isinstance(out[-1], Opaque):
                out[-1] = Opaque(out[-1].size * factor.size)
                continue
        out.append(factor)
    return tuple(out)


def opaque_layout(size: int) -> Layout:
    return (normalize_piece((Opaque(size),)),)


class SpaceTable:
    """Union-find of channel spaces with structure and fixed flags."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.sizes: list[int] = []
        self.hints: list[str] = []
        self.kinds: list[str] = []
        self._fixed: dict[int, str] = {}
        # root id -> ("prod" | "sum", child ids); children are ids, resolve with find()
        self._structure: dict[int, tuple[str, tuple[int, ...]]] = {}
        # spaces paired index by index with an opaque extent (a flatten's spatial positions, a
        # sequence axis): fixed, and not channels unless a layer says otherwise (see finish())
        self.opaque_paired: list[int] = []
        # bumped whenever a direct sum is created or a structure moved by a union: only then can
        # a layout become unrepresentable (see ``representable``)
        self.structure_version = 0
        self._restructured: list[int] = []  # the roots whose structure was set, in order

    # -- basic union-find -------------------------------------------------------------------
    def new(self, size: int, hint: str, kind: str = "channels") -> int:
        self._parent.append(len(self._parent))
        self.sizes.append(size)
        self.hints.append(hint)
        self.kinds.append(kind)
        return len(self._parent) - 1

    def find(self, space: int) -> int:
        root = space
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[space] != root:  # path compression
            self._parent[space], space = root, self._parent[space]
        return root

    def fix(self, space: int, reason: str) -> None:
        self._fixed.setdefault(self.find(space), reason)

    def fixed_reason(self, space: int) -> str | None:
        return self._fixed.get(self.find(space))

    def structure(self, space: int) -> tuple[str, tuple[int, ...]] | None:
        return self._structure.get(self.find(space))

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            reason = f"coupled axes of different sizes ({self.hints[ra]}, {self.hints[rb]})"
            self.fix_all([ra, rb], reason)
            return
        keep, drop = min(ra, rb), max(ra, rb)
        self._parent[drop] = keep
        if self.kinds[keep] == "channels":
            self.kinds[keep] = self.kinds[drop]
        if drop in self._fixed:
            self._fixed.setdefault(keep, self._fixed.pop(drop))
        dropped = self._structure.pop(drop, None)
        kept = self._structure.get(keep)
        if dropped is not None or kept is not None:
            # a composite now stands where a space of the other side was (maybe inside a product)
            self.structure_version += 1
            self._restructured.append(keep)
        if dropped is None:
            return
        if kept is None:
            self._structure[keep] = dropped
            return
        child_sizes = lambda s: [self.sizes[self.find(c)] for c in s[1]]  # noqa: E731
        if kept[0] == dropped[0] and child_sizes(kept) == child_sizes(dropped):
            for x, y in zip(kept[1], dropped[1]):
                self.union(x, y)
        else:
            # Two incompatible refinements of one space: only the identity satisfies both.
            reason = f"incompatible structures on {self.hints[keep]}"
            self.fix_all([keep], reason)
            self.fix_all(dropped[1], reason)

    def fix_all(self, spaces: Iterable[int], reason: str) -> None:
        """Fix spaces and every space they are refined into."""
        stack = list(spaces)
        while stack:
            root = self.find(stack.pop())
            if root in self._fixed and root not in self._structure:
                continue
            self._fixed.setdefault(root, reason)
            structure = self._structure.get(root)
            if structure is not None:
                stack.extend(c for c in structure[1] if self.find(c) not in self._fixed)

    # -- refinement ---------------------------------------------------------------------------
    def _refine(self, space: int, kind: str, child_sizes: Sequence[int], hint: str) -> tuple[int, ...]:
        root = self.find(space)
        assert root not in self._structure, "refine only leaves"
        children = tuple(
            self.new(size, f"{self.hints[root]}{hint}{i}", self.kinds[root]) for i, size in enumerate(child_sizes)
        )
        self._structure[root] = (kind, children)
        if kind == "sum":
            # only a direct sum can make a product above it unrepresentable (fresh children of a
            # product have no structure yet)
            self.structure_version += 1
            self._restructured.append(root)
        if root in self._fixed:
            self.fix_all(children, self._fixed[root])
        return children

    def split_product(self, space: int, outer: int, inner: int) -> tuple[int, int]:
        """Refine leaf ``space`` (size outer*inner) into outer x inner, row-major."""
        return self._refine(space, "prod", (outer, inner), "/x")  # type: ignore[return-value]

    def split_sum(self, space: int, sizes: Sequence[int]) -> tuple[int, ...]:
        """Refine leaf ``space`` into consecutive blocks of the given sizes."""
        return self._refine(space, "sum", sizes, "/part")

    # -- transactions ----------------------------------------------------------------------------
    def checkpoint(self) -> tuple:
        """The table's state, for ``rollback`` (an op whose rule leaves it unrepresentable)."""
        return (
            len(self._parent), list(self._parent), list(self.kinds), dict(self._fixed), dict(self._structure),
            len(self.opaque_paired), len(self._restructured), self.structure_version,
        )

    def rollback(self, state: tuple) -> None:
        """Restore the state of ``checkpoint``: spaces created since then are forgotten."""
        count, parent, kinds, fixed, structure, paired, restructured, _ = state
        self._parent, self.kinds = parent, kinds
        del self.sizes[count:], self.hints[count:]
        self._fixed, self._structure = fixed, structure
        del self.opaque_paired[paired:], self._restructured[restructured:]

    def representable(self, state: tuple) -> str | None:
        """None when every composite space restructured since ``state`` (a ``checkpoint``) and
        every composite above them still expands into pieces of leaf products; otherwise why not
        (a direct sum nested inside a product below a permuted outer factor)."""
        parents: dict[int, list[int]] = {}
        for root, (_, children) in self._structure.items():
            for child in children:
                parents.setdefault(self.find(child), []).append(root)
        todo = [self.find(r) for r in self._restructured[state[-2] :]]
        seen: set[int] = set()
        while todo:
            root = todo.pop()
            if root not in seen:
                seen.add(root)
                todo.extend(self.find(p) for p in parents.get(root, ()))
        for root in sorted(seen):
            if root not in self._structure:
                continue
            try:
                self.expand(((root,),))
            except Unrepresentable as error:
                return f"{error} ({self.hints[root]})"
        return None

    def roots(self) -> list[int]:
        return [s for s in range(len(self._parent)) if self._parent[s] == s]

    def leaves(self) -> list[int]:
        return [s for s in self.roots() if s not in self._structure]

    def ancestors_fixed(self) -> dict[int, str]:
        """Fixed reason of every leaf that is fixed itself or through a fixed composite parent."""
        result: dict[int, str] = {}

        def visit(space: int, inherited: str | None) -> None:
            root = self.find(space)
            reason = self._fixed.get(root) or inherited
            structure = self._structure.get(root)
            if structure is None:
                if reason is not None:
                    result.setdefault(root, reason)
                return
            for child in structure[1]:
                visit(child, reason)

        for root in self.roots():
            visit(root, None)
        return result

    # -- layouts ------------------------------------------------------------------------------
    def expand(self, layout: Layout) -> Layout:
        """Rewrite a layout in leaf spaces only (resolving unions, products and sums).

        Raises Unrepresentable when a sum sits inside a product below a non-opaque outer factor.
        """
        pieces: list[Piece] = []
        for piece in layout:
            pieces.extend(self._expand_piece(piece))
        return tuple(normalize_piece(p) for p in pieces)

    def _expand_piece(self, piece: Piece) -> list[Piece]:
        result: list[Piece] = [()]
        for factor in piece:
            if isinstance(factor, Opaque):
                sub: list[Piece] = [(factor,)]
            else:
                root = self.find(factor)
                structure = self._structure.get(root)
                if structure is None:
                    sub = [(root,)]
                elif structure[0] == "prod":
                    sub = self._expand_piece(structure[1])
                else:
                    sub = []
                    for child in structure[1]:
                        sub.extend(self._expand_piece((child,)))
            result = self._times(result, sub)
        return result

    def _times(self, outer: list[Piece], inner: list[Piece]) -> list[Piece]:
        """Row-major product of two sums of pieces."""
        if len(inner) == 1:
            return [p + inner[0] for p in outer]
        out: list[Piece] = []
        for p in outer:
            if any(not isinstance(f, Opaque) for f in p):
                raise Unrepresentable("a split space nested inside a permuted outer factor")
            repeats = 1
            for f in p:
                repeats *= f.size  # type: ignore[union-attr]
            if repeats > 4096:
                raise Unrepresentable("too many pieces")
            for _ in range(repeats):
                out.extend(inner)
        return out

    def piece_extent(self, piece: Piece) -> int:
        total = 1
        for factor in piece:
            total *= extent(factor, self.sizes)
        return total

    def cut(self, piece: Piece, wanted: Sequence[int]) -> list[Piece] | None:
        """Split one leaf-level piece into consecutive sub-products of the ``wanted`` extents.

        A factor straddling a boundary is refined (space) or divided (opaque). Returns None when
        the extents do not divide (the caller then fails closed).
        """
        factors = list(piece)
        out: list[Piece] = []
        index = 0
        for want in wanted:
            group: list[Factor] = []
            remaining = want
            while remaining > 1:
                if index >= len(factors):
                    return None
                factor = factors[index]
                size = extent(factor, self.sizes)
                if size <= remaining:
                    if remaining % size:
                        return None
                    group.append(factor)
                    remaining //= size
                    index += 1
                else:
                    if size % remaining:
                        return None
                    if isinstance(factor, Opaque):
                        outer, inner = Opaque(remaining), Opaque(size // remaining)
                    else:
                        outer, inner = self.split_product(factor, remaining, size // remaining)
                    group.append(outer)
                    factors[index] = inner
                    remaining = 1
            out.append(normalize_piece(group))
        if index != len(factors):
            return None
        return out

    def split_layout(self, layout: Layout, boundaries: Sequence[int]) -> Layout | None:
        """Re-cut a leaf-level layout so that piece boundaries fall at every offset in ``boundaries``.

        A piece whose outermost factor is a space is split into a direct sum of that space;
        an opaque outermost factor is divided. Returns None when impossible.
        """
        pieces: list[Piece] = []
        offset = 0
        cuts = sorted(set(boundaries))
        for piece in layout:
            size = self.piece_extent(piece)
            inside = [c - offset for c in cuts if offset < c < offset + size]
            offset += size
            if not inside:
                pieces.append(piece)
                continue
            if not piece:
                return None
            head, tail = piece[0], piece[1:]
            inner = self.piece_extent(tail)
            if any(c % inner for c in inside):
                return None
            points = [0] + [c // inner for c in inside] + [extent(head, self.sizes)]
            block_sizes = [b - a for a, b in zip(points, points[1:])]
            if isinstance(head, Opaque):
                heads: Sequence[Factor] = [Opaque(s) for s in block_sizes]
            else:
                heads = self.split_sum(head, block_sizes)
            pieces.extend(normalize_piece((h,) + tail) for h in heads)
        return tuple(pieces)

    def spaces_of(self, layout: Layout) -> list[int]:
        return [f for piece in layout for f in piece if not isinstance(f, Opaque)]

    def unify(self, a: Layout, b: Layout, reason: str) -> None:
        """Make two axis layouts of equal total extent carry the same channels index by index."""
        try:
            ea, eb = self.expand(a), self.expand(b)
            if ea == eb:
                return
            if [self.piece_extent(p) for p in ea] != [self.piece_extent(p) for p in eb]:
                bounds = self._boundaries(ea) | self._boundaries(eb)
                sa, sb = self.split_layout(ea, sorted(bounds)), self.split_layout(eb, sorted(bounds))
                if sa is None or sb is None:
                    raise Unrepresentable("piece boundaries do not align")
                ea, eb = self.expand(sa), self.expand(sb)
            for pa, pb in zip(ea, eb):
                self._unify_piece(pa, pb, reason)
        except Unrepresentable:
            self.fix_all(self.spaces_of(a) + self.spaces_of(b), f"{reason}: layouts cannot be aligned")

    def _boundaries(self, layout: Layout) -> set[int]:
        bounds, offset = set(), 0
        for piece in layout:
            offset += self.piece_extent(piece)
            bounds.add(offset)
        return bounds

    def _leaf_factors(self, piece: Piece) -> Piece:
        """A one-piece layout in leaf spaces, unit extents dropped, opaque extents left unfused."""
        out: list[Factor] = []
        for factor in piece:
            if isinstance(factor, Opaque):
                sub: Sequence[Factor] = (factor,)
            else:
                expanded = self._expand_piece((factor,))
                if len(expanded) != 1:
                    raise Unrepresentable("a split space inside a product")
                sub = expanded[0]
            out.extend(f for f in sub if extent(f, self.sizes) > 1)
        return tuple(out)

    def _unify_piece(self, a: Piece, b: Piece, reason: str) -> None:
        # Refine both factor lists to common extents (row-major), then pair factor by factor.
        for _ in range(16):
            a, b = self._leaf_factors(a), self._leaf_factors(b)
            extents_a = [extent(f, self.sizes) for f in a]
            extents_b = [extent(f, self.sizes) for f in b]
            if extents_a == extents_b:
                for fa, fb in zip(a, b):
                    self._pair(fa, fb, reason)
                return
            common = _common_refinement(extents_a, extents_b)
            if common is None:
                raise Unrepresentable("factor extents do not divide")
            cut_a, cut_b = self.cut(a, common), self.cut(b, common)
            if cut_a is None or cut_b is None:
                raise Unrepresentable("factor extents do not divide")
            a = tuple(f for group in cut_a for f in group)
            b = tuple(f for group in cut_b for f in group)
        raise Unrepresentable("refinement did not converge")

    def _pair(self, a: Factor, b: Factor, reason: str) -> None:
        a_opaque, b_opaque = isinstance(a, Opaque), isinstance(b, Opaque)
        if a_opaque and b_opaque:
            return
        if a_opaque:
            self.fix_all([b], f"{reason} to a non-channel axis")  # type: ignore[list-item]
            self.opaque_paired.append(b)  # type: ignore[arg-type]
        elif b_opaque:
            self.fix_all([a], f"{reason} to a non-channel axis")
            self.opaque_paired.append(a)
        else:
            self.union(a, b)


def _common_refinement(a: Sequence[int], b: Sequence[int]) -> list[int] | None:
    """Extents that refine both row-major factorizations, e.g. (6, 4) and (2, 12) -> (2, 3, 4)."""
    a, b = list(a), list(b)
    out: list[int] = []
    i = j = 0
    while i < len(a) and j < len(b):
        x, y = a[i], b[j]
        if x == y:
            out.append(x)
            i += 1
            j += 1
        elif x < y:
            if y % x:
                return None
            out.append(x)
            b[j] = y // x
            i += 1
        else:
            if x % y:
                return None
            out.append(y)
            a[i] = x // y
            j += 1
    return out if i == len(a) and j == len(b) else None
