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
