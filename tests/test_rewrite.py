"""fxmerge.passes.rewrite: the index forms of a cluster matrix give the dense product."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fxmerge.passes.rewrite import ClusterMap, _apply_factor
from fxmerge.passes.width import _dense  # the dense (width, n) matrix of a clustering


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("case", ["selection", "every column", "a column left out"])
def test_cluster_maps_apply_the_dense_matrix(case: str, weighted: bool) -> None:
    rng = np.random.default_rng(0)
    n, width = 12, 7
    if case == "selection":  # one entry per row: a gather
        clusters = np.full(n, -1)
        clusters[rng.permutation(n)[:width]] = np.arange(width)
    else:  # rows with several entries and rows with none
        clusters = rng.integers(0, width - 2, size=n)
        if case == "a column left out":
            clusters[3] = -1
    weights = rng.uniform(0.1, 1.0, size=n) if weighted else None
    cluster_map = ClusterMap.of_assignment(clusters, weights, width)
    assert (cluster_map.order is not None) == (case == "selection")
    assert (cluster_map.column_rows is not None) == (case == "every column")

    tensor = torch.randn(3, n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.einsum("rn,anb->arb", _dense(clusters, weights, width), tensor)
    got = _apply_factor(tensor, 1, cluster_map)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the column-order scatter adds each row's terms in the general form's order: its bits
    general = replace(cluster_map, order=None, row_weights=None, column_rows=None, column_weights=None)
    assert torch.equal(_apply_factor(tensor, 1, general), got)
    # a dense matrix given by a caller is applied through its ClusterMap
    assert torch.equal(_apply_factor(tensor, 1, _dense(clusters, weights, width)), got)
