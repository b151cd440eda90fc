"""The two-task merging protocol shared by ``fxmerge demo``, the benchmarks and the tests.

ZipIt / heterogeneous-merging protocol on scikit-learn's digits: the 10 classes are split into two
disjoint 5-class tasks (:func:`fxmerge.data.digits_tasks`); model A is trained on task "a" and
model B on task "b", from different initialisations, both scored by one CLIP-style
:class:`~fxmerge.data.TextHead` (fixed class embeddings) so they share an output space. A merge of
[A, B] is then judged on the test set by joint accuracy (argmax over all 10 classes) and by
per-task accuracy (argmax over the task's own 5 classes), as in the papers.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fxmerge import data, evaluation
from fxmerge.api import merge
from fxmerge.data import TaskSplit, TextHead
from fxmerge.zoo import resnet, vgg, vgg_cfg

__all__ = [
    "ENSEMBLE_LABEL",
    "FAMILIES",
    "METHOD_LABELS",
    "REGRESSION_ZIP",
    "DemoPair",
    "PairResult",
    "Row",
    "TaskModels",
    "calibration_data",
    "compare",
    "compare_pair",
    "demo_pairs",
    "evaluate",
    "evaluate_ensemble",
    "format_demo",
    "format_table",
    "method_label",
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
# A merge compared by ``compare``: a method name, or (method, options of that merge only)
MethodSpec = str | tuple[str, Mapping[str, Any]]


def method_label(spec: MethodSpec, shared: Mapping[str, Any] | None = None) -> str:
    """"Zip", "Zip (unmerge=regression)", "Zip (unmerge=regression, depth=lma)": the method, then
    the spec's own options, then the ``shared`` ones of every merge."""
    method, own = (spec, {}) if isinstance(spec, str) else spec
    options = ", ".join(f"{k}={v}" for k, v in {**own, **(shared or {})}.items())
    name = METHOD_LABELS.get(method, method)
    return f"{name} ({options})" if options else name


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


def evaluate(model: nn.Module, head: nn.Module | None, split: TaskSplit) -> dict[str, Any]:
    """``fxmerge.evaluation.evaluate`` on the test set, as ``{"joint", "tasks": [task a, task b],
    "average"}`` (fractions in [0, 1])."""
    tasks = {"A": split.classes_a, "B": split.classes_b}
    return evaluation.evaluate(model, (split.x_test, split.y_test), tasks=tasks, head=head).task_report()


def evaluate_ensemble(task_models: TaskModels) -> dict[str, Any]:
    """``evaluate`` of the ensemble of model A and model B (``fxmerge.evaluation.Ensemble``: their
    logits under the shared head averaged): the upper reference for a merge of the pair."""
    tm = task_models
    return evaluate(evaluation.Ensemble([tm.model_a, tm.model_b], tm.head), None, tm.split)


def calibration_data(split: TaskSplit, *, seed: int = 0, batch_size: int = 64, num_batches: int | None = None) -> list[Tensor]:
    """The training inputs of both tasks, shuffled with ``seed``, in batches (no labels)."""
    order = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))
    return data.calibration_batches(split.x_train[order], batch_size, num_batches)


def _row(name: str, report: dict[str, Any], seconds: float | None = None) -> Row:
    task_a, task_b = report["tasks"]
    return Row(name, report["joint"], task_a, task_b, report["average"], seconds)


def compare(
    task_models: TaskModels,
    methods: Sequence[MethodSpec] = ("average", "permute", "zip"),
    *,
    calibration_batches: int = 32,
    seed: int = 0,
    quiet: bool = True,
    on_merge: Callable[[str], None] | None = None,
    **merge_kwargs: Any,
) -> list[Row]:
    """Rows for model A, model B and ``merge([A, B], method=m)`` for each method (timed); a
    method given as (name, options) adds those options to its own merge (row "Zip (unmerge=...)").

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
    for spec in methods:
        method, own = (spec, {}) if isinstance(spec, str) else spec
        if on_merge is not None:
            on_merge(spec)
        start = time.perf_counter()
        result = merge(
            [tm.model_a, tm.model_b], calibration, method=method, calibration_batches=calibration_batches,
            quiet=quiet, **own, **merge_kwargs,
        )
        seconds = time.perf_counter() - start
        rows.append(_row(method_label(spec), evaluate(result.module, tm.head, tm.split), seconds))
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


# ------------------------------------------------------------------------- the demo's three pairs

ENSEMBLE_LABEL = "Ensemble A+B"

# How ``fxmerge demo`` names each family's models (the same-architecture pair's A and B).
_FAMILY_TEXT = {
    "resnet": "ResNets (3 stages of 1 BasicBlock, width 16)",
    "vgg": "VGGs (3 conv layers of 16/32/64 channels, 2-layer classifier)",
}

# Per family: (deeper model B of the depth pair, its words), (wider model B of the width pair, its words).
_HETERO = {
    "resnet": (
        (functools.partial(resnet, (2, 2, 2), 16), "A: 1 BasicBlock per stage, B: 2"),
        (functools.partial(resnet, (1, 1, 1), 16, width_multiplier=2), "A: x1 (16/32/64 channels), B: x2 (32/64/128)"),
    ),
    "vgg": (
        (functools.partial(vgg, vgg_cfg((2, 2, 2), (16, 32, 64))), "A: 1 conv per stage, B: 2"),
        (functools.partial(FAMILIES["vgg"], width_multiplier=2), "A: x1 (16/32/64 channels), B: x2 (32/64/128)"),
    ),
}


@dataclass(frozen=True, eq=False)
class DemoPair:
    """One pair of ``fxmerge demo``: the factories of model A and model B, the merge methods
    compared (``merge_kwargs`` go to every merge; they also label its row) and one line saying
    what the pair is."""

    name: str
    about: str
    factory_a: ModelFactory
    factory_b: ModelFactory
    methods: tuple[MethodSpec, ...]
    merge_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"DemoPair({self.name!r}, methods={self.methods}, merge_kwargs={dict(self.merge_kwargs)})"

    def label(self, method: MethodSpec) -> str:
        """The row name of ``method``'s merge: "Zip", or "Zip (depth=lma)" with the pair's options."""
        return method_label(method, self.merge_kwargs)


# zip with fxmerge's least-squares unmerge (``merge(..., unmerge="regression")``)
REGRESSION_ZIP: MethodSpec = ("zip", {"unmerge": "regression"})


def demo_pairs(family: str = "resnet") -> tuple[DemoPair, ...]:
    """The three pairs of ``fxmerge demo`` for a family of :data:`FAMILIES`: the same
    architecture twice (average, permute, zip), a depth-heterogeneous pair (A shallower than B:
    zip, depth aligned by LMA, so the merge has B's depth) and a width-heterogeneous pair (A at
    x1, B at x2 width: zip to the wider, ``width="max"``). Every pair's zip is also run with
    ``unmerge="regression"`` (``REGRESSION_ZIP``). Model A is the family's model in all three, so
    it is trained identically (same seed) in each."""
    if family not in FAMILIES:
        raise ValueError(f"demo_pairs: unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    base = FAMILIES[family]
    (deep, deep_text), (wide, wide_text) = _HETERO[family]
    return (
        DemoPair(
            "same architecture", f"two {_FAMILY_TEXT[family]}", base, base, ("average", "permute", "zip", REGRESSION_ZIP),
        ),
        DemoPair(
            "depth-heterogeneous", f"{deep_text}; A is aligned to B layer by layer (LMA) and extended with "
            "identity units, so the merge has B's depth", base, deep, ("zip", REGRESSION_ZIP), {"depth": "lma"},
        ),
        DemoPair(
            "width-heterogeneous", f"{wide_text}; zipped to the wider model's widths",
            base, wide, ("zip", REGRESSION_ZIP), {"width": "max"},
        ),
    )


@dataclass(frozen=True, eq=False)
class PairResult:
    """A demo pair trained (``task_models``) and compared: ``rows`` are model A, model B, one merge
    per method, then the ensemble of A and B."""

    pair: DemoPair
    task_models: TaskModels
    rows: tuple[Row, ...]

    def __repr__(self) -> str:
        return f"PairResult({self.pair.name!r}, rows={[r.name for r in self.rows]})"


def compare_pair(
    pair: DemoPair,
    *,
    seed: int = 0,
    epochs: int = 10,
    calibration_batches: int = 32,
    quiet: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> PairResult:
    """Train ``pair`` (:func:`train_task_models`), :func:`compare` its methods with its
    ``merge_kwargs`` and add the ensemble row (:func:`evaluate_ensemble`). ``on_step(what)`` is
    called before training and before each merge (progress reporting)."""
    if on_step is not None:
        on_step(f"{pair.name}: training A and B")
    models = train_task_models(pair.factory_a, pair.factory_b, seed=seed, epochs=epochs)

    def on_merge(method: str) -> None:
        if on_step is not None:
            on_step(f"{pair.name}: merging, {pair.label(method)}")

    rows = compare(
        models, pair.methods, calibration_batches=calibration_batches, seed=seed, quiet=quiet, on_merge=on_merge,
        **pair.merge_kwargs,
    )
    rows[2:] = [dataclasses.replace(row, name=pair.label(method)) for method, row in zip(pair.methods, rows[2:])]
    rows.append(_row(ENSEMBLE_LABEL, evaluate_ensemble(models)))
    return PairResult(pair, models, tuple(rows))


def format_demo(results: Sequence[PairResult]) -> str:
    """One titled :func:`format_table` per pair: "N. name: about", then its table."""
    parts = [f"{i}. {r.pair.name.capitalize()}: {r.pair.about}.\n\n{format_table(r.rows)}" for i, r in enumerate(results, 1)]
    return "\n\n".join(parts)
