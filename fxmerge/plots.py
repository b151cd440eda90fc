"""Figures of a merge: the depth alignment (CKA matrix with its segmentation) and the groups.

matplotlib is imported only inside the functions, with the object-oriented Agg canvas (no pyplot,
no global backend switch), so ``import fxmerge`` works without matplotlib and plotting works on
a machine without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxmerge.errors import ConfigError

__all__ = ["GroupsPlot", "groups_plot", "loss_landscape", "plot_accuracy", "plot_alignment", "plot_groups"]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("fxmerge.plots needs matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_alignment(alignment: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``alignment.cka`` (deep units as rows, shallow units as columns) with its segmentation.

    alignment: a ``fxmerge.passes.depth.DepthAlignment`` (one entry of ``MergeResult.alignment``),
        or anything with ``cka`` (m, n), ``segments`` (n tuples of deep unit indices),
        ``deep_units`` / ``shallow_units`` (unit names) and optionally ``segmentation.objective``
        and ``objective_value``.
    path: the PNG to write (parent folders are created).

    Every segment i is outlined as a box over the cells (j, i), j in segment i; its first unit
    (the deep unit merged with the shallow model's real unit i) is marked with a filled circle,
    the other units (merged with inserted identity units) with small open circles. Cell values
    are printed when the matrix is small. Returns the path written.
    """
    if isinstance(alignment, (tuple, list)):
        raise ConfigError(
            "plot_alignment takes one DepthAlignment; MergeResult.alignment is a tuple (one per shallower "
            "model): pass result.alignment[0]"
        )
    cka = np.asarray(alignment.cka, dtype=np.float64)
    if cka.ndim != 2:
        raise ConfigError(f"alignment.cka must be a 2-D (deep, shallow) matrix, got shape {cka.shape}")
    m, n = cka.shape
    segments = [tuple(int(j) for j in s) for s in alignment.segments]
    if len(segments) != n:
        raise ConfigError(f"the alignment has {len(segments)} segments for {n} shallow units")
    deep_names = list(getattr(alignment, "deep_units", None) or [str(j) for j in range(m)])
    shallow_names = list(getattr(alignment, "shallow_units", None) or [str(i) for i in range(n)])

    from matplotlib.patches import Rectangle

    figure = _figure(max(4.5, 1.6 + 0.55 * n), max(3.8, 1.4 + 0.36 * m))
    axes = figure.add_subplot(1, 1, 1)
    low = min(0.0, float(np.floor(cka.min() * 10) / 10))
    image = axes.imshow(cka, cmap="viridis", vmin=low, vmax=max(1.0, float(cka.max())), aspect="auto", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.05, pad=0.02)
    colorbar.set_label("linear CKA (unbiased)")

    if m * n <= 400:
        for j in range(m):
            for i in range(n):
                value = cka[j, i]
                shade = (value - low) / (max(1.0, float(cka.max())) - low)
                axes.text(i - 0.1, j, f"{value:.2f}", ha="center", va="center", fontsize=6.5,
                          color="black" if shade > 0.6 else "white", alpha=0.85)

    for i, segment in enumerate(segments):
        if not segment:
            continue
        top = min(segment) - 0.5
        axes.add_patch(Rectangle((i - 0.5, top), 1.0, len(segment), fill=False, edgecolor="#ff3b30", linewidth=2.0))
        first, *extras = segment
        axes.plot([i + 0.32], [first], marker="o", markersize=6.5, color="#ff3b30", markeredgecolor="white", linestyle="none")
        if extras:
            axes.plot([i + 0.32] * len(extras), extras, marker="o", markersize=4.5, markerfacecolor="none",
                      markeredgecolor="#ff3b30", linestyle="none")

    axes.set_xticks(range(n))
    axes.set_xticklabels([f"{i}: {_short(s)}" for i, s in enumerate(shallow_names)], rotation=45, ha="right", fontsize=7.5)
    axes.set_yticks(range(m))
    axes.set_yticklabels([f"{j}: {_short(s)}" for j, s in enumerate(deep_names)], fontsize=7.5)
    axes.set_xlabel("shallow model units (columns)")
    axes.set_ylabel("deep model units (rows)")
    segmentation = getattr(alignment, "segmentation", None)
    objective = getattr(segmentation, "objective", None)
    value = getattr(alignment, "objective_value", None)
    subtitle = ""
    if objective is not None:
        subtitle = f"{str(objective).upper()} segmentation" + (f", objective {value:.3f}" if value is not None else "")
    heading = title if title is not None else "Depth alignment"
    axes.set_title(f"{heading}\n{subtitle}\n(box: segment; ● first unit = real shallow unit, ○ inserted identity)"
                   if subtitle else heading, fontsize=9)
    axes.set_xlim(-0.5, n - 0.5)
    axes.set_ylim(m - 0.5, -0.5)
    return _save(figure, path)


MAX_GROUP_BARS = 40  # groups drawn as bars; beyond it, the most changed ones plus histograms of all


@dataclass(frozen=True)
class GroupsPlot:
    """What ``plot_groups`` draws, computed from the groups alone (testable without a figure).

    ``rows``: indices (into the groups) of the groups drawn as bars, top to bottom: every group in
    graph order when there are at most ``MAX_GROUP_BARS``, else the ``MAX_GROUP_BARS`` with the
    largest width change |merged width - widest model|, then the lowest similarity (the groups
    merged most), then graph order. ``labels``: their names (shortened), ``widths``: merged widths,
    ``sizes``: the models' widths per row, ``similarities``: per row, None for fixed groups.
    ``changes``: width change of every group (merged width - widest model), ``all_similarities``:
    similarity of every merged group with one, for the histograms drawn when groups are left out
    (``omitted`` > 0). ``sorted``: whether rows are ranked rather than in graph order.
    """

    rows: tuple[int, ...]
    labels: tuple[str, ...]
    widths: tuple[int, ...]
    sizes: tuple[tuple[int, ...], ...]
    similarities: tuple[float | None, ...]
    fixed: tuple[bool, ...]
    changes: tuple[int, ...]
    all_similarities: tuple[float, ...]
    omitted: int
    sorted: bool

    def __repr__(self) -> str:
        return f"GroupsPlot({len(self.rows)} groups drawn, {self.omitted} omitted{', ranked' if self.sorted else ''})"


def groups_plot(groups: Sequence[Any], limit: int = MAX_GROUP_BARS) -> GroupsPlot:
    """The data of ``plot_groups`` for GroupReport-like ``groups`` (``name``, ``sizes``, ``width``,
    ``fixed``, ``similarity``); see :class:`GroupsPlot`."""
    if not groups:
        raise ConfigError("plot_groups: the result has no groups")
    changes = tuple(int(g.width) - max(int(s) for s in g.sizes) for g in groups)
    similarity = [None if g.fixed or g.similarity is None else float(g.similarity) for g in groups]
    ranked = len(groups) > limit
    if ranked:
        key = lambda i: (-abs(changes[i]), np.inf if similarity[i] is None else similarity[i], i)  # noqa: E731
        rows = tuple(sorted(range(len(groups)), key=key)[:limit])
    else:
        rows = tuple(range(len(groups)))
    return GroupsPlot(
        rows=rows,
        labels=tuple(_short(groups[i].name, 40) for i in rows),
        widths=tuple(int(groups[i].width) for i in rows),
        sizes=tuple(tuple(int(s) for s in groups[i].sizes) for i in rows),
        similarities=tuple(similarity[i] for i in rows),
        fixed=tuple(bool(groups[i].fixed) for i in rows),
        changes=changes,
        all_similarities=tuple(s for s in similarity if s is not None),
        omitted=len(groups) - len(rows),
        sorted=ranked,
    )


def plot_groups(result: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Horizontal bars, one row per group (names readable on the left): the merged width with each
    model's width marked, and the mean similarity of the merged units (fixed groups: none, grey).
    With more than ``MAX_GROUP_BARS`` groups (densenet121 has 120) only the most changed ones are
    drawn (see :func:`groups_plot`) and histograms of every group's width change and similarity are
    added below, so the figure stays within about 1000 x 1250 px at any group count.

    result: a ``MergeResult`` (or any object with ``groups``, or the groups themselves:
        GroupReport-like items with ``name``, ``sizes``, ``width``, ``fixed``, ``similarity``).
    Returns the path written.
    """
    groups: Sequence[Any] = list(getattr(result, "groups", result))
    return _save(_groups_figure(groups_plot(groups), len(groups), title), path)


def _groups_figure(data: GroupsPlot, count: int, title: str | None) -> Any:
    """The figure of ``plot_groups``: axes[0] widths, axes[1] similarities (rows as y ticks,
    top to bottom), then, when groups were left out, axes[2] / axes[3] the histograms."""
    n = len(data.rows)
    bars = max(2.0, 0.9 + 0.19 * n)
    figure = _figure(9.0, bars + (2.4 if data.omitted else 0.0))
    figure.set_layout_engine("constrained")
    grid = figure.add_gridspec(2 if data.omitted else 1, 2, width_ratios=[1.6, 1.0], height_ratios=[bars, 2.2] if data.omitted else [1])
    widths_axes = figure.add_subplot(grid[0, 0])
    similarity_axes = figure.add_subplot(grid[0, 1], sharey=widths_axes)
    positions = np.arange(n)
    fixed = np.array(data.fixed, dtype=bool)
    widths_axes.barh(positions, data.widths, color=np.where(fixed, "#b0b0b0", "#3a78c2"), height=0.7, label="merged width")
    markers = ["v", "^", "s", "D", "P"]
    for k in range(max((len(s) for s in data.sizes), default=0)):
        values = [s[k] if k < len(s) else np.nan for s in data.sizes]
        widths_axes.plot(values, positions, linestyle="none", marker=markers[k % len(markers)], markersize=4,
                         color="black", alpha=0.7, label=f"model {k} width")
    widths_axes.set_yticks(positions, data.labels, fontsize=7)
    widths_axes.set_ylim(n - 0.5, -0.5)  # first row on top
    widths_axes.set_xlabel("channels")
    widths_axes.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=4, frameon=False)  # above the bars
    shown = [i for i, s in enumerate(data.similarities) if s is not None]
    similarity_axes.barh([positions[i] for i in shown], [data.similarities[i] for i in shown], color="#e08a2c", height=0.7)
    for i in range(n):
        if data.similarities[i] is None:
            similarity_axes.text(0.02, i, "fixed" if data.fixed[i] else "n/a", va="center", fontsize=6, color="grey")
    low = min([0.0, *data.all_similarities])
    similarity_axes.set_xlim(low, 1.0)
    similarity_axes.set_xlabel("mean similarity of merged units")
    similarity_axes.tick_params(axis="y", labelleft=False)
    heading = title or "Merged groups (grey: fixed groups, kept as they are)"
    if data.sorted:
        heading += f"\n{n} of {count} groups: the largest width change |merged - widest model|, then the lowest similarity"
    figure.suptitle(heading, fontsize=9)
    if data.omitted:
        change_axes = figure.add_subplot(grid[1, 0])
        change_axes.hist(data.changes, bins=min(30, max(1, len(set(data.changes)))), color="#3a78c2")
        change_axes.set_xlabel(f"width change (merged - widest model), all {count} groups")
        change_axes.set_ylabel("groups")
        histogram_axes = figure.add_subplot(grid[1, 1])
        histogram_axes.hist(data.all_similarities, bins=20, range=(low, 1.0), color="#e08a2c")
        histogram_axes.set_xlabel(f"similarity, all {len(data.all_similarities)} merged groups")
    return figure


def plot_accuracy(rows: Sequence[Any], path: str | Path, *, title: str | None = None) -> Path:
    """Grouped bars of a results table: joint, task A, task B and average accuracy per row.

    rows: items with ``name``, ``joint``, ``task_a``, ``task_b``, ``average`` (fractions in [0, 1],
        e.g. ``fxmerge.experiments.Row``), or dicts with those keys. Returns the path written.
    """
    def get(row: Any, key: str) -> Any:
        return row[key] if isinstance(row, dict) else getattr(row, key)

    if not rows:
        raise ConfigError("plot_accuracy: no rows")
    columns = (("joint", "joint"), ("task_a", "task A"), ("task_b", "task B"), ("average", "avg"))
    figure = _figure(max(6.0, 1.2 + 1.1 * len(rows)), 3.8)
    axes = figure.subplots()
    positions = np.arange(len(rows))
    width = 0.8 / len(columns)
    for k, (key, label) in enumerate(columns):
        values = [100 * float(get(row, key)) for row in rows]
        axes.bar(positions + (k - 1.5) * width, values, width=width, label=label)
    axes.set_xticks(positions, [_short(str(get(row, "name")), 18) for row in rows], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 105)
    axes.legend(fontsize=7, ncols=4, loc="upper left")
    axes.set_title(title or "Accuracy per model", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def loss_landscape(source: Any, path: str | Path, *, data: Any = None, title: str | None = None, **options: Any) -> Path:
    """Contour plots of the loss over the plane through the merged model and the two aligned
    source models (the MuDSC paper's picture), the three models marked.

    source: a ``fxmerge.evaluation.Landscape``, a sequence of them (one row each, e.g. zip /
        mudsc / permute of one pair), or a two-model ``MergeResult`` with labelled ``data``, for
        which ``fxmerge.evaluation.landscape(source, data, **options)`` computes it (options:
        ``tasks``, ``calibration``, ``steps``, ``margin``, ``head``...; see there for what the
        plane and the grid are, and how BatchNorm statistics are set at every point).
    One panel per task (column) and landscape (row); axes are plane coordinates (Euclidean
    distances in weight space); colours clip at three times the largest loss of the three models
    so that the low basin stays readable. Returns the path written.
    """
    from fxmerge.evaluation import Landscape, landscape

    if isinstance(source, Landscape):
        views = [source]
    elif isinstance(source, (list, tuple)) and source and all(isinstance(v, Landscape) for v in source):
        views = list(source)
    else:
        if data is None:
            raise ConfigError("loss_landscape: give a Landscape, or a MergeResult with data=(labelled data)")
        views = [landscape(source, data, **options)]
    columns = max(len(v.panels) for v in views)
    figure = _figure(3.6 * columns, 3.1 * len(views))
    axes = np.asarray(figure.subplots(len(views), columns, squeeze=False))
    styles = {"merged": ("*", "#d62728", 13), "model 0": ("o", "white", 8), "model 1": ("s", "white", 8)}
    for row, view in enumerate(views):
        for col in range(columns):
            ax = axes[row, col]
            if col >= len(view.panels):
                ax.set_visible(False)
                continue
            losses = view.losses[col]
            ceiling = 3.0 * max(float(view.point_losses[n][col]) for n in view.points)
            top = min(float(losses.max()), ceiling) if ceiling > float(losses.min()) else float(losses.max())
            levels = np.linspace(float(losses.min()), max(top, float(losses.min()) + 1e-9), 16)
            filled = ax.contourf(view.xs, view.ys, np.minimum(losses, levels[-1]), levels=levels, cmap="viridis")
            ax.contour(view.xs, view.ys, np.minimum(losses, levels[-1]), levels=levels[::3], colors="black", linewidths=0.4, alpha=0.5)
            figure.colorbar(filled, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            for name, (x, y) in view.points.items():
                marker, colour, size = styles.get(name, ("D", "white", 7))
                ax.plot([x], [y], marker=marker, color=colour, markeredgecolor="black", markersize=size, linestyle="none")
                # labels inwards, so they stay inside the panel; the merged model's below its mark, the
                # sources' above theirs, so that three points on one line (permute) keep apart
                right = name != "merged" and x > (view.xs[0] + view.xs[-1]) / 2
                below = name == "merged"
                ax.annotate(f"{name} {view.point_losses[name][col]:.2f}", (x, y), textcoords="offset points",
                            xytext=(-6 if right else 6, -7 if below else 6), ha="right" if right else "left",
                            va="top" if below else "bottom", fontsize=6,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
            ax.set_title(f"{view.label or 'merge'}: loss on {'task ' + view.panels[col] if view.panels[col] != 'all' else 'all classes'}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_aspect("equal", adjustable="box")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)
