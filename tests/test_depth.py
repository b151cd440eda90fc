"""Depth-heterogeneous merging (issue #4): identity extension, merge(depth=...), constraints.

* The extension of a shallow model (``align_depth`` + ``extend``) computes exactly what the
  shallow model computes, on inputs that were not used for calibration, for randomised weights
  and BatchNorm statistics set from calibration data; it has the deep model's graph node for
  node, and every non-first unit of a segment is an inserted identity.
* ``merge`` of a shallow and a deep model returns a module of the deep structure and an
  alignment whose segmentation is feasible, covers the deep units in order and attains the
  optimum of its objective (checked by enumerating every feasible segmentation).
* Merging a shallow model with a randomly permuted copy of its own extension: the CKA of a deep
  unit with the shallow unit it copies is 1, so the DP recovers the segmentation the extension
  was built with, and the merge gives back the shallow model's function.
* A downsampling unit only pairs with a downsampling unit of the same shape change.
* Nets whose channel dim a shape does not tell (Conv1d (N, C, L), Conv3d (N, C, D, H, W), a
  channels-last ConvNeXt-style net at C == H == W): the extension of a narrow shallow net into a
  wide deep one is exact, depth and width merge in one call, a permuted twin is recovered.

The unbiased-HSIC CKA against a direct formula is tested in test_metrics.py
(``test_cka_matches_direct_formula``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.passes.depth import DepthAlignment, align_depth, compatibility, extend
from fxmerge.passes.features import tap_extractor
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.passes.segmentation import Segmentation
from fxmerge.passes.units import find_units
from fxmerge.testing import random_permute
from fxmerge.zoo import convnext, resnet, vgg, vgg_cfg, vit

from conftest import randomize_

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- helpers


def calibration_and_test(shape: tuple[int, ...], batches: int = 4, batch_size: int = 16, seed: int = 0):
    """Calibration batches and a separate test batch drawn from another generator and scale."""
    calibration_gen = torch.Generator().manual_seed(seed)
    test_gen = torch.Generator().manual_seed(seed + 1000)
    calibration = [torch.randn(batch_size, *shape, generator=calibration_gen) for _ in range(batches)]
    test = 1.3 * torch.randn(2 * batch_size, *shape, generator=test_gen) + 0.2
    return calibration, test


def prepared(model: nn.Module, seed: int, calibration) -> nn.Module:
    """Random weights everywhere, then BatchNorm statistics from the calibration data; eval mode."""
    randomize_(model, seed)
    reset_batchnorm(model, calibration, quiet=True)
    return model.eval()


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-12))


def node_structure(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in gm.graph.nodes]


def feasible_segmentations(first_ok: np.ndarray, extra_ok: np.ndarray):
    """Every segmentation satisfying the constraints, as tuples of segments (enumeration)."""
    m, n = first_ok.shape
    for inner in itertools.combinations(range(1, m), n - 1):
        starts, ends = (0, *inner), (*inner, m)
        if all(first_ok[s, i] and extra_ok[s + 1 : e].all() for i, (s, e) in enumerate(zip(starts, ends))):
            yield tuple(tuple(range(s, e)) for s, e in zip(starts, ends))


def objective_of(cka: np.ndarray, segments, objective: str) -> float:
    if objective == "lma":
        return float(sum(cka[j, i] for i, seg in enumerate(segments) for j in seg))
    return float(sum(cka[seg[-1], i] for i, seg in enumerate(segments)))


def alignment_with(segments, deep_units, shallow_units, model: int = 1) -> DepthAlignment:
    """A DepthAlignment for a chosen segmentation (``extend`` only reads the segments)."""
    segments = tuple(tuple(s) for s in segments)
    boundaries = tuple(s[-1] + 1 for s in segments)
    segmentation = Segmentation(boundaries, segments, "lma", float("nan"), tuple(s[0] for s in segments))
    m, n = len(deep_units), len(shallow_units)
    return DepthAlignment(
        model, tuple(u.end for u in deep_units), tuple(u.end for u in shallow_units), np.zeros((m, n)), segmentation
    )


def check_extension(shallow_gm, deep_gm, alignment, test: torch.Tensor, rtol: float = 1e-5) -> None:
    """The extension equals the shallow model's function, has the deep graph, and inserts
    identities exactly at the non-first units of the segments."""
    extended = extend(shallow_gm, deep_gm, alignment, test[:4])
    assert node_structure(extended) == node_structure(deep_gm)
    with torch.no_grad():
        expected = shallow_gm(test)
        got = extended(test)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    assert relative_error(expected, got) <= rtol

    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    extended_units = find_units(extended)
    assert [(u.start, u.end) for u in extended_units] == [(u.start, u.end) for u in deep_units]
    # At every deep position j of segment i, the extension carries shallow unit i's output.
    ext_taps = tap_extractor(extended, [u.end for u in deep_units])
    shallow_taps = tap_extractor(shallow_gm, [u.end for u in shallow_units])
    inputs = tap_extractor(extended, [u.start for u in deep_units])
    with torch.no_grad():
        ext_out, shallow_out, ext_in = ext_taps(test), shallow_taps(test), inputs(test)
    for i, segment in enumerate(alignment.segments):
        for j in segment:
            assert relative_error(shallow_out[i], ext_out[j]) <= rtol, f"deep unit {j} of segment {i}"
        for j in segment[1:]:  # an inserted unit passes its input through unchanged
            assert relative_error(ext_in[j], ext_out[j]) <= rtol, f"inserted unit {j} is not an identity"
    first_units = {s[0] for s in alignment.segments}
    for j in first_units - {0}:  # a real unit changes its input (else the test would prove nothing)
        if deep_units[j].preserves_shape:
            assert relative_error(ext_in[j], ext_out[j]) > 1e-3


# Shallow / deep pairs of one family and their input shape.
PAIRS = {
    "zoo-resnet": (
        lambda: resnet((1, 1, 1), 8, in_channels=3, image_size=16),
        lambda: resnet((3, 3, 3), 8, in_channels=3, image_size=16),
        (3, 16, 16),
    ),
    "zoo-vgg": (
        lambda: vgg(vgg_cfg((1, 1, 1), (8, 16, 32)), in_channels=3, image_size=16),
        lambda: vgg(vgg_cfg((2, 2, 2), (8, 16, 32)), in_channels=3, image_size=16),
        (3, 16, 16),
    ),
    "torchvision-resnet18-to-34": (
        lambda: __import__("torchvision").models.resnet18(num_classes=10),
        lambda: __import__("torchvision").models.resnet34(num_classes=10),
        (3, 32, 32),
    ),
    "zoo-vit-4-to-6": (
        lambda: vit(patch_size=4, num_layers=4, in_channels=3, image_size=16),
        lambda: vit(patch_size=4, num_layers=6, in_channels=3, image_size=16),
        (3, 16, 16),
    ),
    # Channel dims that neither rank nor sizes tell; the shallow net is also the narrow one.
    "zoo-resnet1d-x1-to-x2": (
        lambda: resnet((1, 1), 8, dims=1, in_channels=3, image_size=16, num_outputs=5),
        lambda: resnet((2, 2), 16, dims=1, in_channels=3, image_size=16, num_outputs=5),
        (3, 16),
    ),
    "zoo-resnet3d-x1-to-x2": (
        lambda: resnet((1, 1), 4, dims=3, in_channels=2, image_size=4, num_outputs=5),
        lambda: resnet((2, 2), 8, dims=3, in_channels=2, image_size=4, num_outputs=5),
        (2, 4, 4, 4),
    ),
    "zoo-convnext-x1-to-x2": (  # the shallow net has 8 channels on 8x8: C == H == W
        lambda: convnext((1, 1), 8, in_channels=3, image_size=8, num_outputs=5),
        lambda: convnext((2, 2), 16, in_channels=3, image_size=8, num_outputs=5),
        (3, 8, 8),
    ),
    "zoo-convnext-same-width": (  # both nets: 8 channels on 8x8 in stage 1
        lambda: convnext((1, 1), 8, in_channels=3, image_size=8, num_outputs=5),
        lambda: convnext((2, 3), 8, in_channels=3, image_size=8, num_outputs=5),
        (3, 8, 8),
    ),
}
# The pairs of nets whose channel dim a shape does not tell, narrow shallow net and wide deep net.
ND_PAIRS = ("zoo-resnet1d-x1-to-x2", "zoo-resnet3d-x1-to-x2", "zoo-convnext-x1-to-x2")


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
    make_shallow, make_deep, shape = PAIRS[request.param]
    calibration, test = calibration_and_test(shape)
    shallow = prepared(make_shallow(), 0, calibration)
    deep = prepared(make_deep(), 1, calibration)
    shallow_gm, deep_gm = fxmerge.trace(shallow, calibration[0]), fxmerge.trace(deep, calibration[0])
    return request.param, shallow, shallow_gm, deep_gm, calibration, test


# ----------------------------------------------------------------------------------- extension


@pytest.mark.parametrize("objective", ["lma", "sma"])
def test_extension_computes_the_shallow_function(pair, objective):
    name, shallow, shallow_gm, deep_gm, calibration, test = pair
    assert len(find_units(deep_gm)) > len(find_units(shallow_gm))
    alignment = align_depth(deep_gm, shallow_gm, calibration, objective, 1, quiet=True)
    assert any(len(s) > 1 for s in alignment.segments), "no identity inserted: nothing tested"
    with torch.no_grad():  # the traced graph is the model itself
        assert relative_error(shallow(test), shallow_gm(test)) <= 1e-6
    check_extension(shallow_gm, deep_gm, alignment, test)


def test_every_feasible_segmentation_extends_exactly():
    """Not only the DP's choice: each feasible way to place the zoo ResNet's blocks is exact."""
    make_shallow, make_deep, shape = PAIRS["zoo-resnet"]
    calibration, test = calibration_and_test(shape)
    shallow_gm = fxmerge.trace(prepared(make_shallow(), 0, calibration), calibration[0])
    deep_gm = fxmerge.trace(prepared(make_deep(), 1, calibration), calibration[0])
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    first_ok, extra_ok = compatibility(deep_gm, deep_units, shallow_gm, shallow_units)
    segmentations = list(feasible_segmentations(first_ok, extra_ok))
    # Stage 1 of the deep model has 3 shape-preserving blocks: the stem's segment can absorb 0, 1
    # or 2 of them; the downsampling blocks fix stages 2 and 3.
    assert len(segmentations) == 3
    for segments in segmentations:
        check_extension(shallow_gm, deep_gm, alignment_with(segments, deep_units, shallow_units), test)


# ------------------------------------------------------------------------------ compatibility


def test_downsampling_units_only_pair_with_downsampling_units():
    make_shallow, make_deep, shape = PAIRS["zoo-resnet"]
    x = torch.randn(4, *shape)
    shallow_gm, deep_gm = fxmerge.trace(make_shallow().eval(), x), fxmerge.trace(make_deep().eval(), x)
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    first_ok, extra_ok = compatibility(deep_gm, deep_units, shallow_gm, shallow_units)

    def downsamples(unit) -> bool:
        return len(unit.in_shape) == len(unit.out_shape) == 4 and unit.in_shape[2:] != unit.out_shape[2:]

    deep_down = [j for j, u in enumerate(deep_units) if downsamples(u)]
    shallow_down = [i for i, u in enumerate(shallow_units) if downsamples(u)]
    assert [deep_units[j].end for j in deep_down] == ["stage2_0_relu2", "stage3_0_relu2"]
    assert [shallow_units[i].end for i in shallow_down] == ["stage2_0_relu2", "stage3_0_relu2"]
    # Each downsampling shallow block pairs with exactly the deep block of the same stage ...
    for i, j in zip(shallow_down, deep_down):
        assert np.flatnonzero(first_ok[:, i]).tolist() == [j]
    # ... a downsampling deep block only starts the segment of a downsampling shallow block with
    # the same shapes, and can never become an identity.
    for j in deep_down:
        partners = np.flatnonzero(first_ok[j]).tolist()
        assert partners and all(i in shallow_down for i in partners)
        assert all(deep_units[j].shape_change == shallow_units[i].shape_change for i in partners)
        assert not extra_ok[j]
    # Shape-preserving stage-1 blocks pair only with the shallow stage-1 block.
    stage1 = [j for j, u in enumerate(deep_units) if u.end.startswith("stage1_")]
    assert stage1 == [1, 2, 3]
    assert all(np.flatnonzero(first_ok[j]).tolist() == [1] for j in stage1)
    assert extra_ok[stage1].all()
    # The stem, the pooling/flatten unit and the head are only compatible with themselves.
    assert np.flatnonzero(first_ok[0]).tolist() == [0]
    assert np.flatnonzero(first_ok[-1]).tolist() == [len(shallow_units) - 1]


# ------------------------------------------------- Conv1d, Conv3d, channels-last at C == H == W


@pytest.mark.parametrize("name", ND_PAIRS)
def test_depth_and_width_merge_in_one_call(name):
    """merge([shallow narrow, deep wide], depth="lma", width="max"): the shallow net is extended
    into the deep structure, then zipped with it at the deep (larger) widths."""
    make_shallow, make_deep, shape = PAIRS[name]
    calibration, test = calibration_and_test(shape)
    shallow, deep = prepared(make_shallow(), 0, calibration), prepared(make_deep(), 1, calibration)
    result = fxmerge.merge([shallow, deep], calibration, method="zip", depth="lma", width="max", quiet=True)
    (alignment,) = result.alignment
    assert alignment.model == 0 and any(len(s) > 1 for s in alignment.segments)
    deep_gm = fxmerge.trace(deep, calibration[0])
    assert node_structure(result.module) == node_structure(deep_gm)
    merged_shapes = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    assert merged_shapes == {k: tuple(v.shape) for k, v in deep_gm.state_dict().items()}
    with torch.no_grad():
        got = result.module(test)
    assert got.shape == (len(test), 5) and torch.isfinite(got).all()


@pytest.mark.parametrize("name", ND_PAIRS)
@pytest.mark.parametrize("method", ["permute", "zip"])
def test_deep_net_merged_with_its_permuted_twin_is_recovered(name, method):
    _, make_deep, shape = PAIRS[name]
    calibration, test = calibration_and_test(shape)
    deep = prepared(make_deep(), 1, calibration)
    twin = random_permute(deep, calibration[0], seed=3)
    with torch.no_grad():
        assert relative_error(deep(test), twin(test)) <= 1e-5
    changed = [k for k, v in deep.state_dict().items() if v.is_floating_point() and not torch.equal(v, twin.state_dict()[k])]
    assert len(changed) > len(deep.state_dict()) // 2  # the twin's weights are permuted
    result = fxmerge.merge([deep, twin], calibration, method=method, quiet=True)
    with torch.no_grad():
        assert relative_error(deep(test), result.module(test)) < 1e-4


# ---------------------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def digits_sized_resnets():
    shape = (1, 8, 8)
    calibration, test = calibration_and_test(shape, batches=6, batch_size=32)
    shallow = prepared(resnet((1, 1, 1), 8, in_channels=1, image_size=8), 0, calibration)
    deep = prepared(resnet((2, 3, 2), 8, in_channels=1, image_size=8), 1, calibration)
    return shallow, deep, calibration, test


@pytest.mark.parametrize("objective", ["lma", "sma"])
@pytest.mark.parametrize("method", ["permute", "zip"])
def test_merge_aligns_depth_and_returns_the_deep_structure(digits_sized_resnets, method, objective):
    shallow, deep, calibration, test = digits_sized_resnets
    result = fxmerge.merge([shallow, deep], calibration, method=method, depth=objective, quiet=True)
    deep_gm = fxmerge.trace(deep, calibration[0])
    shallow_gm = fxmerge.trace(shallow, calibration[0])
    assert node_structure(result.module) == node_structure(deep_gm)
    assert {k: v.shape for k, v in result.module.state_dict().items()} == {
        k: v.shape for k, v in deep_gm.state_dict().items()
    }
    with torch.no_grad():
        out = result.module(test)
    assert out.shape == (len(test), 10) and torch.isfinite(out).all()

    assert isinstance(result.alignment, tuple) and len(result.alignment) == 1
    alignment = result.alignment[0]
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    m, n = len(deep_units), len(shallow_units)
    assert alignment.model == 0
    assert alignment.cka.shape == (m, n) and np.isfinite(alignment.cka).all()
    assert alignment.cka.max() <= 1 + 1e-9
    assert alignment.deep_units == tuple(u.end for u in deep_units)
    assert alignment.shallow_units == tuple(u.end for u in shallow_units)
    assert alignment.segmentation.objective == objective

    segments = alignment.segments
    assert len(segments) == n and all(segments)
    assert [j for s in segments for j in s] == list(range(m))
    first_ok, extra_ok = compatibility(deep_gm, deep_units, shallow_gm, shallow_units)
    assert all(first_ok[s[0], i] for i, s in enumerate(segments))
    assert all(extra_ok[j] for s in segments for j in s[1:])
    value = objective_of(alignment.cka, segments, objective)
    assert value == pytest.approx(alignment.objective_value, rel=1e-12, abs=1e-12)
    # The optimum over every feasible segmentation, by enumeration.
    best = max(objective_of(alignment.cka, s, objective) for s in feasible_segmentations(first_ok, extra_ok))
    assert alignment.objective_value == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_hidden_channels_of_inserted_residual_units_take_the_deep_models_weights(digits_sized_resnets, method):
    """An inserted zero-residual unit's hidden channels never reach the shallow model's output,
    so the hidden groups are matched over the deep model alone: the shallow model's M_k and U_k
    are zero there and the merged hidden layers are the deep model's, bit for bit (its M_k is the
    identity), instead of averages of the deep layers with identity kernels."""
    shallow, deep, calibration, _ = digits_sized_resnets
    result = fxmerge.merge([shallow, deep], calibration, method=method, quiet=True)
    inserted = [j for segment in result.alignment[0].segments for j in segment[1:]]
    deep_analysis = fxmerge.analyze(deep, calibration[0])
    inert = {g.name for g in result.groups if "inert" in g.source}
    assert inserted and len(inert) == len(inserted)  # one hidden group per inserted BasicBlock
    merged, original = result.module.state_dict(), deep.state_dict()
    for name in inert:
        match = result.matches[name]
        assert not match.merge[0].any() and not match.unmerge[0].any()
        assert torch.equal(match.merge[1], torch.eye(match.sizes[1], dtype=torch.float64))
        norm_vectors = [r.param for r in deep_analysis.group(name).producers if original[r.param].dim() == 1]
        assert norm_vectors and any(p.endswith("bn1.weight") for p in norm_vectors)
        for param in norm_vectors:
            if "running" not in param:  # the running statistics are recomputed on calibration data
                assert torch.equal(merged[param], original[param]), param
    # groups with real units of both models are matched over both
    assert all(not m.merge[0].eq(0).all() for n, m in result.matches.items() if n not in inert and not m.fixed)
    # inserted="matched" (Xu et al.): the same groups are matched over both models
    paper = fxmerge.merge([shallow, deep], calibration, method=method, inserted="matched", quiet=True)
    assert not any("inert" in g.source for g in paper.groups)
    assert all(paper.matches[name].merge[0].any() for name in inert)


def test_the_attention_of_an_inserted_transformer_unit_is_the_deep_models_own():
    """An inserted attention sub-block (out_proj zeroed) of a shallow ViT: its heads and head
    channels are the deep model's own (identity M_k; zero for the shallow model), so the merged
    in_proj rows are the deep model's, bit for bit; the merge is otherwise a normal one."""
    calibration, test = calibration_and_test((1, 8, 8), batches=2, batch_size=32)
    torch.manual_seed(0)
    shallow = vit(patch_size=2, num_layers=2, in_channels=1, image_size=8).eval()
    deep = vit(patch_size=2, num_layers=3, in_channels=1, image_size=8).eval()
    result = fxmerge.merge([shallow, deep], calibration, quiet=True)
    own = [g for g in result.groups if g.source.startswith("the model's own")]
    layers = {g.name.split(".self_attention")[0] for g in own}
    assert len(layers) == 1 and {g.name.rsplit(":", 1)[1] for g in own} == {"heads", "qk", "v"}
    for group in own:
        match = result.matches[group.name]
        assert not match.merge[0].any() and torch.equal(match.merge[1], torch.eye(match.width, dtype=torch.float64))
    (layer,) = layers
    bias = f"{layer}.self_attention.in_proj_bias"
    assert torch.equal(result.module.state_dict()[bias], deep.state_dict()[bias])
    with torch.no_grad():
        assert torch.isfinite(result.module(test)).all()


def test_inert_groups_keep_the_width_asked_for():
    """A shallow x1 with a deep x2 ResNet: at width="max" the inserted units' hidden groups are
    the deep model's own units; at width="min" they cannot be (that needs merging the deep
    model's units), so they are matched over both models like any group, to the narrower width."""
    calibration, _ = calibration_and_test((1, 8, 8), batches=4, batch_size=32)
    shallow = prepared(resnet((1, 1, 1), 8, in_channels=1, image_size=8), 0, calibration)
    deep = prepared(resnet((2, 2, 2), 8, width_multiplier=2, in_channels=1, image_size=8), 1, calibration)
    wide = fxmerge.merge([shallow, deep], calibration, width="max", quiet=True)
    narrow = fxmerge.merge([shallow, deep], calibration, width="min", quiet=True)
    inert = {g.name for g in wide.groups if "inert" in g.source}
    assert len(inert) == 3  # one inserted block per stage
    for group in wide.groups:
        if not group.fixed:
            assert group.width == max(group.sizes), group.name
    for group in narrow.groups:
        assert "inert" not in group.source
        if not group.fixed:
            assert group.width == min(group.sizes), group.name


def test_merge_order_does_not_change_the_alignment(digits_sized_resnets):
    shallow, deep, calibration, _ = digits_sized_resnets
    first = fxmerge.merge([shallow, deep], calibration, method="permute", depth="lma", quiet=True).alignment[0]
    second = fxmerge.merge([deep, shallow], calibration, method="permute", depth="lma", quiet=True).alignment[0]
    assert (first.model, second.model) == (0, 1)
    np.testing.assert_allclose(first.cka, second.cka, rtol=0, atol=1e-12)
    assert first.segments == second.segments


def test_lma_and_sma_optimise_different_objectives(digits_sized_resnets):
    """Each objective's segmentation is at least as good as the other's under its own objective."""
    shallow, deep, calibration, _ = digits_sized_resnets
    lma = fxmerge.merge([shallow, deep], calibration, method="permute", depth="lma", quiet=True).alignment[0]
    sma = fxmerge.merge([shallow, deep], calibration, method="permute", depth="sma", quiet=True).alignment[0]
    np.testing.assert_allclose(lma.cka, sma.cka, rtol=0, atol=1e-12)
    assert objective_of(lma.cka, lma.segments, "lma") >= objective_of(lma.cka, sma.segments, "lma") - 1e-12
    assert objective_of(sma.cka, sma.segments, "sma") >= objective_of(sma.cka, lma.segments, "sma") - 1e-12


# ------------------------------------------------------------- merging with its own extension


def self_extension_case(family: str):
    """(shallow model, twin = random_permute(extension), segments used, calibration, test)."""
    shape = (1, 8, 8)
    calibration, test = calibration_and_test(shape, batches=6, batch_size=32)
    if family == "resnet":
        shallow = prepared(resnet((1, 1, 1), 8, in_channels=1, image_size=8), 0, calibration)
        deep = resnet((3, 3, 3), 8, in_channels=1, image_size=8).eval()
    elif family == "vit":
        shallow = prepared(vit(patch_size=2, num_layers=2, in_channels=1, image_size=8), 0, calibration)
        deep = vit(patch_size=2, num_layers=3, in_channels=1, image_size=8).eval()
    else:
        shallow = prepared(vgg(vgg_cfg((1, 1, 1), (8, 16, 32)), in_channels=1, image_size=8), 0, calibration)
        deep = vgg(vgg_cfg((2, 2, 2), (8, 16, 32)), in_channels=1, image_size=8).eval()
    shallow_gm, deep_gm = fxmerge.trace(shallow, calibration[0]), fxmerge.trace(deep, calibration[0])
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    first_ok, extra_ok = compatibility(deep_gm, deep_units, shallow_gm, shallow_units)
    # The lexicographically LARGEST feasible segmentation: ties in the DP go to the smallest, so
    # finding this one again must come from the CKA values, not from tie-breaking.
    segments = max(feasible_segmentations(first_ok, extra_ok), key=lambda s: tuple(x[-1] for x in s))
    extended = extend(shallow_gm, deep_gm, alignment_with(segments, deep_units, shallow_units), test[:4])
    twin = random_permute(extended, calibration[0], seed=7)
    return shallow, twin, segments, calibration, test


@pytest.mark.parametrize("family", ["resnet", "vit", "vgg"])
@pytest.mark.parametrize("objective", ["lma", "sma"])
def test_dp_recovers_the_segmentation_of_its_own_extension(family, objective):
    shallow, twin, segments, calibration, _ = self_extension_case(family)
    assert any(len(s) > 1 for s in segments)
    shallow_gm, twin_gm = fxmerge.trace(shallow, calibration[0]), fxmerge.trace(twin, calibration[0])
    alignment = align_depth(twin_gm, shallow_gm, calibration, objective, 0, quiet=True)
    m, n = alignment.cka.shape
    for i, segment in enumerate(segments):  # a deep unit that copies shallow unit i: CKA 1
        np.testing.assert_allclose(alignment.cka[list(segment), i], 1.0, atol=1e-9)
    if objective == "lma":
        # Every other segmentation pairs some deep unit with a shallow unit it does not copy.
        assert alignment.segments == segments
        assert alignment.objective_value == pytest.approx(m, abs=1e-9)
    else:
        # SMA only scores the last unit of each segment, so every feasible segmentation whose
        # segment i ends inside the true segment i is optimal too: SMA cannot tell where a
        # segment starts. Ties go to the lexicographically smallest boundaries.
        deep_units, shallow_units = find_units(twin_gm), find_units(shallow_gm)
        first_ok, extra_ok = compatibility(twin_gm, deep_units, shallow_gm, shallow_units)
        optimal = [
            s for s in feasible_segmentations(first_ok, extra_ok)
            if all(seg[-1] in true for seg, true in zip(s, segments))
        ]
        assert segments in optimal
        assert len(optimal) > (1 if family in ("resnet", "vit") else 0)
        assert alignment.objective_value == pytest.approx(n, abs=1e-9)
        assert alignment.segments == min(optimal, key=lambda s: tuple(seg[-1] for seg in s))


@pytest.mark.parametrize("family", ["resnet", "vit"])
@pytest.mark.parametrize(("method", "beta"), [("permute", 1.0), ("zip", 0.0)])
def test_merging_a_model_with_its_permuted_extension_gives_it_back(family, method, beta):
    """[shallow, permute(extend(shallow))]: the depth DP finds the extension's segmentation, the
    width matching undoes the permutation, so the merge is the shallow model's function.

    zip runs with beta=0 (no merges within one model): with beta=1 zip may pair two units of one
    model that are both constant (dead) on the calibration data, which is exact on calibration
    inputs only.
    """
    shallow, twin, segments, calibration, test = self_extension_case(family)
    result = fxmerge.merge([shallow, twin], calibration, method=method, beta=beta, depth="lma", quiet=True)
    assert result.alignment[0].segments == segments
    with torch.no_grad():
        expected, got = shallow(test), result.module(test)
    assert relative_error(expected, got) <= 1e-5


def test_vgg_merged_with_its_permuted_extension_is_the_extension_after_batchnorm_reset():
    """A VGG merged with its own permuted extension gives back that EXTENSION with its BatchNorm
    statistics recomputed on the calibration data — which is what every merge does (BN reset,
    as in ZipIt!/REPAIR). For VGG this is not the shallow VGG itself: an inserted plain unit's
    BatchNorm (weight 1, bias 0, stats 0/1) is an identity only with those statistics, and the
    reset (train-mode batch statistics) re-normalises it. Residual units have a zeroed branch and
    are unaffected (see the ResNet/ViT cases above)."""
    shallow, twin, segments, calibration, _ = self_extension_case("vgg")
    result = fxmerge.merge([shallow, twin], calibration, method="permute", depth="lma", quiet=True)
    assert result.alignment[0].segments == segments
    shallow_gm, twin_gm = fxmerge.trace(shallow, calibration[0]), fxmerge.trace(twin, calibration[0])
    units = find_units(twin_gm)
    extended = extend(shallow_gm, twin_gm, alignment_with(segments, units, find_units(shallow_gm)), calibration[0])
    reset_batchnorm(extended, calibration, quiet=True)
    with torch.no_grad():
        assert relative_error(extended(calibration[0]), result.module(calibration[0])) <= 1e-5
        # and the reset really does change the function: the limitation is real, not a test artefact
        assert relative_error(shallow(calibration[0]), result.module(calibration[0])) > 1e-3


def test_depth_alignment_skips_calibration_batches_too_small_for_cka(digits_sized_resnets):
    """A data set's last, partial batch (< 4 samples) must not break the unbiased CKA."""
    shallow, deep, calibration, _ = digits_sized_resnets
    with_tail = [*calibration, calibration[0][:3]]
    result = fxmerge.merge([shallow, deep], with_tail, method="permute", depth="lma", quiet=True)
    reference = fxmerge.merge([shallow, deep], calibration, method="permute", depth="lma", quiet=True)
    np.testing.assert_allclose(result.alignment[0].cka, reference.alignment[0].cka, rtol=0, atol=1e-12)
    with pytest.raises(fxmerge.errors.CalibrationError):
        fxmerge.merge([shallow, deep], [calibration[0][:3]], method="permute", depth="lma", quiet=True)


# ---------------------------------------------------------------------------------------- plots


def test_plots_write_pngs_and_import_matplotlib_lazily(digits_sized_resnets, tmp_path):
    import ast
    import inspect

    import fxmerge.plots

    # No module-level matplotlib import: fxmerge (and fxmerge.plots) import without it.
    tree = ast.parse(inspect.getsource(fxmerge.plots))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level for a in n.names] + [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
    assert not any(name.startswith("matplotlib") for name in names)
    pytest.importorskip("matplotlib")
    from fxmerge.plots import plot_alignment, plot_groups

    shallow, deep, calibration, _ = digits_sized_resnets
    result = fxmerge.merge([shallow, deep], calibration, method="zip", depth="lma", quiet=True)
    for path in (
        plot_alignment(result.alignment[0], tmp_path / "cka.png", title="resnet"),
        plot_groups(result, tmp_path / "sub" / "groups.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(fxmerge.errors.ConfigError):
        plot_alignment(result.alignment, tmp_path / "bad.png")  # the tuple, not one alignment
