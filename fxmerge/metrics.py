"""Similarity and evaluation metrics: unbiased linear CKA, correlation, accuracies, loss barrier.

CKA follows the minibatch estimator of Nguyen, Raghu & Kornblith (2021), built on the unbiased
HSIC estimator of Song et al. (2012). For one batch of ``n`` samples with features ``X`` (n, p)
and ``Y`` (n, q), flattened per sample, let ``K = X X^T`` and ``L = Y Y^T`` with their diagonals
set to zero. Then

    HSIC_1(K, L) = [tr(K L) + (1^T K 1)(1^T L 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n (n-3))

and over batches ``b``

    CKA = mean_b HSIC_1(K_b, L_b) / sqrt(mean_b HSIC_1(K_b, K_b) * mean_b HSIC_1(L_b, L_b)).

The estimator is unbiased, so values can fall slightly outside [0, 1]; they are not clipped.
When a feature set has no estimated variance (a non-positive self term), CKA with it is defined
as 0 instead of NaN, so that downstream dynamic programs never see NaN.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fxmerge.errors import CalibrationError, ConfigError
from fxmerge.evaluation import score

__all__ = [
    "cka",
    "CKAAccumulator",
    "correlation",
    "joint_accuracy",
    "per_task_accuracy",
    "task_report",
    "loss_curve",
    "loss_barrier",
]

# Below four samples the unbiased estimator divides by zero (n - 3 or n - 2).
MIN_CKA_BATCH = 4


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------


def _gram_without_diagonal(features: Tensor) -> Tensor:
    """Linear Gram matrix of one feature set with a zero diagonal.

    features: (n, ...) -> (n, n) float64.
    The features are centred over the batch first. The unbiased HSIC estimator is invariant to
    adding a constant vector to every sample (U-centring cancels it), so this changes nothing
    mathematically, but it removes the large common offset (e.g. post-ReLU activations are all
    positive) that would otherwise dominate the Gram entries and cost precision.
    """
    flat = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    flat = flat - flat.mean(dim=0, keepdim=True)
    gram = flat @ flat.T
    gram.fill_diagonal_(0.0)
    return gram


def _batch_size_checked(features: Sequence[Tensor], what: str) -> int:
    """The common leading dimension of ``features``; ConfigError if they differ or are < 4."""
    sizes = {int(f.shape[0]) for f in features}
    if len(sizes) != 1:
        raise ConfigError(f"{what}: all feature sets of one batch must have the same number of samples, got {sorted(sizes)}")
    (size,) = sizes
    if size < MIN_CKA_BATCH:
        raise ConfigError(f"{what}: the unbiased CKA estimator needs at least {MIN_CKA_BATCH} samples per batch, got {size}")
    return size


class _GramSummary:
    """What HSIC_1 needs from a stack of k Gram matrices of one batch of n samples.

    flat:       (k, n*n) the Gram matrices, row-major
    row_sums:   (k, n)   K 1
    totals:     (k,)     1^T K 1
    """

    def __init__(self, features: Sequence[Tensor]) -> None:
        grams = torch.stack([_gram_without_diagonal(f) for f in features])  # (k, n, n)
        self.num_samples = int(grams.shape[-1])
        self.flat = grams.reshape(grams.shape[0], -1)
        self.row_sums = grams.sum(dim=2)
        self.totals = self.row_sums.sum(dim=1)


def _hsic1_cross(a: _GramSummary, b: _GramSummary) -> Tensor:
    """HSIC_1 of every pair (K from ``a``, L from ``b``): (k_a, k_b) float64.

    Uses tr(K L) = <K, L>_F (Gram matrices are symmetric) and 1^T K L 1 = (K 1) . (L 1), so all
    pairs come out of two matrix products.
    """
    n = a.num_samples
    trace_term = a.flat @ b.flat.T
    total_term = torch.outer(a.totals, b.totals) / ((n - 1) * (n - 2))
    row_term = (a.row_sums @ b.row_sums.T) * (2.0 / (n - 2))
    return (trace_term + total_term - row_term) / (n * (n - 3))


def _hsic1_self(a: _GramSummary) -> Tensor:
    """HSIC_1(K, K) for every Gram matrix of ``a``: (k,) float64 (the diagonal of the cross term)."""
    n = a.num_samples
    trace_term = (a.flat * a.flat).sum(dim=1)
    total_term = a.totals**2 / ((n - 1) * (n - 2))
    row_term = (a.row_sums * a.row_sums).sum(dim=1) * (2.0 / (n - 2))
    return (trace_term + total_term - row_term) / (n * (n - 3))


def _cka_from_sums(cross: Tensor, row_self: Tensor, col_self: Tensor) -> Tensor:
    """cross (m, k) / sqrt(row_self (m,) x col_self (k,)), 0 where a self term is not positive."""
    denominator = torch.sqrt(torch.outer(row_self.clamp(min=0.0), col_self.clamp(min=0.0)))
    positive = denominator > 0
    return torch.where(positive, cross / torch.where(positive, denominator, torch.ones_like(denominator)), torch.zeros_like(cross))


def cka(x: Tensor, y: Tensor) -> float:
    """Unbiased linear CKA between two feature sets of the same batch.

    x: (n, ...) and y: (n, ...), any trailing shapes (flattened per sample), n >= 4.
    Computed in float64. Returns 0.0 if either feature set has no estimated variance.
    """
    _batch_size_checked([x, y], "cka")
    summary_x = _GramSummary([x])
    summary_y = _GramSummary([y.to(x.device)])
    value = _cka_from_sums(_hsic1_cross(summary_x, summary_y), _hsic1_self(summary_x), _hsic1_self(summary_y))
    return float(value[0, 0])


class CKAAccumulator:
    """Streams a whole CKA matrix between ``num_rows`` and ``num_cols`` feature sets over batches.

    Only running sums are kept, so memory does not grow with the number of batches:

    cross_sums:     (num_rows, num_cols) float64, sum over batches of HSIC_1(K_row, L_col)
    row_self_sums:  (num_rows,) float64, sum over batches of HSIC_1(K_row, K_row)
    col_self_sums:  (num_cols,) float64, sum over batches of HSIC_1(L_col, L_col)
    num_batches:    int, number of batches added

    The means in the CKA formula share the batch count, so it cancels: the matrix is computed
    from the sums directly. To combine accumulators of several processes, sum their
    ``state()`` vectors (e.g. with ``torch.distributed.all_reduce``) and ``load_state`` the
    result, or ``add_state`` them one by one.
    """

    def __init__(self, num_rows: int, num_cols: int) -> None:
        if num_rows < 1 or num_cols < 1:
            raise ConfigError(f"CKAAccumulator needs at least one row and one column feature set, got {num_rows} x {num_cols}")
        self.num_rows = num_rows
        self.num_cols = num_cols
        self.cross_sums = torch.zeros(num_rows, num_cols, dtype=torch.float64)
        self.row_self_sums = torch.zeros(num_rows, dtype=torch.float64)
        self.col_self_sums = torch.zeros(num_cols, dtype=torch.float64)
        self.num_batches = 0

    def update(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> None:
        """Add one batch. rows: num_rows tensors (batch, ...); cols: num_cols tensors (batch, ...).

        Every Gram matrix is computed once per batch and reused for all pairs. Passing the same
        sequence object for ``rows`` and ``cols`` computes the Gram matrices only once.
        """
        if len(rows) != self.num_rows or len(cols) != self.num_cols:
            raise ConfigError(
                f"CKAAccumulator.update: expected {self.num_rows} row and {self.num_cols} column feature sets, got {len(rows)} and {len(cols)}"
            )
        _batch_size_checked([*rows, *cols], "CKAAccumulator.update")
        with torch.no_grad():
            row_summary = _GramSummary(rows)
            if cols is rows:
                col_summary = row_summary
            else:
                device = rows[0].device
                col_summary = _GramSummary([c.to(device) for c in cols])
            cross = _hsic1_cross(row_summary, col_summary)
            row_self = _hsic1_self(row_summary)
            col_self = row_self if col_summary is row_summary else _hsic1_self(col_summary)
        self.cross_sums += cross.cpu()
        self.row_self_sums += row_self.cpu()
        self.col_self_sums += col_self.cpu()
        self.num_batches += 1

    def matrix(self) -> np.ndarray:
        """The CKA matrix (num_rows, num_cols) float64 from the batches added so far."""
        if self.num_batches == 0:
            raise CalibrationError("CKAAccumulator.matrix: no batch has been added")
        return _cka_from_sums(self.cross_sums, self.row_self_sums, self.col_self_sums).numpy()

    def state(self) -> Tensor:
        """All sums as one flat float64 vector (num_rows*num_cols + num_rows + num_cols + 1,).

        Layout: cross_sums row-major, row_self_sums, col_self_sums, num_batches. States of
        accumulators of the same shape add element-wise.
        """
        count = torch.tensor([float(self.num_batches)], dtype=torch.float64)
        return torch.cat([self.cross_sums.reshape(-1), self.row_self_sums, self.col_self_sums, count])

    def _split_state(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        expected = self.num_rows * self.num_cols + self.num_rows + self.num_cols + 1
        state = state.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if state.numel() != expected:
            raise ConfigError(
                f"CKAAccumulator state for a {self.num_rows} x {self.num_cols} matrix has {expected} entries, got {state.numel()}"
            )
        cross_end = self.num_rows * self.num_cols
        row_end = cross_end + self.num_rows
        col_end = row_end + self.num_cols
        return (
            state[:cross_end].reshape(self.num_rows, self.num_cols).clone(),
            state[cross_end:row_end].clone(),
            state[row_end:col_end].clone(),
            int(round(float(state[col_end]))),
        )

    def load_state(self, state: Tensor) -> None:
        """Replace the sums with those of ``state`` (as returned by ``state()``)."""
        self.cross_sums, self.row_self_sums, self.col_self_sums, self.num_batches = self._split_state(state)

    def add_state(self, state: Tensor) -> None:
        """Add the sums of another accumulator's ``state()`` to these."""
        cross, row_self, col_self, count = self._split_state(state)
        self.cross_sums += cross
        self.row_self_sums += row_self
        self.col_self_sums += col_self
        self.num_batches += count


# --------------------------------------------------------------------------------------------
# Correlation
# --------------------------------------------------------------------------------------------


def correlation(cov: Tensor) -> Tensor:
    """Pearson correlation (d, d) from a covariance matrix (d, d), same dtype as ``cov``.

    A unit with zero (or, from rounding, negative) variance is uncorrelated with every other
    unit and has correlation 1 with itself, so no NaN appears. Entries are clamped to [-1, 1]
    because rounding can push them slightly past it.
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ConfigError(f"correlation expects a square (d, d) covariance matrix, got shape {tuple(cov.shape)}")
    cov64 = cov.to(torch.float64)
    std = torch.sqrt(torch.diagonal(cov64).clamp(min=0.0))
    denominator = torch.outer(std, std)
    positive = denominator > 0
    corr = torch.where(positive, cov64 / torch.where(positive, denominator, torch.ones_like(denominator)), torch.zeros_like(cov64))
    corr = corr.clamp(-1.0, 1.0)
    corr.fill_diagonal_(1.0)
    return corr.to(cov.dtype)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def joint_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction in [0, 1] of samples whose argmax over all classes equals the label.

    logits: (N, C); labels: (N,) integer class ids. (``fxmerge.evaluation.score``'s ``joint``.)
    """
    return score(logits, labels).joint


def per_task_accuracy(logits: Tensor, labels: Tensor, task_classes: Sequence[Sequence[int]]) -> list[float]:
    """Per-task accuracy, fractions in [0, 1].

    logits: (N, C); labels: (N,) global class ids; task_classes: the global class ids of each
    task. For task t, only the samples whose label is one of its classes count, and the
    prediction is the argmax over the task's classes only (the task identity is given).
    A task with no class, a class id outside [0, C), or a task with no sample is a ConfigError.
    (``fxmerge.evaluation.score``'s ``tasks``.)
    """
    return [t.accuracy for t in score(logits, labels, task_classes).tasks]


def task_report(logits: Tensor, labels: Tensor, task_classes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """{"joint": float, "tasks": list[float], "average": float}, all fractions in [0, 1].

    ``average`` is the unweighted mean of the per-task accuracies (``fxmerge.evaluation.score``).
    """
    return score(logits, labels, task_classes).task_report()


# --------------------------------------------------------------------------------------------
# Loss barrier
# --------------------------------------------------------------------------------------------


def _check_same_state_layout(state_a: dict[str, Tensor], state_b: dict[str, Tensor]) -> None:
    """ConfigError naming the first key (in model_a's order) that is missing or differs in shape."""
    for key, tensor_a in state_a.items():
        if key not in state_b:
            raise ConfigError(f"loss barrier: key {key!r} of model_a is missing from model_b")
        if tensor_a.shape != state_b[key].shape:
            raise ConfigError(
                f"loss barrier: key {key!r} has shape {tuple(tensor_a.shape)} in model_a but {tuple(state_b[key].shape)} in model_b"
            )
    for key in state_b:
        if key not in state_a:
            raise ConfigError(f"loss barrier: key {key!r} of model_b is missing from model_a")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _num_samples(targets: Any) -> int:
    return int(targets.shape[0]) if isinstance(targets, Tensor) else len(targets)


def _mean_loss(model: nn.Module, data: Iterable[tuple[Any, Any]], loss_fn: Callable[[Tensor, Any], Tensor], device: torch.device) -> float:
    """Per-sample mean loss over ``data``; ``loss_fn`` returns the batch mean, weighted by batch size."""
    total = 0.0
    count = 0
    for inputs, targets in data:
        inputs = inputs.to(device) if isinstance(inputs, Tensor) else inputs
        targets = targets.to(device) if isinstance(targets, Tensor) else targets
        batch = _num_samples(targets)
        total += float(loss_fn(model(inputs), targets)) * batch
        count += batch
    if count == 0:
        raise CalibrationError("loss barrier: the data has no samples")
    return total / count


def loss_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Tensor, Any], Tensor],
    steps: int = 21,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss along the straight line between two models' weights.

    Every floating parameter and buffer is set to (1 - lam) * theta_a + lam * theta_b for
    ``steps`` values of lam evenly spaced over [0, 1]; integer buffers (e.g.
    ``num_batches_tracked``) are taken from model_a. The models must have identical
    state_dict keys and shapes. Evaluation is in eval mode without gradients, on a deep copy
    of model_a, on model_a's device; neither model is modified.

    data: an iterable of (inputs, targets) batches, iterated once per lam (a one-shot iterator
    is first materialised into a list). loss_fn(outputs, targets) must return the batch mean;
    batches are weighted by their size so the result is a per-sample mean.
    Returns (lambdas (steps,), losses (steps,)), both float64.
    """
    if steps < 2:
        raise ConfigError(f"loss curve needs at least 2 interpolation steps (the two end points), got {steps}")
    state_a = model_a.state_dict()
    state_b = model_b.state_dict()
    _check_same_state_layout(state_a, state_b)
    if iter(data) is data:  # a one-shot iterator would be exhausted after the first lam
        data = list(data)

    device = _model_device(model_a)
    work_model = copy.deepcopy(model_a).eval()
    # The end points are model_a's and model_b's own tensors (read only): load_state_dict
    # copies into work_model's separate tensors, so the originals are never written.
    ends_a = {key: tensor.detach().to(device) for key, tensor in state_a.items()}
    ends_b = {key: tensor.detach().to(device) for key, tensor in state_b.items()}

    lambdas = np.linspace(0.0, 1.0, steps)
    losses = np.empty(steps, dtype=np.float64)
    with torch.no_grad():
        for step, lam in enumerate(lambdas):
            interpolated: dict[str, Tensor] = {}
            for key, tensor_a in ends_a.items():
                if tensor_a.is_floating_point() or tensor_a.is_complex():
                    tensor_b = ends_b[key].to(tensor_a.dtype)
                    # Written as (1-lam) a + lam b, not a lerp, so lam = 0 and 1 reproduce the models exactly.
                    interpolated[key] = (1.0 - float(lam)) * tensor_a + float(lam) * tensor_b
                else:
                    interpolated[key] = tensor_a
            work_model.load_state_dict(interpolated, strict=True)
            losses[step] = _mean_loss(work_model, data, loss_fn, device)
    return lambdas, losses


def loss_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Tensor, Any], Tensor],
    steps: int = 21,
) -> float:
    """max_lam L(theta(lam)) - (L(theta_a) + L(theta_b)) / 2 along the linear path; see ``loss_curve``.

    Always >= 0 because the end points are on the grid.
    """
    _, losses = loss_curve(model_a, model_b, data, loss_fn, steps)
    return float(losses.max() - (losses[0] + losses[-1]) / 2.0)
