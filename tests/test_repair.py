"""BatchNorm repair (``fxmerge.passes.repair.reset_batchnorm``) covers every form a batch norm takes.

One small net is written four ways — with ``nn.BatchNorm2d`` modules, with ``F.batch_norm`` on
``get_attr`` buffers (what fx leaves when it traces into timm's ``BatchNormAct2d``), and exported
by ``torch.export`` (``aten.batch_norm`` and, decomposed, ``aten._native_batch_norm_legit_no_training``)
— and resetting each on the same batches gives the same running statistics (allclose 1e-6) as
resetting the module form, whose statistics are checked against a brute-force cumulative average.
A batch norm that cannot be reset is named in a warning (strict: an error), never skipped silently.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.errors import UnsupportedOpError
from fxmerge.passes.repair import reset_batchnorm

from conftest import randomize_


def _batches(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 6, 6, generator=generator) for _ in range(count)]


class ModuleNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN, the second BN called twice (its statistics see both calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x)) + self.bn2(x)


class _FunctionalNorm(nn.Module):
    """A batch norm written with F.batch_norm on its own buffers (like timm's BatchNormAct2d)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


class FunctionalNet(ModuleNet):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = _FunctionalNorm(5)
        self.bn2 = _FunctionalNorm(5, eps=1e-3)


def _pair() -> tuple[nn.Module, nn.Module]:
    """The module net (random weights and statistics) and the functional net with the same state."""
    module_net = randomize_(ModuleNet().eval())
    functional_net = FunctionalNet().eval()
    state = {k: v for k, v in module_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    functional_net.load_state_dict(state)
    return module_net, functional_net


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running_" in k}


def _brute_force(model: ModuleNet, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cumulative average of each BN input's batch mean and unbiased variance, with every BN
    normalising by its batch statistics (train mode), computed by hand."""
    sums: dict[str, list[torch.Tensor]] = {"bn1": [], "bn2": []}

    def norm(name: str, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=1)
        sums[name].append(torch.stack([mean, var]))
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    with torch.no_grad():
        for x in batches:
            h = F.relu(norm("bn1", model.conv1(x), model.bn1))
            norm("bn2", model.conv2(h), model.bn2)
            norm("bn2", h, model.bn2)
    out = {}
    for name, values in sums.items():
        mean, var = torch.stack(values).mean(0)
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = mean.float(), var.float()
    return out


def _reset_traced(model: nn.Module, batches: list[torch.Tensor], form: str) -> dict[str, torch.Tensor]:
    """Reset the statistics of ``model`` captured in ``form``; return them by their module names."""
    if form == "fx":
        gm = torch.fx.symbolic_trace(model)
    else:
        program = torch.export.export(copy.deepcopy(model), (batches[0],), strict=False)  # it shares buffers
        if form == "export-decomposed":
            program = program.run_decompositions()
        gm = program.module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every batch norm is resettable: not one warning
        count = reset_batchnorm(gm, batches, quiet=True)
    assert count == 2
    return _statistics(gm)


def test_module_form_equals_the_brute_force_average() -> None:
    model, _ = _pair()
    batches = _batches()
    expected = _brute_force(model, batches)
    assert reset_batchnorm(model, batches, quiet=True) == 2
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    assert int(model.bn2.num_batches_tracked) == 2 * len(batches)  # called twice per batch


@pytest.mark.parametrize("form", ["fx", "export", "export-decomposed"])
def test_every_form_of_batch_norm_is_reset_like_the_module_form(form: str) -> None:
    module_net, functional_net = _pair()
    batches = _batches()
    traced_functional = {"fx": functional_net, "export": module_net, "export-decomposed": module_net}[form]
    before = {k: v.clone() for k, v in _statistics(module_net).items()}
    got = _reset_traced(traced_functional, batches, form)
    assert {k: torch.equal(v, before[k]) for k, v in _statistics(module_net).items()} == dict.fromkeys(before, True)
    reference = ModuleNet().eval()
    reference.load_state_dict(module_net.state_dict())
    reset_batchnorm(reference, batches, quiet=True)
    expected = _statistics(reference)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got[key], before[key])  # the reset did change them


def test_functional_form_outputs_match_after_reset() -> None:
    module_net, functional_net = _pair()
    batches = _batches()
    gm = torch.fx.symbolic_trace(functional_net)
    reset_batchnorm(gm, batches, quiet=True)
    reset_batchnorm(module_net, batches, quiet=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module_net(x), rtol=1e-5, atol=1e-5)
    assert not gm.training


class _ParameterStatistics(_FunctionalNorm):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        del self.running_var
        self.running_var = nn.Parameter(torch.ones(channels), requires_grad=False)


class _ComputedStatistics(_FunctionalNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.weight.detach() * 0, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


@pytest.mark.parametrize(
    ("norm", "match"),
    [
        (_ParameterStatistics, r"batch norm node 'batch_norm' in the root GraphModule: its running_var is get_attr 'bn.running_var', a parameter"),
        (_ComputedStatistics, r"batch norm node 'batch_norm' in the root GraphModule: its running_mean is computed by node 'mul' \(call_function mul\)"),
    ],
    ids=["parameter", "computed"],
)
def test_a_batch_norm_that_cannot_be_reset_is_named(norm: type[nn.Module], match: str) -> None:
    model = nn.Sequential()
    model.add_module("bn", norm(3))
    gm = torch.fx.symbolic_trace(model.eval())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reset_batchnorm(gm, _batches(), quiet=True)
    assert len(caught) == 1  # the node, once (not again as unread buffers)
    assert re.match(match + r".*not recomputed", str(caught[0].message))
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
    with pytest.raises(UnsupportedOpError, match=match):
        reset_batchnorm(gm, _batches(), quiet=True, strict=True)


class _OpaqueNorm(_FunctionalNorm):
    """A custom leaf: its F.batch_norm is inside the module, out of the graph's sight."""

    momentum = 0.1


def test_running_statistics_inside_a_leaf_module_are_named() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _OpaqueNorm(3)).eval()
    with pytest.warns(UserWarning, match=r"module '1' \(_OpaqueNorm\) holds a 'running_mean' buffer"):
        reset_batchnorm(model, _batches(), quiet=True)


def test_frozen_batch_norms_are_left_alone() -> None:
    """torchvision's FrozenBatchNorm2d (no momentum) keeps its statistics as fixed parameters."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3), nn.BatchNorm2d(3)).eval()
    frozen = model[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reset_batchnorm(model, _batches(), quiet=True) == 1
    assert torch.equal(model[1].running_mean, frozen)


def test_shared_functional_statistics_accumulate_over_call_sites() -> None:
    """The same running buffers read by two F.batch_norm nodes: one set of statistics, both calls."""
    module_net, functional_net = _pair()
    batches = _batches(2)
    gm = torch.fx.symbolic_trace(functional_net)
    assert sum(n.target is F.batch_norm for n in gm.graph.nodes) == 3
    reset_batchnorm(gm, batches, quiet=True)
    expected = _brute_force(module_net, batches)
    for key, value in expected.items():
        torch.testing.assert_close(gm.state_dict()[key], value, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- merge(repair=...): none, repair

import fxmerge  # noqa: E402
from fxmerge.passes.repair import node_moments  # noqa: E402
from fxmerge.testing import random_permute  # noqa: E402

from conftest import ConvBNNet, random_batches  # noqa: E402


BNNet = ConvBNNet  # conv -> BN -> relu -> conv -> BN -> relu -> pool -> linear, widths (6, 5)


class LNNet(nn.Module):
    """linear (no bias) -> relu -> linear -> LayerNorm -> relu -> linear: REPAIR inserts an affine
    node after the first linear and folds into the LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6, bias=False)
        self.fc2 = nn.Linear(6, 7)
        self.ln = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.ln(self.fc2(F.relu(self.fc1(x))))))


def _momentum_trained(seed: int = 0) -> BNNet:
    """A BNNet trained a few SGD steps (BN momentum 0.1) on data unlike the calibration data:
    its running statistics are neither the calibration data's nor the initial ones."""
    torch.manual_seed(seed)
    model = BNNet()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    generator = torch.Generator().manual_seed(seed + 100)
    for _ in range(6):
        x = torch.randn(16, 3, 6, 6, generator=generator) * 3 + 2
        loss = model(x).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("repair", ["none", "repair"])
def test_a_twin_with_momentum_statistics_is_given_back(method: str, repair: str) -> None:
    model = _momentum_trained()
    calibration = random_batches((8, 3, 6, 6), count=3)
    twin = random_permute(model, calibration[0], seed=1)
    x = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    result = fxmerge.merge([model, twin], calibration, method=method, repair=repair, quiet=True)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
        # "bn" recomputes the statistics on the calibration data: not the model any more
        bn = fxmerge.merge([model, twin], calibration, method=method, repair="bn", quiet=True)
        assert (bn.module(x) - model(x)).abs().max() > 1e-2
    if method == "permute" and repair == "none":  # the merged units are in model 0's order
        merged, original = result.module.state_dict(), model.state_dict()
        assert merged.keys() == original.keys()
        for key, value in original.items():
            torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_repair_interpolated_to_one_model_is_that_model() -> None:
    """``interpolate((1, 0))`` of a REPAIRed permute merge: the targets are model 0's statistics,
    so every BatchNorm output is rescaled back to model 0's (after "bn" moved them) — model 0,
    whose statistics come from training, not from the calibration data."""
    a, b = _momentum_trained(0), _momentum_trained(1)
    calibration = random_batches((8, 3, 6, 6), count=3)
    result = fxmerge.merge([a, b], calibration, method="permute", repair="repair", quiet=True)
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(result.interpolate((1.0, 0.0))(x), a(x), atol=1e-5, rtol=1e-5)
        bn = fxmerge.merge([a, b], calibration, method="permute", repair="bn", quiet=True)
        assert (bn.interpolate((1.0, 0.0))(x) - a(x)).abs().max() > 1e-2


def test_none_merges_running_variances_as_stds() -> None:
    """method="average" (identity matches): mean = average of means, var = (average of stds)^2."""
    a, b = _momentum_trained(0), _momentum_trained(1)
    calibration = random_batches((8, 3, 6, 6), count=2)
    merged = fxmerge.merge([a, b], calibration, method="average", repair="none", quiet=True).module.state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    for name in ("bn1", "bn2"):
        torch.testing.assert_close(merged[f"{name}.running_mean"], (sa[f"{name}.running_mean"] + sb[f"{name}.running_mean"]) / 2)
        std = (sa[f"{name}.running_var"].sqrt() + sb[f"{name}.running_var"].sqrt()) / 2
        torch.testing.assert_close(merged[f"{name}.running_var"], std.square())


def _targets(result: fxmerge.MergeResult, sizes: tuple[int, int], sources: list[tuple[torch.Tensor, torch.Tensor]],
             weights: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: the interpolated (mean, std) of merged unit c = sum_k w_k sum_j M_k[c, j] s_k[j]
    over sum_k w_k sum_j M_k[c, j], with the dense M_k of the group of these sizes."""
    (match,) = [m for m in result.matches.values() if m.sizes == sizes and not m.fixed]
    out = []
    for which in (0, 1):
        total = sum(w * m @ s[which] for w, m, s in zip(weights, match.merge, sources))
        count = sum(w * m.sum(dim=1) for w, m in zip(weights, match.merge))
        out.append(total / count)
    return out[0], out[1]


def _pre_activation(gm: torch.fx.GraphModule, consumer: str) -> str:
    """The name of the node that feeds node ``consumer`` (after REPAIR: the corrected value)."""
    (node,) = [n for n in gm.graph.nodes if n.name == consumer]
    return node.args[0].name


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 0.7)])
def test_repair_gives_every_unit_the_interpolated_statistics_bn_cnn(weights: tuple[float, float]) -> None:
    a, b = _momentum_trained(0), _momentum_trained(1)
    calibration = random_batches((8, 3, 6, 6), count=3)
    result = fxmerge.merge([a, b], calibration, method="zip", repair="repair", model_weights=weights, quiet=True)
    for bn, consumer, sizes in (("bn1", "relu", (6, 6)), ("bn2", "relu_1", (5, 5))):
        sources = [node_moments(torch.fx.symbolic_trace(m), {bn: 1}, calibration)[bn] for m in (a, b)]
        mean, std = _targets(result, sizes, sources, weights)
        node = _pre_activation(result.module, consumer)
        got_mean, got_std = node_moments(result.module, {node: 1}, calibration)[node]
        torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_std, std, atol=1e-5, rtol=1e-5)
    plain = fxmerge.merge([a, b], calibration, method="zip", model_weights=weights, quiet=True).module
    before_mean, before_std = node_moments(plain, {"bn2": 1}, calibration)["bn2"]
    assert (before_std - std).abs().max() > 1e-3  # "bn" alone does not give the targets


def test_repair_gives_every_unit_the_interpolated_statistics_layernorm_mlp() -> None:
    torch.manual_seed(0)
    a, b = randomize_(LNNet(), 0).eval(), randomize_(LNNet(), 1).eval()
    calibration = random_batches((16, 5), count=3)
    plain = fxmerge.merge([a, b], calibration, method="zip", repair="bn", quiet=True).module
    result = fxmerge.merge([a, b], calibration, method="zip", repair="repair", quiet=True)
    assert any(n.name.startswith("add") for n in result.module.graph.nodes)  # the affine node after fc1
    for layer, consumer, sizes in (("fc1", "relu", (6, 6)), ("ln", "relu_1", (7, 7))):
        sources = [node_moments(torch.fx.symbolic_trace(m), {layer: 1}, calibration)[layer] for m in (a, b)]
        mean, std = _targets(result, sizes, sources, (0.5, 0.5))
        node = _pre_activation(result.module, consumer)
        got_mean, got_std = node_moments(result.module, {node: 1}, calibration)[node]
        torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_std, std, atol=1e-5, rtol=1e-5)
        before_mean, before_std = node_moments(plain, {layer: 1}, calibration)[layer]
        assert (before_std - std).abs().max() > 1e-3  # REPAIR changed something
    x = random_batches((4, 5), count=1, seed=9)[0]
    saved = result.module(x)
    loaded = fxmerge.load(result.save(pathlib_tmp()))
    torch.testing.assert_close(loaded(x), saved)


def pathlib_tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "merged"


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.head(self.attn(h, h, h)[0].mean(1))


def test_repair_rescales_an_attention_output_through_its_getitem() -> None:
    """``nn.MultiheadAttention`` returns a tuple: its output item gets an inserted affine node, and
    the statistics the interpolated ones; a twin stays exact."""
    a, b = randomize_(AttentionNet(), 0).eval(), randomize_(AttentionNet(), 1).eval()
    calibration = random_batches((8, 5, 4), count=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every site can be rescaled
        result = fxmerge.merge([a, b], calibration, method="zip", repair="repair", quiet=True)
    match = result.matches["attn.out_proj:out"]
    sources = [node_moments(torch.fx.symbolic_trace(m), {"getitem": 2}, calibration)["getitem"] for m in (a, b)]
    expected = [sum(m @ s[i] for m, s in zip(match.merge, sources)) for i in (0, 1)]
    node = _pre_activation(result.module, "mean")
    assert node.startswith("add")
    got_mean, got_std = node_moments(result.module, {node: 2}, calibration)[node]
    torch.testing.assert_close(got_mean, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_std, expected[1], atol=1e-5, rtol=1e-5)
    twin = random_permute(a, calibration[0], seed=1)
    merged = fxmerge.merge([a, twin], calibration, method="zip", repair="repair", quiet=True).module
    x = random_batches((3, 5, 4), count=1, seed=4)[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), a(x), atol=1e-5, rtol=1e-5)


class BNAct(nn.BatchNorm2d):
    """A batch norm followed by its activation in one module (like timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class BNActNet(BNNet):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = BNAct(6)


def test_repair_does_not_fold_into_a_norm_that_computes_more() -> None:
    """Scaling BNAct's weight and bias would rescale relu's input, not the output REPAIR measured:
    the node is named and left as "bn" made it (so is the conv before it: BNAct is its norm)."""
    a, b = randomize_(BNActNet(), 0).eval(), randomize_(BNActNet(), 1).eval()
    calibration = random_batches((8, 3, 6, 6), count=2)
    options = dict(method="zip", leaf_modules=[BNAct], quiet=True)
    with pytest.warns(UserWarning, match=r"node 'bn1': a normalisation whose affine map the registry cannot rescale"):
        repaired = fxmerge.merge([a, b], calibration, repair="repair", **options).module.state_dict()
    plain = fxmerge.merge([a, b], calibration, repair="bn", **options).module.state_dict()
    for key in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_var"):
        assert torch.equal(repaired[key], plain[key]), key
    assert not torch.equal(repaired["bn2.weight"], plain["bn2.weight"])  # the plain BatchNorm is rescaled


class SharedNormNet(nn.Module):
    """One BatchNorm module called after both convs (their channels are one group)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_repair_of_a_norm_called_twice_corrects_each_call_on_its_own() -> None:
    """Folding a correction into a BatchNorm called twice would change both calls, so each call
    gets its own inserted affine node, and a twin stays exact."""
    model = randomize_(SharedNormNet().eval())
    calibration = _batches(3)
    twin = random_permute(model, calibration[0], seed=2)
    result = fxmerge.merge([model, twin], calibration, method="permute", repair="repair", quiet=True)
    inserted = [n for n in result.module.graph.nodes if n.op == "get_attr" and n.target.startswith("_repair")]
    assert len(inserted) == 4  # scale and shift after each of the norm's two calls
    x = _batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)


class FunctionalBNNet(BNNet):
    """BNNet with its first norm written with F.batch_norm on get_attr buffers (what fx leaves of
    timm's BatchNormAct2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = _FunctionalNorm(6)


def test_repair_folds_into_a_functional_batch_norm() -> None:
    model = randomize_(FunctionalBNNet(), 0).eval()
    calibration = random_batches((8, 3, 6, 6), count=3)
    twin = random_permute(model, calibration[0], seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fxmerge.merge([model, twin], calibration, method="permute", repair="repair", quiet=True)
    assert not [n for n in result.module.graph.nodes if n.op == "get_attr" and n.target.startswith("_repair")]
    x = random_batches((5, 3, 6, 6), count=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
        bn = fxmerge.merge([model, twin], calibration, method="permute", repair="bn", quiet=True)
        assert (bn.module(x) - model(x)).abs().max() > 1e-2  # the fold did the work
