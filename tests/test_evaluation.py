"""fxmerge.evaluation: accuracies and losses against hand-computed values, the landscape plane's
geometry, MergeResult.evaluate, and the `fxmerge merge` -> `fxmerge eval` round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fxmerge
from fxmerge import zoo
from fxmerge.cli import main
from fxmerge.data import digits_tasks, train_classifier
from fxmerge.errors import ConfigError, LoadError
from fxmerge.evaluation import (
    Ensemble,
    Evaluation,
    evaluate,
    evaluate_models,
    grid_axis,
    labelled_batches,
    landscape,
    load_labelled,
    plane,
    score,
)
from fxmerge.metrics import task_report

pytestmark = pytest.mark.usefixtures("one_thread")

# Two tasks: classes {0, 1} and {2, 3}.
LOGITS = torch.tensor(
    [
        [5.0, 1.0, 0.0, 0.0],  # label 0: joint right, task right
        [0.0, 1.0, 9.0, 0.0],  # label 1: joint wrong (2), task {0,1} right (1)
        [2.0, 0.0, 1.0, 0.0],  # label 2: joint wrong (0), task {2,3} right (2)
        [0.0, 0.0, 3.0, 1.0],  # label 3: joint wrong (2), task wrong (2)
        [0.0, 0.0, 0.0, 4.0],  # label 3: joint right, task right
    ]
)
LABELS = torch.tensor([0, 1, 2, 3, 3])
TASKS = {"A": [0, 1], "B": [2, 3]}


def _cross_entropy(row: list[float], label: int) -> float:
    """-log softmax(row)[label], by hand."""
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_score_matches_hand_computed_accuracies_and_losses():
    result = score(LOGITS, LABELS, TASKS)
    rows = LOGITS.tolist()
    assert result.samples == 5
    assert result.joint == 2 / 5
    assert [t.name for t in result.tasks] == ["A", "B"]
    assert [t.samples for t in result.tasks] == [2, 3]
    assert [t.accuracy for t in result.tasks] == [1.0, 2 / 3]
    assert result.average == (1.0 + 2 / 3) / 2
    assert result.loss_kind == "cross_entropy"
    assert result.loss == pytest.approx(sum(_cross_entropy(r, y) for r, y in zip(rows, LABELS.tolist())) / 5, rel=1e-12)
    # task A: samples 0, 1 on columns {0, 1}; task B: samples 2, 3, 4 on columns {2, 3}, local labels 0, 1, 1
    loss_a = (_cross_entropy(rows[0][:2], 0) + _cross_entropy(rows[1][:2], 1)) / 2
    loss_b = (_cross_entropy(rows[2][2:], 0) + _cross_entropy(rows[3][2:], 1) + _cross_entropy(rows[4][2:], 1)) / 3
    assert result.tasks[0].loss == pytest.approx(loss_a, rel=1e-12)
    assert result.tasks[1].loss == pytest.approx(loss_b, rel=1e-12)
    assert repr(result) == "Evaluation(5 samples, joint 40.0%, A 100.0%, B 66.7%, avg 83.3%, cross_entropy 2.358)"
    # metrics.task_report is the same computation
    assert task_report(LOGITS, LABELS, [[0, 1], [2, 3]]) == {"joint": 0.4, "tasks": [1.0, 2 / 3], "average": (1.0 + 2 / 3) / 2}


def test_regression_labels_give_the_mean_squared_error():
    outputs = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]])
    targets = torch.tensor([[1.5, 2.0], [0.0, 1.0], [2.0, 3.0]])
    result = score(outputs, targets)
    assert result.loss_kind == "mse" and result.joint is None and result.tasks == () and result.average is None
    assert result.loss == pytest.approx((0.25 + 0 + 0 + 4 + 1 + 0) / 6, rel=1e-12)
    with pytest.raises(ConfigError, match="regression"):
        score(outputs, targets, TASKS)
    with pytest.raises(ConfigError, match="do not match"):
        score(outputs, targets[:, :1])


def test_score_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"labels must have shape \(N,\)"):
        score(LOGITS, LABELS[:3])
    with pytest.raises(ConfigError, match=r"class ids in \[0, 4\)"):
        score(LOGITS, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ConfigError, match="task B"):
        score(LOGITS[:2], LABELS[:2], TASKS)  # no sample of classes 2, 3
    with pytest.raises(ConfigError, match="outside"):
        score(LOGITS, LABELS, {"A": [0, 7]})
    with pytest.raises(ConfigError, match="no classes"):
        score(LOGITS, LABELS, {"A": []})
    with pytest.raises(ConfigError, match="zero samples"):
        score(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


class _HFStyle(nn.Module):
    """Takes keyword inputs and returns an object with ``.logits``, like a HuggingFace model."""

    def forward(self, values: torch.Tensor) -> object:
        return type("Output", (), {"logits": values * 1.0})()


def test_evaluate_streams_batches_and_equals_one_score():
    expected = score(LOGITS, LABELS, TASKS)
    model = nn.Identity()
    for batch_size in (1, 2, 5):
        got = evaluate(model, (LOGITS, LABELS), tasks=TASKS, batch_size=batch_size)
        assert (got.joint, [t.accuracy for t in got.tasks], [t.samples for t in got.tasks]) == (
            expected.joint, [t.accuracy for t in expected.tasks], [t.samples for t in expected.tasks])
        assert got.loss == pytest.approx(expected.loss, rel=1e-12)
        assert [t.loss for t in got.tasks] == pytest.approx([t.loss for t in expected.tasks], rel=1e-12)
    # dict batches carrying their labels, and an output with .logits
    batches = [{"values": LOGITS[:3], "labels": LABELS[:3]}, {"values": LOGITS[3:], "labels": LABELS[3:]}]
    got = evaluate(_HFStyle(), batches, tasks=TASKS)
    assert got.joint == expected.joint and [t.accuracy for t in got.tasks] == [t.accuracy for t in expected.tasks]
    # a head on the outputs: doubling the logits keeps every argmax
    head = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(2 * torch.eye(4))
    doubled = evaluate(nn.Identity(), (LOGITS, LABELS), tasks=TASKS, head=head)
    assert doubled.joint == expected.joint and doubled.loss == pytest.approx(score(2 * LOGITS, LABELS).loss, rel=1e-12)
    with pytest.raises(ConfigError, match="expected \\(inputs, labels\\)"):
        labelled_batches([LOGITS])


def test_ensemble_averages_the_members_logits_under_the_head():
    torch.manual_seed(0)
    members = [nn.Linear(4, 3), nn.Linear(4, 3)]
    head = nn.Linear(3, 5)
    x = torch.randn(7, 4)
    with torch.no_grad():
        expected = (head(members[0](x)) + head(members[1](x))) / 2
        assert torch.allclose(Ensemble(members, head)(x), expected, atol=1e-7)
        assert torch.allclose(Ensemble(members)(x), (members[0](x) + members[1](x)) / 2, atol=1e-7)
    labels = expected.argmax(1)
    assert evaluate(Ensemble(members, head), (x, labels)).joint == 1.0
    with pytest.raises(ConfigError, match="at least one model"):
        Ensemble([])


def test_evaluate_restores_training_flags():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    first = evaluate(model, (LOGITS, LABELS))
    assert model.training
    assert evaluate(model, (LOGITS, LABELS)) == first  # eval mode: dropout off, deterministic


def test_table_format_and_dict():
    table = evaluate_models({"merged": nn.Identity(), "doubled": nn.Sequential()}, (LOGITS, LABELS), tasks=TASKS)
    assert table["merged"] == table["doubled"]
    text = table.format().splitlines()
    assert text[0].split() == ["model", "joint", "A", "B", "avg", "cross_entropy"]
    assert text[1].split() == ["merged", "40.0", "100.0", "66.7", "83.3", f"{table['merged'].loss:.4f}"]
    data = table.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["models"]["merged"]["tasks"][1] == {"name": "B", "samples": 3, "accuracy": 2 / 3, "loss": table["merged"].tasks[1].loss}
    assert repr(table) == "EvaluationTable(merged, doubled; 5 samples)"


def test_load_labelled_files_and_callables(tmp_path):
    save_file({"inputs": LOGITS, "labels": LABELS}, tmp_path / "data.safetensors")
    torch.save({"x": LOGITS, "y": LABELS}, tmp_path / "data.pt")
    expected = score(LOGITS, LABELS, TASKS)
    for batches in (
        load_labelled(str(tmp_path / "data.safetensors"), batch_size=2),
        load_labelled(str(tmp_path / "data.pt"), keys=("x", "y")),
        load_labelled("test_evaluation:labelled_pair"),
        load_labelled("test_evaluation:labelled_batches_factory"),
    ):
        assert evaluate(nn.Identity(), batches, tasks=TASKS).joint == expected.joint
    with pytest.raises(ConfigError, match=r"needs the tensors \['inputs', 'labels'\]"):
        load_labelled(str(tmp_path / "data.pt"))


def labelled_pair() -> tuple[torch.Tensor, torch.Tensor]:
    return LOGITS, LABELS


def labelled_batches_factory():
    return iter([(LOGITS[:2], LABELS[:2]), (LOGITS[2:], LABELS[2:])])


# --------------------------------------------------------------------------------------------
# The landscape plane
# --------------------------------------------------------------------------------------------


def test_plane_geometry_is_exact():
    generator = torch.Generator().manual_seed(0)
    merged, a, b = (torch.randn(50, generator=generator, dtype=torch.float64) for _ in range(3))
    geometry = plane(merged, a, b)
    assert not geometry.collinear
    assert torch.allclose(geometry.basis @ geometry.basis.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    (x_m, y_m), (x_a, y_a), (x_b, y_b) = geometry.coordinates
    assert (x_m, y_m) == (0.0, 0.0) and y_a == 0.0
    assert x_a == pytest.approx(float((a - merged).norm()), rel=1e-12)
    assert x_b == pytest.approx(float((b - merged) @ (a - merged)) / float((a - merged).norm()), rel=1e-12)
    assert math.hypot(x_b, y_b) == pytest.approx(float((b - merged).norm()), rel=1e-12)  # b lies in the plane
    for vector, (x, y) in zip((merged, a, b), geometry.coordinates):
        assert torch.allclose(geometry.point(x, y), vector, atol=1e-12)  # the point reproduces the weights
        assert geometry.project(vector) == pytest.approx((x, y), abs=1e-12)
    assert torch.equal(geometry.point(0.0, 0.0), merged)
    # a point off the plane projects to its closest plane point
    off = geometry.point(0.3, -0.7) + 2.0 * torch.linalg.qr(torch.stack([geometry.basis[0], geometry.basis[1], a * b]).T)[0][:, 2]
    assert geometry.project(off) == pytest.approx((0.3, -0.7), abs=1e-10)


def test_plane_of_collinear_points_takes_a_seeded_orthogonal_direction():
    merged = torch.zeros(20, dtype=torch.float64)
    a = torch.linspace(-1, 1, 20, dtype=torch.float64)
    geometry = plane(merged, a, -a, seed=3)
    assert geometry.collinear and torch.equal(geometry.basis, plane(merged, a, -a, seed=3).basis)
    assert float(geometry.basis[0] @ geometry.basis[1]) == pytest.approx(0.0, abs=1e-12)
    assert geometry.coordinates[2] == pytest.approx((-float(a.norm()), 0.0), abs=1e-12)
    with pytest.raises(ConfigError, match="span no plane"):
        plane(merged, merged, a)


def test_grid_axis_covers_the_range_with_zero_on_it():
    for low, high, steps in ((-0.3, 1.7, 11), (-5.0, 0.0, 3), (0.0, 2.0, 7), (-1.25, 0.5, 9)):
        axis = grid_axis(low, high, steps)
        assert len(axis) == steps and axis[0] <= low and axis[-1] >= high - 1e-12
        assert 0.0 in axis.tolist()
        np.testing.assert_allclose(np.diff(axis), np.diff(axis)[0], rtol=1e-9)
    with pytest.raises(ConfigError):
        grid_axis(0.5, 1.0, 11)


def _tiny_pair():
    torch.manual_seed(0)
    kwargs = {"blocks_per_stage": (1,), "width": 4, "in_channels": 1, "image_size": 8, "num_outputs": 4}
    models = [zoo.resnet(**kwargs).eval() for _ in range(2)]
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(3)]
    inputs = torch.randn(24, 1, 8, 8, generator=generator)
    labels = torch.arange(24) % 4
    return models, calibration, (inputs, labels)


@pytest.mark.parametrize("method", ["zip", "permute"])
def test_landscape_points_are_the_models(method, tmp_path):
    models, calibration, data = _tiny_pair()
    result = fxmerge.merge(models, calibration, method=method, quiet=True)
    view = landscape(result, data, tasks=TASKS, calibration=calibration, steps=3)
    assert view.losses.shape == (2, 3, 3) and view.panels == ("A", "B") and view.label == method
    column, row = list(view.xs).index(0.0), list(view.ys).index(0.0)
    direct = evaluate(result.module, data, tasks=TASKS)
    merged_losses = [t.loss for t in direct.tasks]
    assert view.losses[:, row, column] == pytest.approx(merged_losses, rel=1e-6)  # the merged grid point
    assert view.point_losses["merged"] == pytest.approx(merged_losses, rel=1e-6)
    for k, weights in enumerate(((1.0, 0.0), (0.0, 1.0))):
        aligned = evaluate(result.interpolate(weights), data, tasks=TASKS)
        assert view.point_losses[f"model {k}"] == pytest.approx([t.loss for t in aligned.tasks], rel=1e-5)
    if method == "permute":  # two-model permute: the merge is the midpoint of the aligned pair
        assert view.points["model 1"] == pytest.approx((-view.points["model 0"][0], 0.0), abs=1e-6)
    from fxmerge.plots import loss_landscape  # matplotlib is in the test extra

    path = loss_landscape([view, view], tmp_path / f"{method}.png")
    assert path.stat().st_size > 1000


def test_merge_result_evaluate_rows():
    models, calibration, data = _tiny_pair()
    result = fxmerge.merge(models, calibration, method="zip", quiet=True)
    table = result.evaluate(data, tasks=TASKS, models=models)
    assert [name for name, _ in table.rows] == ["merged", "model 0", "model 1"]
    assert table["merged"] == evaluate(result.module, data, tasks=TASKS)
    assert table["model 1"] == evaluate(models[1], data, tasks=TASKS)
    assert isinstance(result.evaluate(data)["merged"], Evaluation)


# --------------------------------------------------------------------------------------------
# The command line round trip
# --------------------------------------------------------------------------------------------

KWARGS = {"blocks_per_stage": [1, 1], "in_channels": 1, "image_size": 8, "num_outputs": 10, "width": 4}


def test_merge_then_eval_round_trip(tmp_path, capsys):
    split = digits_tasks(seed=0)
    models = []
    for k, name in enumerate(("a", "b")):
        torch.manual_seed(k)
        model = zoo.resnet(**KWARGS)
        x, y = split.task(name, "train")
        train_classifier(model, x, y, epochs=1, seed=k, classes=split.classes(name))
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, tmp_path / f"{name}.safetensors")
        models.append(model.eval())
    save_file({"inputs": split.x_train[:128].contiguous()}, tmp_path / "calib.safetensors")
    save_file({"inputs": split.x_test.contiguous(), "labels": split.y_test.contiguous()}, tmp_path / "test.safetensors")
    config = tmp_path / "merge.yaml"
    config.write_text(
        "models:\n"
        f"  - {{factory: 'fxmerge.zoo:resnet', kwargs: {KWARGS}, weights: '{tmp_path / 'a.safetensors'}'}}\n"
        f"  - {{factory: 'fxmerge.zoo:resnet', kwargs: {KWARGS}, weights: '{tmp_path / 'b.safetensors'}'}}\n"
        f"calibration: {{tensor: '{tmp_path / 'calib.safetensors'}', batch_size: 64}}\n"
        "merge: {method: zip}\n"
        f"out: '{tmp_path / 'merged'}'\n"
    )
    assert main(["merge", str(config), "--quiet"]) == 0
    out = tmp_path / "merged"
    tasks = ["--task", "A=" + ",".join(map(str, split.classes_a)), "--task", "B=" + ",".join(map(str, split.classes_b))]
    png = tmp_path / "landscape.png"
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(tmp_path / "test.safetensors"), *tasks, "--landscape", str(png), "--steps", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["model", "joint", "A", "B", "avg", "cross_entropy"]
    assert [line.split()[0] for line in printed[1:4]] == ["merged", "model", "model"]
    loaded = fxmerge.load(out)  # the manifest was re-written with the new report
    with torch.no_grad():  # the loaded merge compiles and computes the same
        torch.testing.assert_close(torch.compile(loaded, backend="aot_eager")(split.x_test[:16]), loaded(split.x_test[:16]))
    report = fxmerge.io.load_report(out)
    task_dict = {"A": list(split.classes_a), "B": list(split.classes_b)}
    data = (split.x_test, split.y_test)
    for name, module in (("merged", loaded), ("model 0", models[0]), ("model 1", models[1])):
        assert report["evaluation"]["models"][name] == evaluate(module, data, tasks=task_dict).to_dict(), name
    assert report["evaluation"]["tasks"] == task_dict and report["sources"]["models"][0]["factory"] == "fxmerge.zoo:resnet"
    assert report["groups"]  # the merge's own report is kept
    # --weights replaces the recorded paths: model b's weights for both sources give model 1's row twice
    b = str(tmp_path / "b.safetensors")
    assert main(["eval", str(out), "--data", str(tmp_path / "test.safetensors"), *tasks, "--weights", b, "--weights", b]) == 0
    rows = fxmerge.io.load_report(out)["evaluation"]["models"]
    assert rows["model 0"] == rows["model 1"] == report["evaluation"]["models"]["model 1"]
    assert main(["eval", str(out), "--data", str(tmp_path / "test.safetensors"), "--weights", b]) == 1
    assert "--weights: give one file per source model (2 recorded in report.json), got 1" in capsys.readouterr().err
    report = fxmerge.io.load_report(out)
    assert png.stat().st_size > 1000
    # a tampered report is refused, not re-signed
    (out / "report.json").write_text(json.dumps({**report, "groups": []}))
    assert main(["eval", str(out), "--data", str(tmp_path / "test.safetensors"), "--no-sources"]) == 1
    with pytest.raises(LoadError):
        fxmerge.io.load_report(out)


def test_eval_command_errors(tmp_path, capsys):
    models, calibration, (inputs, labels) = _tiny_pair()
    fxmerge.merge(models, calibration, method="zip", quiet=True).save(tmp_path / "saved")  # the Python API: no sources
    save_file({"inputs": inputs, "labels": labels}, tmp_path / "data.safetensors")
    data = ["--data", str(tmp_path / "data.safetensors")]
    assert main(["eval", str(tmp_path / "missing"), *data]) == 1
    assert "fxmerge eval: error: " + str(tmp_path / "missing") + ": no such directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "saved"), *data, "--task", "A:0,1"]) == 1
    assert "--task 'A:0,1': expected NAME=ID,ID,..." in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "saved"), "--data", str(tmp_path / "data.safetensors"), "--keys", "x,y"]) == 1
    assert "needs the tensors ['x', 'y']" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "saved"), *data, "--task", "A=0,1", "--task", "B=2,3"]) == 0
    out = capsys.readouterr().out
    assert "(no source models: report.json records none" in out and out.splitlines()[1].split()[0] == "merged"
    assert fxmerge.io.load_report(tmp_path / "saved")["evaluation"]["models"]["merged"] == evaluate(
        fxmerge.load(tmp_path / "saved"), (inputs, labels), tasks=TASKS).to_dict()
    assert main(["eval", str(tmp_path / "saved"), *data, "--landscape", str(tmp_path / "x.png")]) == 1
    assert "--landscape needs the two source models and the calibration data" in capsys.readouterr().err
