"""Metrics: unbiased CKA against a direct loop implementation, correlation, accuracies, loss barrier."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fxmerge.errors import CalibrationError, ConfigError
from fxmerge.metrics import (
    CKAAccumulator,
    cka,
    correlation,
    joint_accuracy,
    loss_barrier,
    loss_curve,
    per_task_accuracy,
    task_report,
)

# --------------------------------------------------------------------------------------------
# Reference: the unbiased HSIC written term by term with explicit loops, in numpy.
# --------------------------------------------------------------------------------------------


def reference_hsic1(x: np.ndarray, y: np.ndarray) -> float:
    n = x.shape[0]
    x = x.reshape(n, -1)
    y = y.reshape(n, -1)
    k = np.zeros((n, n))
    l = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                k[i, j] = float(np.dot(x[i], x[j]))
                l[i, j] = float(np.dot(y[i], y[j]))
    trace_kl = sum(k[i, j] * l[j, i] for i in range(n) for j in range(n))
    sum_k = sum(k[i, j] for i in range(n) for j in range(n))
    sum_l = sum(l[i, j] for i in range(n) for j in range(n))
    ones_k_l_ones = sum(k[i, j] * l[j, t] for i in range(n) for j in range(n) for t in range(n))
    value = trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_k_l_ones
    return value / (n * (n - 3))


def reference_cka(batches_x: list[np.ndarray], batches_y: list[np.ndarray]) -> float:
    cross = np.mean([reference_hsic1(x, y) for x, y in zip(batches_x, batches_y)])
    self_x = np.mean([reference_hsic1(x, x) for x in batches_x])
    self_y = np.mean([reference_hsic1(y, y) for y in batches_y])
    return float(cross / np.sqrt(self_x * self_y))


def test_cka_matches_direct_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, 2, generator=generator)
    y = x.reshape(9, -1)[:, :4] @ torch.randn(4, 5, generator=generator) + 0.5 * torch.randn(9, 5, generator=generator)
    y = y + 3.0  # a common offset: the estimator must be insensitive to it
    expected = reference_cka([x.double().numpy()], [y.double().numpy()])
    assert cka(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cka_of_features_with_themselves_is_one():
    x = torch.randn(16, 7)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 8, generator=generator, dtype=torch.float64) + x @ torch.randn(6, 8, generator=generator, dtype=torch.float64)
    orthogonal, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    base = cka(x, y)
    assert cka(x, y @ orthogonal) == pytest.approx(base, rel=1e-10)
    assert cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)


def test_cka_of_constant_features_is_zero_not_nan():
    assert cka(torch.randn(8, 3), torch.ones(8, 4)) == 0.0


def test_cka_needs_four_samples():
    with pytest.raises(ConfigError, match="at least 4"):
        cka(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ConfigError):
        cka(torch.randn(6, 5), torch.randn(5, 5))


def test_accumulator_matches_mean_of_hsic_over_batches():
    generator = torch.Generator().manual_seed(2)
    batch_sizes = [6, 5, 7]
    rows = [[torch.randn(b, 4, generator=generator), torch.randn(b, 2, 3, generator=generator)] for b in batch_sizes]
    cols = [[r[0] * 2 + torch.randn(r[0].shape, generator=generator), torch.randn(r[0].shape[0], 5, generator=generator), torch.relu(r[1])] for r in rows]
    accumulator = CKAAccumulator(2, 3)
    for row_batch, col_batch in zip(rows, cols):
        accumulator.update(row_batch, col_batch)
    matrix = accumulator.matrix()
    assert matrix.shape == (2, 3)
    assert accumulator.num_batches == 3
    for r in range(2):
        for c in range(3):
            expected = reference_cka([b[r].double().numpy() for b in rows], [b[c].double().numpy() for b in cols])
            assert matrix[r, c] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_accumulator_is_symmetric_when_rows_equal_cols():
    generator = torch.Generator().manual_seed(3)
    shared = CKAAccumulator(3, 3)  # same list object: Gram matrices computed once
    separate = CKAAccumulator(3, 3)
    for _ in range(3):
        features = [torch.randn(8, 5, generator=generator) for _ in range(3)]
        features[2] = features[0] + 0.3 * features[2]
        shared.update(features, features)
        separate.update(features, [f.clone() for f in features])
    matrix = shared.matrix()
    np.testing.assert_allclose(matrix, matrix.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-12)
    np.testing.assert_allclose(separate.matrix(), matrix, rtol=1e-12, atol=1e-12)


def test_accumulator_states_add_like_one_stream():
    generator = torch.Generator().manual_seed(4)
    batches = [([torch.randn(6, 3, generator=generator)], [torch.randn(6, 4, generator=generator), torch.randn(6, 2, generator=generator)]) for _ in range(4)]
    whole = CKAAccumulator(1, 2)
    first_half = CKAAccumulator(1, 2)
    second_half = CKAAccumulator(1, 2)
    for index, (rows, cols) in enumerate(batches):
        whole.update(rows, cols)
        (first_half if index < 2 else second_half).update(rows, cols)
    first_half.add_state(second_half.state())
    assert first_half.num_batches == 4
    np.testing.assert_allclose(first_half.matrix(), whole.matrix(), rtol=1e-12)
    summed = CKAAccumulator(1, 2)
    summed.load_state(first_half.state())
    np.testing.assert_allclose(summed.matrix(), whole.matrix(), rtol=1e-12)
    with pytest.raises(ConfigError):
        summed.load_state(torch.zeros(3))


def test_accumulator_errors():
    accumulator = CKAAccumulator(1, 1)
    with pytest.raises(CalibrationError):
        accumulator.matrix()
    with pytest.raises(ConfigError):
        accumulator.update([torch.randn(5, 2)], [])
    with pytest.raises(ConfigError):
        accumulator.update([torch.randn(5, 2)], [torch.randn(4, 2)])


# --------------------------------------------------------------------------------------------
# Correlation
# --------------------------------------------------------------------------------------------


def test_correlation_matches_numpy_and_handles_zero_variance():
    generator = torch.Generator().manual_seed(5)
    samples = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    samples[:, 1] = 2.0  # a dead unit
    cov = torch.cov(samples.T)
    corr = correlation(cov)
    assert not torch.isnan(corr).any()
    assert corr.dtype == cov.dtype
    np.testing.assert_allclose(corr[1].numpy(), [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(torch.diagonal(corr).numpy(), 1.0)
    alive = [0, 2, 3]
    expected = np.corrcoef(samples[:, alive].numpy().T)
    np.testing.assert_allclose(corr[alive][:, alive].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert float(corr.abs().max()) <= 1.0


def test_correlation_rejects_non_square():
    with pytest.raises(ConfigError):
        correlation(torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def test_joint_and_per_task_accuracy_on_hand_made_example():
    # Two tasks: classes {0, 1} and {2, 3}.
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0, 0.0],  # label 0: joint right, task right
            [0.0, 1.0, 9.0, 0.0],  # label 1: joint wrong (2), task {0,1} right (1)
            [2.0, 0.0, 1.0, 0.0],  # label 2: joint wrong (0), task {2,3} right (2)
            [0.0, 0.0, 3.0, 1.0],  # label 3: joint wrong (2), task wrong (2)
            [0.0, 0.0, 0.0, 4.0],  # label 3: joint right, task right
        ]
    )
    labels = torch.tensor([0, 1, 2, 3, 3])
    tasks = [[0, 1], [2, 3]]
    assert joint_accuracy(logits, labels) == pytest.approx(2 / 5)
    assert per_task_accuracy(logits, labels, tasks) == pytest.approx([1.0, 2 / 3])
    report = task_report(logits, labels, tasks)
    assert report["joint"] == pytest.approx(0.4)
    assert report["tasks"] == pytest.approx([1.0, 2 / 3])
    assert report["average"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_accuracy_argument_errors():
    logits = torch.zeros(3, 4)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ConfigError):
        joint_accuracy(logits, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="task 1"):
        per_task_accuracy(logits, labels, [[0, 1], [3]])  # no sample of class 3
    with pytest.raises(ConfigError):
        per_task_accuracy(logits, labels, [[0, 7]])


# --------------------------------------------------------------------------------------------
# Loss barrier
# --------------------------------------------------------------------------------------------


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    # Non-trivial running statistics, so buffers matter for the interpolation.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4) * (seed + 1))
    return model


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(6)
    return [(torch.randn(b, 4, generator=generator), torch.randint(0, 3, (b,), generator=generator)) for b in (10, 10, 5)]


def reference_barrier(model_a: nn.Module, model_b: nn.Module, data, steps: int = 21) -> float:
    state_a = model_a.state_dict()
    state_b = model_b.state_dict()
    probe = copy.deepcopy(model_a).eval()
    losses = []
    for lam in np.linspace(0.0, 1.0, steps):
        mixed = {
            key: ((1 - lam) * state_a[key] + lam * state_b[key]) if state_a[key].is_floating_point() else state_a[key]
            for key in state_a
        }
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in data:
                total += F.cross_entropy(functional_call(probe, mixed, (x,)), y, reduction="sum").item()
                count += len(y)
        losses.append(total / count)
    return max(losses) - (losses[0] + losses[-1]) / 2


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], was_training: bool) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert model.training == was_training


def test_barrier_of_a_model_with_itself_is_zero():
    model = make_mlp(0)
    before = snapshot(model)
    assert abs(loss_barrier(model, model, make_data(), F.cross_entropy)) < 1e-6
    assert_untouched(model, before, was_training=True)


def test_barrier_matches_direct_loop_and_leaves_models_untouched():
    model_a, model_b = make_mlp(1), make_mlp(2)
    model_b.eval()
    before_a, before_b = snapshot(model_a), snapshot(model_b)
    data = make_data()
    barrier = loss_barrier(model_a, model_b, data, F.cross_entropy)
    assert barrier == pytest.approx(reference_barrier(model_a, model_b, data), rel=1e-6, abs=1e-7)
    assert barrier >= 0.0
    assert_untouched(model_a, before_a, was_training=True)
    assert_untouched(model_b, before_b, was_training=False)


def test_loss_curve_end_points_are_the_models_and_iterators_are_accepted():
    model_a, model_b = make_mlp(3), make_mlp(4)
    data = make_data()
    lambdas, losses = loss_curve(model_a, model_b, iter(data), F.cross_entropy, steps=5)
    np.testing.assert_allclose(lambdas, [0.0, 0.25, 0.5, 0.75, 1.0])
    for model, loss in ((model_a, losses[0]), (model_b, losses[-1])):
        probe = copy.deepcopy(model).eval()
        with torch.no_grad():
            expected = sum(F.cross_entropy(probe(x), y, reduction="sum").item() for x, y in data) / 25
        assert loss == pytest.approx(expected, rel=1e-6)


def test_barrier_rejects_mismatched_models():
    model_a = make_mlp(0)
    wider = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(ConfigError, match="'0.weight'"):
        loss_barrier(model_a, wider, make_data(), F.cross_entropy)
    extra = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="'4.weight'"):
        loss_barrier(model_a, extra, make_data(), F.cross_entropy)
    with pytest.raises(ConfigError):
        loss_barrier(model_a, model_a, make_data(), F.cross_entropy, steps=1)
