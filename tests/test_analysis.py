"""Op coverage of the dependency analysis: one small hand-written model per rule.

Each case checks BOTH that permuting every free group keeps the outputs (``assert_invariant``,
after randomising every parameter and buffer) AND the expected group structure (which axes are
coupled, how many groups are free, index maps through flatten / cat / heads).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_invariant, nontrivial_permutations, randomize_, relative_error
from torch import nn

import fxmerge
from fxmerge.groups import Opaque
from fxmerge.passes.rewrite import transform_axis

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def groups_at(analysis, param: str, axis: int):
    """Groups on one parameter axis, in the order they first appear in the axis layout."""
    layout = analysis.param_layouts[analysis.aliases.get(param, param)][axis] or ()
    by_id = {analysis.space_ids[g.name]: g for g in analysis.groups}
    found = []
    for piece in layout:
        for factor in piece:
            if not isinstance(factor, Opaque) and by_id[factor] not in found:
                found.append(by_id[factor])
    return found


def group_at(analysis, param: str, axis: int):
    found = groups_at(analysis, param, axis)
    assert len(found) == 1, f"{param}[{axis}] is in {[g.name for g in found]}"
    return found[0]


def ref_of(analysis, param: str, axis: int):
    for group in analysis.groups:
        for ref in group.producers + group.consumers:
            if ref.param == param and ref.axis == axis:
                return ref
    raise AssertionError(f"{param}[{axis}] is in no group")


def free_names(analysis) -> set[str]:
    return {g.name for g in analysis.free_groups}


def same(analysis, *axes: tuple[str, int]) -> bool:
    """Whether all the given parameter axes lie in one single group."""
    return len({group_at(analysis, p, a).name for p, a in axes}) == 1


def channel_permutation(analysis, param: str, axis: int, perms) -> torch.Tensor:
    """The index map a set of space permutations induces on one parameter axis."""
    layout = analysis.param_layouts[analysis.aliases.get(param, param)][axis]
    size = sum(math.prod(f.size if isinstance(f, Opaque) else analysis.space_sizes[f] for f in piece) for piece in layout)
    return transform_axis(torch.arange(size), 0, layout, perms, analysis.space_sizes)


def check(model: nn.Module, x, **kwargs):
    """Randomise, analyse (no fail-closed warning allowed), check invariance; returns the analysis."""
    randomize_(model.eval(), seed=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis = fxmerge.analyze(model, x)
    assert_invariant(model, x, analysis, **kwargs)
    return analysis


def io_fixed(analysis, first: tuple[str, int], last: tuple[str, int]) -> None:
    """The model's input channels and output channels are fixed groups."""
    g_in, g_out = group_at(analysis, *first), group_at(analysis, *last)
    assert g_in.fixed and "model input" in g_in.reason
    assert g_out.fixed and "model output" in g_out.reason


IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
VEC = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------------------------


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.b = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x)))))


def test_grouped_conv() -> None:
    analysis = check(GroupedConv(), IMG)
    io_fixed(analysis, ("a.weight", 1), ("b.weight", 0))
    # a's 8 outputs factor as 4 groups x 2; g's 12 outputs as 4 groups x 3; the group index is shared
    a_out = groups_at(analysis, "a.weight", 0)
    g_out = groups_at(analysis, "g.weight", 0)
    assert [g.size for g in a_out] == [4, 2] and [g.size for g in g_out] == [4, 3]
    assert a_out[0].name == g_out[0].name
    assert all(not g.fixed for g in a_out + g_out)
    # g.weight's input axis reads only the per-group channels
    assert [g.name for g in groups_at(analysis, "g.weight", 1)] == [a_out[1].name]
    assert len(analysis.free_groups) == 3
    perms = nontrivial_permutations(analysis, 0)
    # channels of one conv group stay together: block of 2 (resp. 3) maps onto a block
    for param, block in (("a.weight", 2), ("g.weight", 3)):
        index = channel_permutation(analysis, param, 0, perms).view(4, block)
        assert (index // block == index[:, :1] // block).all()


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(self.dw2(F.relu6(self.dw(self.bn(self.a(x))))))


def test_depthwise_conv() -> None:
    analysis = check(Depthwise(), IMG)
    assert same(analysis, ("a.weight", 0), ("bn.weight", 0), ("bn.running_var", 0), ("dw.weight", 0), ("dw.bias", 0))
    dw2 = groups_at(analysis, "dw2.weight", 0)
    assert [g.size for g in dw2] == [8, 2] and dw2[0].name == group_at(analysis, "a.weight", 0).name
    assert not dw2[0].fixed and not dw2[1].fixed
    assert len(analysis.free_groups) == 2


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.b = nn.Conv1d(6, 5, 3)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.pool(F.gelu(self.b(self.bn(self.a(x))))).squeeze(-1))


def test_conv1d() -> None:
    analysis = check(Conv1dNet(), torch.randn(2, 3, 10))
    io_fixed(analysis, ("a.weight", 1), ("fc.weight", 0))
    assert same(analysis, ("a.weight", 0), ("bn.weight", 0), ("b.weight", 1))
    assert same(analysis, ("b.weight", 0), ("b.bias", 0), ("fc.weight", 1))
    assert len(analysis.free_groups) == 2


class ConvTransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.up(torch.relu(self.a(x)))))


def test_conv_transpose() -> None:
    analysis = check(ConvTransposeNet(), IMG)
    # ConvTranspose weight is (in, out, k, k): axis 0 reads, axis 1 produces
    assert same(analysis, ("a.weight", 0), ("up.weight", 0))
    assert same(analysis, ("up.weight", 1), ("up.bias", 0), ("b.weight", 1))
    assert ref_of(analysis, "up.weight", 0).role == "in" and ref_of(analysis, "up.weight", 1).role == "out"
    assert len(analysis.free_groups) == 2


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


class BN1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.bn = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def test_batchnorm1d_on_features() -> None:
    analysis = check(BN1dNet(), VEC)
    io_fixed(analysis, ("fc1.weight", 1), ("fc2.weight", 0))
    group = group_at(analysis, "fc1.weight", 0)
    assert not group.fixed and group.size == 10
    assert same(analysis, ("fc1.weight", 0), ("fc1.bias", 0), ("bn.weight", 0), ("bn.bias", 0),
                ("bn.running_mean", 0), ("bn.running_var", 0), ("fc2.weight", 1))
    assert len(analysis.free_groups) == 1


class LayerNormNet(nn.Module):
    """nn.LayerNorm and F.layer_norm with parameters used directly (get_attr)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.ln = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 12)
        self.ln_weight = nn.Parameter(torch.ones(12))
        self.ln_bias = nn.Parameter(torch.zeros(12))
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        h = self.fc2(F.gelu(self.ln(self.fc1(x))))
        h = F.layer_norm(h, (12,), self.ln_weight, self.ln_bias, 1e-5)
        return self.fc3(h)


def test_layer_norm_module_and_functional() -> None:
    analysis = check(LayerNormNet(), VEC)
    assert same(analysis, ("fc1.weight", 0), ("ln.weight", 0), ("ln.bias", 0), ("fc2.weight", 1))
    assert same(analysis, ("fc2.weight", 0), ("ln_weight", 0), ("ln_bias", 0), ("fc3.weight", 1))
    assert len(analysis.free_groups) == 2
    # the literal 12 of F.layer_norm's normalized_shape is recorded (a width change rewrites it)
    literals = [s for s in analysis.shape_literals if s.value == 12]
    assert literals and literals[0].layout == ((group_at(analysis, "ln_weight", 0).name,),)


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(3, 12)
        self.b = nn.Conv2d(12, 8, 1)
        self.gn_weight = nn.Parameter(torch.ones(8))
        self.gn_bias = nn.Parameter(torch.zeros(8))
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.b(F.silu(self.gn(self.a(x))))
        return self.c(F.group_norm(h, 2, self.gn_weight, self.gn_bias))


def test_group_norm_keeps_groups_together() -> None:
    analysis = check(GroupNormNet(), IMG)
    factors = groups_at(analysis, "gn.weight", 0)
    assert [g.size for g in factors] == [3, 4], "12 channels = 3 groups x 4 channels per group"
    assert all(not g.fixed for g in factors)
    assert groups_at(analysis, "a.weight", 0) == factors == groups_at(analysis, "b.weight", 1)
    functional = groups_at(analysis, "gn_weight", 0)
    assert [g.size for g in functional] == [2, 4]
    assert len(analysis.free_groups) == 4
    perms = nontrivial_permutations(analysis, 0)
    for param, (groups, per) in (("gn.weight", (3, 4)), ("gn_weight", (2, 4))):
        index = channel_permutation(analysis, param, 0, perms).view(groups, per)
        assert (index // per == index[:, :1] // per).all(), "a GroupNorm group was split"


# --------------------------------------------------------------------------------------------
# embedding, activations, dropout, pooling
# --------------------------------------------------------------------------------------------


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.out(F.relu(self.fc(self.emb(tokens)))).mean(1)


def test_embedding() -> None:
    tokens = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    analysis = check(EmbeddingNet(), tokens)
    assert same(analysis, ("emb.weight", 1), ("fc.weight", 1))
    assert not group_at(analysis, "emb.weight", 1).fixed
    # the vocabulary axis is looked up by token id: never permuted
    assert analysis.param_layouts["emb.weight"][0] == ((Opaque(20),),)
    assert len(analysis.free_groups) == 2


class Activations(nn.Module):
    """Every form of an elementwise activation: module, functional, method, in-place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(6 if i == 0 else 10, 10) for i in range(9))
        self.relu = nn.ReLU(inplace=True)
        self.gelu = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        h = self.relu(self.fc[0](x))
        h = F.relu(self.fc[1](h), inplace=True)
        h = self.fc[2](h).relu()
        h = self.fc[3](h)
        h.relu_()
        h = torch.sigmoid(self.fc[4](h))
        h = self.gelu(self.fc[5](h)).tanh()
        h = F.dropout(self.drop(self.fc[6](h)), 0.3, training=self.training)
        h = F.hardswish(self.fc[7](h)).clamp(-1.0, 1.0)
        h = F.leaky_relu(self.fc[8](h), 0.1)
        return self.out(h)


def test_activations_every_form() -> None:
    analysis = check(Activations(), VEC)
    for i in range(8):
        assert same(analysis, (f"fc.{i}.weight", 0), (f"fc.{i}.bias", 0), (f"fc.{i + 1}.weight", 1))
    assert len(analysis.free_groups) == 9
    io_fixed(analysis, ("fc.0.weight", 1), ("out.weight", 0))


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.max = nn.MaxPool2d(2)
        self.b = nn.Conv2d(6, 7, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.c = nn.Conv2d(7, 8, 1)
        self.adaptive = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 + 6, 3)

    def forward(self, x):
        h1 = self.max(torch.relu(self.a(x)))
        h2 = self.avg(torch.relu(self.b(h1)))
        h3 = self.adaptive(self.c(F.max_pool2d(h2, 2))).flatten(1)
        side = F.adaptive_max_pool2d(F.avg_pool2d(h1, 2), 1).flatten(1)
        return self.fc(torch.cat([h3, side], dim=1))


def test_pooling() -> None:
    analysis = check(Pools(), IMG)
    assert same(analysis, ("a.weight", 0), ("b.weight", 1))
    assert same(analysis, ("b.weight", 0), ("c.weight", 1))
    assert [g.name for g in groups_at(analysis, "fc.weight", 1)] == [
        group_at(analysis, "c.weight", 0).name,
        group_at(analysis, "a.weight", 0).name,
    ]
    assert len(analysis.free_groups) == 3


# --------------------------------------------------------------------------------------------
# reshapes: flatten / view / reshape into a Linear, shape literals
# --------------------------------------------------------------------------------------------


class FlattenNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.how == "module":
            h = self.flat(h)
        elif self.how == "flatten":
            h = torch.flatten(h, 1)
        elif self.how == "method":
            h = h.flatten(1)
        elif self.how == "view":
            h = h.view(h.size(0), -1)
        else:
            h = h.reshape(-1, 256)
        return self.out(torch.relu(self.fc(h)))


@pytest.mark.parametrize("how", ["module", "flatten", "method", "view", "reshape"])
def test_flatten_into_linear(how: str) -> None:
    analysis = check(FlattenNet(how), IMG)
    group = group_at(analysis, "conv.weight", 0)
    assert not group.fixed
    ref = ref_of(analysis, "fc.weight", 1)
    assert ref.layout == ((group.name, 64),), "channel c owns Linear inputs c*64 .. c*64+63"
    assert analysis.param_layouts["fc.weight"][1] == ((analysis.space_ids[group.name], Opaque(64)),)
    # the flattened tensor is no tap of the group (its dim holds 4 x 64 values, not 4 units)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in analysis.graph_module.graph.nodes if "tensor_meta" in n.meta}
    assert group.taps and all(shapes[t.node][t.dim] == 4 for t in group.taps)
    assert len(analysis.free_groups) == 2


class ViewLiteral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        n = x.shape[0]
        h = torch.relu(self.conv(x)).view(n, 64, -1)  # (N, 64, 64)
        h = h.reshape(n, 64, 4, 16).mean(2)  # (N, 64, 16)
        return self.fc(h).mean(1)


def test_view_records_shape_literal() -> None:
    analysis = check(ViewLiteral(), IMG)
    group = group_at(analysis, "conv.weight", 0)
    assert not group.fixed and group.size == 64
    literals = [s for s in analysis.shape_literals if s.value == 64]
    assert len(literals) == 2, analysis.shape_literals
    assert all(s.layout == ((group.name,),) for s in literals)
    assert {s.path for s in literals} == {(2,)}
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    for literal in literals:
        assert nodes[literal.node].args[literal.path[0]] == 64


class ChannelShuffle(nn.Module):
    """ShuffleNet: view channels as (groups, per-group), swap them, flatten back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.g(torch.relu(self.a(x)))
        n, c, height, width = h.shape
        h = h.view(n, 2, c // 2, height, width).transpose(1, 2).contiguous().view(n, c, height, width)
        return self.b(torch.relu(h))


def test_channel_shuffle() -> None:
    analysis = check(ChannelShuffle(), IMG)
    groups_, per_group = groups_at(analysis, "g.weight", 0)
    assert (groups_.size, per_group.size) == (2, 4) and not groups_.fixed and not per_group.fixed
    # after the shuffle, b reads (per-group x groups): the factors in swapped order
    assert groups_at(analysis, "b.weight", 1) == [per_group, groups_]
    assert ref_of(analysis, "b.weight", 1).layout == ((per_group.name, groups_.name),)


class CatShuffle(nn.Module):
    """ShuffleNet v2 unit: two branches concatenated, then shuffled across the two halves."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 4, 1)
        self.q = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = torch.cat([torch.relu(self.p(x)), torch.relu(self.q(x))], dim=1)
        n, c, height, width = h.shape
        h = h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
        return self.b(h)


def test_shuffle_of_a_concatenation() -> None:
    analysis = check(CatShuffle(), IMG)
    # (cat of two 4-channel halves) viewed as (2, 4) is a block index x ONE space: p and q
    # share their permutation and stay free; b reads them interleaved: (channel, half)
    group = group_at(analysis, "p.weight", 0)
    assert group == group_at(analysis, "q.weight", 0) and not group.fixed
    assert ref_of(analysis, "b.weight", 1).layout == ((group.name, 2),)
    assert len(analysis.free_groups) == 1


class MatmulParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(8, 5))
        self.u = nn.Parameter(torch.randn(3, 5))
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(torch.relu(self.a(x)) @ self.w)  # (N, 5)
        return self.b(torch.tanh(torch.matmul(self.u, h.t()).t()))


def test_parameter_used_through_matmul() -> None:
    analysis = check(MatmulParameter(), VEC)
    assert same(analysis, ("a.weight", 0), ("w", 0))
    assert same(analysis, ("w", 1), ("u", 1))
    assert same(analysis, ("u", 0), ("b.weight", 1))
    # the contracted axis of a parameter reads channels (role "in": U^T when merging), the other produces
    assert analysis.param_roles["w"] == ("in", "out")
    assert analysis.param_roles["u"] == ("out", "in")
    assert len(analysis.free_groups) == 3


# --------------------------------------------------------------------------------------------
# residual connections, gating, cat, split, permute, reductions
# --------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.a(torch.relu(x))
        if self.form == "+":
            x = x + y
        elif self.form == "+=":
            x += y
        elif self.form == "torch.add":
            x = torch.add(x, y, alpha=0.5)
        elif self.form == "method":
            x = x.add(y)
        elif self.form == "-":
            x = y - x
        elif self.form == "sub":
            x = torch.sub(x, y)
        z = self.b(torch.relu(x))
        x = x.add_(z) if self.form == "method" else x + z
        return self.head(x)


@pytest.mark.parametrize("form", ["+", "+=", "torch.add", "method", "-", "sub"])
def test_residual_forms(form: str) -> None:
    analysis = check(Residual(form), IMG)
    assert same(analysis, ("stem.weight", 0), ("a.weight", 0), ("a.weight", 1), ("b.weight", 0), ("b.bias", 0), ("head.weight", 1))
    assert len(analysis.free_groups) == 1 and analysis.free_groups[0].size == 6


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.lin1 = nn.Linear(8, 3)
        self.lin2 = nn.Linear(3, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        s = F.adaptive_avg_pool2d(x, 1)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        s = x.mean((2, 3))
        gate = self.lin2(torch.relu(self.lin1(s))).sigmoid()
        x = x * gate[:, :, None, None]
        return self.head(x)


def test_squeeze_excitation_gating() -> None:
    analysis = check(SqueezeExcite(), IMG)
    assert same(analysis, ("conv.weight", 0), ("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0),
                ("lin1.weight", 1), ("lin2.weight", 0), ("head.weight", 1))
    assert sorted(g.size for g in analysis.free_groups) == [3, 4, 8]


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 5, 1)
        self.d = nn.Conv2d(15, 2, 1)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        g = torch.relu(self.c(h))
        return self.d(torch.cat((h, g), 1))


def test_cat_along_channels() -> None:
    analysis = check(CatNet(), IMG)
    a, b, c = (group_at(analysis, f"{n}.weight", 0).name for n in "abc")
    assert ref_of(analysis, "c.weight", 1).layout == ((a,), (b,))
    assert ref_of(analysis, "d.weight", 1).layout == ((a,), (b,), (c,))
    assert len({a, b, c}) == 3 and len(analysis.free_groups) == 3


class SplitNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.p = nn.Conv2d(4, 3, 1)
        self.q = nn.Conv2d(4, 3, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "chunk":
            u, v = h.chunk(2, dim=1)
        elif self.how == "torch.chunk":
            u, v = torch.chunk(h, 2, 1)
        elif self.how == "split":
            u, v = torch.split(h, [4, 4], dim=1)
        else:
            parts = h.split(4, 1)
            u, v = parts[0], parts[1]
        return self.head(torch.cat([self.p(u), self.q(v)], 1))


@pytest.mark.parametrize("how", ["chunk", "torch.chunk", "split", "method_split"])
def test_split_along_channels(how: str) -> None:
    analysis = check(SplitNet(how), IMG)
    halves = groups_at(analysis, "a.weight", 0)
    assert [g.size for g in halves] == [4, 4] and all(not g.fixed for g in halves)
    assert group_at(analysis, "p.weight", 1).name == halves[0].name
    assert group_at(analysis, "q.weight", 1).name == halves[1].name
    assert ref_of(analysis, "a.weight", 0).layout == ((halves[0].name,), (halves[1].name,))
    assert len(analysis.free_groups) == 4


class ConvNeXtBlock(nn.Module):
    """NCHW depthwise conv -> NHWC LayerNorm + Linear -> layer scale -> NCHW, residual."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((8,), 1e-6))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(x)
        h = h.permute(0, 2, 3, 1) if self.how == "permute" else h.transpose(1, 3).transpose(1, 2)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        h = self.gamma * h
        h = h.permute(0, 3, 1, 2) if self.how == "permute" else torch.transpose(h, 1, 3).transpose(2, 3)
        x = x + h
        return self.head(x.mean([-2, -1]))


@pytest.mark.parametrize("how", ["permute", "transpose"])
def test_channels_last_block(how: str) -> None:
    analysis = check(ConvNeXtBlock(how), IMG)
    assert same(analysis, ("stem.weight", 0), ("dw.weight", 0), ("norm.weight", 0), ("fc1.weight", 1),
                ("fc2.weight", 0), ("gamma", 0), ("head.weight", 1))
    assert same(analysis, ("fc1.weight", 0), ("fc2.weight", 1))
    assert sorted(g.size for g in analysis.free_groups) == [8, 16]


class Reductions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        s = torch.relu(self.a(x)).mean(dim=(2, 3))
        t = torch.sum(torch.relu(self.b(x)), dim=[-1, -2])
        u = torch.relu(self.a(x)).amax(dim=3).mean(-1)
        return self.fc(s + t + u)


def test_spatial_reductions() -> None:
    analysis = check(Reductions(), IMG)
    assert same(analysis, ("a.weight", 0), ("b.weight", 0), ("fc.weight", 1))
    assert len(analysis.free_groups) == 1


# --------------------------------------------------------------------------------------------
# transformer pieces: tokens, positions, layer scale, attention
# --------------------------------------------------------------------------------------------


class TokenNet(nn.Module):
    """Patch embedding, class token and position embedding used as parameters (get_attr)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 12))
        self.pos = nn.Parameter(torch.zeros(1, 5, 12))
        self.scale = nn.Parameter(torch.ones(12))
        self.fc = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        n = x.shape[0]
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(n, -1, -1), h], dim=1) + self.pos
        h = h + self.scale * self.fc(h)
        return self.head(h[:, 0])


def test_class_token_position_embedding_layer_scale() -> None:
    analysis = check(TokenNet(), IMG)
    assert same(analysis, ("patch.weight", 0), ("cls", 2), ("pos", 2), ("scale", 0), ("fc.weight", 0),
                ("fc.weight", 1), ("head.weight", 1))
    stream = group_at(analysis, "patch.weight", 0)
    assert not stream.fixed and stream.size == 12
    producers = {(r.param, r.axis) for r in stream.producers}
    assert {("cls", 2), ("pos", 2), ("scale", 0)} <= producers
    # the sequence axis of the position embedding (class token + 2x2 patches) is no channel
    # axis: opaque, in no group
    assert groups_at(analysis, "pos", 1) == []
    assert sum(f.size for piece in analysis.param_layouts["pos"][1] for f in piece if isinstance(f, Opaque)) == 4
    assert len(analysis.free_groups) == 1


class MHANet(nn.Module):
    def __init__(self, batch_first: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(6, kdim) if kdim else None
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: (N, L, 6)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        kv = h if self.kv is None else self.kv(x if self.batch_first else x.transpose(0, 1))
        a, _ = self.attn(h, kv, kv, need_weights=False)
        h = self.norm(h + a)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h).mean(1)


SEQ = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


def _attention_groups(analysis, prefix: str):
    groups = [g for g in analysis.groups if g.kind in ("heads", "head_channels") and g.name.startswith(prefix)]
    return {g.kind: [x for x in groups if x.kind == g.kind] for g in groups}


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first: bool) -> None:
    analysis = check(MHANet(batch_first), SEQ)
    assert same(analysis, ("embed.weight", 0), ("attn.in_proj_weight", 1), ("attn.out_proj.weight", 0),
                ("norm.weight", 0), ("head.weight", 1))
    groups = _attention_groups(analysis, "attn")
    assert [g.size for g in groups["heads"]] == [4]
    assert sorted(g.size for g in groups["head_channels"]) == [4, 4]  # q/k and v within-head orders
    assert all(not g.fixed for gs in groups.values() for g in gs)
    # in_proj rows: (heads x qk) for q, again for k, (heads x v) for v
    heads = groups["heads"][0].name
    layout = ref_of(analysis, "attn.in_proj_weight", 0).layout
    assert len(layout) == 3 and all(piece[0] == heads for piece in layout)
    assert layout[0] == layout[1] != layout[2]
    assert len(analysis.free_groups) == 4


def test_multihead_attention_separate_kv_dims() -> None:
    analysis = check(MHANet(True, kdim=10), SEQ)
    assert same(analysis, ("kv.weight", 0), ("attn.k_proj_weight", 1), ("attn.v_proj_weight", 1))
    assert same(analysis, ("embed.weight", 0), ("attn.q_proj_weight", 1))
    assert not group_at(analysis, "kv.weight", 0).fixed
    assert len(analysis.free_groups) == 5


class SDPABlock(nn.Module):
    """timm-style attention: fused qkv Linear, reshape to heads, SDPA, merge heads, projection."""

    def __init__(self, how: str, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.how, self.heads = how, heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        B, L, E = h.shape
        if self.how == "separate":
            q, k, v = (lin(h).view(B, L, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        else:
            qkv = self.qkv(h).reshape(B, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
            if self.how == "index":
                q, k, v = qkv[0], qkv[1], qkv[2]
            else:
                q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(B, L, E)
        h = h + self.proj(a)
        return self.head(h).mean(1)


@pytest.mark.parametrize("how", ["index", "unbind"])
def test_sdpa_fused_qkv_heads_are_permutable(how: str) -> None:
    analysis = check(SDPABlock(how), SEQ)
    assert same(analysis, ("embed.weight", 0), ("qkv.weight", 1), ("proj.weight", 0), ("proj.bias", 0), ("head.weight", 1))
    assert not group_at(analysis, "embed.weight", 0).fixed
    # qkv rows = (3 [q/k/v selector] x 4 heads x 4 channels per head), row-major
    rows = groups_at(analysis, "qkv.weight", 0)
    assert [g.size for g in rows] == [3, 4, 4]
    selector, heads, per_head = rows
    assert selector.fixed, "swapping q, k and v is not an invariance"
    assert not heads.fixed and not per_head.fixed
    # proj reads (heads x channels per head) in the order the v rows produce them
    assert groups_at(analysis, "proj.weight", 1) == [heads, per_head]
    perms = nontrivial_permutations(analysis, 0)
    index = channel_permutation(analysis, "proj.weight", 1, perms).view(4, 4)
    assert (index // 4 == index[:, :1] // 4).all(), "a head was split"
    assert len(analysis.free_groups) == 3


def test_sdpa_separate_projections() -> None:
    analysis = check(SDPABlock("separate"), SEQ)
    q, k, v = (groups_at(analysis, f"{n}.weight", 0) for n in "qkv")
    assert [g.size for g in q] == [4, 4] and not any(g.fixed for g in q + k + v)
    assert q == k, "q and k share the head order and the within-head order (the q.k contraction)"
    assert v[0] == q[0] and v[1] != q[1], "v shares the head order, not the within-head order"
    assert groups_at(analysis, "proj.weight", 1) == v
    assert len(analysis.free_groups) == 4


# --------------------------------------------------------------------------------------------
# tied weights, inputs and outputs
# --------------------------------------------------------------------------------------------


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.out(h)


def test_module_called_twice() -> None:
    analysis = check(SharedLinear(), VEC)
    # W h used twice: its input and output channels are one group
    assert same(analysis, ("inp.weight", 0), ("shared.weight", 0), ("shared.weight", 1), ("out.weight", 1))
    assert len(analysis.free_groups) == 1


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 20, bias=False)
        self.decoder.weight = self.emb.weight  # tied

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.fc(self.emb(tokens))))


def test_tied_embedding_and_output_layer() -> None:
    tokens = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    analysis = check(TiedLM(), tokens)
    assert analysis.aliases["decoder.weight"] == analysis.aliases["emb.weight"]
    stream = group_at(analysis, analysis.aliases["emb.weight"], 1)
    assert same(analysis, ("fc.weight", 0), ("fc.weight", 1))
    assert stream.name == group_at(analysis, "fc.weight", 0).name and not stream.fixed
    model = TiedLM()
    randomize_(model)
    _, twin = assert_invariant(model, tokens, seed=4)
    assert twin.decoder.weight is twin.emb.weight, "the permuted twin keeps the weights tied"


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x, y):
        h = torch.relu(self.a(x) + self.b(y))
        return self.c(h), h.sum(-1)


def test_inputs_and_outputs_fixed() -> None:
    x, y = torch.randn(3, 6), torch.randn(3, 4)
    analysis = check(TwoInputs(), (x, y))
    assert group_at(analysis, "a.weight", 1).fixed and "model input" in group_at(analysis, "a.weight", 1).reason
    assert group_at(analysis, "b.weight", 1).fixed
    assert group_at(analysis, "c.weight", 0).fixed and "model output" in group_at(analysis, "c.weight", 0).reason
    assert not group_at(analysis, "a.weight", 0).fixed  # h only leaves the model summed over channels
    # returning a hidden tensor itself fixes its channels
    class Leak(TwoInputs):
        def forward(self, x, y):
            h = torch.relu(self.a(x) + self.b(y))
            return self.c(h), h

    leak = check(Leak(), (x, y))
    assert group_at(leak, "a.weight", 0).fixed and "model output" in group_at(leak, "a.weight", 0).reason
    assert not leak.free_groups


# --------------------------------------------------------------------------------------------
# layouts that pieces of products cannot express fail closed (timm LeViT, CoaT, EfficientFormer)
# --------------------------------------------------------------------------------------------


class HeadsThenSplit(nn.Module):
    """LeViT-style attention in a few ops: the qkv rows viewed as (heads, per-head) and the per-head
    part split into q, k, v — a direct sum inside a product under a permuted head factor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.qkv = nn.Linear(5, 2 * (2 + 2 + 3))
        self.proj = nn.Linear(2 * 3, 4)

    def forward(self, x):  # (N, L, 6)
        n, length, _ = x.shape
        q, k, v = self.qkv(torch.relu(self.fc(x))).view(n, length, 2, 7).split([2, 2, 3], dim=3)
        attn = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v.transpose(1, 2)).transpose(1, 2).reshape(n, length, 6))


def test_unrepresentable_layout_fails_closed_at_its_node() -> None:
    model = randomize_(HeadsThenSplit().eval(), seed=1)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"node 'split' \(call_method Tensor.split\): layout not representable"):
        analysis = fxmerge.analyze(model, x)  # used to raise fxmerge.passes.spaces.Unrepresentable
    assert all(g.fixed and "split" in g.reason for g in groups_at(analysis, "qkv.weight", 0))
    assert not group_at(analysis, "fc.weight", 0).fixed  # the op before keeps its free channels
    assert_invariant(model, x, analysis)
    with pytest.raises(fxmerge.errors.UnsupportedOpError, match="split"):
        fxmerge.analyze(model, x, strict=True)


class SumIntoProduct(nn.Module):
    """A direct sum (g's rows cut by the cat they are added to) unified into the inner factor of a
    product (fc's rows viewed as 2 x 4) at a later op: the union, not a split, is unrepresentable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.g, self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(6, 1), nn.Linear(6, 3)
        self.pre = nn.Linear(6, 6)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        n = x.shape[0]
        x = torch.relu(self.pre(x))
        h = self.fc(x).view(n, 2, 4)
        s = self.g(x) + torch.cat([self.a(x), self.b(x)], -1)
        return self.head((h + s.unsqueeze(1)).reshape(n, 8))


def test_unrepresentable_union_fails_closed_at_its_node() -> None:
    model = randomize_(SumIntoProduct().eval(), seed=2)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"node 'add_1' \(call_function _operator.add\): layout not representable"):
        analysis = fxmerge.analyze(model, x)
    assert all(g.fixed for g in groups_at(analysis, "fc.weight", 0))
    assert not group_at(analysis, "pre.weight", 0).fixed
    assert_invariant(model, x, analysis)


# --------------------------------------------------------------------------------------------
# coverage counts fixed hidden channels
# --------------------------------------------------------------------------------------------


class OpaqueLinear(nn.Module):
    """A layer the analysis has no rule for when kept as a leaf."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return x @ self.weight.t()


def test_coverage_counts_fixed_hidden_channels() -> None:
    model = nn.Sequential(
        OpaqueLinear(4, 8), nn.ReLU(), OpaqueLinear(8, 8), nn.ReLU(), OpaqueLinear(8, 6), nn.ReLU(), OpaqueLinear(6, 2)
    )
    x = torch.randn(3, 4)
    traced_through = fxmerge.analyze(model, x)
    assert traced_through.coverage() == 1.0 and len(traced_through.free_groups) == 3
    with pytest.warns(UserWarning, match="no rule for module type OpaqueLinear"):
        closed = fxmerge.analyze(model, x, leaf_modules=[OpaqueLinear])
    assert not closed.free_groups and closed.groups  # every op failed closed
    assert closed.coverage() == 0.0
    # only the last layer is a leaf: the 8 + 8 stay free; fixed are the 6 channels it reads and
    # both axes of its own weight (2 x 6: the analysis cannot tell they are its input and output)
    with pytest.warns(UserWarning):
        partial = fxmerge.analyze(model, x, leaf_modules=["6"])
    assert partial.coverage() == pytest.approx(16 / (8 + 8 + 6 + 2 + 6))


class _AddcmulAffine(nn.Module):
    """timm's ``resmlp.Affine``: ``beta + alpha * x`` over the last dim, as ``torch.addcmul``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, 1, dim))
        self.beta = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, dim) -> (N, L, dim)
        return torch.addcmul(self.beta, self.alpha, x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_addcmul_keeps_the_channel_group_free(capture: str) -> None:
    """Found by the timm table (resmlp_12_224: 42% coverage): addcmul broadcasts its three operands
    like ``beta + alpha * x``, so the hidden group stays free."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _AddcmulAffine(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 5, 8)
    analysis = fxmerge.analyze(model, x, capture=capture)
    hidden = [g for g in analysis.groups if g.size == 16]
    assert hidden and not any(g.fixed for g in hidden), [(g.name, g.reason) for g in hidden]
    if capture == "fx":
        assert_invariant(model, x, analysis, min_changed_fraction=0.5)
    else:
        twin = fxmerge.testing.random_permute(model, x, capture="export", seed=1)
        with torch.no_grad():
            assert torch.allclose(model(x), twin(x), atol=1e-6) and not torch.equal(model[0].weight, twin[0].weight)


class _BiasAttention(nn.Module):
    """Swin/T5-style attention: a (2L-1, heads) table indexed by relative position and added to
    every head's scores through sdpa's ``attn_mask`` (1, heads, L, L). ``lookup``: "index"
    (``table[index]``, advanced indexing: fails closed) or "embedding" (``F.embedding``)."""

    def __init__(self, lookup: str, dim: int = 8, heads: int = 2, length: int = 4) -> None:
        super().__init__()
        self.heads, self.lookup = heads, lookup
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * length - 1, heads))
        position = torch.arange(length)
        self.register_buffer("index", (position[:, None] - position[None, :] + length - 1).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, dim) -> (N, L, dim)
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        rows = self.table[self.index] if self.lookup == "index" else F.embedding(self.index, self.table)
        bias = rows.view(length, length, self.heads).permute(2, 0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("lookup", ["index", "embedding"])
def test_a_per_head_attention_mask_moves_with_the_heads(lookup: str, capture: str) -> None:
    """Found by the HF table (Swin with a nonzero relative position bias): sdpa's ``attn_mask``
    head axis was not coupled with the heads, so a per-head bias stayed in place while the heads
    were permuted (0.18 relative error here). The mask is now a broadcast operand of the scores:
    its head axis is the heads' (a bias looked up with F.embedding, or by ``table[index]`` in an
    exported graph — ``aten.index`` is a lookup — keeps the heads free and is permuted with them;
    fx's advanced-indexing ``getitem`` fails closed and fixes them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _BiasAttention(lookup), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4, 8)
    analysis = fxmerge.analyze(model, x, capture=capture)
    heads = [g for g in analysis.groups if g.size == 2 and g.producers]
    assert heads and all(g.fixed for g in heads) == (lookup == "index" and capture == "fx"), [
        (g.name, g.reason) for g in heads
    ]
    with torch.no_grad():
        y = model(x)
        for seed in range(3):  # 2 heads: some seeds leave them in place
            twin = fxmerge.testing.random_permute(model, x, seed=seed, capture=capture)
            assert relative_error(y, twin(x)) < 1e-5, seed
