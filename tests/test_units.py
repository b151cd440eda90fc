"""``fxmerge.passes.units``: the spine (dominator chain of the output) and the units cut along it.

Units as implemented (commit "units split pooling/flatten into their own units"): a step with a
layer (conv / linear / attention) starts a unit and takes the layer-free, shape-preserving steps
after it (norm, activation); a layer-free step that changes the shape (pooling, flatten, token
selection) forms an "other" unit of its own, so that a block looks the same whether or not it is
the last one.
"""

from __future__ import annotations


import networkx as nx
import pytest
import torch
import torchvision.models as tvm
from torch.fx import GraphModule

import fxmerge
from fxmerge import zoo
from fxmerge.passes.units import Unit, analysis_for_units, channel_count, channel_dims, find_units, spine


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def traced(model: torch.nn.Module, shape: tuple[int, ...]) -> GraphModule:
    torch.manual_seed(0)
    return fxmerge.trace(model.eval(), torch.randn(shape))


def check_chain(gm: GraphModule, units: list[Unit]) -> None:
    """Units tile the spine: consecutive, indexed in order, from the placeholder to the last node."""
    nodes = {n.name: n for n in gm.graph.nodes}
    assert [u.index for u in units] == list(range(len(units)))
    assert nodes[units[0].start].op == "placeholder"
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert units[-1].end == output.args[0].name
    for before, after in zip(units, units[1:]):
        assert before.end == after.start
        assert before.out_shape == after.in_shape
    chain = spine(gm)
    for unit in units:
        assert unit.start in chain and unit.end in chain
        assert unit.nodes[-1] == unit.end
        assert set(unit.layers) <= set(unit.nodes)
    seen = [name for unit in units for name in unit.nodes]
    assert len(seen) == len(set(seen)), "a node belongs to two units"


def shapes(unit: Unit) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return unit.shape_change


def test_zoo_resnet_units() -> None:
    gm = traced(zoo.resnet((1, 1, 1), in_channels=1, image_size=8), (2, 1, 8, 8))
    units = find_units(gm)
    check_chain(gm, units)
    assert [u.kind for u in units] == ["plain", "residual", "residual", "residual", "other", "plain"]
    assert units[0].layers == ("stem_0",)
    assert units[1].layers == ("stage1_0_conv1", "stage1_0_conv2")
    assert units[2].layers == ("stage2_0_conv1", "stage2_0_conv2", "stage2_0_shortcut_0")
    assert units[3].layers == ("stage3_0_conv1", "stage3_0_conv2", "stage3_0_shortcut_0")
    assert units[4].layers == () and set(units[4].nodes) == {"pool", "flatten"}
    assert units[5].layers == ("head",)
    assert [shapes(u) for u in units] == [
        ((1, 8, 8), (16, 8, 8)),
        ((16, 8, 8), (16, 8, 8)),
        ((16, 8, 8), (32, 4, 4)),  # stride 2: channels double, spatial size halves
        ((32, 4, 4), (64, 2, 2)),
        ((64, 2, 2), (64,)),
        ((64,), (10,)),
    ]
    assert [u.preserves_shape for u in units] == [False, True, False, False, False, False]
    assert all(u.in_shape[0] == 2 for u in units)  # batch dimension kept
    # Every residual block holds its own add and closing ReLU.
    for unit in units[1:4]:
        assert any(name.startswith("add") for name in unit.nodes)
        assert unit.end.endswith("relu2")


def test_zoo_vgg_units() -> None:
    gm = traced(zoo.vgg(batch_norm=True, in_channels=1, image_size=8, hidden=32), (2, 1, 8, 8))
    units = find_units(gm)
    check_chain(gm, units)
    assert all(u.kind in ("plain", "other") for u in units)
    plain = [u for u in units if u.kind == "plain"]
    # one plain unit per conv (with its BatchNorm and ReLU) and per Linear (with its ReLU)
    assert [u.layers for u in plain] == [
        ("features_0",), ("features_4",), ("features_8",), ("classifier_0",), ("classifier_2",)
    ]
    assert [u.nodes for u in plain[:3]] == [
        ("features_0", "features_1", "features_2"),
        ("features_4", "features_5", "features_6"),
        ("features_8", "features_9", "features_10"),
    ]
    assert plain[3].nodes == ("classifier_0", "classifier_1")
    assert shapes(plain[0]) == ((1, 8, 8), (16, 8, 8))
    assert shapes(plain[1]) == ((16, 4, 4), (32, 4, 4))
    assert shapes(plain[2]) == ((32, 2, 2), (64, 2, 2))
    assert shapes(plain[3]) == ((64,), (32,))
    assert shapes(plain[4]) == ((32,), (10,))
    # the max pools (and the flatten after the last one) are layer-free, shape-changing units
    others = [u for u in units if u.kind == "other"]
    assert [u.nodes for u in others] == [("features_3",), ("features_7",), ("features_11", "flatten")]
    assert all(u.layers == () and not u.preserves_shape for u in others)


def test_torchvision_resnet18_units() -> None:
    gm = traced(tvm.resnet18(num_classes=10), (2, 3, 32, 32))
    units = find_units(gm)
    check_chain(gm, units)
    residual = [u for u in units if u.kind == "residual"]
    assert len(residual) == 8
    expected_blocks = [f"layer{s}_{b}" for s in range(1, 5) for b in range(2)]
    for unit, block in zip(residual, expected_blocks):
        assert unit.layers[:2] == (f"{block}_conv1", f"{block}_conv2")
        downsample = block.endswith("_0") and block != "layer1_0"
        assert unit.layers[2:] == ((f"{block}_downsample_0",) if downsample else ())
        assert unit.preserves_shape == (not downsample), (block, unit.in_shape, unit.out_shape)
        if downsample:
            (c, h, w), (c2, h2, w2) = unit.shape_change
            assert (c2, h2, w2) == (2 * c, h // 2, w // 2)
    # 1 + 8 + 1 units with a layer: the stem conv, the 8 blocks, the classifier
    with_layers = [u for u in units if u.layers]
    assert len(with_layers) == 10
    assert with_layers[0].kind == "plain" and with_layers[0].layers == ("conv1",)
    assert with_layers[-1] is units[-1] and units[-1].kind == "plain" and units[-1].layers == ("fc",)
    assert shapes(units[-1]) == ((512,), (10,))
    assert all(u.kind == "other" for u in units if not u.layers)
    assert residual == units[2:10]  # stem, maxpool, 8 blocks, (pool+)flatten, fc


def test_vit_encoder_layers_are_two_residual_units_each() -> None:
    gm = traced(zoo.vit(patch_size=2, num_layers=3, in_channels=1, image_size=8), (2, 1, 8, 8))
    units = find_units(gm)
    check_chain(gm, units)
    residual = [u for u in units if u.kind == "residual"]
    assert len(residual) == 6
    for layer in range(3):
        attention, mlp = residual[2 * layer], residual[2 * layer + 1]
        prefix = f"encoder_layers_encoder_layer_{layer}"
        assert attention.layers == (f"{prefix}_self_attention",)
        assert mlp.layers == (f"{prefix}_mlp_0", f"{prefix}_mlp_3")
        assert f"{prefix}_ln_1" in attention.nodes and f"{prefix}_ln_2" in mlp.nodes
        for unit in (attention, mlp):
            assert unit.in_shape == unit.out_shape == (2, 17, 32)  # 16 patches + class token
    assert units[0].kind == "plain" and units[0].layers == ("conv_proj",)
    assert units[-1].kind == "plain" and units[-1].layers == ("heads_head",)
    assert shapes(units[-1]) == ((32,), (10,))


@pytest.mark.parametrize(
    ("name", "model", "shape"),
    [
        pytest.param(name, model, shape, id=name)
        for name, model, shape in [
            ("zoo_resnet", lambda: zoo.resnet((2, 1, 1), in_channels=1, image_size=8), (2, 1, 8, 8)),
            ("resnet18", lambda: tvm.resnet18(num_classes=10), (2, 3, 32, 32)),
            ("zoo_vgg", lambda: zoo.vgg(in_channels=1, image_size=8), (2, 1, 8, 8)),
        ]
    ],
)
def test_spine_is_the_dominator_chain_in_topological_order(name: str, model, shape) -> None:
    gm = traced(model(), shape)
    chain = spine(gm)
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    assert nodes[order[chain[0]]].op == "placeholder" and chain[0] == nodes[0].name
    assert nodes[order[chain[-1]]].op == "output"
    assert [order[c] for c in chain] == sorted(order[c] for c in chain)
    assert len(set(chain)) == len(chain)
    # Independent check on these models (no shape arithmetic, no parameters used as data): a node is
    # on the spine iff removing it disconnects the input from the output.
    graph = nx.DiGraph()
    for node in nodes:
        for source in node.all_input_nodes:
            if source.op != "get_attr":
                graph.add_edge(source.name, node.name)
    source, sink = chain[0], chain[-1]
    for node in graph.nodes:
        if node in (source, sink):
            continue
        cut = graph.copy()
        cut.remove_node(node)
        on_spine = not nx.has_path(cut, source, sink)
        assert on_spine == (node in chain), f"{name}: {node} on spine: {node in chain}, dominates output: {on_spine}"
    # inside a residual block (or a branch) nodes are off the spine
    if name != "zoo_vgg":
        assert any(n.name not in chain for n in nodes if n.op == "call_module")


# ------------------------------------------------ channel dims come from the analysis, not shapes


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_resnet_units_have_channels_on_dim_1(dims: int) -> None:
    """(N, C, L) and (N, C, D, H, W): rank says nothing about the channel dim (an (N, C, L) signal
    has the rank of an (N, L, C) token sequence); the analysis finds it."""
    gm = traced(zoo.resnet((1, 1), 4, dims=dims, in_channels=2, image_size=4, num_outputs=5), (2, 2, *(4,) * dims))
    units = find_units(gm)
    check_chain(gm, units)
    assert [u.kind for u in units] == ["plain", "residual", "residual", "other", "plain"]
    assert [(u.in_channel_dims, u.out_channel_dims) for u in units] == [((1,), (1,))] * 5
    assert [(u.in_channels, u.out_channels) for u in units] == [(2, 4), (4, 4), (4, 8), (8, 8), (8, 5)]
    space = (4,) * dims
    assert units[2].layout_change == ((2, -1, *space), (2, -1, *(2,) * dims))  # channel counts masked
    assert units[1].preserves_shape and not units[2].preserves_shape


def channels_last_units(width: int) -> list[Unit]:
    gm = traced(zoo.convnext((1, 1), width, in_channels=3, image_size=8, num_outputs=5), (2, 3, 8, 8))
    units = find_units(gm)
    check_chain(gm, units)
    return units


def test_channels_last_permutes_are_unit_boundaries_whatever_the_sizes() -> None:
    """A permute to channels-last and back is a layout change, also at C == H == W (8 channels on
    8x8), where the shapes before and after are equal: the units do not depend on the width."""
    units = channels_last_units(8)
    structure = [(u.kind, u.end, u.layout_change) for u in units]
    assert [(u.kind, u.end, u.layout_change) for u in channels_last_units(6)] == structure
    assert [(u.kind, u.end, u.layout_change) for u in channels_last_units(16)] == structure
    assert [u.kind for u in units] == ["plain", "other", "residual", "other", "plain", "residual", "other", "plain"]
    stem_norm = units[1]  # permute -> LayerNorm -> permute back, after the stem conv
    assert [n.split("_")[0] for n in stem_norm.nodes] == ["permute", "stem", "permute"]
    assert stem_norm.in_shape == stem_norm.out_shape == (2, 8, 8, 8) and stem_norm.in_channel_dims == (1,)
    # Inside the block the channels sit on the last dim, with a shape equal to the channels-first one.
    gm = traced(zoo.convnext((1, 1), 8, in_channels=3, image_size=8, num_outputs=5), (2, 3, 8, 8))
    analysis = analysis_for_units(gm)
    first, back = stem_norm.nodes[0], stem_norm.nodes[-1]
    assert channel_dims(analysis, first) == (3,) and channel_dims(analysis, back) == (1,)
    assert channel_count(analysis, first) == channel_count(analysis, back) == 8
    assert channel_dims(analysis, "x") == (1,) and channel_dims(analysis, "flatten") == (1,)


def test_a_permute_that_moves_the_channels_is_not_shape_preserving() -> None:
    """A unit whose output has the input's shape but its channels on another dim cannot become an
    identity, so the depth DP must not insert it as one."""
    unit = Unit(0, "a", "b", ("b",), "plain", (), (2, 8, 8, 8), (2, 8, 8, 8), (1,), (3,), 8, 8)
    assert not unit.preserves_shape
    assert unit.layout_change == ((2, -1, 8, 8), (2, 8, 8, -1))
