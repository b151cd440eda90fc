"""The two-task merging protocol shared by ``fxmerge demo``, the benchmarks and the tests.

ZipIt / heterogeneous-merging protocol on scikit-learn's digits: the 10 classes are split into two
disjoint 5-class tasks (:func:`fxmerge.data.digits_tasks`); model A is trained on task "a" and
model B on task "b", from different initialisations, both scored by one CLIP-style
:class:`~fxmerge.data.TextHead` (fixed class embeddings) so they share an output space. A merge of
[A, B] is then judged on the test set by joint accuracy (argmax over all 10 classes) and by
per-task accuracy (argmax over the task's own 5 classes), as in the papers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxmerge import data, evaluation
from fxmerge.api import merge
from fxmerge.data import TaskSplit, TextHead
from fxmerge.zoo import resnet, vgg, vgg_cfg

__all__ = [
    "FAMILIES",
    "METHOD_LABELS",
    "Row",
    "TaskModels",
    "calibration_data",
    "compare",
    "evaluate",
    "evaluate_ensemble",
    "format_table",
    "train_task_models",
]

ModelFactory = Callable[..., nn.Module]
"""Called as ``factory(in_channels=1, image_size=8, num_outputs=embed_dim)``; returns a fresh model."""

# The demo's model pairs: small enough to train in seconds on a CPU.
FAMILIES: dict[str, ModelFactory] = {
    "resnet": functools.partial(resnet, (1, 1, 1), 16),
    "vgg": functools.partial(vgg, vgg_cfg((1, 1, 1), (16, 32, 64))),
}

METHOD_LABELS = {"average": "Average", "permute": "Permute", "zip": "Zip", "mudsc": "MuDSC"}


@dataclass(frozen=True, eq=False)
class TaskModels:
    """Model A (trained on ``split.classes_a``), model B (on ``split.classes_b``), their shared head."""

    model_a: nn.Module
    model_b: nn.Module
    head: TextHead
    split: TaskSplit


@dataclass(frozen=True)
class Row:
    """One line of a comparison; accuracies are fractions in [0, 1], ``seconds`` is None for a
    trained (not merged) model."""

    name: str
    joint: float
    task_a: float
    task_b: float
    average: float
    seconds: float | None = None


def train_task_models(
    factory_a: ModelFactory,
    factory_b: ModelFactory,
    *,
    seed: int = 0,
    epochs: int = 10,
    embed_dim: int = 32,
    lr: float = 3e-3,
) -> TaskModels:
    """Train model A on task "a" and model B on task "b" of ``digits_tasks(seed)``.

    Models output ``embed_dim``-dimensional embeddings scored by one ``TextHead`` whose class
    embeddings are drawn from ``seed``; only the task's own 5 class columns enter the loss. A is
    initialised and trained with seed ``2*seed``, B with ``2*seed + 1``. Deterministic for a seed.
    """
    split = data.digits_tasks(seed)
    head = TextHead(data.class_embeddings(dim=embed_dim, seed=seed))
    models = []
    for task, factory, model_seed in (("a", factory_a, 2 * seed), ("b", factory_b, 2 * seed + 1)):
        torch.manual_seed(model_seed)
        model = factory(in_channels=1, image_size=8, num_outputs=embed_dim)
        x, y = split.task(task, "train")
        data.train_classifier(model, x, y, epochs=epochs, lr=lr, seed=model_seed, head=head, classes=split.classes(task))
        models.append(model)
    return TaskModels(models[0], models[1], head, split)


def evaluate(model: nn.Module, head: nn.Module, split: TaskSplit) -> dict[str, Any]:
    """``fxmerge.evaluation.evaluate`` on the test set, as ``{"joint", "tasks": [task a, task b],
    "average"}`` (fractions in [0, 1])."""
    tasks = {"A": split.classes_a, "B": split.classes_b}
    return evaluation.evaluate(model, (split.x_test, split.y_test), tasks=tasks, head=head).task_report()


def evaluate_ensemble(task_models: TaskModels) -> dict[str, Any]:
    """``evaluate`` of the ensemble of model A and model B (``fxmerge.evaluation.Ensemble``: their
    logits under the shared head averaged): the upper reference for a merge of the pair."""
    tm = task_models
    return evaluate(evaluation.Ensemble([tm.model_a, tm.model_b], tm.head), nn.Identity(), tm.split)


def calibration_data(split: TaskSplit, *, seed: int = 0, batch_size: int = 64, num_batches: int | None = None) -> list[Tensor]:
    """The training inputs of both tasks, shuffled with ``seed``, in batches (no labels)."""
    order = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))
    return data.calibration_batches(split.x_train[order], batch_size, num_batches)


def _row(name: str, report: dict[str, Any], seconds: float | None = None) -> Row:
    task_a, task_b = report["tasks"]
    return Row(name, report["joint"], task_a, task_b, report["average"], seconds)


def compare(
    task_models: TaskModels,
    methods: Sequence[str] = ("average", "permute", "zip"),
    *,
    calibration_batches: int = 32,
    seed: int = 0,
    quiet: bool = True,
    on_merge: Callable[[str], None] | None = None,
    **merge_kwargs: Any,
) -> list[Row]:
    """Rows for model A, model B and ``merge([A, B], method=m)`` for each method (timed).

    Calibration: ``calibration_data(split, seed=seed)``, batches of 64, the first
    ``calibration_batches`` of them. ``merge_kwargs`` go to every ``fxmerge.merge`` call;
    ``on_merge(method)`` is called before each merge (progress reporting).
    """
    tm = task_models
    calibration = calibration_data(tm.split, seed=seed, num_batches=calibration_batches)
    rows = [
        _row("Task A model", evaluate(tm.model_a, tm.head, tm.split)),
        _row("Task B model", evaluate(tm.model_b, tm.head, tm.split)),
    ]
    for method in methods:
        if on_merge is not None:
            on_merge(method)
        start = time.perf_counter()
        result = merge(
            [tm.model_a, tm.model_b], calibration, method=method, calibration_batches=calibration_batches,
            quiet=quiet, **merge_kwargs,
        )
        seconds = time.perf_counter() - start
        rows.append(_row(METHOD_LABELS.get(method, method), evaluate(result.module, tm.head, tm.split), seconds))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table: accuracies in percent (1 decimal), merge time in seconds ("-" for models)."""
    lines = [
        "| model | joint | task A | task B | avg | time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        seconds = "-" if r.seconds is None else f"{r.seconds:.2f} s"
        cells = [f"{100 * v:.1f}" for v in (r.joint, r.task_a, r.task_b, r.average)]
        lines.append(f"| {r.name} | {' | '.join(cells)} | {seconds} |")
    return "\n".join(lines)
