"""Issue #14 item 4: groups.png stays readable at any number of groups.

``groups_plot`` (the data ``plot_groups`` draws) is checked exactly against a brute-force ranking;
the figure's axes are checked to draw that data (tick labels, bar lengths, histogram counts), and
the PNG's pixel size stays bounded from 10 to 200 groups (densenet121 has 120; before, 4458 px wide).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from fxmerge.api import GroupReport
from fxmerge.errors import ConfigError
from fxmerge.plots import MAX_GROUP_BARS, _groups_figure, groups_plot, plot_groups

pytest.importorskip("matplotlib")

MAX_SIDE = 2400  # pixels, at the default dpi


def _groups(count: int) -> list[GroupReport]:
    """Groups of two models: every 7th fixed (equal widths kept), the others zipped to a width
    between the two, with similarities spread over [0, 1) in a scrambled order."""
    out = []
    for i in range(count):
        a, b = 16 * (1 + i % 4), 16 * (1 + (i * 3) % 4)
        if i % 7 == 0:
            out.append(GroupReport(f"features.denseblock{i // 30}.denselayer{i}.conv1:out", (a, a), a, True, None, "fixed"))
        else:
            width = max(a, b) - (i % 5)
            out.append(GroupReport(f"features.denseblock{i // 30}.denselayer{i}.conv2:out", (a, b), width, False, (i * 37 % 100) / 100, "activations"))
    return out


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_groups_plot_draws_every_group_in_graph_order_when_they_fit() -> None:
    groups = _groups(10)
    data = groups_plot(groups)
    assert data.rows == tuple(range(10)) and data.omitted == 0 and not data.sorted
    assert data.labels[1] == "…tures.denseblock0.denselayer1.conv2:out" and len(data.labels[1]) == 40  # the tail names it
    assert data.widths == tuple(g.width for g in groups)
    assert data.sizes == tuple(g.sizes for g in groups)
    assert data.similarities == tuple(None if g.fixed else g.similarity for g in groups)
    assert data.changes == tuple(g.width - max(g.sizes) for g in groups)
    assert data.all_similarities == tuple(g.similarity for g in groups if not g.fixed)


def test_groups_plot_ranks_by_width_change_then_similarity_beyond_the_limit() -> None:
    groups = _groups(200)
    data = groups_plot(groups)
    # brute force: stable sorts, least significant key first
    order = sorted(range(200), key=lambda i: float("inf") if groups[i].fixed else groups[i].similarity)
    order = sorted(order, key=lambda i: -abs(groups[i].width - max(groups[i].sizes)))
    assert data.rows == tuple(order[:MAX_GROUP_BARS]) and data.sorted and data.omitted == 200 - MAX_GROUP_BARS
    assert all(abs(data.changes[i]) == 4 for i in data.rows[:10])  # the most shrunk groups first
    assert len(data.changes) == 200 and len(data.all_similarities) == sum(not g.fixed for g in groups)
    with pytest.raises(ConfigError, match="no groups"):
        groups_plot([])


@pytest.mark.parametrize("count", [10, 200])
def test_the_figure_draws_the_data_and_stays_bounded(tmp_path: Path, count: int) -> None:
    groups = _groups(count)
    data = groups_plot(groups)
    figure = _groups_figure(data, count, None)
    widths_axes, similarity_axes, *histograms = figure.axes
    assert [t.get_text() for t in widths_axes.get_yticklabels()] == list(data.labels)
    assert [p.get_width() for p in widths_axes.patches] == list(data.widths)
    assert [p.get_width() for p in similarity_axes.patches] == [s for s in data.similarities if s is not None]
    if count > MAX_GROUP_BARS:
        changes, similarities = histograms
        assert sum(p.get_height() for p in changes.patches) == count
        assert sum(p.get_height() for p in similarities.patches) == len(data.all_similarities)
        assert "40 of 200 groups" in figure.get_suptitle()
    else:
        assert histograms == []
    width, height = _png_size(plot_groups(groups, tmp_path / "groups.png"))
    assert 600 <= width <= MAX_SIDE and 150 <= height <= MAX_SIDE, (width, height)
