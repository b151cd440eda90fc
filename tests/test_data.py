"""Tests for fxmerge.data: the digits task split, loaders, the CLIP-style head and training."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxmerge.data import (
    TaskSplit,
    TextHead,
    calibration_batches,
    class_embeddings,
    digits_tasks,
    evaluate_logits,
    load_digits_tensors,
    loader,
    train_classifier,
)
from fxmerge.zoo import mlp, resnet


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast


@pytest.fixture(scope="module")
def split() -> TaskSplit:
    return digits_tasks(seed=0)


def _sorted_rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, ...]]:
    """Each sample as one (label, pixels...) tuple, sorted: a canonical multiset of samples."""
    rows = torch.cat([y[:, None].to(x.dtype), x.reshape(len(x), -1)], dim=1)
    return sorted(tuple(row) for row in rows.tolist())


def test_load_digits_tensors_shapes_and_standardisation() -> None:
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 1e-5
    assert abs(x.std().item() - 1.0) < 1e-5


def test_tasks_are_disjoint_and_cover_all_classes(split: TaskSplit) -> None:
    assert len(split.classes_a) == len(split.classes_b) == 5
    assert set(split.classes_a).isdisjoint(split.classes_b)
    assert set(split.classes_a) | set(split.classes_b) == set(range(10))
    assert list(split.classes_a) == sorted(split.classes_a)


def test_same_seed_same_split_and_other_seeds_differ(split: TaskSplit) -> None:
    again = digits_tasks(seed=0)
    assert (again.classes_a, again.classes_b) == (split.classes_a, split.classes_b)
    assert torch.equal(again.x_train, split.x_train) and torch.equal(again.y_test, split.y_test)
    others = [digits_tasks(seed=seed) for seed in (1, 2, 3)]
    assert any(other.classes_a != split.classes_a for other in others)
    assert any(not torch.equal(other.y_train, split.y_train) for other in others)


def test_train_and_test_partition_the_data(split: TaskSplit) -> None:
    x, y = load_digits_tensors()
    assert len(split.x_train) + len(split.x_test) == len(x)
    assert len(split.x_test) == pytest.approx(0.25 * len(x), abs=1)
    # Train plus test is exactly the data set as a multiset, so no sample is in both.
    combined = _sorted_rows(torch.cat([split.x_train, split.x_test]), torch.cat([split.y_train, split.y_test]))
    assert combined == _sorted_rows(x, y)
    # Stratified: every class keeps its share of the test split, up to rounding.
    for label in range(10):
        total = int((y == label).sum())
        assert abs(int((split.y_test == label).sum()) - 0.25 * total) <= 1


def test_task_returns_only_its_classes_with_global_labels(split: TaskSplit) -> None:
    for name, classes in (("a", split.classes_a), ("b", split.classes_b)):
        for part, full_y in (("train", split.y_train), ("test", split.y_test)):
            x, y = split.task(name, part)
            assert len(x) == len(y) == int(torch.isin(full_y, torch.tensor(classes)).sum())
            assert set(y.tolist()) == set(classes)
    x_a, _ = split.task("a", "test")
    x_b, _ = split.task("b", "test")
    assert len(x_a) + len(x_b) == len(split.x_test)
    with pytest.raises(ValueError):
        split.task("c", "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        split.task("a", "val")  # type: ignore[arg-type]


def test_local_labels(split: TaskSplit) -> None:
    _, y = split.task("b", "train")
    local = split.local_labels(y, "b")
    assert local.dtype == torch.int64 and set(local.tolist()) == set(range(5))
    assert torch.equal(torch.tensor(split.classes_b)[local], y)
    with pytest.raises(ValueError, match="not among"):
        split.local_labels(torch.tensor([split.classes_a[0]]), "b")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), labels=st.lists(st.integers(0, 4), min_size=1, max_size=20))
def test_local_labels_round_trip(seed: int, labels: list[int]) -> None:
    classes = tuple(sorted(torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:5].tolist()))
    stub = TaskSplit(classes, tuple(sorted(set(range(10)) - set(classes))), *(torch.empty(0),) * 4)
    global_labels = torch.tensor([classes[i] for i in labels])
    assert stub.local_labels(global_labels, "a").tolist() == labels


def test_class_embeddings_are_seeded_unit_vectors() -> None:
    embeddings = class_embeddings(10, 32, seed=0)
    assert embeddings.shape == (10, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(10))
    assert torch.equal(embeddings, class_embeddings(10, 32, seed=0))
    assert not torch.allclose(embeddings, class_embeddings(10, 32, seed=1))


def test_text_head_logits_are_cosine_over_temperature() -> None:
    embeddings = class_embeddings(10, 16, seed=3) * torch.linspace(0.5, 2.0, 10)[:, None]  # not unit
    head = TextHead(embeddings, temperature=0.1)
    x = torch.randn(7, 16)
    expected = F.cosine_similarity(x[:, None, :], embeddings[None, :, :], dim=-1) / 0.1
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (7, 10)
    assert list(head.parameters()) == []
    assert "embeddings" in head.state_dict() and torch.equal(head.embeddings, embeddings)
    assert isinstance(head.temperature, float)
    assert TextHead().temperature == 0.07 and TextHead().embeddings.shape == (10, 32)


def test_loader_is_deterministic_and_carries_labels() -> None:
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    first = [batch for batch in loader(x, y, batch_size=4, shuffle=True, seed=5)]
    second = [batch for batch in loader(x, y, batch_size=4, shuffle=True, seed=5)]
    assert [len(b[0]) for b in first] == [4, 4, 2]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    order = torch.cat([b[1] for b in first])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert torch.equal(torch.cat([b[0] for b in first])[:, 0].long(), order)
    unlabelled = list(loader(x, batch_size=4))
    assert len(unlabelled[0]) == 1 and torch.equal(unlabelled[0][0], x[:4])


def test_calibration_batches() -> None:
    x = torch.randn(150, 1, 8, 8)
    batches = calibration_batches(x, batch_size=64)
    assert [len(b) for b in batches] == [64, 64, 22]
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert torch.equal(torch.cat(batches), x)
    assert [len(b) for b in calibration_batches(x, batch_size=50, num_batches=2)] == [50, 50]


def test_resnet_trained_with_text_head_reaches_high_task_accuracy(split: TaskSplit) -> None:
    head = TextHead(class_embeddings(10, 32, seed=0))
    x, y = split.task("a", "train")
    x_test, y_test = split.task("a", "test")
    torch.manual_seed(0)
    model = resnet(width=8, in_channels=1, image_size=8, num_outputs=32)
    trained = train_classifier(model, x, y, epochs=6, head=head, classes=split.classes_a)
    assert trained is model and not model.training
    logits = evaluate_logits(model, x_test, head)
    assert logits.shape == (len(x_test), 10)
    task_predictions = logits[:, list(split.classes_a)].argmax(dim=1)
    accuracy = (task_predictions == split.local_labels(y_test, "a")).float().mean().item()
    assert accuracy > 0.9


def test_plain_training_is_deterministic_and_learns(split: TaskSplit) -> None:
    x, y = split.task("b", "train")
    x_test, y_test = split.task("b", "test")

    def fit(seed: int) -> nn.Module:
        torch.manual_seed(100)  # same init; only train_classifier's seed varies
        return train_classifier(mlp((32,), in_channels=1, image_size=8), x, y, epochs=3, seed=seed)

    threads_before = torch.get_num_threads()
    first, second, other_seed = fit(0), fit(0), fit(1)
    assert torch.get_num_threads() == threads_before, "train_classifier must restore the thread count"
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other_seed.state_dict().values()))
    logits = evaluate_logits(first, x_test)
    assert logits.shape == (len(x_test), 10)
    assert (logits.argmax(dim=1) == y_test).float().mean().item() > 0.9


def test_evaluate_logits_restores_mode_and_batches_consistently() -> None:
    torch.manual_seed(0)
    model = mlp((16,), in_channels=1, image_size=8)
    x = torch.randn(37, 1, 8, 8)
    model.train()
    small_batches = evaluate_logits(model, x, batch_size=5)
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(small_batches, model.eval()(x))
    assert not small_batches.requires_grad
