"""What ``fxmerge.merge`` hands back: short reprs of ``MergeResult`` / ``GroupReport``, the
cluster labels of every group (checked against the merge/unmerge matrices and against the
permutations of a permuted twin), and the timing of every stage."""

from __future__ import annotations

import time

import pytest
import torch

import fxmerge
from fxmerge import zoo
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.testing import random_permute
from conftest import random_batches, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = random_batches(count=3)
STAGES = ["trace", "depth", "dependency", "structure", "features", "width", "rewrite", "repair"]


def _resnet(seed: int, stages: tuple[int, ...] = (1, 1, 1)) -> torch.nn.Module:
    model = randomize_(zoo.resnet(stages, width=8, in_channels=1, image_size=8), seed).eval()
    reset_batchnorm(model, BATCHES, quiet=True)
    return model.eval()


@pytest.fixture(scope="module")
def zipped(one_thread) -> tuple[fxmerge.MergeResult, float]:
    """Two independent resnets zipped to half the larger width: clusters of ~4 units."""
    start = time.perf_counter()
    result = fxmerge.merge([_resnet(0), _resnet(1)], BATCHES, method="zip", width=0.5, quiet=True)
    return result, time.perf_counter() - start


def test_merge_result_repr_is_a_short_summary(zipped) -> None:
    result, _ = zipped
    text = repr(result)
    free = [g for g in result.groups if not g.fixed]
    widths = sorted(g.width for g in free)
    assert "\n" not in text and len(text) < 250, text
    assert text.startswith("MergeResult(2 models, method='zip', ")
    assert f"{len(result.groups)} groups ({len(free)} free, {len(result.groups) - len(free)} fixed)" in text
    assert f"merged widths {widths[0]}..{widths[-1]} (total {sum(widths)})" in text
    assert "depth aligned: no" in text and text.endswith(f"{sum(result.timings.values()):.2f} s)")
    assert "GraphModule" not in text and "forward" not in text


def test_group_report_repr_is_short(zipped) -> None:
    result, _ = zipped
    for group in result.groups:
        text = repr(group)
        assert "\n" not in text and len(text) < 160, text
        assert text.startswith(f"GroupReport({group.name!r}: {group.sizes} -> {group.width}, ")
        assert ("fixed" in text) == group.fixed
    assert "labels" not in repr(result.groups)


def test_depth_alignment_shows_in_the_repr() -> None:
    result = fxmerge.merge([_resnet(0), _resnet(1, (2, 1, 1))], BATCHES, method="zip", quiet=True)
    assert "depth aligned: yes" in repr(result) and result.alignment


def test_labels_are_the_argmax_of_the_unmerge_matrices(zipped) -> None:
    result, _ = zipped
    largest = 0
    for group in result.groups:
        match = result.matches[group.name]
        assert len(group.labels) == 2
        assert [len(labels) for labels in group.labels] == list(group.sizes)
        if group.fixed:
            assert all(labels == tuple(range(size)) for labels, size in zip(group.labels, group.sizes))
            continue
        members = torch.zeros(group.width, dtype=torch.long)
        for labels, merge, unmerge in zip(group.labels, match.merge, match.unmerge):
            labels = torch.tensor(labels)
            assert torch.equal(labels, unmerge.argmax(dim=1))
            # unit i is reconstructed from its cluster only, and enters only its cluster's average
            assert torch.equal(unmerge != 0, torch.nn.functional.one_hot(labels, group.width).bool())
            assert torch.equal(merge.T != 0, torch.nn.functional.one_hot(labels, group.width).bool())
            members += torch.bincount(labels, minlength=group.width)
        assert (members >= 1).all(), f"{group.name}: an empty cluster"
        largest = max(largest, int(members.max()))
    assert largest > 2, "no cluster of more than two units: the test would not exercise elastic zipping"


def test_permute_labels_undo_the_permutation() -> None:
    model = _resnet(0)
    twin, permutations = random_permute(model, BATCHES[0], seed=3, return_permutations=True)
    result = fxmerge.merge([model, twin], BATCHES, method="permute", quiet=True)
    free = [g for g in result.groups if not g.fixed]
    assert {g.name for g in free} == set(permutations)
    for group in result.groups:
        if group.fixed:
            assert group.labels == (tuple(range(group.width)),) * 2
            continue
        perm = permutations[group.name]
        assert not torch.equal(perm, torch.arange(len(perm)))
        # merged unit i is the model's unit i; unit j of the twin is the model's unit perm[j]
        assert group.labels[0] == tuple(range(group.width))
        assert group.labels[1] == tuple(perm.tolist())
        assert torch.equal(torch.tensor(group.labels[1])[torch.argsort(perm)], torch.arange(len(perm)))


def test_random_permute_returns_the_permutations_it_applied() -> None:
    model = _resnet(0)
    twin, permutations = random_permute(model, BATCHES[0], seed=3, return_permutations=True)
    assert twin.state_dict().keys() == model.state_dict().keys()
    perm = permutations["stem.0:out"]
    assert torch.equal(twin.stem[0].weight, model.stem[0].weight[perm])
    plain = random_permute(model, BATCHES[0], seed=3)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in twin.state_dict().items())


def test_every_stage_is_timed(zipped) -> None:
    result, wall = zipped
    assert list(result.timings) == STAGES
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert sum(result.timings.values()) <= wall
