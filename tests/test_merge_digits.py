"""Merging two ResNets trained on disjoint digit tasks: real data, one seed, a few epochs.

The claims of the papers on the smallest real setting: zipping keeps far more of both tasks
than weight averaging (per-task and joint accuracy); merging is deterministic, leaves its inputs
alone, and its GraphModule compiles.
"""

from __future__ import annotations


import pytest
import torch

import fxmerge
from fxmerge.experiments import FAMILIES, Row, TaskModels, calibration_data, compare, evaluate, format_table, train_task_models

SEED = 0
EPOCHS = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def task_models(one_thread: None) -> TaskModels:
    return train_task_models(FAMILIES["resnet"], FAMILIES["resnet"], seed=SEED, epochs=EPOCHS)


@pytest.fixture(scope="module")
def merged(task_models: TaskModels) -> dict:
    models = [task_models.model_a, task_models.model_b]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    calibration = calibration_data(task_models.split, seed=SEED)
    results = {
        method: fxmerge.merge(models, calibration, method=method, quiet=True)
        for method in ("average", "zip")
    }
    return {"before": before, "calibration": calibration, **results}


def _report(task_models: TaskModels, module: torch.nn.Module) -> dict:
    return evaluate(module, task_models.head, task_models.split)


def test_trained_models_know_their_own_task(task_models: TaskModels) -> None:
    a = _report(task_models, task_models.model_a)
    b = _report(task_models, task_models.model_b)
    assert a["tasks"][0] > 0.9 and b["tasks"][1] > 0.9
    # ... and not the other one: only 5 of the 10 class embeddings were ever trained against.
    assert a["tasks"][1] < 0.6 and b["tasks"][0] < 0.6


def test_zip_beats_weight_averaging(task_models: TaskModels, merged: dict) -> None:
    zipped = _report(task_models, merged["zip"].module)
    averaged = _report(task_models, merged["average"].module)
    best_single = max(_report(task_models, m)["average"] for m in (task_models.model_a, task_models.model_b))
    assert zipped["average"] > averaged["average"]
    assert zipped["joint"] > averaged["joint"]
    assert zipped["average"] > best_single


def test_merge_leaves_input_models_untouched(task_models: TaskModels, merged: dict) -> None:
    for model, before in zip((task_models.model_a, task_models.model_b), merged["before"]):
        after = model.state_dict()
        assert after.keys() == before.keys()
        for key, tensor in before.items():
            assert torch.equal(after[key], tensor), key
        assert not model.training


def test_same_seed_gives_bit_identical_merge(task_models: TaskModels, merged: dict) -> None:
    again = fxmerge.merge(
        [task_models.model_a, task_models.model_b], merged["calibration"], method="zip", quiet=True
    )
    first, second = merged["zip"].module.state_dict(), again.module.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_merged_module_compiles_to_the_same_function(task_models: TaskModels, merged: dict) -> None:
    module = merged["zip"].module
    x = task_models.split.x_test[:128]
    compiled = torch.compile(module, backend="aot_eager")
    with torch.no_grad():
        expected = module(x)
        actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_compare_reports_the_same_numbers(task_models: TaskModels, merged: dict) -> None:
    rows = compare(task_models, ("average", "zip"), seed=SEED)
    assert [r.name for r in rows] == ["Task A model", "Task B model", "Average", "Zip"]
    assert rows[0].seconds is None and rows[1].seconds is None
    assert all(r.seconds is not None and r.seconds > 0 for r in rows[2:])
    zipped = _report(task_models, merged["zip"].module)
    assert (rows[3].joint, rows[3].task_a, rows[3].task_b, rows[3].average) == (
        zipped["joint"], *zipped["tasks"], zipped["average"],
    )


def test_calibration_covers_both_tasks_without_labels(task_models: TaskModels) -> None:
    batches = calibration_data(task_models.split, seed=SEED)
    assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (1, 8, 8) for b in batches)
    assert all(len(b) == 64 for b in batches[:-1])
    x = torch.cat(batches)
    assert len(x) == len(task_models.split.x_train)
    assert not torch.equal(x, task_models.split.x_train)  # shuffled ...
    rows = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
    assert rows(x) == rows(task_models.split.x_train)  # ... but the same samples, of both tasks


def test_format_table() -> None:
    rows = [Row("Task A model", 0.5, 1.0, 0.2, 0.6), Row("Zip", 0.625, 0.9, 0.8, 0.85, 1.234)]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| model | joint | task A | task B | avg | time |"
    assert lines[2] == "| Task A model | 50.0 | 100.0 | 20.0 | 60.0 | - |"
    assert lines[3] == "| Zip | 62.5 | 90.0 | 80.0 | 85.0 | 1.23 s |"
