"""``fxmerge.merge`` on models whose answer is known exactly (recovery of permuted twins).

A model ``m`` and copies of it whose every free channel group was randomly permuted
(``fxmerge.testing.random_permute``) compute the same function with different weights. A correct
merge must find the permutations back and reproduce ``m``: permute, zip and MuDSC for a twin,
every method for ``[m, m]``, permute and zip (alpha=1) for three copies. The same twins check
partial zipping (``stop_at``: one tail per model), ``output="concat"``, that inputs are never
touched, determinism and ``torch.compile``.

``m``'s BatchNorm statistics are first computed on the calibration data
(``fxmerge.passes.repair.reset_batchnorm``) because merging resets BatchNorm on that data: the
merged model can only equal ``m`` if ``m``'s statistics are the calibration statistics too.

Every recovery assertion can fail: ``test_twins_are_nontrivial`` shows that the twins' weights
differ and that naive weight averaging does NOT give ``m`` back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn

import fxmerge
from fxmerge import zoo
from fxmerge.errors import ConfigError
from fxmerge.match import match
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.passes.tails import ChannelMap
from fxmerge.passes.units import find_units
from fxmerge.testing import random_permute
from conftest import output_of, random_batches, relative_error, same_state

TOL = 1e-3  # relative error ||y - y'|| / ||y|| of a recovered model


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ models


def _zoo_resnet(num_outputs: int = 10) -> nn.Module:
    return zoo.resnet((1, 1, 1), in_channels=1, image_size=8, num_outputs=num_outputs)


def _zoo_vgg() -> nn.Module:
    return zoo.vgg(batch_norm=True, in_channels=1, image_size=8)


def _zoo_vit() -> nn.Module:
    model = zoo.vit(patch_size=2, num_layers=2, in_channels=1, image_size=8)
    # Constant inits (LayerNorm 1/0, zero biases, class token, position embedding) would let a
    # wrongly matched parameter go unnoticed: randomise everything.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def _tv_resnet18() -> nn.Module:
    return tvm.resnet18(num_classes=10)


# name -> (builder, batch shape, number of calibration batches). resnet18's last stage is 1x1 at
# 32x32, so each of its channels sees only (batches x batch size) samples there: 32 samples keep
# every ReLU alive on some sample (with 8 samples a few units are dead on all of them, tie with
# each other, and get mismatched).
BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "zoo_resnet": (_zoo_resnet, (16, 1, 8, 8), 4),
    "zoo_vgg_bn": (_zoo_vgg, (16, 1, 8, 8), 4),
    "zoo_vit": (_zoo_vit, (16, 1, 8, 8), 4),
    "tv_resnet18": (_tv_resnet18, (8, 3, 32, 32), 4),
}
ZOO = ["zoo_resnet", "zoo_vgg_bn", "zoo_vit"]
ALL = [*ZOO, "tv_resnet18"]


@dataclass
class Case:
    """A model in eval mode with calibration-data BatchNorm statistics, and two permuted twins."""

    model: nn.Module
    batches: list[torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    twin1: nn.Module
    twin2: nn.Module


def _build(name: str, seed: int = 0) -> Case:
    builder, shape, count = BUILDERS[name]
    torch.manual_seed(seed)
    model = builder().eval()
    batches = random_batches(shape, count)
    reset_batchnorm(model, batches, quiet=True)
    x = batches[0]
    with torch.no_grad():
        y = model(x)
    twin1 = random_permute(model, x, seed=1).eval()
    twin2 = random_permute(model, x, seed=2).eval()
    return Case(model, batches, x, y, twin1, twin2)


@pytest.fixture(scope="module")
def cases(one_thread: None) -> Callable[[str], Case]:
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


def merged_output(models: list[nn.Module], case: Case, **options) -> tuple[fxmerge.MergeResult, torch.Tensor]:
    result = fxmerge.merge(models, case.batches, quiet=True, **options)
    return result, output_of(result.module, case.x)


def triple_clusters(result: fxmerge.MergeResult) -> tuple[int, int]:
    """(clusters holding exactly one unit of every model, all clusters) over the matched groups."""
    good = total = 0
    for group in result.groups:
        if group.fixed:
            continue
        for cluster in range(group.width):
            total += 1
            good += all(labels.count(cluster) == 1 for labels in group.labels)
    return good, total


# -------------------------------------------------------------------------------------- the twins


@pytest.mark.parametrize("name", ALL)
def test_twins_are_nontrivial(cases, name: str) -> None:
    """The recovery tests have teeth: twins compute m's function with different weights, and
    averaging m with a twin without aligning it does not give m back."""
    case = cases(name)
    assert torch.isfinite(case.y).all() and case.y.norm() > 0
    assert case.y.std(dim=0).mean() > 1e-3 * case.y.abs().mean(), "outputs do not depend on the input"
    for twin in (case.twin1, case.twin2):
        assert relative_error(case.y, output_of(twin, case.x), norm="l2") < 1e-4
    state, twin_state = case.model.state_dict(), case.twin1.state_dict()
    matrices = [k for k, v in state.items() if v.dim() >= 2]
    moved = [k for k in matrices if not torch.equal(state[k], twin_state[k])]
    assert len(moved) >= 0.9 * len(matrices), f"only {len(moved)} of {len(matrices)} weight matrices were permuted"
    naive = copy.deepcopy(case.model)
    naive.load_state_dict(
        {k: (v + twin_state[k]) / 2 if v.is_floating_point() else v for k, v in state.items()}
    )
    assert relative_error(case.y, output_of(naive, case.x), norm="l2") > 1e-2


# ---------------------------------------------------------------------------------------- recovery


RECOVERY = [(n, m) for n in ALL for m in ("permute", "zip", "mudsc") if not (n == "tv_resnet18" and m == "mudsc")]


@pytest.mark.parametrize(("name", "method"), RECOVERY)
def test_merging_a_permuted_twin_recovers_the_model(cases, name: str, method: str) -> None:
    case = cases(name)
    result, y2 = merged_output([case.model, case.twin1], case, method=method)
    assert y2.shape == case.y.shape
    err = relative_error(case.y, y2, norm="l2")
    assert err < TOL, f"{name} {method}: ||y - y'|| / ||y|| = {err:.2e}"
    free = [g for g in result.groups if not g.fixed]
    assert free, "nothing was matched"
    assert all(g.width == g.sizes[0] for g in free)


MERGE_WITH_ITSELF = [
    pytest.param(n, m)
    for n in ZOO
    for m in ("average", "permute", "zip")
] + [pytest.param("tv_resnet18", "average")]


@pytest.mark.parametrize(("name", "method"), MERGE_WITH_ITSELF)
def test_merging_a_model_with_itself_is_the_model(cases, name: str, method: str) -> None:
    case = cases(name)
    _, y2 = merged_output([case.model, case.model], case, method=method)
    err = relative_error(case.y, y2, norm="l2")
    assert err < TOL, f"{name} {method}: ||y - y'|| / ||y|| = {err:.2e}"


THREE = [(n, m, a) for n in ZOO for m, a in (("permute", 0.5), ("zip", 1.0), ("mudsc", 1.0))]


@pytest.mark.parametrize(("name", "method", "alpha"), THREE)
def test_merging_three_copies_recovers_the_model(cases, name: str, method: str, alpha: float) -> None:
    case = cases(name)
    result, y2 = merged_output([case.model, case.twin1, case.twin2], case, method=method, alpha=alpha)
    err = relative_error(case.y, y2, norm="l2")
    assert err < TOL, f"{name} {method} alpha={alpha}: ||y - y'|| / ||y|| = {err:.2e}"


@pytest.mark.parametrize("name", ZOO)
def test_three_copies_zip_at_default_alpha_recovers(cases, name: str) -> None:
    """Three copies at ZipIt's default alpha=0.5.

    With plain ZipIt decay this fails: after two copies of a feature merge (score 1), their score
    with the third copy decays to alpha * 1 = 0.5 and two unmerged third copies of DIFFERENT
    features with similarity above 0.5 are merged first. fxmerge does not decay a merge of two
    identical features (score >= 1 - 1e-6: deduplication), so every cluster is one unit per model.
    """
    case = cases(name)
    result, y2 = merged_output([case.model, case.twin1, case.twin2], case, method="zip")
    assert relative_error(case.y, y2, norm="l2") < TOL
    good, total = triple_clusters(result)
    assert good == total


@pytest.mark.parametrize(
    ("copy_similarity", "cross", "alpha", "recovered"),
    [
        (1.0, 0.6, 0.5, True),    # identical copies: deduplicated, no decay
        (1.0, 0.9, 0.5, True),
        (0.99, 0.4, 0.5, True),   # near copies decay: 0.5 * 0.99 > 0.4
        (0.99, 0.6, 0.5, False),  # 0.5 * 0.99 < 0.6: two different features merge first
        (0.99, 0.6, 1.0, True),
    ],
)
def test_zip_three_copies_mechanism(copy_similarity: float, cross: float, alpha: float, recovered: bool) -> None:
    """Three copies of two features with similarity ``cross`` between the features: identical
    copies always come together; near copies only when the decayed score beats ``cross``."""
    sizes = [2, 2, 2]
    feature = np.arange(6) % 2
    similarity = np.where(feature[:, None] == feature[None, :], copy_similarity, cross)
    np.fill_diagonal(similarity, 1.0)
    pairs = match(similarity, sizes, 2, method="zip", alpha=alpha, beta=1.0)
    labels = np.concatenate([u.argmax(axis=1) for _, u in pairs])
    copies_together = all(len(set(labels[feature == f])) == 1 for f in (0, 1))
    assert copies_together == recovered, labels


def test_vit_heads_are_matched_blockwise(cases) -> None:
    case = cases("zoo_vit")
    result, y2 = merged_output([case.model, case.twin1], case, method="zip")
    assert relative_error(case.y, y2, norm="l2") < TOL
    heads = [g for g in result.groups if ":heads" in g.name]
    outer = [g for g in heads if g.name.endswith(":heads")]
    assert len(outer) == 2, [g.name for g in result.groups]  # one per encoder layer
    assert all(g.source == "blocks paired" for g in outer), outer
    assert all(g.sizes == (4, 4) and g.width == 4 for g in outer)
    inner = [g for g in heads if "*" in g.name]
    assert inner and all(g.source.endswith("block-wise") for g in inner), inner
    # The twin's head order really was permuted, and the pairing found it back.
    pairings = [result.matches[g.name].unmerge[1].argmax(dim=0) for g in outer]  # type: ignore[index]
    assert any(not torch.equal(p, torch.arange(4)) for p in pairings), pairings


# ------------------------------------------------------------------------------- partial zipping


def test_partial_zipping_at_every_unit_recovers_the_model(cases) -> None:
    case = cases("zoo_resnet")
    units = find_units(fxmerge.trace(case.model, case.x))
    assert len(units) >= 5
    for index in range(len(units) - 1):
        for method in ("permute", "zip"):
            result, y2 = merged_output([case.model, case.twin1], case, method=method, stop_at=index)
            err = relative_error(case.y, y2, norm="l2")
            assert err < TOL, f"stop_at={index} ({units[index].end}) {method}: {err:.2e}"
            gm = result.module
            targets = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
            for k in (0, 1):
                assert any(t.startswith(f"tail{k}.") for t in targets), (index, targets)
            assert not any(t.startswith("tail2.") for t in targets)
            maps = [n for n, mod in gm.named_modules() if isinstance(mod, ChannelMap)]
            assert len(maps) == 2, (index, maps)  # one unmerge map per model
            assert not gm.training


def test_partial_zipping_by_node_name_and_three_models(cases) -> None:
    case = cases("zoo_resnet")
    units = find_units(fxmerge.trace(case.model, case.x))
    by_index = fxmerge.merge([case.model, case.twin1], case.batches, stop_at=2, quiet=True)
    by_name = fxmerge.merge([case.model, case.twin1], case.batches, stop_at=units[2].end, quiet=True)
    a, b = by_index.module.state_dict(), by_name.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result, y2 = merged_output([case.model, case.twin1, case.twin2], case, method="permute", stop_at=2)
    assert relative_error(case.y, y2, norm="l2") < TOL
    targets = {str(n.target).split(".")[0] for n in result.module.graph.nodes if n.op == "call_module"}
    assert {"tail0", "tail1", "tail2"} <= targets
    # stop_at the last unit: nothing is left for a tail, the merge is a full one.
    full = fxmerge.merge([case.model, case.twin1], case.batches, stop_at=len(units) - 1, quiet=True)
    assert not any(str(n.target).startswith("tail") for n in full.module.graph.nodes)


def test_stop_at_must_be_a_unit_boundary(cases) -> None:
    case = cases("zoo_resnet")
    units = find_units(fxmerge.trace(case.model, case.x))
    inside = units[1].layers[0]  # a conv inside the first residual block
    assert inside not in {u.end for u in units}
    with pytest.raises(ConfigError) as error:
        fxmerge.merge([case.model, case.twin1], case.batches, stop_at=inside, quiet=True)
    message = str(error.value)
    assert inside in message
    for unit in units:
        assert unit.end in message, f"valid name {unit.end!r} missing from: {message}"
    with pytest.raises(ConfigError):
        fxmerge.merge([case.model, case.twin1], case.batches, stop_at="no_such_node", quiet=True)


@pytest.mark.parametrize("stop", [6, 99, -1])
def test_stop_at_out_of_range(cases, stop: int) -> None:
    case = cases("zoo_resnet")
    assert len(find_units(fxmerge.trace(case.model, case.x))) == 6
    with pytest.raises(ConfigError, match="0..5"):
        fxmerge.merge([case.model, case.twin1], case.batches, stop_at=stop, quiet=True)


# ----------------------------------------------------------------------------------------- concat


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_concat_of_twins_is_both_outputs(cases, method: str) -> None:
    case = cases("zoo_resnet")
    _, y2 = merged_output([case.model, case.twin1], case, method=method, output="concat")
    assert y2.shape == (case.x.shape[0], 20)
    assert relative_error(torch.cat([case.y, case.y], dim=-1), y2, norm="l2") < TOL


def test_concat_with_different_label_sets(cases) -> None:
    case = cases("zoo_resnet")
    # Model "7" shares m's trunk (permuted) and has its own 7-way head: the merged trunk is m's,
    # so the concatenated output must be exactly [m(x), model7(x)].
    model7 = copy.deepcopy(case.twin1)
    torch.manual_seed(7)
    model7.head = nn.Linear(model7.head.in_features, 7)
    model7.eval()
    _, y2 = merged_output([case.model, model7], case, method="zip", output="concat")
    assert y2.shape == (case.x.shape[0], 17)
    expected = torch.cat([case.y, output_of(model7, case.x)], dim=-1)
    assert relative_error(expected, y2, norm="l2") < TOL
    assert relative_error(case.y, y2[:, :10], norm="l2") < TOL

    # Two independent models with 10 and 7 outputs: one merged trunk, width 17 out.
    torch.manual_seed(3)
    other = _zoo_resnet(num_outputs=7).eval()
    reset_batchnorm(other, case.batches, quiet=True)
    _, y3 = merged_output([case.model, other], case, method="zip", output="concat")
    assert y3.shape == (case.x.shape[0], 17) and torch.isfinite(y3).all()
    # Shared outputs of different sizes cannot be averaged.
    with pytest.raises(ConfigError, match="head"):
        fxmerge.merge([case.model, other], case.batches, quiet=True)


# ----------------------------------------------------------------------------- inputs, determinism


@pytest.mark.parametrize("name", ["zoo_resnet", "zoo_vit"])
def test_inputs_are_untouched(cases, name: str) -> None:
    case = cases(name)
    model, twin = copy.deepcopy(case.model), copy.deepcopy(case.twin1)
    third = copy.deepcopy(case.twin2)
    twin.train()  # one model handed over in train mode
    models = [model, twin, third]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    flags = [[sub.training for sub in m.modules()] for m in models]
    runs = [
        dict(models=models[:2], method="zip"),
        dict(models=models[:2], method="mudsc"),
        dict(models=models[:2], method="permute", stop_at=2),
        dict(models=models[:2], method="zip", output="concat"),
        dict(models=models, method="zip", alpha=1.0),
    ]
    for run in runs:
        result = fxmerge.merge(run.pop("models"), case.batches, quiet=True, **run)
        assert not result.module.training
        for m, state, flag in zip(models, before, flags):
            after = m.state_dict()
            assert after.keys() == state.keys()
            for key, tensor in state.items():
                assert torch.equal(after[key], tensor), f"{run}: {key} changed"
            assert [sub.training for sub in m.modules()] == flag, f"{run}: training flags changed"
    assert twin.training and not model.training
    # ... and the train-mode input is merged as the function it computes in eval mode.
    _, y2 = merged_output([model, twin], case, method="zip")
    assert relative_error(case.y, y2, norm="l2") < TOL


@pytest.mark.parametrize(("name", "method"), [("zoo_resnet", "zip"), ("zoo_resnet", "mudsc"), ("zoo_vit", "zip")])
def test_merging_twice_gives_bit_identical_merges(cases, name: str, method: str) -> None:
    case = cases(name)
    # Two independently initialised models: nothing is exactly tied, every matcher choice counts.
    other = _build(name, seed=1).model
    runs = [
        fxmerge.merge([case.model, other], case.batches, method=method, quiet=True).module for _ in range(2)
    ]
    assert same_state(*runs)
    assert torch.equal(output_of(runs[0], case.x), output_of(runs[1], case.x))
    # not vacuous: the merged model is neither input
    assert relative_error(case.y, output_of(runs[0], case.x), norm="l2") > 1e-3


# ---------------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("options", [dict(method="zip"), dict(method="zip", stop_at=2, output="concat")], ids=["full", "tails"])
def test_torch_compile_matches_eager(cases, options: dict) -> None:
    case = cases("zoo_resnet")
    result = fxmerge.merge([case.model, case.twin1], case.batches, quiet=True, **options)
    eager = output_of(result.module, case.x)
    compiled = torch.compile(result.module, backend="aot_eager")
    with torch.no_grad():
        out = compiled(case.x)
    assert out.shape == eager.shape
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-5), (out - eager).abs().max()


class _UnusedInEval(nn.Module):
    """googlenet-style: an auxiliary head only training calls, and one module under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 3)
        self.shared = nn.Linear(6, 6)
        self.alias = self.shared  # a second path to one module (coat's shared position encoding)

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.body(x))))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_modules_the_traced_graph_never_calls_are_not_merged() -> None:
    """Regression (torchvision googlenet, timm coat_lite_tiny): the merge read the user model's
    state dict, whose auxiliary head and second path to a shared module the traced graph does
    not hold, and the rewrite failed with "GraphModule has no attribute 'aux'"."""
    torch.manual_seed(0)
    model = _UnusedInEval().eval()
    calibration = random_batches((8, 4), count=4)
    twin = random_permute(model, calibration[0], seed=1)
    result = fxmerge.merge([model, twin], calibration, method="permute", quiet=True)
    assert relative_error(output_of(model, calibration[0]), output_of(result.module, calibration[0])) < 1e-5
    assert not hasattr(result.module, "aux")


class _InputIndependentMiddle(nn.Module):
    """x -> fc1 -> relu -> fc2 (weights 1e-7 of its biases: its output is its bias up to float32
    rounding, a layer that does not depend on the input) -> fc3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        with torch.no_grad():
            self.fc2.weight.mul_(1e-7)
            self.fc2.bias.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(torch.relu(self.fc1(x))))


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_a_layer_that_ignores_its_input_is_matched_on_weights(method: str) -> None:
    """Found by the HF table (MobileViT's last stage at 1x1 resolution): where every unit is
    constant up to float32 rounding, correlations are rounding noise (twin columns correlated
    -0.38) and the merge of a model with its permuted twin was off by 6e-2. Such taps now inform
    nothing, and a group seen only there is matched on its weights."""
    torch.manual_seed(0)
    model = _InputIndependentMiddle().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 6, generator=generator) for _ in range(4)]
    twin = fxmerge.testing.random_permute(model, batches[0], seed=1)
    result = fxmerge.merge([model, twin], batches, method=method, quiet=True)
    group = next(g for g in result.groups if g.name == "fc2:out")
    assert group.source.startswith("weights"), group
    x = torch.randn(8, 6, generator=generator)
    with torch.no_grad():
        assert relative_error(model(x), result.module(x)) < 1e-5
