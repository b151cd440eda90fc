"""Accuracy and loss of a model on labelled data, and the loss landscape of a merge.

This module is the one implementation of "how good is this model on these labels" in fxmerge:
``fxmerge.metrics.task_report``, ``fxmerge.experiments.evaluate`` (the demo and the benchmarks),
``MergeResult.evaluate`` and ``fxmerge eval`` all go through :func:`score`.

Classification (integer labels (N,), outputs (N, C)):

* joint accuracy: argmax over all C classes equals the label;
* per task (a named list of class ids): only the samples whose label is one of the task's
  classes count, and the prediction is the argmax over the task's own classes (the task
  identity is given, as in the ZipIt!/MuDSC papers); the task's loss is the cross-entropy of
  the logits restricted to its classes;
* loss: mean cross-entropy over all classes.

Regression (float labels, outputs of the same number of elements per sample): the loss is the
mean squared error per element; there is no accuracy.

Labelled data is an iterable of ``(inputs, labels)`` batches (inputs: a tensor, a tuple of
positional tensors or a dict of keyword tensors, as ``fxmerge.inputs.Batch`` takes them; a dict
batch may instead carry its labels under ``"labels"``), or one ``(inputs, labels)`` pair of
tensors that :func:`labelled_batches` splits. :func:`load_labelled` reads what the command line
names: a ``.safetensors``/``.pt`` file holding the tensors ``inputs`` (N, ...) and ``labels``
(N,), or ``'package.module:callable'`` returning either form.

The loss landscape (:func:`landscape`) is the MuDSC paper's picture: the loss over the plane
through the merged model and the two aligned source models, see :func:`plane`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxmerge.errors import ConfigError

__all__ = [
    "DATA_KEYS",
    "Ensemble",
    "Evaluation",
    "EvaluationTable",
    "Landscape",
    "Plane",
    "Task",
    "TaskScore",
    "aligned_sources",
    "as_tasks",
    "evaluate",
    "evaluate_models",
    "grid_axis",
    "labelled_batches",
    "landscape",
    "load_labelled",
    "plane",
    "score",
]

DATA_KEYS = ("inputs", "labels")
"""The tensor names of a labelled data file: inputs (N, ...) and labels (N,)."""

DEFAULT_BATCH_SIZE = 256


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A named set of global class ids."""

    name: str
    classes: tuple[int, ...]


@dataclass(frozen=True)
class TaskScore:
    """One task's result: accuracy (fraction in [0, 1]) and mean cross-entropy over its
    ``samples`` samples, both within the task's own classes."""

    name: str
    samples: int
    accuracy: float
    loss: float

    def __repr__(self) -> str:
        return f"TaskScore({self.name}: {100 * self.accuracy:.1f}%, loss {self.loss:.4g}, {self.samples} samples)"


@dataclass(frozen=True)
class Evaluation:
    """A model on labelled data.

    ``samples``: how many; ``loss``: the mean per-sample cross-entropy (``loss_kind``
    "cross_entropy") or the mean squared error per output element ("mse"); ``joint``: the
    accuracy over all classes (None for regression); ``tasks``: one ``TaskScore`` per task.
    """

    samples: int
    loss: float
    loss_kind: str
    joint: float | None = None
    tasks: tuple[TaskScore, ...] = ()

    @property
    def average(self) -> float | None:
        """The unweighted mean of the per-task accuracies (None without tasks)."""
        return float(np.mean([t.accuracy for t in self.tasks])) if self.tasks else None

    def __repr__(self) -> str:
        parts = [f"{self.samples} samples"]
        if self.joint is not None:
            parts.append(f"joint {100 * self.joint:.1f}%")
        parts += [f"{t.name} {100 * t.accuracy:.1f}%" for t in self.tasks]
        if self.tasks:
            parts.append(f"avg {100 * self.average:.1f}%")
        parts.append(f"{self.loss_kind} {self.loss:.4g}")
        return f"Evaluation({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: samples, loss, loss_kind, joint, average and tasks (name, samples, accuracy, loss)."""
        return {
            "samples": self.samples, "loss": self.loss, "loss_kind": self.loss_kind, "joint": self.joint,
            "average": self.average,
            "tasks": [{"name": t.name, "samples": t.samples, "accuracy": t.accuracy, "loss": t.loss} for t in self.tasks],
        }

    def task_report(self) -> dict[str, Any]:
        """``{"joint", "tasks": [accuracy per task], "average"}`` (``fxmerge.metrics.task_report``'s form)."""
        return {"joint": self.joint, "tasks": [t.accuracy for t in self.tasks],
                "average": self.average if self.tasks else float("nan")}


@dataclass(frozen=True)
class EvaluationTable:
    """Several models on the same data: ``rows`` of (name, Evaluation), e.g. the merged model
    and its source models (``MergeResult.evaluate``, ``fxmerge eval``)."""

    rows: tuple[tuple[str, Evaluation], ...]

    def __getitem__(self, name: str) -> Evaluation:
        for row_name, evaluation in self.rows:
            if row_name == name:
                return evaluation
        raise KeyError(f"no row {name!r}; rows: {[n for n, _ in self.rows]}")

    def __repr__(self) -> str:
        samples = self.rows[0][1].samples if self.rows else 0
        return f"EvaluationTable({', '.join(n for n, _ in self.rows)}; {samples} samples)"

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        """A text table: accuracies in percent (1 decimal), then the loss."""
        if not self.rows:
            return "(no models)"
        first = self.rows[0][1]
        headers = ["model"]
        if first.joint is not None:
            headers.append("joint")
        headers += [t.name for t in first.tasks] + (["avg"] if first.tasks else []) + [first.loss_kind]
        lines = []
        for name, e in self.rows:
            cells = [name]
            if e.joint is not None:
                cells.append(f"{100 * e.joint:.1f}")
            cells += [f"{100 * t.accuracy:.1f}" for t in e.tasks]
            if e.tasks:
                cells.append(f"{100 * e.average:.1f}")
            cells.append(f"{e.loss:.4f}")
            lines.append(cells)
        widths = [max(len(headers[i]), *(len(row[i]) for row in lines)) for i in range(len(headers))]
        text = [" ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
        text += [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in lines]
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"models": {name: Evaluation.to_dict()}}`` (what ``fxmerge eval`` writes
        into report.json under ``"evaluation"``)."""
        return {"models": {name: evaluation.to_dict() for name, evaluation in self.rows}}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def as_tasks(tasks: Any) -> tuple[Task, ...]:
    """Tasks from None (none), a mapping name -> class ids, or a sequence of class-id lists
    (named "0", "1", ...) or of ``Task``. A task without classes or with a repeated id is a
    ConfigError."""
    if tasks is None:
        return ()
    items = list(tasks.items()) if isinstance(tasks, Mapping) else [
        (t.name, t.classes) if isinstance(t, Task) else (str(i), t) for i, t in enumerate(tasks)
    ]
    out = []
    for name, classes in items:
        ids = tuple(int(c) for c in classes)
        if not ids:
            raise ConfigError(f"task {name} has no classes")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"task {name} repeats a class id: {list(ids)}")
        out.append(Task(str(name), ids))
    return tuple(out)


class _Tally:
    """Running sums over batches (all exact counts, losses summed in float64)."""

    def __init__(self, tasks: tuple[Task, ...]) -> None:
        self.tasks = tasks
        self.samples = 0
        self.elements = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.kind: str | None = None
        self.task_samples = [0] * len(tasks)
        self.task_correct = [0] * len(tasks)
        self.task_loss = [0.0] * len(tasks)

    def add(self, outputs: Tensor, labels: Tensor) -> None:
        labels = labels.to(outputs.device)
        kind = "mse" if labels.is_floating_point() else "cross_entropy"
        if self.kind is not None and kind != self.kind:
            raise ConfigError("labels mix integer (class) and float (regression) batches")
        self.kind = kind
        if kind == "mse":
            self._add_regression(outputs, labels)
        else:
            self._add_classification(outputs, labels)

    def _add_regression(self, outputs: Tensor, labels: Tensor) -> None:
        if self.tasks:
            raise ConfigError("tasks are class ids, but the labels are float (a regression): give no tasks")
        if labels.dim() == 0 or outputs.dim() == 0 or outputs.shape[0] != labels.shape[0] or outputs.numel() != labels.numel():
            raise ConfigError(
                f"regression labels of shape {tuple(labels.shape)} do not match the model's outputs {tuple(outputs.shape)}"
            )
        self.loss_sum += float(F.mse_loss(outputs.to(torch.float64).reshape(labels.shape), labels.to(torch.float64), reduction="sum"))
        self.elements += labels.numel()
        self.samples += int(labels.shape[0])

    def _add_classification(self, logits: Tensor, labels: Tensor) -> None:
        if logits.dim() != 2:
            raise ConfigError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ConfigError(f"labels must have shape (N,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
        num_classes = logits.shape[1]
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ConfigError(f"labels must be class ids in [0, {num_classes}), got ids {int(labels.min())}..{int(labels.max())}")
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.loss_sum += float(F.cross_entropy(logits.to(torch.float64), labels, reduction="sum"))
        self.samples += int(labels.shape[0])
        for t, task in enumerate(self.tasks):
            if min(task.classes) < 0 or max(task.classes) >= num_classes:
                raise ConfigError(f"task {task.name} has class ids outside [0, {num_classes}): {list(task.classes)}")
            class_ids = torch.as_tensor(task.classes, dtype=torch.long, device=logits.device)
            in_task = torch.isin(labels, class_ids)
            count = int(in_task.sum())
            if count == 0:
                continue
            restricted = logits[in_task][:, class_ids]  # (N_t, |task|)
            local = (labels[in_task].unsqueeze(1) == class_ids).long().argmax(dim=1)  # label's index in the task
            self.task_correct[t] += int((restricted.argmax(dim=1) == local).sum())
            self.task_loss[t] += float(F.cross_entropy(restricted.to(torch.float64), local, reduction="sum"))
            self.task_samples[t] += count

    def result(self) -> Evaluation:
        if self.samples == 0:
            raise ConfigError("cannot compute an accuracy over zero samples")
        if self.kind == "mse":
            return Evaluation(self.samples, self.loss_sum / self.elements, "mse")
        scores = []
        for task, count, correct, loss in zip(self.tasks, self.task_samples, self.task_correct, self.task_loss):
            if count == 0:
                raise ConfigError(f"task {task.name} (classes {list(task.classes)}) has no sample among the labels")
            scores.append(TaskScore(task.name, count, correct / count, loss / count))
        return Evaluation(self.samples, self.loss_sum / self.samples, "cross_entropy", self.correct / self.samples, tuple(scores))


def score(outputs: Tensor, labels: Tensor, tasks: Any = None) -> Evaluation:
    """The ``Evaluation`` of model outputs against labels.

    outputs: logits (N, C) with labels (N,) integer class ids, or regression outputs with float
    labels of the same number of elements (N, ...). tasks: see :func:`as_tasks`.
    """
    tally = _Tally(as_tasks(tasks))
    tally.add(outputs, labels)
    return tally.result()


def _logits(output: Any) -> Tensor:
    """The prediction tensor of a model's output: a tensor, ``.logits`` / ``["logits"]`` (an HF
    ``ModelOutput``), or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError(f"cannot find the logits in a model output of type {type(output).__name__}")


def labelled_batches(data: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> list[tuple[Any, Tensor]]:
    """``data`` as a list of (inputs, labels) batches.

    ``data``: an ``(inputs, labels)`` pair of tensors with the same first dimension, or a
    mapping with ``inputs`` and ``labels`` (both split into batches of ``batch_size``); else an
    iterable of batches, each ``(inputs, labels)`` or a dict of keyword inputs with ``labels``.
    """
    if isinstance(data, Mapping) and all(k in data for k in DATA_KEYS):
        data = (data[DATA_KEYS[0]], data[DATA_KEYS[1]])
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        inputs, labels = data
        if inputs.dim() == 0 or labels.dim() == 0 or inputs.shape[0] != labels.shape[0]:
            raise ConfigError(f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} must have the same first dimension")
        return list(zip(inputs.split(batch_size), labels.split(batch_size)))
    batches = []
    for index, item in enumerate(data):
        if isinstance(item, Mapping) and ("labels" in item or "label" in item):
            key = "labels" if "labels" in item else "label"
            item = ({k: v for k, v in item.items() if k != key}, item[key])
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[1], Tensor):
            raise ConfigError(f"labelled batch {index}: expected (inputs, labels) with a labels tensor, got {type(item).__name__}")
        batches.append((item[0], item[1]))
    if not batches:
        raise ConfigError("the labelled data holds no batches")
    return batches


def evaluate(model: nn.Module, data: Any, *, tasks: Any = None, head: nn.Module | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Evaluation:
    """``model`` (then ``head`` on its outputs, when given) on labelled ``data``
    (:func:`labelled_batches`), in eval mode and without gradients; the train/eval flags are
    restored afterwards. Inputs are moved to the model's device batch by batch."""
    from fxmerge.inputs import as_batch, module_device

    tally = _Tally(as_tasks(tasks))
    parts = [m for m in (model, head) if m is not None]
    flags = [m.training for m in parts]
    device = module_device(model)
    if head is not None and device is not None:
        head = head.to(device)
    try:
        for m in parts:
            m.eval()
        with torch.no_grad():
            for inputs, labels in labelled_batches(data, batch_size):
                outputs = _logits(as_batch(inputs).run(model))
                if head is not None:
                    outputs = head(outputs)
                tally.add(outputs, labels)
    finally:
        for m, flag in zip(parts, flags):
            m.train(flag)
    return tally.result()


class Ensemble(nn.Module):
    """The upper reference of a merge: every model run on the input, outputs (through ``head``,
    when given: logits) averaged. ``forward``: input -> (N, C) mean of the models' outputs. The
    models are held, not copied; nothing is shared between them."""

    def __init__(self, models: Sequence[nn.Module], head: nn.Module | None = None) -> None:
        super().__init__()
        if len(models) < 1:
            raise ConfigError("Ensemble: give at least one model")
        self.members = nn.ModuleList(models)
        self.head = head

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        outputs = [_logits(m(*args, **kwargs)) for m in self.members]
        if self.head is not None:
            outputs = [self.head(o) for o in outputs]
        return torch.stack(outputs).mean(dim=0)


def evaluate_models(models: Mapping[str, nn.Module], data: Any, *, tasks: Any = None, head: nn.Module | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> EvaluationTable:
    """Every model of ``models`` (name -> module) on the same labelled ``data``, in order."""
    batches = labelled_batches(data, batch_size)
    return EvaluationTable(tuple((name, evaluate(m, batches, tasks=tasks, head=head)) for name, m in models.items()))


def load_labelled(spec: str, *, batch_size: int = DEFAULT_BATCH_SIZE, keys: Sequence[str] = DATA_KEYS) -> list[tuple[Any, Tensor]]:
    """Labelled batches from what the command line names (``fxmerge eval --data``).

    ``spec``: a ``.safetensors`` file, or a dict of tensors saved with ``torch.save`` (read with
    ``weights_only=True``), holding the tensors named ``keys`` (default ``inputs`` (N, ...) and
    ``labels`` (N,): int64 class ids, or float regression targets); or ``'package.module:callable'``
    (the convention of ``fxmerge.loading``: a name with ':' that is not an existing path) called
    without arguments and returning an ``(inputs, labels)`` pair of tensors or an iterable of
    ``(x, y)`` batches.
    """
    from fxmerge.loading import load_tensors, resolve_callable

    if ":" in spec and not os.path.exists(spec):
        return labelled_batches(resolve_callable(spec)(), batch_size)
    tensors = load_tensors(spec)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ConfigError(f"{spec} holds {sorted(tensors)}: the labelled data needs the tensors {list(keys)} (missing {missing})")
    return labelled_batches((tensors[keys[0]], tensors[keys[1]]), batch_size)


# --------------------------------------------------------------------------------------------
# The loss landscape
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class Plane:
    """A 2-D affine plane in weight space: ``point(x, y) = origin + x * basis[0] + y * basis[1]``.

    origin: (P,) float64, the first vector (the merged model); basis: (2, P) float64,
    orthonormal; ``coordinates``: the (x, y) of the three vectors the plane was made from, in
    the order given to :func:`plane`; ``collinear``: the three were (numerically) on one line,
    so ``basis[1]`` is a seeded random direction orthogonal to ``basis[0]``.
    """

    origin: Tensor
    basis: Tensor
    coordinates: tuple[tuple[float, float], ...]
    collinear: bool = False

    def __repr__(self) -> str:
        points = ", ".join(f"({x:.3g}, {y:.3g})" for x, y in self.coordinates)
        return f"Plane({self.origin.numel()} weights, points {points}{', collinear' if self.collinear else ''})"

    def point(self, x: float, y: float) -> Tensor:
        """The weight vector (P,) float64 at plane coordinates (x, y)."""
        return self.origin + float(x) * self.basis[0] + float(y) * self.basis[1]

    def project(self, vector: Tensor) -> tuple[float, float]:
        """The plane coordinates of ``vector`` (P,) (its orthogonal projection onto the plane)."""
        offset = vector.to(torch.float64) - self.origin
        return float(self.basis[0] @ offset), float(self.basis[1] @ offset)


def plane(origin: Tensor, a: Tensor, b: Tensor, *, seed: int = 0, tolerance: float = 1e-6) -> Plane:
    """The plane through three weight vectors (P,), by Gram-Schmidt, with ``origin`` at (0, 0).

    ``basis[0] = (a - origin) / |a - origin|`` (so ``a`` is at (|a - origin|, 0));
    ``basis[1]`` is ``b - origin`` minus its component along ``basis[0]``, normalised (``b`` at
    (<b - o, e0>, |residual|)). When the residual is below ``tolerance`` times
    ``|b - origin|`` (the three are collinear: a two-model permute merge is the midpoint of
    its aligned pair), ``basis[1]`` is a random direction (generator seeded with ``seed``)
    orthogonal to ``basis[0]``, so the picture is the loss around the line. ``a == origin`` is
    a ConfigError (no plane). Computed in float64.
    """
    origin, a, b = (v.detach().reshape(-1).to(torch.float64).cpu() for v in (origin, a, b))
    if not origin.shape == a.shape == b.shape:
        raise ConfigError(f"plane: the three weight vectors differ in size: {origin.numel()}, {a.numel()}, {b.numel()}")
    first = a - origin
    length = float(first.norm())
    if length == 0.0:
        raise ConfigError("plane: the first source model has the merged model's weights: the three models span no plane")
    e0 = first / length
    offset = b - origin
    residual = offset - (e0 @ offset) * e0
    collinear = float(residual.norm()) <= tolerance * max(float(offset.norm()), 1e-300)
    if collinear:
        residual = torch.randn(origin.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        residual = residual - (e0 @ residual) * e0
    e1 = residual / residual.norm()
    result = Plane(origin, torch.stack([e0, e1]), ((0.0, 0.0),), collinear)
    coordinates = ((0.0, 0.0), (length, 0.0), result.project(b))
    return Plane(origin, result.basis, coordinates, collinear)


def grid_axis(low: float, high: float, steps: int) -> np.ndarray:
    """``steps`` evenly spaced values (steps,) covering [low, high] with 0 among them (exactly),
    so the plane's origin — the merged model — is a grid point. Needs low <= 0 <= high, steps >= 3."""
    if steps < 3:
        raise ConfigError(f"a landscape grid needs at least 3 points per axis, got {steps}")
    if not low <= 0.0 <= high or high <= low:
        raise ConfigError(f"grid_axis: need low <= 0 <= high and low < high, got {low}, {high}")
    # One spare step: shifting the start down to a multiple of the spacing keeps [low, high] covered.
    spacing = (high - low) / (steps - 2)
    start = math.floor(low / spacing)
    return np.array([(start + i) * spacing for i in range(steps)], dtype=np.float64)


@dataclass(frozen=True, repr=False, eq=False)
class Landscape:
    """Losses over a grid of a :class:`Plane`.

    xs (nx,), ys (ny,): the grid's plane coordinates; losses: (panels, ny, nx) float64 mean
    loss per panel (one per task: the task's cross-entropy within its classes on its samples;
    without tasks one panel "all": the loss over all classes); panels: their names; points:
    name -> (x, y) of the merged model and the aligned sources; point_losses: name -> loss per
    panel at that point; label: what merge this is (e.g. the method); batchnorm: how grid
    points got their BatchNorm statistics.
    """

    xs: np.ndarray
    ys: np.ndarray
    losses: np.ndarray
    panels: tuple[str, ...]
    points: dict[str, tuple[float, float]]
    point_losses: dict[str, tuple[float, ...]]
    label: str = ""
    batchnorm: str = ""

    def __repr__(self) -> str:
        return (f"Landscape({self.label or 'merge'}: {len(self.ys)}x{len(self.xs)} grid, panels {list(self.panels)}, "
                f"loss {self.losses.min():.3g}..{self.losses.max():.3g})")


def aligned_sources(result: Any) -> tuple[nn.Module, nn.Module]:
    """The two source models in the merged model's coordinates: ``result.interpolate((1, 0))``
    and ``((0, 1))`` — each model alone through the merge's own merge/unmerge matrices (for
    permute with equal widths, the model itself, permuted into model 0's channel order; for zip,
    the model's image in the zipped space), BatchNorm statistics reset on the calibration data."""
    count = len(result.groups[0].sizes) if result.groups else 0
    if count != 2:
        raise ConfigError(f"the loss landscape is the plane through two source models and their merge; this merge has {count} models")
    return result.interpolate((1.0, 0.0)), result.interpolate((0.0, 1.0))


def _float_parameters(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [(name, p) for name, p in module.named_parameters() if p.is_floating_point()]


def _vector(module: nn.Module, names: Sequence[str]) -> Tensor:
    parameters = dict(module.named_parameters())
    missing = [n for n in names if n not in parameters]
    if missing:
        raise ConfigError(f"the models of a landscape must have the same parameters; missing {missing[:3]}")
    return torch.cat([parameters[n].detach().reshape(-1).to(torch.float64).cpu() for n in names])


def _load_vector(module: nn.Module, vector: Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for _, p in _float_parameters(module):
            p.copy_(vector[offset:offset + p.numel()].reshape(p.shape).to(p.dtype))
            offset += p.numel()


def landscape(
    source: Any,
    data: Any,
    *,
    tasks: Any = None,
    calibration: Iterable[Any] | None = None,
    calibration_batches: int | None = None,
    steps: int = 11,
    margin: float = 0.25,
    head: nn.Module | None = None,
    label: str = "",
    seed: int = 0,
) -> Landscape:
    """The loss of the merged model's neighbourhood on the plane through it and the aligned sources.

    source: a two-model ``MergeResult`` (the aligned sources come from :func:`aligned_sources`)
    or a tuple ``(merged, source_a, source_b)`` of modules with the same parameters. The plane
    is :func:`plane` of the three models' floating parameters (flattened in
    ``named_parameters`` order): the merged model at (0, 0), source a on the x axis. The grid
    (``steps`` x ``steps``, :func:`grid_axis`) covers the three points plus ``margin`` times the
    larger extent on every side; the merged model is a grid point. At every grid point a copy
    of the merged model gets the point's parameters and is evaluated on ``data`` with
    :func:`evaluate` (``tasks``, ``head``).

    BatchNorm: the statistics are reset at every point on ``calibration`` (the first
    ``calibration_batches``; for a ``MergeResult`` by default the merge's own count), the way
    ``merge`` and ``MergeResult.interpolate`` make them, so the merged point and the source
    points are exactly those models, and every other point is judged as the merge would have
    built it. (Interpolating running variances instead gives negative variances off the
    triangle of the three models.) Without ``calibration`` every point keeps the merged model's
    buffers. Cost: one calibration pass and one evaluation per point.
    """
    from fxmerge.inputs import calibration_inputs
    from fxmerge.passes.repair import reset_batchnorm

    if isinstance(source, (tuple, list)):
        merged, model_a, model_b = source
        limit = calibration_batches or 32
    else:
        merged = source.module
        model_a, model_b = aligned_sources(source)
        limit = calibration_batches or source.config.calibration_batches
        label = label or source.config.method
    names = [n for n, _ in _float_parameters(merged)]
    geometry = plane(_vector(merged, names), _vector(model_a, names), _vector(model_b, names), seed=seed)
    batches = labelled_batches(data)
    reset = calibration_inputs(calibration, limit) if calibration is not None else None
    work = copy.deepcopy(merged).eval()

    def losses_at(x: float, y: float) -> tuple[float, ...]:
        _load_vector(work, geometry.point(x, y))
        if reset is not None:
            reset_batchnorm(work, reset, quiet=True)
        result = evaluate(work, batches, tasks=tasks, head=head)
        return tuple(t.loss for t in result.tasks) if result.tasks else (result.loss,)

    coordinates = np.array(geometry.coordinates)
    span = float(max(np.ptp(coordinates[:, 0]), np.ptp(coordinates[:, 1])))
    low, high = coordinates.min(axis=0) - margin * span, coordinates.max(axis=0) + margin * span
    xs = grid_axis(min(low[0], 0.0), max(high[0], 0.0), steps)
    if geometry.collinear:  # no second point: as far to each side as the line is long
        ys = grid_axis(-(0.5 + margin) * span, (0.5 + margin) * span, steps)
    else:
        ys = grid_axis(min(low[1], 0.0), max(high[1], 0.0), steps)
    grid = np.array([[losses_at(x, y) for x in xs] for y in ys])  # (ny, nx, panels)
    names_of_points = ("merged", "model 0", "model 1")
    points = {n: (float(x), float(y)) for n, (x, y) in zip(names_of_points, geometry.coordinates)}
    point_losses = {n: losses_at(*points[n]) for n in names_of_points}
    panels = tuple(t.name for t in as_tasks(tasks)) or ("all",)
    batchnorm = f"reset on {len(reset)} calibration batches per point" if reset is not None else "the merged model's statistics"
    return Landscape(xs, ys, np.moveaxis(grid, 2, 0), panels, points, point_losses, label, batchnorm)
