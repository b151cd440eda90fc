"""``fxmerge demo``'s three pairs (``fxmerge.experiments.demo_pairs``): they train and merge, the
merges have the bigger model's structure, the ensemble row is the ensemble's accuracy and the
printed tables hold every row. Tiny runs (1 epoch, 2 calibration batches): exactness, not accuracy."""

from __future__ import annotations

import copy

import pytest
import torch

from fxmerge.api import merge
from fxmerge.evaluation import Ensemble
from fxmerge.experiments import (
    ENSEMBLE_LABEL,
    FAMILIES,
    REGRESSION_ZIP,
    PairResult,
    calibration_data,
    compare_pair,
    demo_pairs,
    evaluate,
    format_demo,
)

SEED = 0
EPOCHS = 1
CALIBRATION_BATCHES = 3  # 192 samples: more than stage 3's 128 units at x2


@pytest.fixture(scope="module")
def results() -> tuple[PairResult, ...]:
    return tuple(
        compare_pair(pair, seed=SEED, epochs=EPOCHS, calibration_batches=CALIBRATION_BATCHES) for pair in demo_pairs("resnet")
    )


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _accuracies(logits: torch.Tensor, labels: torch.Tensor, tasks: tuple[tuple[int, ...], ...]) -> list[float]:
    """[joint (argmax over all classes), task accuracy (argmax within the task's classes, over the
    task's samples) per task, their mean], computed directly."""
    joint = float((logits.argmax(1) == labels).double().mean())
    per_task = []
    for classes in tasks:
        index = torch.tensor(classes)
        mine = (labels[:, None] == index).any(1)
        predicted = index[logits[mine][:, index].argmax(1)]
        per_task.append(float((predicted == labels[mine]).double().mean()))
    return [joint, *per_task, sum(per_task) / len(per_task)]


def _values(row) -> list[float]:
    return [row.joint, row.task_a, row.task_b, row.average]


def test_demo_pairs_same_depth_and_width() -> None:
    same, depth, width = demo_pairs("vgg")
    assert same.factory_a is same.factory_b is depth.factory_a is width.factory_a is FAMILIES["vgg"]
    assert same.methods == ("average", "permute", "zip", REGRESSION_ZIP) and dict(same.merge_kwargs) == {}
    assert depth.methods == width.methods == ("zip", REGRESSION_ZIP)
    assert dict(depth.merge_kwargs) == {"depth": "lma"} and dict(width.merge_kwargs) == {"width": "max"}
    assert depth.label("zip") == "Zip (depth=lma)" and same.label("zip") == "Zip"
    assert depth.label(REGRESSION_ZIP) == "Zip (unmerge=regression, depth=lma)"
    with pytest.raises(ValueError, match="unknown family 'mlp'"):
        demo_pairs("mlp")


def test_every_pair_has_its_models_merges_and_ensemble(results: tuple[PairResult, ...]) -> None:
    assert [[row.name for row in r.rows] for r in results] == [
        ["Task A model", "Task B model", "Average", "Permute", "Zip", "Zip (unmerge=regression)", ENSEMBLE_LABEL],
        ["Task A model", "Task B model", "Zip (depth=lma)", "Zip (unmerge=regression, depth=lma)", ENSEMBLE_LABEL],
        ["Task A model", "Task B model", "Zip (width=max)", "Zip (unmerge=regression, width=max)", ENSEMBLE_LABEL],
    ]
    for r in results:
        tm = r.task_models
        for row, model in zip(r.rows[:2], (tm.model_a, tm.model_b)):
            report = evaluate(model, tm.head, tm.split)
            assert _values(row) == [report["joint"], *report["tasks"], report["average"]]
            assert row.seconds is None
        assert all(row.seconds is not None and row.seconds > 0 for row in r.rows[2:-1])
    # Model A is the same factory and seed in every pair: trained to the same weights.
    a = [r.task_models.model_a.state_dict() for r in results]
    assert all(torch.equal(a[0][k], other[k]) for other in a[1:] for k in a[0])


def test_ensemble_row_is_the_ensembles_accuracy(results: tuple[PairResult, ...]) -> None:
    for r in results:
        tm = r.task_models
        ensemble = r.rows[-1]
        assert ensemble.name == ENSEMBLE_LABEL and ensemble.seconds is None
        report = evaluate(Ensemble([tm.model_a, tm.model_b], tm.head), torch.nn.Identity(), tm.split)
        assert _values(ensemble) == [report["joint"], *report["tasks"], report["average"]]
        # ...and recomputed without fxmerge.evaluation: the heads' logits of A and B averaged.
        a, b = copy.deepcopy(tm.model_a).eval(), copy.deepcopy(tm.model_b).eval()  # the fixture's modes stay
        with torch.no_grad():
            logits = (tm.head(a(tm.split.x_test)) + tm.head(b(tm.split.x_test))) / 2
        expected = _accuracies(logits, tm.split.y_test, (tm.split.classes_a, tm.split.classes_b))
        assert _values(ensemble) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("index", [1, 2], ids=["depth", "width"])
def test_hetero_merge_has_the_bigger_models_structure(results: tuple[PairResult, ...], index: int) -> None:
    """The depth pair's merge has B's blocks (A was extended), the width pair's B's widths: its
    state_dict has model B's names and shapes, not A's; and it is the merge the demo's row reports."""
    r = results[index]
    tm = r.task_models
    calibration = calibration_data(tm.split, seed=SEED, num_batches=CALIBRATION_BATCHES)
    merged = merge(
        [tm.model_a, tm.model_b], calibration, method="zip", calibration_batches=CALIBRATION_BATCHES, quiet=True,
        **r.pair.merge_kwargs,
    ).module
    assert _shapes(merged) == _shapes(tm.model_b) != _shapes(tm.model_a)
    if index == 1:
        assert len(_shapes(tm.model_b)) > len(_shapes(tm.model_a))  # deeper: more parameters
        assert "stage3.1.conv1.weight" in _shapes(merged) and "stage3.1.conv1.weight" not in _shapes(tm.model_a)
    else:
        assert _shapes(merged)["stage3.0.conv1.weight"] == (128, 64, 3, 3)  # x2 of stage 3's 64 channels
    report = evaluate(merged, tm.head, tm.split)
    assert _values(r.rows[2]) == [report["joint"], *report["tasks"], report["average"]]
    fitted = merge(
        [tm.model_a, tm.model_b], calibration, method="zip", calibration_batches=CALIBRATION_BATCHES, quiet=True,
        unmerge="regression", **r.pair.merge_kwargs,
    ).module
    assert _shapes(fitted) == _shapes(merged)
    report = evaluate(fitted, tm.head, tm.split)
    assert _values(r.rows[3]) == [report["joint"], *report["tasks"], report["average"]]


def test_format_demo_prints_every_row_of_every_pair(results: tuple[PairResult, ...]) -> None:
    text = format_demo(results)
    sections = text.split("\n\n")
    assert len(sections) == 2 * len(results)  # a title line, then its table, per pair
    for i, r in enumerate(results):
        assert sections[2 * i] == f"{i + 1}. {r.pair.name.capitalize()}: {r.pair.about}."
        lines = sections[2 * i + 1].splitlines()[2:]
        assert len(lines) == len(r.rows)
        for line, row in zip(lines, r.rows):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert cells[0] == row.name
            assert [float(c) for c in cells[1:5]] == [float(f"{100 * v:.1f}") for v in _values(row)]
            assert cells[5] == ("-" if row.seconds is None else f"{row.seconds:.2f} s")
