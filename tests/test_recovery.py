"""A merged permuted twin is the model: recovery on torchvision's grouped, depthwise, SE,
channel-shuffle, channels-last and attention families, and on grouped Conv1d / Conv3d nets.

``fxmerge.testing.random_permute(m, x, seed=1)`` computes m's function with every free group
permuted (grouped-conv groups and channels per group, attention heads and head channels
included). ``merge([m, twin], calibration, method=...)`` must find every permutation back: the
merged model's output is m's to a relative error (``conftest.relative_error``, max-abs) below
1e-4 for permute, zip and MuDSC. Every parameter and buffer of m is first randomised
(``conftest.randomize_``: constant inits such as ConvNeXt's 1e-6 layer scale or ViT's zero head
would hide a mismatched parameter), then its BatchNorm statistics are set to the calibration
data's (``reset_batchnorm``), because merging resets BatchNorm on that data.

``test_twin_is_nontrivial`` gives each recovery assertion teeth: the twin computes m's function,
but averaging it with m without alignment does not.

Also here: Net2Net recovery of a grouped-conv net (the widened copy doubles the channels per
group, the group count stays), and a group observed on fewer calibration samples than it has
units, which must be named in a warning while the weight tie-break still recovers the twin.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig

import fxmerge
from fxmerge import zoo
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.testing import net2net_widen, random_permute
from conftest import output_of, random_batches, randomize_, relative_error

TOL = 1e-4  # relative error max|y - y'| / max|y| of a recovered model

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_convnext() -> nn.Module:
    """convnext_tiny's blocks (depthwise 7x7, channels-last LayerNorm, layer scale), 2 stages."""
    return tvm.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10)


def _small_swin() -> nn.Module:
    """swin_t's blocks at 32x32: 8x8 patches in 4x4 windows (shifted, masked), then 4x4 (one window)."""
    return tvm.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10)


def _small_vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)


def _small_maxvit() -> nn.Module:
    return tvm.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
        head_dim=4, stochastic_depth_prob=0.0, num_classes=10,
    )


def _grouped_resnet(dims: int) -> Callable[[], nn.Module]:
    return lambda: zoo.resnet((1, 1), width=8, dims=dims, groups=4, in_channels=2, image_size=8)


ALL = ("permute", "zip", "mudsc")
# name -> (builder, calibration batch shape, methods); 4 calibration batches. torchvision builders
# at 32x32, the smallest size they all accept. convnext_tiny and swin_t take 40-80 s per merge on
# this machine, so here they are the same classes in small configurations (every block kind kept);
# resnext50_32x4d (the grouped-conv case that used to fail, 0.82) is tested with permute only, zip
# and MuDSC of grouped convs run on regnet_y_400mf and the grouped zoo nets: most of its time is
# the weight tie-break of its 2048-channel last stage, seen by 32 samples, whatever its depth.
# benchmarks/torchvision_models.py merges every full torchvision builder.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[str, ...]]] = {
    "resnext50_32x4d": (tvm.resnext50_32x4d, (8, 3, 32, 32), ("permute",)),
    "regnet_x_400mf": (tvm.regnet_x_400mf, (8, 3, 32, 32), ("permute",)),
    "regnet_y_400mf": (tvm.regnet_y_400mf, (8, 3, 32, 32), ALL),
    "shufflenet_v2_x0_5": (tvm.shufflenet_v2_x0_5, (8, 3, 32, 32), ALL),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, (8, 3, 32, 32), ALL),
    "efficientnet_b0": (tvm.efficientnet_b0, (8, 3, 32, 32), ("permute",)),
    "convnext_16_32": (_small_convnext, (8, 3, 32, 32), ALL),
    "swin_16_w4": (_small_swin, (8, 3, 32, 32), ALL),
    "vit_32px_p8": (_small_vit, (8, 3, 32, 32), ALL),
    "grouped_conv1d_resnet": (_grouped_resnet(1), (16, 2, 16), ALL),
    "grouped_conv3d_resnet": (_grouped_resnet(3), (8, 2, 6, 6, 6), ALL),
    # MaxVit's relative-position shape literals over a space that is no group (used to raise
    # KeyError '?63' in the rewrite); its einsum attention fails closed
    "maxvit_small": (_small_maxvit, (4, 3, 32, 32), ("permute",)),
}
CASES = [(name, method) for name, (_, _, methods) in sorted(MODELS.items()) for method in methods]


@dataclass
class Case:
    """m (eval mode, randomised, calibration-data BatchNorm statistics), its twin, the data."""

    model: nn.Module
    twin: nn.Module
    batches: list[torch.Tensor]
    y: torch.Tensor


@pytest.fixture(scope="module")
def cases(one_thread: None) -> Callable[[str], Case]:
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            builder, shape, _ = MODELS[name]
            torch.manual_seed(0)
            model = randomize_(builder().eval())
            batches = random_batches(shape, 4)
            reset_batchnorm(model, batches, quiet=True)
            twin = random_permute(model, batches[0], seed=1).eval()
            cache[name] = Case(model, twin, batches, output_of(model, batches[0]))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(MODELS))
def test_twin_is_nontrivial(cases, name: str) -> None:
    case = cases(name)
    assert relative_error(case.y, output_of(case.twin, case.batches[0])) < TOL
    state, twin_state = case.model.state_dict(), case.twin.state_dict()
    naive = copy.deepcopy(case.model)
    naive.load_state_dict({k: (v + twin_state[k]) / 2 if v.is_floating_point() else v for k, v in state.items()})
    assert relative_error(case.y, output_of(naive, case.batches[0])) > 1e-2


@pytest.mark.parametrize(("name", "method"), CASES)
def test_merged_permuted_twin_is_the_model(cases, name: str, method: str) -> None:
    case = cases(name)
    result = fxmerge.merge([case.model, case.twin], case.batches, method=method, quiet=True)
    err = relative_error(case.y, output_of(result.module, case.batches[0]))
    assert err < TOL, f"{name} {method}: max|y - y'| / max|y| = {err:.2e}"
    assert all(g.width == g.sizes[0] for g in result.groups)


# ----------------------------------------------------------------------- Net2Net, grouped convs


def test_net2net_widened_grouped_conv_net_is_recovered() -> None:
    """zip to width="min" (default alpha) of [m, Net2Net-widened m]: the widened copy has twice
    the channels per group of every grouped conv (4 groups stay 4), and only m's function fits."""
    factory = lambda w: zoo.resnet((1, 1), width=8, width_multiplier=w, groups=4, in_channels=1, image_size=8)  # noqa: E731
    batches = random_batches((16, 1, 8, 8))
    torch.manual_seed(0)
    model = randomize_(factory(1.0).eval())
    reset_batchnorm(model, batches, quiet=True)
    wide = net2net_widen(model, batches[0], 2, factory(2.0))
    assert wide.stage1[0].conv1.groups == 4 and wide.stage1[0].conv1.out_channels == 16
    y = output_of(model, batches[0])
    assert relative_error(y, output_of(wide, batches[0])) < 1e-5
    result = fxmerge.merge([model, wide], batches, method="zip", width="min", quiet=True)
    assert sum(p.numel() for p in result.module.parameters()) == sum(p.numel() for p in model.parameters())
    err = relative_error(y, output_of(result.module, batches[0]))
    assert err < TOL, f"max|y - y'| / max|y| = {err:.2e}"


# ------------------------------------------------------------------ too few calibration samples


def test_group_with_fewer_samples_than_units_warns_and_weights_break_the_ties() -> None:
    """The issue's setting on an MLP: calibration ``[x] * 4`` with x a batch of 2 inputs, hidden
    layers of 64 units. Every feature is then an affine function of one number, so all
    correlations are +-1 and activations cannot tell the units apart: without the weight
    tie-break the merge is wrong (0.68 here) while every group reports similarity 1. Each such
    group must be named in a warning (with the samples counted at its taps and its width), and
    the tie-break must give m back on new inputs."""
    torch.manual_seed(0)
    model = randomize_(zoo.mlp((64, 64), in_channels=1, image_size=4).eval())
    x = random_batches((2, 1, 4, 4), 1)[0]
    twin = random_permute(model, x, seed=1).eval()
    hidden = [g.name for g in fxmerge.analyze(model, x).free_groups]
    assert len(hidden) == 2
    for method in ("permute", "zip"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fxmerge.merge([model, twin], [x] * 4, method=method, quiet=True)
        messages = [str(w.message) for w in caught if "calibration samples" in str(w.message)]
        assert len(messages) == 1, messages  # one warning per merge, naming every starved group
        for name in hidden:
            assert f"{name} (8 samples, 64 units)" in messages[0], (name, messages)
        new = random_batches((16, 1, 4, 4), 1, seed=5)[0]
        err = relative_error(output_of(model, new), output_of(result.module, new))
        assert err < TOL, f"{method}: max|y - y'| / max|y| = {err:.2e}"
