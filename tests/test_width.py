"""Width-heterogeneous merging (elastic neuron zipping, Section III-C of the paper).

The central exact check is recovery from a Net2Net-widened copy: ``net2net_widen`` duplicates every
hidden channel of every free group of a model (producer rows, biases, norm entries and BatchNorm
running statistics copied; each consumer's input weights divided between the copies), which gives
a model twice as wide computing the same function. Merging ``[m, widened]`` with zip to
``width="min"`` can then only reproduce ``m`` if every merged unit is exactly one channel of ``m``
together with its two copies: any other cluster mixes channels and changes the function.

ZipIt's alpha matters here. Plain ZipIt decay fails at the default ``alpha=0.5``: zip first merges
the score-1 pair inside the widened model (two bit-identical copies), and m's unit then meets that
cluster at ``alpha * min(1, 1) = 0.5`` -- after any two distinct channels of m correlating above 0.5
were zipped together. fxmerge's zip does not decay a merge of two identical features (score
>= 1 - 1e-6, ``fxmerge.match.zip.IDENTICAL``): deduplication is not a new merge. Recovery is then
exact at the default alpha (``test_default_alpha_recovers_from_widened_copy``), and
``test_alpha_mechanism`` pins the rule on a 2-channel similarity matrix: *near* copies (0.99) still
decay as in ZipIt.

Elastic widths, permute for unequal widths, MuDSC (incl. a ViT with 4 heads), depth and width in
one call, and ``torch.compile`` of the results are checked on zoo models. torchvision's resnet50 +
wide_resnet50_2 takes ~50 s per merge on this machine: it lives in ``benchmarks/width.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import fxmerge
from fxmerge import zoo
from fxmerge.errors import ConfigError
from fxmerge.match import match
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.testing import net2net_widen, random_permute
from conftest import output_of, random_batches, relative_error

TOL = 1e-3  # relative error ||y - y'|| / ||y|| of a recovered model


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- helpers


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _free_widths(result: fxmerge.MergeResult) -> dict[str, int]:
    return {g.name: g.width for g in result.groups if not g.fixed}


Factory = Callable[[float], nn.Module]
FACTORIES: dict[str, Factory] = {
    "zoo_resnet": lambda w: zoo.resnet((1, 1, 1), width_multiplier=w, in_channels=1, image_size=8),
    "zoo_vgg": lambda w: zoo.vgg(width_multiplier=w, in_channels=1, image_size=8),
}


def _calibrated(factory: Factory, batches: list[torch.Tensor], seed: int = 0) -> nn.Module:
    """``factory(1)`` in eval mode with BatchNorm statistics of the calibration data (merging resets
    BatchNorm on that data, so a recovered model can only equal ``m`` if ``m``'s are those too)."""
    torch.manual_seed(seed)
    model = factory(1.0).eval()
    reset_batchnorm(model, batches, quiet=True)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def widened_case(request) -> tuple[nn.Module, nn.Module, list[torch.Tensor], torch.Tensor]:
    """(m, widened m built by the factory at width multiplier 2, calibration batches, m(batch 0))."""
    factory = FACTORIES[request.param]
    batches = random_batches()
    model = _calibrated(factory, batches)
    wide = net2net_widen(model, batches[0], 2, factory(2.0))
    return model, wide, batches, output_of(model, batches[0])


# ------------------------------------------------------------------------- 1. Net2Net recovery


def test_net2net_widen_preserves_the_function(widened_case) -> None:
    model, wide, batches, y = widened_case
    for x in batches:
        assert relative_error(output_of(model, x), output_of(wide, x), norm="l2") < 1e-5
    narrow_groups = {g.name: g.size for g in fxmerge.analyze(model, batches[0]).groups}
    wide_groups = {g.name: (g.size, g.fixed) for g in fxmerge.analyze(wide, batches[0]).groups}
    for name, (size, fixed) in wide_groups.items():
        assert size == (narrow_groups[name] if fixed else 2 * narrow_groups[name]), name
    assert _params(wide) > 3 * _params(model)
    # without a target the copy is resized in place of being rebuilt: the same function again
    resized = net2net_widen(model, batches[0], 2)
    assert relative_error(y, output_of(resized, batches[0]), norm="l2") < 1e-5
    assert _params(resized) == _params(wide)


@pytest.mark.parametrize("width", ["min", "max"])
def test_zip_recovers_m_from_widened_copy(widened_case, width: str) -> None:
    model, wide, batches, y = widened_case
    result = fxmerge.merge([model, wide], batches, method="zip", width=width, alpha=1.0, quiet=True)
    assert relative_error(y, output_of(result.module, batches[0]), norm="l2") < TOL
    for group in result.groups:
        if not group.fixed:
            # 1 up to the 1e-3 weight tie-break that groups with dead units add to the correlation
            assert group.similarity == pytest.approx(1.0, abs=2e-3), group.name
            assert group.width == (min if width == "min" else max)(group.sizes)
    if width == "min":
        assert _params(result.module) == _params(model)


def test_mudsc_recovers_m_from_widened_copy(widened_case) -> None:
    model, wide, batches, y = widened_case
    result = fxmerge.merge([model, wide], batches, method="mudsc", width="min", alpha=1.0, quiet=True)
    assert relative_error(y, output_of(result.module, batches[0]), norm="l2") < TOL


def test_default_alpha_recovers_from_widened_copy(widened_case) -> None:
    """alpha=0.5 (the default), as the issue asks: the widened copy's two copies of a channel are
    identical features, so merging them is deduplication and spends no decay; m's unit then meets
    the pair at score ~1 (plain ZipIt decay would make it 0.5, after distinct channels of m that
    correlate above 0.5 were zipped together)."""
    model, wide, batches, y = widened_case
    result = fxmerge.merge([model, wide], batches, method="zip", width="min", quiet=True)
    assert result.config.alpha == 0.5
    assert relative_error(y, output_of(result.module, batches[0]), norm="l2") < TOL
    assert _params(result.module) == _params(model)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_three_models_m_permuted_widened(widened_case, alpha: float) -> None:
    """Clusters of four (two score-1 pairs, then one merge at alpha): exact at both alphas."""
    model, wide, batches, y = widened_case
    twin = random_permute(model, batches[0], seed=1).eval()
    result = fxmerge.merge([model, twin, wide], batches, method="zip", width="min", alpha=alpha, quiet=True)
    assert relative_error(y, output_of(result.module, batches[0]), norm="l2") < TOL
    assert _params(result.module) == _params(model)


def test_three_models_m_widened_widened2(widened_case) -> None:
    """Clusters of five (m's unit and four copies): exact at both alphas (identical copies are
    deduplicated without decay)."""
    model, wide, batches, y = widened_case
    wide2 = random_permute(wide, batches[0], seed=3).eval()
    models = [model, wide, wide2]
    for alpha in (0.5, 1.0):
        result = fxmerge.merge(models, batches, method="zip", width="min", alpha=alpha, quiet=True)
        assert relative_error(y, output_of(result.module, batches[0]), norm="l2") < TOL, alpha


@pytest.mark.parametrize(("copy_similarity", "correlation", "alpha", "recovered"), [
    (1.0, 0.6, 0.5, True),    # identical copies: deduplicated without decay
    (1.0, 0.4, 0.5, True),
    (0.99, 0.6, 0.5, False),  # near copies decay: distinct channels above 0.5 * 0.99 zip first
    (0.99, 0.4, 0.5, True),
    (0.99, 0.6, 1.0, True),
])
def test_alpha_mechanism(copy_similarity: float, correlation: float, alpha: float, recovered: bool) -> None:
    """Two channels of m (units 0, 1) and the widened copy's four (2, 3 copy 1; 4, 5 copy 2)."""
    channel = np.array([0, 1, 0, 1, 0, 1])
    similarity = np.where(channel[:, None] == channel[None, :], copy_similarity, correlation)
    np.fill_diagonal(similarity, 1.0)
    pairs = match(similarity, [2, 4], 2, method="zip", alpha=alpha, beta=1.0)
    clusters = np.concatenate([u.argmax(axis=1) for _, u in pairs])
    pure = all(len(set(channel[clusters == c])) == 1 for c in range(2))
    assert pure == recovered


# ----------------------------------------------------------------------------- 2. elastic widths


@pytest.fixture(scope="module")
def equal_resnets() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    batches = random_batches()
    factory = FACTORIES["zoo_resnet"]
    return _calibrated(factory, batches, seed=0), _calibrated(factory, batches, seed=1), batches


def test_float_widths_scale_the_model_and_compile(equal_resnets) -> None:
    a, b, batches = equal_resnets
    x = batches[0]
    counts = []
    for multiple in (0.5, 1.0, 1.5, 2.0):
        result = fxmerge.merge([a, b], batches, method="zip", width=multiple, quiet=True)
        for group in result.groups:
            expected = group.sizes[0] if group.fixed else round(multiple * max(group.sizes))
            assert group.width == expected, (multiple, group.name)
        widths = _free_widths(result)
        assert result.module.get_submodule("stem.0").weight.shape[0] == widths["stem.0:out"]
        assert result.module.get_submodule("head").weight.shape[1] == widths["stage3.0.conv2:out"]
        counts.append(_params(result.module))
        eager = output_of(result.module, x)
        compiled = torch.compile(result.module, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        if multiple == 2.0:
            # every unit kept on its own: the merged model is the two models side by side and its
            # (fixed, averaged) output is exactly their ensemble average
            assert relative_error((output_of(a, x) + output_of(b, x)) / 2, eager, norm="l2") < 1e-5
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts


def test_float_width_above_the_sum_is_capped(equal_resnets) -> None:
    """Documented behaviour: a float multiple is capped at keeping every unit (no error)."""
    a, b, batches = equal_resnets
    result = fxmerge.merge([a, b], batches, width=3.0, quiet=True)
    assert all(g.width == sum(g.sizes) for g in result.groups if not g.fixed)


def test_int_and_dict_widths(equal_resnets) -> None:
    a, b, batches = equal_resnets
    result = fxmerge.merge([a, b], batches, width=20, quiet=True)
    assert set(_free_widths(result).values()) == {20}
    assert result.module.get_submodule("stage3.0.conv1").weight.shape[:2] == (20, 20)
    output_of(result.module, batches[0])

    requested = {"stem.0:out": 5, "stage2.0.conv1:out": 7, "stage3.0.conv1:out": 100}
    result = fxmerge.merge([a, b], batches, width=requested, quiet=True)
    for group in result.groups:
        if not group.fixed:
            assert group.width == requested.get(group.name, max(group.sizes)), group.name
    assert result.module.get_submodule("stage2.0.conv1").weight.shape[0] == 7
    assert result.module.get_submodule("stage2.0.conv2").weight.shape[1] == 7
    assert result.module.get_submodule("stage3.0.conv2").weight.shape[1] == 100
    output_of(result.module, batches[0])


@pytest.mark.parametrize("width", [0, -3, 33, 1000, {"stem.0:out": 0}, {"stem.0:out": 33}, {"no_such_group": 4}, 0.0, "wide"])
def test_invalid_widths_raise_config_error(equal_resnets, width) -> None:
    a, b, batches = equal_resnets  # every group of [a, b] has 16 + 16 = 32 units at least
    with pytest.raises(ConfigError):
        fxmerge.merge([a, b], batches, width=width, quiet=True)


# --------------------------------------------------------------------- 3. permute, unequal widths


@pytest.fixture(scope="module")
def narrow_wide() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    batches = random_batches()
    torch.manual_seed(0)
    narrow = zoo.resnet((1, 1, 1), 8, in_channels=1, image_size=8).eval()
    wide = zoo.resnet((1, 1, 1), 16, in_channels=1, image_size=8).eval()
    return narrow, wide, batches


@pytest.mark.parametrize("order", ["narrow_first", "wide_first"])
def test_permute_unequal_widths_keeps_unmatched_units(narrow_wide, order: str) -> None:
    narrow, wide, batches = narrow_wide
    models = [narrow, wide] if order == "narrow_first" else [wide, narrow]
    k_narrow, k_wide = (0, 1) if order == "narrow_first" else (1, 0)
    result = fxmerge.merge(models, batches, method="permute", quiet=True)
    for group in result.groups:
        if group.fixed:
            continue
        n, w = group.sizes[k_narrow], group.sizes[k_wide]
        assert w == 2 * n and group.width == w, group.name
        merge_narrow = result.matches[group.name].merge[k_narrow].numpy()
        merge_wide = result.matches[group.name].merge[k_wide].numpy()
        # every narrow unit is matched to one wide unit (averaged, 1/2) ...
        assert ((merge_narrow != 0).sum(axis=0) == 1).all() and set(merge_narrow[merge_narrow != 0]) == {0.5}
        # ... and the w - n unmatched wide units are merged units on their own (weight 1)
        members = (merge_narrow != 0).sum(axis=1) + (merge_wide != 0).sum(axis=1)
        assert sorted(members.tolist()) == [1] * (w - n) + [2] * n
        assert sorted(merge_wide[merge_wide != 0].tolist()) == [0.5] * n + [1.0] * (w - n)
    assert _params(result.module) == _params(wide)
    output_of(result.module, batches[0])
    with pytest.raises(ConfigError, match="permute"):
        fxmerge.merge(models, batches, method="permute", width="min", quiet=True)


# ---------------------------------------------------------------------- 4. MuDSC, unequal widths


@pytest.mark.parametrize("width", ["max", "min"])
def test_mudsc_unequal_resnets(narrow_wide, width: str) -> None:
    narrow, wide, batches = narrow_wide
    result = fxmerge.merge([narrow, wide], batches, method="mudsc", width=width, quiet=True)
    for group in result.groups:
        if not group.fixed:
            assert group.width == (max if width == "max" else min)(group.sizes)
    assert _params(result.module) == _params(wide if width == "max" else narrow)
    output_of(result.module, batches[0])


def _vit(layers: int, hidden: int) -> nn.Module:
    return zoo.vit(
        patch_size=2, num_layers=layers, num_heads=4, hidden_dim=hidden, mlp_dim=2 * hidden, in_channels=1, image_size=8
    ).eval()


def _attention(module: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]


@pytest.mark.parametrize(("width", "embed"), [("max", 64), ("min", 32)])
def test_mudsc_unequal_vits(width: str, embed: int) -> None:
    batches = random_batches()
    torch.manual_seed(0)
    small, large = _vit(2, 32), _vit(2, 64)
    result = fxmerge.merge([small, large], batches, method="mudsc", width=width, quiet=True)
    attention = _attention(result.module)
    assert len(attention) == 2
    for mha in attention:
        assert (mha.embed_dim, mha.num_heads, mha.head_dim) == (embed, 4, embed // 4)
        assert tuple(mha.in_proj_weight.shape) == (3 * embed, embed)
        assert tuple(mha.out_proj.weight.shape) == (embed, embed)
    assert result.module.get_submodule("conv_proj").weight.shape[0] == embed
    heads = [g for g in result.groups if g.name.endswith(":heads")]
    assert heads and all(g.width == 4 for g in heads)
    assert _params(result.module) == _params(large if width == "max" else small)
    y = output_of(result.module, batches[0])
    assert y.shape == (16, 10)


# ------------------------------------------------------------------------ 5. depth and width


def _check_depth_and_width(result: fxmerge.MergeResult, deep_wide: nn.Module, x: torch.Tensor) -> None:
    assert result.alignment is not None and len(result.alignment) == 1
    for group in result.groups:
        if not group.fixed:
            assert group.width == max(group.sizes), group.name
    # the merged model has the deep model's structure and widths
    assert _params(result.module) == _params(deep_wide)
    assert {k: v.shape for k, v in result.module.state_dict().items()} == {
        k: v.shape for k, v in deep_wide.state_dict().items()
    }
    output_of(result.module, x)


@pytest.mark.parametrize("order", ["shallow_first", "deep_first"])
def test_depth_and_width_resnets(order: str) -> None:
    batches = random_batches()
    torch.manual_seed(0)
    shallow_narrow = zoo.resnet((1, 1, 1), 8, in_channels=1, image_size=8).eval()
    deep_wide = zoo.resnet((2, 2, 2), 16, in_channels=1, image_size=8).eval()
    models = [shallow_narrow, deep_wide] if order == "shallow_first" else [deep_wide, shallow_narrow]
    result = fxmerge.merge(models, batches, method="zip", quiet=True)
    _check_depth_and_width(result, deep_wide, batches[0])


def test_depth_and_width_vits() -> None:
    batches = random_batches()
    torch.manual_seed(0)
    shallow_narrow, deep_wide = _vit(2, 32), _vit(3, 64)
    result = fxmerge.merge([shallow_narrow, deep_wide], batches, method="zip", quiet=True)
    _check_depth_and_width(result, deep_wide, batches[0])
    assert [m.embed_dim for m in _attention(result.module)] == [64, 64, 64]



def test_a_group_matched_on_weights_is_matched_again_only_when_its_neighbours_changed(monkeypatch) -> None:
    """The weight-matching step after the first pass skips a group whose neighbours' matches are
    the ones it saw: forcing every group matched on weights (the attention heads of
    nn.MultiheadAttention) to be matched again gives the same weights."""
    import fxmerge.passes.width as width_pass

    torch.manual_seed(0)
    models = [zoo.vit(patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, image_size=8).eval() for _ in range(2)]
    batches = random_batches((64, 3, 8, 8), 2)
    matched = []
    real_match_structure = width_pass._match_structure
    monkeypatch.setattr(
        width_pass, "_match_structure",
        lambda structure, *a, **k: matched.append(structure.outer) or real_match_structure(structure, *a, **k),
    )
    skipped = fxmerge.merge(models, batches, method="zip", quiet=True)
    on_weights = {g.name.split("*")[0] for g in skipped.groups if g.source.startswith("weights")}
    assert len(on_weights) == 2 and sorted(matched) == sorted(on_weights)  # each matched once: all skipped
    fresh = iter(range(10**6))
    monkeypatch.setattr(width_pass, "_neighbour_matches", lambda *args: ((str(next(fresh)), None),))
    matched.clear()
    forced = fxmerge.merge(models, batches, method="zip", quiet=True)
    assert sorted(matched) == sorted(2 * list(on_weights))
    assert [g.labels for g in forced.groups] == [g.labels for g in skipped.groups]
    forced_state, skipped_state = forced.module.state_dict(), skipped.module.state_dict()
    assert all(torch.equal(forced_state[k], skipped_state[k]) for k in skipped_state)


def test_groups_whose_ties_weights_break_are_matched_once(monkeypatch) -> None:
    """Dead units inside every block: their groups are matched on activations with a weight
    tie-break, once, even when their neighbours' matches changed since."""
    import fxmerge.passes.width as width_pass

    torch.manual_seed(0)
    models = [zoo.resnet(in_channels=1, image_size=8, num_outputs=10).eval() for _ in range(2)]
    with torch.no_grad():
        for model in models:
            for name, module in model.named_modules():
                if name.endswith(".bn1"):
                    module.bias[:2] = -100.0
    batches = random_batches((64, 1, 8, 8), 2)
    matched = []
    real_match_plain = width_pass._match_plain
    monkeypatch.setattr(width_pass, "_match_plain", lambda name, *a: matched.append(name) or real_match_plain(name, *a))
    fresh = iter(range(10**6))
    monkeypatch.setattr(width_pass, "_neighbour_matches", lambda *args: ((str(next(fresh)), None),))
    result = fxmerge.merge(models, batches, method="zip", quiet=True)
    tied = [g.name for g in result.groups if "+weights" in g.source]
    assert len(tied) == 3 and set(tied) <= set(matched) and len(matched) == len(set(matched))


def test_similarities_made_in_a_workspace_equal_fresh_ones_and_reuse_its_memory() -> None:
    from fxmerge.passes.width import _Workspace, similarity_of

    generator = torch.Generator().manual_seed(0)
    workspace = _Workspace()
    pointers = []
    for units, widths in ((12, (7, 5)), (8, (3,)), (12, (4, 4))):  # the largest first: the others fit in it
        features = [[torch.randn(units, w, generator=generator) for w in widths] for _ in range(2)]
        expected = similarity_of(features)
        got = similarity_of(features, workspace)
        np.testing.assert_array_equal(got, expected)
        pointers.append(got.__array_interface__["data"][0])
    assert len(set(pointers)) == 1  # one buffer served every group
    wider = [[torch.randn(30, 2, generator=generator)] for _ in range(2)]  # larger than the buffer: it grows
    np.testing.assert_array_equal(similarity_of(wider, workspace), similarity_of(wider))


@pytest.mark.parametrize("constant_unit", [False, True])
def test_weight_similarity_is_the_pearson_correlation_of_the_feature_vectors(constant_unit: bool) -> None:
    """similarity_of against numpy's float64 correlation of the concatenated feature vectors; a
    unit whose features are constant correlates 0 with every other unit (the masked path)."""
    from fxmerge.passes.width import similarity_of

    generator = torch.Generator().manual_seed(0)
    features = [[torch.randn(10, w, generator=generator) for w in (7, 5)] for _ in range(2)]
    if constant_unit:
        for block in features[1]:
            block[3] = 0.25
    got = similarity_of(features)
    vectors = torch.cat([torch.cat(blocks, dim=1) for blocks in features]).double().numpy()  # (20, 12)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nan_to_num(np.corrcoef(vectors), nan=0.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    if constant_unit:
        assert not got[13].any()  # unit 3 of model 1: constant, no variance; its self-term too
    else:
        assert np.abs(got).min() > 0  # no entry masked


def test_the_weighted_merge_leaves_its_inputs_alone() -> None:
    """Terms are accumulated in place, but a tensor no transform changes is the caller's own."""
    from types import SimpleNamespace

    from fxmerge.passes.width import _weighted_merge

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    before = (a.clone(), b.clone())
    analysis = SimpleNamespace(space_sizes={})
    for scales in ((1.0, 1.0), (0.5, 1.5), (0.0, 2.0)):
        got = _weighted_merge([a, b], [(None, None)] * 2, [("out", "in")] * 2, [analysis] * 2, [({}, {})] * 2, scales)
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
        assert torch.equal(got, (before[0] * scales[0] + before[1] * scales[1]) / (scales[0] + scales[1]))


# ---------------------------------------------------------------------- 4. the regression unmerge


def _statistics_of(samples: np.ndarray, sizes: tuple[int, ...]):
    """GroupStatistics of (S, N) float64 samples as the feature pass writes them (no dead units)."""
    from fxmerge.passes.features import GroupStatistics

    return GroupStatistics(
        "g", sizes, np.corrcoef(samples, rowvar=False), ("tap",), len(samples), np.zeros(samples.shape[1], bool),
        std=samples.std(axis=0, ddof=1), mean=samples.mean(axis=0),
    )


def _regression_on_samples(samples: np.ndarray, match, ridge: float, model_weights=None) -> np.ndarray:
    """The ridge regression of the live units on the merged units, solved on the samples:
    min_U sum ||x - U m||^2 / (S - 1) + ridge s ||U - U0||^2, m = M x (M as the rewrite weights
    the models), s = mean variance of m; (N, r) by the normal equations."""
    count, r = len(match.sizes), match.width
    scales = np.ones(count) if model_weights is None else np.asarray(model_weights) * count
    merge = np.concatenate([scales[k] * match.merge[k].numpy() for k in range(count)], axis=1)
    merge /= np.where(merge.sum(axis=1, keepdims=True) > 0, merge.sum(axis=1, keepdims=True), 1.0)
    copy = np.concatenate([u.numpy() for u in match.unmerge], axis=0)
    centred = samples - samples.mean(axis=0)
    merged = centred @ merge.T
    cross, gram = centred.T @ merged / (len(samples) - 1), merged.T @ merged / (len(samples) - 1)
    s = np.trace(gram) / r
    fitted = np.linalg.solve(gram + ridge * s * np.eye(r), (cross + ridge * s * copy).T).T
    fitted[np.concatenate(match.clusters) < 0] = 0.0  # an inert model's units are not read
    return fitted


@pytest.mark.parametrize("model_weights", [None, (0.3, 0.7, 0.0)])
@pytest.mark.parametrize("ridge", [1e-9, 1e-2, 10.0])
def test_the_regression_unmerge_is_the_ridge_regression_on_the_samples(ridge: float, model_weights) -> None:
    """Three models, the third inert (its units take no part): U from the group's statistics
    equals the regression solved on the samples; an inert unit's row is zero."""
    from fxmerge.passes.width import GroupMatch, regression_unmerge

    rng = np.random.default_rng(0)
    sizes = (6, 5, 4)
    latent = rng.normal(size=(400, 4))
    samples = latent @ rng.normal(size=(4, 15)) + 0.5 * rng.normal(size=(400, 15)) + rng.normal(size=15)
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 5, 0, 0, 0, 0])  # model 0 merges within itself too
    base = GroupMatch.of_labels("g", sizes[:2], 6, labels[:11], None, "activations")
    clusters = (*base.clusters, np.full(4, -1))
    weights = (*base.weights, np.zeros(4))
    match = GroupMatch("g", sizes, 6, False, None, "activations", clusters, weights)
    fitted = regression_unmerge(match, _statistics_of(samples, sizes), model_weights, ridge=ridge)
    assert "regression unmerge" in fitted.source
    assert all(np.array_equal(a, b) for a, b in zip(fitted.clusters, match.clusters))  # M is the same
    got = np.concatenate(fitted.unmerge_matrices, axis=0)
    np.testing.assert_allclose(got, _regression_on_samples(samples, match, ridge, model_weights), rtol=1e-9, atol=1e-9)
    assert not got[11:].any()
    # the ridge pulls toward the copy unmerge: far from it when small, close when large
    copy = np.concatenate([u.numpy() for u in match.unmerge], axis=0)
    assert (np.abs(got - copy).max() < 0.2) == (ridge == 10.0)
    # the rewrite reads the same matrices: U_k^T as a dense transform
    np.testing.assert_array_equal(fitted.maps[1][1].numpy(), fitted.unmerge_matrices[1].T)
    np.testing.assert_array_equal(fitted.unmerge[0].numpy(), fitted.unmerge_matrices[0])


def test_the_regression_unmerge_of_a_twin_is_the_copy_unmerge() -> None:
    """Model 1 = a permutation of model 0's units: each unit equals its merged unit, so the
    regression has nothing to add whatever the ridge."""
    from fxmerge.passes.width import GroupMatch, regression_unmerge

    rng = np.random.default_rng(1)
    own = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 7)) + 0.1 * rng.normal(size=(300, 7))
    permutation = rng.permutation(7)
    samples = np.concatenate([own, own[:, permutation]], axis=1)
    labels = np.concatenate([np.arange(7), permutation])  # model 1's unit j is model 0's unit permutation[j]
    match = GroupMatch.of_labels("g", (7, 7), 7, labels, None, "activations")
    fitted = regression_unmerge(match, _statistics_of(samples, (7, 7)), ridge=1e-6)
    for u, copy in zip(fitted.unmerge_matrices, match.unmerge):
        np.testing.assert_allclose(u, copy.numpy(), atol=1e-9)


@pytest.mark.parametrize("method", ["zip", "permute", "mudsc"])
def test_regression_unmerge_recovers_a_permuted_twin(method: str) -> None:
    """A twin through the whole merge: BatchNorm net and a ViT whose heads stay one-to-one."""
    batches = random_batches()
    torch.manual_seed(0)
    model = _calibrated(FACTORIES["zoo_resnet"], batches)
    twin = random_permute(model, batches[0], seed=1)
    result = fxmerge.merge([model, twin], batches, method=method, unmerge="regression", quiet=True)
    assert relative_error(output_of(model, batches[0]), output_of(result.module, batches[0]), norm="l2") < 1e-5
    assert any("regression unmerge" in g.source for g in result.groups)
    torch.manual_seed(0)
    vit = _vit(2, 32).eval()
    result = fxmerge.merge([vit, random_permute(vit, batches[0], seed=1)], batches, method=method, unmerge="regression", quiet=True)
    assert relative_error(output_of(vit, batches[0]), output_of(result.module, batches[0]), norm="l2") < 1e-5
    fitted = {g.name for g in result.groups if "regression unmerge" in g.source}
    heads = [g for g in result.groups if g.name.endswith(":heads")]
    assert fitted and heads and not fitted & {g.name for g in heads}


def test_regression_unmerge_recovers_m_from_widened_copy(widened_case) -> None:
    model, wide, batches, y = widened_case
    result = fxmerge.merge([model, wide], batches, method="zip", width="min", unmerge="regression", quiet=True)
    assert relative_error(y, output_of(result.module, batches[0]), norm="l2") < TOL


def test_regression_unmerge_changes_only_the_unmerge(equal_resnets) -> None:
    """On two independent models: the same merged units (labels) as the copy unmerge, other
    weights, and the same bits on a second run (deterministic)."""
    *models, batches = equal_resnets
    copy = fxmerge.merge(models, batches, quiet=True)
    fitted = [fxmerge.merge(models, batches, unmerge="regression", quiet=True) for _ in range(2)]
    assert [g.labels for g in copy.groups] == [g.labels for g in fitted[0].groups]
    states = [m.module.state_dict() for m in (copy, *fitted)]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])
    # fitted to equal weights: re-weighting would need the statistics again
    reweighted = fitted[0].interpolate((0.5, 0.5)).state_dict()
    assert all(torch.equal(reweighted[k], states[1][k]) for k in states[1] if k.endswith("weight"))
    with pytest.raises(ConfigError, match="merge again with model_weights"):
        fitted[0].interpolate((1.0, 0.0))


def test_regression_unmerge_needs_feature_statistics(equal_resnets) -> None:
    *models, batches = equal_resnets
    with pytest.raises(ConfigError, match="method='average'"):
        fxmerge.merge(models, batches, method="average", unmerge="regression", quiet=True)
    with pytest.raises(ConfigError, match="data-free"):
        fxmerge.merge(models, None, unmerge="regression", example_input=batches[0], quiet=True)
