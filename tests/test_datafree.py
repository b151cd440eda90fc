"""Data-free merging (``merge(models, None, example_input=...)``): weight matching, no statistics.

A model merged with its permuted twin from weights alone is the model again (permute and zip, a
CNN with BatchNorm whose statistics come from training and an MLP); the merge is deterministic;
the options that need data, and a missing example input, are clear errors; the weight-space unit
similarity that aligns depths without data is invariant to channel order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge
from fxmerge.errors import ConfigError
from fxmerge.passes.depth import unit_weight_similarity
from fxmerge.passes.units import find_units
from fxmerge.testing import random_permute

from conftest import ConvBNNet, randomize_, same_state


class MLP(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.hidden = nn.ModuleList(nn.Linear(12, 12) for _ in range(depth))
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.inp(x))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def _cnn(seed: int = 0) -> ConvBNNet:
    """randomised weights and running statistics (not those of any data)"""
    return randomize_(ConvBNNet((8, 6)), seed).eval()


CASES = {
    "cnn": (_cnn, (1, 3, 6, 6)),
    "mlp": (lambda seed=0: randomize_(MLP(), seed).eval(), (1, 5)),
}


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_permuted_twin_is_recovered_from_weights(case: str, method: str) -> None:
    build, shape = CASES[case]
    model = build()
    example = torch.zeros(shape)
    twin = random_permute(model, torch.randn(shape), seed=3)
    result = fxmerge.merge([model, twin], None, method=method, example_input=example, quiet=True)
    assert result.config.repair == "none"
    assert all(g.fixed or g.source == "weights" for g in result.groups)
    x = torch.randn((7, *shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
    if method == "permute":  # model 0's order: the very weights of the model
        merged, original = result.module.state_dict(), model.state_dict()
        for key, value in original.items():
            torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_a_data_free_merge_is_deterministic() -> None:
    a, b = _cnn(0), _cnn(1)
    example = torch.zeros(2, 3, 6, 6)
    first = fxmerge.merge([a, b], None, method="zip", example_input=example, quiet=True)
    second = fxmerge.merge([a, b], None, method="zip", example_input=torch.ones(2, 3, 6, 6), quiet=True)
    assert same_state(first.module, second.module)  # the example's values are not used


def test_weight_matching_iterates_until_the_matches_stop_changing() -> None:
    """With the other groups' final matches fixed, re-matching any group on weights gives its
    final match: the iteration reached a fixed point (or its round limit, not reached here)."""
    from fxmerge.passes.width import match_groups

    a, b = randomize_(MLP(depth=3), 1).eval(), randomize_(MLP(depth=3), 11).eval()  # 2 rounds change matches
    example = torch.zeros(1, 5)
    analyses = [fxmerge.analyze(m, example) for m in (a, b)]
    states = [dict(m.state_dict()) for m in (a, b)]
    options = dict(method="permute", width="max", alpha=0.5, beta=1.0, balance=0.5)
    final = match_groups(analyses, states, {}, rounds=10, **options)
    once = match_groups(analyses, states, {}, rounds=1, **options)
    assert any(not torch.equal(final[n].merge[1], once[n].merge[1]) for n in final if not final[n].fixed)
    again = match_groups(analyses, states, {}, rounds=11, **options)
    for name, match in final.items():
        if not match.fixed:
            assert torch.equal(match.merge[1], again[name].merge[1]), name


def test_data_free_options_are_checked() -> None:
    a, b = _cnn(0), _cnn(1)
    with pytest.raises(ConfigError, match="example_input="):
        fxmerge.merge([a, b], None, quiet=True)
    with pytest.raises(ConfigError, match="repair='repair'.*calibration=None"):
        fxmerge.merge([a, b], None, repair="repair", example_input=torch.zeros(1, 3, 6, 6), quiet=True)
    with pytest.raises(ConfigError, match="drop example_input"):
        fxmerge.merge([a, b], [torch.zeros(2, 3, 6, 6)], example_input=torch.zeros(1, 3, 6, 6), quiet=True)


def test_weight_similarity_of_units_ignores_channel_order() -> None:
    model = randomize_(MLP(depth=3), 0).eval()
    twin = random_permute(model, torch.zeros(1, 5), seed=2)
    graphs = [fxmerge.trace(m, torch.zeros(1, 5)) for m in (model, twin)]
    units = [find_units(g) for g in graphs]
    own = unit_weight_similarity(graphs[0], units[0], graphs[0], units[0])
    cross = unit_weight_similarity(graphs[0], units[0], graphs[1], units[1])
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(cross, own, atol=1e-12)
    np.testing.assert_allclose(np.diag(own), 1.0, atol=1e-12)
    assert (own[~np.eye(len(own), dtype=bool)] < 1 - 1e-6).all()


def test_depths_are_aligned_without_data() -> None:
    """A 3-hidden-layer MLP and a 1-hidden-layer MLP merge without data; the shallow model's
    extension is the deep graph, and the result interpolated fully to model 0 is model 0."""
    deep, shallow = randomize_(MLP(depth=3), 0).eval(), randomize_(MLP(depth=1), 1).eval()
    result = fxmerge.merge([deep, shallow], None, method="permute", example_input=torch.zeros(1, 5), quiet=True)
    (alignment,) = result.alignment
    assert alignment.cka.shape == (5, 3) and len(alignment.segments) == 3
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(result.interpolate((1.0, 0.0))(x), deep(x), atol=1e-5, rtol=1e-5)
