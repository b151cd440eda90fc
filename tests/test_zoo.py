"""Tests for fxmerge.zoo: shapes, exact fx traceability, and the module layout later passes rely on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.fx
from torch import nn

from fxmerge import zoo
from fxmerge.zoo import BasicBlock, ConvNeXtBlock, FAMILIES, convnext, mlp, resnet, vgg, vgg_cfg, vit


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast


DIGITS = {"in_channels": 1, "image_size": 8}
CIFAR = {"in_channels": 3, "image_size": 32}
SIZES = {"digits": DIGITS, "cifar": CIFAR}

# Small but non-default configurations, so every family is exercised beyond its defaults.
FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet,
    "resnet_deep": lambda **kw: resnet((2, 1, 2), width=8, **kw),
    "vgg": vgg,
    "vgg_two_pools": lambda **kw: vgg((16, "M", 32, "M", 64), **kw),
    "vgg_no_bn": lambda **kw: vgg(vgg_cfg((2, 1, 1)), batch_norm=False, **kw),
    "mlp": mlp,
    "mlp_layernorm": lambda **kw: mlp((32, 16, 8), layernorm=True, **kw),
    "vit": lambda **kw: vit(num_layers=2, **kw),
    "convnext": convnext,
    "convnext_deep": lambda **kw: convnext((2, 1), width=4, mlp_ratio=3, **kw),
}

# Layer types whose modules must each be called at exactly one graph node.
UNIT_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.ReLU)


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input(size: dict[str, int], batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, size["in_channels"], size["image_size"], size["image_size"], generator=generator)


def _with_nontrivial_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """One train-mode forward moves BN running stats away from (0, 1), so eval mode is not trivial."""
    model.train()
    with torch.no_grad():
        model(x * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("family", list(FACTORIES))
def test_output_shape_and_exact_trace(family: str, size_name: str) -> None:
    torch.manual_seed(0)
    size = SIZES[size_name]
    model = FACTORIES[family](num_outputs=7, **size)
    assert model.training, "factories must return models in train mode, like torchvision"
    x = _input(size)
    model = _with_nontrivial_running_stats(model, x)

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        eager_out = model(x)
        traced_out = traced(x)
    assert eager_out.shape == (4, 7)
    assert eager_out.abs().max() > 0, "an all-zero output would make the trace comparison vacuous"
    torch.testing.assert_close(traced_out, eager_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["resnet", "resnet_deep", "vgg", "vgg_two_pools", "vgg_no_bn", "mlp", "mlp_layernorm", "convnext_deep"])
def test_every_unit_module_has_exactly_one_call_site(family: str) -> None:
    model = FACTORIES[family](**DIGITS)
    traced = torch.fx.symbolic_trace(model)
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    unit_names = {name for name, module in model.named_modules() if isinstance(module, UNIT_TYPES)}
    assert unit_names, "model has no units at all"
    assert {name: calls[name] for name in unit_names} == {name: 1 for name in unit_names}
    assert not any(getattr(m, "inplace", False) for m in model.modules() if isinstance(m, nn.ReLU))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_width_multiplier_two_adds_parameters(family: str) -> None:
    factory = FAMILIES[family]
    narrow = factory(width_multiplier=1.0, **DIGITS)
    wide = factory(width_multiplier=2.0, **DIGITS)
    assert _num_parameters(wide) > _num_parameters(narrow)
    x = _input(DIGITS)
    assert wide.eval()(x).shape == narrow.eval()(x).shape == (4, 10)


def test_families_registry() -> None:
    assert FAMILIES == {"resnet": resnet, "vgg": vgg, "mlp": mlp, "vit": vit, "convnext": convnext}
    assert zoo.BasicBlock is BasicBlock


def test_resnet_layout_with_three_blocks_per_stage() -> None:
    model = resnet((3, 3, 3), width=8, width_multiplier=1.5, **DIGITS)
    assert [name for name, _ in model.named_children()] == ["stem", "stage1", "stage2", "stage3", "pool", "flatten", "head"]
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert model.stem[0].bias is None
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and isinstance(model.flatten, nn.Flatten)

    expected_widths = (12, 24, 48)  # round(8 * 1.5) * (1, 2, 4)
    for stage_index, width in enumerate(expected_widths):
        stage = getattr(model, f"stage{stage_index + 1}")
        assert isinstance(stage, nn.Sequential) and len(stage) == 3
        assert all(isinstance(block, BasicBlock) for block in stage)
        strides = [block.conv1.stride for block in stage]
        assert strides == ([(2, 2)] if stage_index > 0 else [(1, 1)]) + [(1, 1), (1, 1)]
        assert all(block.conv2.out_channels == width for block in stage)
        # Only a stage's first block changes shape, so only it needs a projection shortcut.
        shortcut_lengths = [len(block.shortcut) for block in stage]
        assert shortcut_lengths == ([2] if stage_index > 0 else [0]) + [0, 0]
    assert model.head.in_features == 48 and model.head.out_features == 10


def test_resnet_stage_resolution_on_digits() -> None:
    model = resnet(**DIGITS).eval()
    spatial_sizes: dict[str, tuple[int, ...]] = {}
    for name in ("stem", "stage1", "stage2", "stage3"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: spatial_sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    model(_input(DIGITS))
    assert spatial_sizes == {"stem": (16, 8, 8), "stage1": (16, 8, 8), "stage2": (32, 4, 4), "stage3": (64, 2, 2)}


def test_basic_block_shortcut_kinds() -> None:
    identity = BasicBlock(8, 8, stride=1)
    assert isinstance(identity.shortcut, nn.Sequential) and len(identity.shortcut) == 0
    projection = BasicBlock(8, 16, stride=2)
    conv, bn = projection.shortcut
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 16
    widen_only = BasicBlock(8, 16, stride=1)
    assert len(widen_only.shortcut) == 2
    assert projection(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)


@pytest.mark.parametrize(("dims", "conv", "norm"), [(1, nn.Conv1d, nn.BatchNorm1d), (3, nn.Conv3d, nn.BatchNorm3d)])
def test_resnet_dims_builds_conv1d_and_conv3d_nets(dims: int, conv: type, norm: type) -> None:
    torch.manual_seed(0)
    model = resnet((2, 1), width=4, dims=dims, in_channels=2, image_size=8, num_outputs=5)
    assert {type(m) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)} == {conv}
    assert {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {norm}
    x = torch.randn(3, 2, *(8,) * dims)
    model = _with_nontrivial_running_stats(model, x)
    traced_model = torch.fx.symbolic_trace(model)
    sizes: dict[str, tuple[int, ...]] = {}
    for name in ("stem", "stage1", "stage2"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:])))
    with torch.no_grad():
        eager = model(x)
        traced = traced_model(x)
    assert eager.shape == (3, 5)
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-6)
    assert sizes == {"stem": (4, *(8,) * dims), "stage1": (4, *(8,) * dims), "stage2": (8, *(4,) * dims)}
    with pytest.raises(ValueError, match="dims"):
        resnet(dims=4)


def test_convnext_layout_is_channels_last_inside_blocks() -> None:
    model = convnext((1, 2), width=8, in_channels=3, image_size=8, num_outputs=5)
    assert [name for name, _ in model.named_children()] == ["stem", "stem_norm", "stage1", "stage2", "pool", "flatten", "norm", "head"]
    block = model.stage1[0]
    assert isinstance(block, ConvNeXtBlock) and block.dwconv.groups == block.dwconv.in_channels == 8
    assert (block.fc1.in_features, block.fc1.out_features, block.fc2.out_features) == (8, 16, 8)
    assert len(model.stage2) == 3 and model.stage2[0].conv.stride == (2, 2) and model.stage2[0].conv.out_channels == 16
    traced = torch.fx.symbolic_trace(model)
    permutes = [n.args[1:] for n in traced.graph.nodes if n.op == "call_method" and n.target == "permute"]
    # stem norm, one block, downsample norm, two blocks: to channels-last and back each time
    assert permutes == [(0, 2, 3, 1), (0, 3, 1, 2)] * 5
    x = torch.randn(2, 3, 8, 8)  # 8 channels on 8x8: C == H == W in stage 1
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        convnext((1, 1, 1, 1), image_size=4)


def test_vgg_cfg() -> None:
    assert vgg_cfg() == (16, "M", 32, "M", 64, "M")
    assert vgg_cfg((2, 2, 2)) == (16, 16, "M", 32, 32, "M", 64, 64, "M")
    assert vgg_cfg((1, 3), (8, 4)) == (8, "M", 4, 4, 4, "M")
    with pytest.raises(ValueError):
        vgg_cfg((1, 1), (8, 16, 32))


@pytest.mark.parametrize(
    ("cfg", "size", "flat_features"),
    [
        ((16, "M", 32, "M", 64, "M"), DIGITS, 64 * 1 * 1),
        ((16, "M", 32, "M", 64), DIGITS, 64 * 2 * 2),
        ((16, "M", 32, "M", 64, "M"), CIFAR, 64 * 4 * 4),
    ],
)
def test_vgg_classifier_reads_flattened_map(cfg: tuple, size: dict[str, int], flat_features: int) -> None:
    model = vgg(cfg, hidden=20, **size)
    assert [name for name, _ in model.named_children()] == ["features", "flatten", "classifier"]
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    first, relu, last = model.classifier
    assert isinstance(relu, nn.ReLU)
    assert (first.in_features, first.out_features) == (flat_features, 20)
    assert (last.in_features, last.out_features) == (20, 10)


def test_vgg_feature_layout_and_width_scaling() -> None:
    model = vgg((4, "M", 6, "M"), batch_norm=True, width_multiplier=1.5, hidden=10, **DIGITS)
    assert [type(m) for m in model.features] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
    ]
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [6, 9]
    assert model.classifier[0].in_features == 9 * 2 * 2 and model.classifier[0].out_features == 15
    no_bn = vgg((4, "M"), batch_norm=False, **DIGITS)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())


def test_vgg_rejects_pooling_below_one_pixel() -> None:
    with pytest.raises(ValueError, match="below 1x1"):
        vgg(vgg_cfg((1, 1, 1, 1), (8, 8, 8, 8)), **DIGITS)


def test_mlp_layout() -> None:
    model = mlp((32, 16), layernorm=True, width_multiplier=0.5, num_outputs=3, **DIGITS)
    assert [name for name, _ in model.named_children()] == ["flatten", "layers"]
    assert [type(m) for m in model.layers] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    shapes = [(m.in_features, m.out_features) for m in model.layers if isinstance(m, nn.Linear)]
    assert shapes == [(64, 16), (16, 8), (8, 3)]


def test_vit_input_channels_and_width_rounding() -> None:
    model = vit(num_heads=4, hidden_dim=32, mlp_dim=64, width_multiplier=1.3, **DIGITS)
    assert model.conv_proj.in_channels == 1 and model.conv_proj.kernel_size == (2, 2)
    # 32 * 1.3 = 41.6 -> nearest multiple of 4 heads is 40; mlp 64 * 1.3 = 83.2 -> 83.
    assert model.hidden_dim == 40 and model.conv_proj.out_channels == 40
    assert model.encoder.layers[0].mlp[0].out_features == 83
    assert model.seq_length == (8 // 2) ** 2 + 1
    rgb = vit(**CIFAR)
    assert rgb.conv_proj.in_channels == 3 and rgb.hidden_dim == 32
    assert rgb.heads.head.weight.abs().sum() > 0, "head must not keep torchvision's all-zero init"
    with pytest.raises(ValueError):
        vit(patch_size=3, **DIGITS)
