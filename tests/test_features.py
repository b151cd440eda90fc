"""The feature-statistics pass: float32 products against float64, the memory budget, the taps.

* float32 samples are multiplied in float32 (``RunningMoments``): on a small ViT's real
  activations and on adversarial data (a mean offset 10^4 times the spread, drifting between
  batches, on which an uncentred float32 Gram loses every digit) the correlations agree with a
  float64 computation of the same samples within the bound of the docstring; values where float32
  products would overflow or underflow are multiplied in float64; the scatter is exactly
  symmetric and the same samples give the same bits.
* ``max_memory``: a budget that forces several statistics passes gives the bit-identical merge
  (state dicts compared with ``torch.equal``); too small a budget names the group, the node and
  the size it needs; the plan keeps each pass within the budget.
* The taps are the values the consumers read even when an in-place op overwrites them later.
"""

from __future__ import annotations

import operator
import re

import numpy as np
import pytest
import torch
from torch import nn

import fxmerge
import fxmerge.passes.features as features
from fxmerge import zoo
from fxmerge.config import MergeConfig
from fxmerge.errors import ConfigError
from fxmerge.metrics import correlation
from fxmerge.passes.dependency import analyze_graph, state_name_map
from fxmerge.passes.features import FLOAT32_ROWS, Footprint, RunningMoments, feature_statistics, observed_groups
from fxmerge.trace import trace
from conftest import random_batches

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0**-24  # float32 unit roundoff


def _reference(batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scatter of the samples, in float64, two-pass."""
    data = np.concatenate([b.double().numpy() for b in batches])
    mean = data.mean(axis=0)
    centred = data - mean
    return mean, centred.T @ centred


def _normwise(scatter: np.ndarray, reference: np.ndarray) -> float:
    """max |S - R|_ab / sqrt(R_aa R_bb): the error relative to the product of the units' norms."""
    norms = np.sqrt(np.diag(reference))
    return float((np.abs(scatter - reference) / np.outer(norms, norms)).max())


def _statistics(models: list[nn.Module], batches: list[torch.Tensor], **kwargs) -> dict:
    graphs = [trace(model, batches[0]) for model in models]
    analyses = [analyze_graph(gm, state_name_map(gm)) for gm in graphs]
    observed = observed_groups(analyses, [g.name for g in analyses[0].groups])
    return feature_statistics(graphs, observed, batches, quiet=True, **kwargs)


# --------------------------------------------------------------------- float32 against float64


def test_float32_correlations_on_real_activations_match_float64(monkeypatch) -> None:
    """A ViT pair's correlations (float32 products) against the same activations in float64."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(zoo.vit(patch_size=4, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=160, image_size=16).eval())
    batches = random_batches((16, 3, 16, 16), count=3)
    fast = _statistics(models, batches)
    samples = features._samples
    monkeypatch.setattr(features, "_samples", lambda value, dim: samples(value, dim).double())
    exact = _statistics(models, batches)
    assert fast.keys() == exact.keys() and max(sum(s.sizes) for s in fast.values()) == 320  # 8+ panels
    worst = 0.0
    for name, statistics in exact.items():
        assert fast[name].taps == statistics.taps and fast[name].samples == statistics.samples
        worst = max(worst, float(np.abs(fast[name].correlation - statistics.correlation).max()))
    # the docstring's bound: about sqrt(n) 2^-24 for the n <= 16 x 17 rows of a chunk; measured ~1e-7
    assert 0 < worst < 1e-5, worst


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_float32_products_of_centred_samples_keep_their_precision(offset: float) -> None:
    """Three models' blocks (unequal widths), correlated units, a mean offset that drifts between
    batches: the scatter within sqrt(n) 2^-24 of the units' norms, the correlations within 1e-6."""
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(164, 164, generator=generator) / 8
    batches = []
    for index, n in enumerate((1040, 7, 3000, 1040)):
        spread = torch.randn(n, 164, generator=generator) * torch.linspace(0.02, 0.3, 164)
        batches.append((spread + spread @ mix + offset * (1 + 1e-5 * index)).float())
    moments = RunningMoments(164)
    for batch in batches:
        moments.update([batch[:, :40], batch[:, 40:64], batch[:, 64:]])
    mean, scatter = _reference(batches)
    np.testing.assert_allclose(moments.mean.numpy(), mean, rtol=1e-12, atol=1e-12 * (1 + offset))
    error = _normwise(moments.scatter.numpy(), scatter)
    assert error < np.sqrt(3000) * U, error
    got = correlation(moments.scatter.clone()).numpy()
    assert np.abs(got - correlation(torch.from_numpy(scatter)).numpy()).max() < 1e-6
    if offset:
        # the data are adversarial: an uncentred float32 Gram, sum x x^T - n m m^T, is useless
        data = torch.cat(batches)
        naive = (data.T @ data).double().numpy() - len(data) * np.outer(mean, mean)
        assert _normwise(naive, scatter) > 1e-1


def test_out_of_range_units_are_multiplied_in_float64() -> None:
    """Units whose squares overflow (1e25) or underflow (1e-25) float32 products: float64 products."""
    generator = torch.Generator().manual_seed(3)
    batch = torch.randn(500, 6, generator=generator)
    batch[:, 0] *= 1e25
    batch[:, 1] *= 1e-25
    batch[:, 2] = batch[:, 0] * 2e-25 + batch[:, 3]  # correlated with the huge unit
    moments = RunningMoments(6)
    moments.update(batch)
    mean, scatter = _reference([batch])
    assert np.isfinite(moments.scatter.numpy()).all()
    assert _normwise(moments.scatter.numpy(), scatter) < 1e-13


def test_scatter_is_symmetric_and_deterministic() -> None:
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(300, 200, generator=generator) + 5 for _ in range(3)]
    runs = []
    for _ in range(2):
        moments = RunningMoments(200, chunk_bytes=100 * 200 * 8)  # 100-row chunks
        for batch in batches:
            moments.update([batch[:, :120], batch[:, 120:]])
        runs.append(moments.scatter)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[0].T)
    _, scatter = _reference(batches)
    assert _normwise(runs[0].numpy(), scatter) < np.sqrt(100) * U


@pytest.mark.parametrize(
    "dtype, rows, chunk_rows", [(torch.float32, 300, None), (torch.float32, 300, 100), (torch.float32, 40, None), (torch.float64, 300, 100)]
)
def test_first_update_writes_the_bits_of_adding_to_zeros(dtype: torch.dtype, rows: int, chunk_rows: int | None) -> None:
    """The scatter starts unset (no zeroing pass over fresh memory): the first update writes its
    products, which gives the bits of the same updates added to a zeroed scatter, whatever the
    memory held (float32 and float64 products, several chunks, a batch small enough for float64)."""
    generator = torch.Generator().manual_seed(8)
    batches = [(torch.randn(rows, 150, generator=generator) * 3 + 1).to(dtype) for _ in range(2)]
    written, zeroed = RunningMoments(150), RunningMoments(150)
    written._scatter.fill_(float("nan"))  # whatever the fresh memory holds must not leak
    zeroed._scatter.zero_()
    zeroed._written = True  # the accumulation as it was: every update adds
    for batch in batches:
        written.update([batch[:, :70], batch[:, 70:]], chunk_rows=chunk_rows)
        zeroed.update([batch[:, :70], batch[:, 70:]], chunk_rows=chunk_rows)
    assert torch.equal(written.scatter, zeroed.scatter)
    assert torch.equal(written.scatter, written.scatter.T)


def test_moments_without_samples_have_a_zero_scatter() -> None:
    moments = RunningMoments(5)
    moments._scatter.fill_(float("nan"))
    moments.update(torch.empty(0, 5))
    assert moments.count == 0 and torch.equal(moments.scatter, torch.zeros(5, 5, dtype=torch.float64))


def test_symmetric_gram_overwrites_the_buffer_it_is_given() -> None:
    generator = torch.Generator().manual_seed(9)
    blocks = [torch.randn(90, width, generator=generator) for width in (40, 7, 300)]
    fresh = features.symmetric_gram(blocks)
    garbage = torch.full((90, 90), float("nan"), dtype=torch.float64)
    assert features.symmetric_gram(blocks, out=garbage) is garbage
    assert torch.equal(garbage, fresh)
    joined = torch.cat(blocks, dim=1).double()
    assert torch.allclose(fresh, joined @ joined.T, rtol=1e-5, atol=1e-4)


def test_float32_chunks_are_capped(monkeypatch) -> None:
    """At most FLOAT32_ROWS rows per float32 product, whatever the chunk budget; small batches are
    multiplied in float64."""
    moments = RunningMoments(4, chunk_bytes=2**30)
    assert moments.chunk_rows() > FLOAT32_ROWS
    products = []
    original = features._add_upper_gram_

    def recording(scatter, chunk, *args, then=None, **kwargs):
        products.append((len(chunk), chunk.dtype))
        if then is not None:  # added with the last chunk's products
            products.append((len(then[0]), then[0].dtype))
        original(scatter, chunk, *args, then=then, **kwargs)

    monkeypatch.setattr(features, "_add_upper_gram_", recording)
    moments.update(torch.randn(FLOAT32_ROWS + 200, 4))
    # two float32 chunks, then the float64 rank-one corrections (one: there was no earlier batch)
    assert products == [(FLOAT32_ROWS, torch.float32), (200, torch.float32), (1, torch.float64)]
    products.clear()
    moments.update(torch.randn(features.FLOAT64_BELOW - 1, 4))  # a small batch: float64, Chan's row included
    assert products == [(features.FLOAT64_BELOW, torch.float64)]


# ------------------------------------------------------------------------------- memory budget


def _resnets() -> list[nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(zoo.resnet((2, 2, 1), width=8, in_channels=1, image_size=8).eval())
    return models


def test_max_memory_merge_is_bit_identical(monkeypatch) -> None:
    models, batches = _resnets(), random_batches(count=3)
    plans = []
    plan = features.plan_passes

    def recording_plan(keys, footprint, max_memory):
        plans.append((keys, footprint, plan(keys, footprint, max_memory)))
        return plans[-1][2]

    monkeypatch.setattr(features, "plan_passes", recording_plan)
    unbounded = fxmerge.merge(models, batches, method="zip", quiet=True)
    assert not plans  # no budget: one pass, unplanned
    fxmerge.merge(models, batches, method="zip", quiet=True, max_memory="1TB")  # one pass: the footprint
    ((keys, footprint, ample),) = plans
    assert len(ample) == 1 and footprint.samples
    budget = features.smallest_max_memory(keys, footprint)
    bounded = fxmerge.merge(models, batches, method="zip", quiet=True, max_memory=budget)
    passes = plans[1][2]
    assert len(passes) >= 3 and [k for p in passes for k in p] == keys
    # every pass within the budget; the one-pass statistics would not have fitted
    start = 0
    for chunk in passes:
        assert footprint.need(keys, start, start + len(chunk)) <= budget
        start += len(chunk)
    assert footprint.need(keys, 0, len(keys)) > budget
    state, expected = bounded.module.state_dict(), unbounded.module.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert bounded.groups == unbounded.groups and bounded.config.max_memory == budget


def test_too_small_a_budget_names_the_group_and_the_size() -> None:
    with pytest.raises(ConfigError) as caught:
        fxmerge.merge(_resnets(), random_batches(count=2), method="zip", quiet=True, max_memory="10kB")
    message = str(caught.value)
    assert re.search(r"max_memory=10000 bytes .* too small for the feature statistics of group '.+' at node '.+': "
                     r"\d+ units over all models need [0-9.]+ MiB", message), message
    smallest = int(re.search(r"give max_memory >= (\d+)", message).group(1))
    assert smallest > 10**4


def test_plan_keeps_the_order_and_counts_the_kept_correlations() -> None:
    keys = [("a", "t1"), ("a", "t2"), ("b", "t1"), ("c", "t1"), ("c", "t2")]
    dims = {"a": 64, "b": 64, "c": 64}
    samples = {key: 100 for key in keys}
    moments, update = RunningMoments.nbytes(64, samples=100)
    cov = 8 * 64 * 64
    on_cpu, on_device = Footprint(dims, samples), Footprint(dims, samples, results_on_device=False)
    assert on_cpu.need(keys, 0, 2) == 2 * moments + update and on_cpu.need(keys, 2, 2) == cov
    budget = 2 * moments + update + cov
    # on a GPU only the correlation of a group split over passes stays (c's, for c/t2) ...
    assert features.plan_passes(keys, on_device, budget) == [
        [("a", "t1"), ("a", "t2")], [("b", "t1"), ("c", "t1")], [("c", "t2")]
    ]
    # ... on the CPU every finished group's correlation stays, and crowds the later passes
    smallest = features.smallest_max_memory(keys, on_cpu)
    assert smallest == on_cpu.need(keys, 4, 5) == 3 * cov + moments + update > budget
    with pytest.raises(ConfigError, match=r"group 'c' at node 't2'.*of them the correlations of the groups before it.*"
                       rf"give max_memory >= {smallest} "):
        features.plan_passes(keys, on_cpu, budget)
    assert features.plan_passes(keys, on_cpu, smallest) == [
        [("a", "t1"), ("a", "t2"), ("b", "t1")], [("c", "t1")], [("c", "t2")]
    ]
    assert features.plan_passes(keys, on_cpu, None) == [keys]


def test_max_memory_option_parses_sizes() -> None:
    assert MergeConfig(max_memory="4GB").max_memory == 4 * 10**9
    assert MergeConfig(max_memory="512MiB").max_memory == 512 * 2**20
    assert MergeConfig(max_memory=" 1.5 gb").max_memory == 1_500_000_000
    assert MergeConfig(max_memory=2e9).max_memory == 2 * 10**9 and MergeConfig().max_memory is None
    for bad in ("lots", "4XB", 0, -5, True, "0B"):
        with pytest.raises(ConfigError, match="max_memory"):
            MergeConfig(max_memory=bad)


# ------------------------------------------------------------------------------------- the taps


class _Overwritten(nn.Module):
    """``h`` is tapped (fc2 reads it), then a ReLU overwrites it in place; fc3 reads both."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h)
        h = self.act(h)
        return self.fc3(y + h)


def test_taps_are_the_values_the_consumers_read_despite_in_place_ops() -> None:
    batches = random_batches((64, 6), count=2)
    statistics = {}
    for inplace in (False, True):
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(_Overwritten(inplace).eval())
        statistics[inplace] = _statistics(models, batches)
    assert statistics[True].keys() == statistics[False].keys() and statistics[True]
    tapped = {node for s in statistics[True].values() for node in s.taps}
    assert "tanh" in tapped  # the value the in-place ReLU overwrites
    for name, expected in statistics[False].items():
        assert np.array_equal(statistics[True][name].correlation, expected.correlation), name


class _AddsIntoItsInput(nn.Module):
    """Writes into its input without being named in-place (a leaf: the static check cannot see it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return x


class _Writers(nn.Module):
    """Every tapped value below is overwritten later: in place by name (``relu_``), through a view
    of it, and by a leaf module that writes without saying so; ``u`` is never written."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.leaf = _AddsIntoItsInput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 2.0
        b = a.relu_()
        c = self.fc(b)
        flat = c.view(-1)
        c.mul_(3.0)
        d = self.fc(x)
        e = self.leaf(d)
        u = torch.tanh(x)
        return b.sum() + flat.sum() + e.sum() + u.sum()


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _AddsIntoItsInput) or super().is_leaf_module(m, qualname)


def _writers_graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = _Writers().eval()
    return torch.fx.GraphModule(model, _LeafTracer().trace(model))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_tap_extractor_returns_the_values_the_nodes_produced_despite_later_writes(mode: str) -> None:
    gm = _writers_graph()
    x = torch.randn(5, 4)
    names = ["mul", "view", "fc", "fc_1", "tanh"]
    expected = {"mul": x * 2.0, "fc_1": gm.fc(x), "tanh": torch.tanh(x)}
    expected["fc"] = gm.fc((x * 2.0).relu())
    expected["view"] = expected["fc"].view(-1)
    extractor = features.tap_extractor(gm, names)
    # named writes are found before running: relu_ on mul; mul_ on fc, the base of the view
    assert extractor.cloned == frozenset({"mul", "fc", "view"})
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    for _ in range(2):  # the leaf's write is seen at run time, and cloned from then on
        with context:
            values = extractor(x)
        for name, value in zip(names, values):
            assert torch.equal(value, expected[name]), name
    assert "fc_1" in extractor.cloned  # the leaf wrote into it
    assert ("tanh" in extractor.cloned) == (mode == "inference_mode")  # no version counter to check


def test_tap_extractor_copies_nothing_that_is_not_written() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    gm = trace(zoo.vit(patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, image_size=16).eval(), x)
    names = [  # tensor values (the attention module's is a tuple)
        node.name for node in gm.graph.nodes
        if (node.op == "call_module" and "attention" not in node.name) or node.target is operator.add
    ]
    extractor = features.tap_extractor(gm, names)
    with torch.no_grad():
        values = extractor(x)
        copies = features._extractor_module(gm, names, frozenset(names))(x)[: len(names)]
    assert extractor.cloned == frozenset() and len(names) > 10
    assert not any(node.op == "call_method" and node.target == "clone" for node in extractor.module.graph.nodes)
    assert len(values) == len(names)
    for name, value, copy in zip(names, values, copies):
        assert torch.equal(value, copy), name


def test_taps_last_observes_only_the_last_place_a_layer_reads_the_channels() -> None:
    """taps="last" (ZipIt!'s choice): a residual stream read by several blocks is observed at its
    last reader only, and its correlation is that tap's alone — the same numbers as "consumers"
    gives for a group read in one place."""
    models, batches = _resnets(), random_batches((16, 1, 8, 8), 3)
    every = _statistics(models, batches)
    last = _statistics(models, batches, taps="last")
    assert every.keys() == last.keys()
    many = [name for name, s in every.items() if len(s.taps) > 1]
    assert many  # the residual streams
    for name, stats in every.items():
        assert last[name].taps == stats.taps[-1:]
        if len(stats.taps) == 1:
            np.testing.assert_array_equal(last[name].correlation, stats.correlation)
    for name in many:  # one tap's correlation, not the average over the readers
        assert not np.allclose(last[name].correlation, every[name].correlation)
    with pytest.raises(ConfigError, match="taps='first'"):
        _statistics(models, batches, taps="first")
