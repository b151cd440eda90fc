"""The digits two-task split, data loaders, and a CLIP-style shared output head.

scikit-learn ships the 8x8 digits data set with the package, so everything here runs offline.
The split follows the ZipIt / heterogeneous-merging protocol: the 10 classes are divided into
two disjoint 5-class tasks, model A is trained on task "a" and model B on task "b", and both
emit embeddings scored against one fixed set of class embeddings (:class:`TextHead`), so the
two models share an output space and can be merged with a shared output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fxmerge.threads import intra_op_threads

__all__ = [
    "TaskName",
    "SplitName",
    "TaskSplit",
    "TextHead",
    "calibration_batches",
    "class_embeddings",
    "digits_tasks",
    "evaluate_logits",
    "load_digits_tensors",
    "loader",
    "train_classifier",
]

TaskName = Literal["a", "b"]
SplitName = Literal["train", "test"]

NUM_DIGIT_CLASSES = 10
# sklearn's digits pixels are integer counts in 0..16.
_DIGITS_MAX_PIXEL = 16.0


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(x, y)``: x float32 (1797, 1, 8, 8), y int64 (1797,).

    Pixels are scaled to [0, 1], then standardised with one scalar mean and std over the whole
    data set (a single channel, so a per-channel statistic would be the same thing).
    """
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / _DIGITS_MAX_PIXEL
    images = (images - images.mean()) / images.std()
    return images.unsqueeze(1).contiguous(), torch.as_tensor(bunch.target, dtype=torch.int64)


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous
class TaskSplit:
    """Two disjoint class subsets of one data set, with a shared train/test split.

    ``x_train`` (N_train, 1, 8, 8), ``y_train`` (N_train,) int64 hold every class with the
    original 0..9 labels; likewise ``x_test``/``y_test``. ``classes_a``/``classes_b`` are sorted.
    """

    classes_a: tuple[int, ...]
    classes_b: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def classes(self, name: TaskName) -> tuple[int, ...]:
        """The global labels that make up task ``name``."""
        if name == "a":
            return self.classes_a
        if name == "b":
            return self.classes_b
        raise ValueError(f"TaskSplit: task name must be 'a' or 'b', got {name!r}")

    def task(self, name: TaskName, split: SplitName) -> tuple[Tensor, Tensor]:
        """Samples of task ``name`` in ``split``: x (n, 1, 8, 8) and y (n,) with global 0..9 labels."""
        if split == "train":
            x, y = self.x_train, self.y_train
        elif split == "test":
            x, y = self.x_test, self.y_test
        else:
            raise ValueError(f"TaskSplit: split must be 'train' or 'test', got {split!r}")
        keep = torch.isin(y, torch.tensor(self.classes(name), dtype=y.dtype))
        return x[keep], y[keep]

    def local_labels(self, y: Tensor, name: TaskName) -> Tensor:
        """Global labels (n,) -> indices (n,) into ``classes(name)``; a label outside the task raises."""
        return _global_to_local(y, self.classes(name))


def _global_to_local(y: Tensor, classes: Sequence[int]) -> Tensor:
    """Map labels (n,) to their position in ``classes``; labels not in ``classes`` raise ValueError."""
    classes = [int(c) for c in classes]
    size = max(max(classes), int(y.max()) if y.numel() else 0) + 1
    lookup = torch.full((size,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes, dtype=torch.int64)] = torch.arange(len(classes), dtype=torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative, got min {int(y.min())}")
    local = lookup[y.long()]
    if bool((local < 0).any()):
        outside = sorted(set(y[local < 0].tolist()))
        raise ValueError(f"labels {outside} are not among the task's classes {tuple(classes)}")
    return local


def digits_tasks(seed: int = 0, test_fraction: float = 0.25) -> TaskSplit:
    """Split digits into two disjoint 5-class tasks and a stratified train/test split.

    The seed drives both the class permutation and the train/test split, so one integer names
    one whole experimental setup.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits_tasks: test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits_tensors()
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(NUM_DIGIT_CLASSES, generator=generator).tolist()
    half = NUM_DIGIT_CLASSES // 2
    train_index, test_index = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y.numpy(), random_state=seed
    )
    train_index = torch.as_tensor(train_index)
    test_index = torch.as_tensor(test_index)
    return TaskSplit(
        classes_a=tuple(sorted(permutation[:half])),
        classes_b=tuple(sorted(permutation[half:])),
        x_train=x[train_index],
        y_train=y[train_index],
        x_test=x[test_index],
        y_test=y[test_index],
    )


def loader(
    x: Tensor, y: Tensor | None = None, batch_size: int = 64, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """DataLoader over ``x`` (N, ...) and optionally ``y`` (N,).

    Batches are lists ``[x_batch]`` or ``[x_batch, y_batch]`` (TensorDataset convention). The
    shuffle order comes from a generator seeded with ``seed``, independent of global RNG state.
    """
    tensors = (x,) if y is None else (x, y)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=generator)


def calibration_batches(x: Tensor, batch_size: int = 64, num_batches: int | None = None) -> list[Tensor]:
    """``x`` (N, ...) cut in order into batches (<= batch_size, ...); the first ``num_batches`` if given."""
    if batch_size < 1:
        raise ValueError(f"calibration_batches: batch_size must be >= 1, got {batch_size}")
    batches = list(torch.split(x, batch_size))
    return batches if num_batches is None else batches[:num_batches]


def class_embeddings(num_classes: int = NUM_DIGIT_CLASSES, dim: int = 32, seed: int = 0) -> Tensor:
    """Fixed random unit vectors (num_classes, dim), standing in for CLIP's text embeddings."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)


class TextHead(nn.Module):
    """Cosine-similarity classifier against fixed class embeddings.

    ``forward``: embeddings (N, dim) -> logits (N, num_classes) =
    ``normalize(x) @ normalize(E).T / temperature``. ``E`` is a buffer, so it is saved with the
    state dict but never trained: every model scored by the same head shares one output space.
    """

    embeddings: Tensor

    def __init__(self, embeddings: Tensor | None = None, temperature: float = 0.07) -> None:
        super().__init__()
        if embeddings is None:
            embeddings = class_embeddings()
        if embeddings.dim() != 2:
            raise ValueError(f"TextHead: embeddings must be (num_classes, dim), got shape {tuple(embeddings.shape)}")
        if temperature <= 0:
            raise ValueError(f"TextHead: temperature must be > 0, got {temperature}")
        self.register_buffer("embeddings", embeddings.detach().clone())
        self.temperature = float(temperature)

    @property
    def num_classes(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        """(N, dim) -> (N, num_classes)."""
        return F.normalize(x, dim=-1) @ F.normalize(self.embeddings, dim=-1).T / self.temperature

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}"


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    head: nn.Module | None = None,
    classes: Sequence[int] | None = None,
    num_threads: int | None = 1,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it in eval mode.

    x (N, ...) is the model input, y (N,) int64 global labels. Logits are ``head(model(x))``
    when ``head`` is given (the head is frozen: only ``model``'s parameters are optimised),
    otherwise ``model(x)``. When ``classes`` is given, only those logit columns are used and
    labels are mapped to their index in ``classes`` -- the ZipIt protocol, where a model trained
    on 5 of 10 classes never pushes the other 5 embeddings. Deterministic for a given ``seed``
    (it seeds the global RNG, which also fixes dropout). ``num_threads`` caps torch's intra-op
    threads while training (restored afterwards; ``None`` keeps the current setting).
    """
    if len(x) != len(y):
        raise ValueError(f"train_classifier: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("train_classifier: no training samples")
    torch.manual_seed(seed)
    device = _device_of(model)
    targets = _global_to_local(y, classes) if classes is not None else y.long()
    class_columns = torch.tensor(list(classes), dtype=torch.int64, device=device) if classes is not None else None
    if head is not None:
        head = head.to(device).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # A trailing batch of one sample breaks BatchNorm in train mode (one value per channel).
    drop_last = len(x) > batch_size and len(x) % batch_size == 1
    data = DataLoader(
        TensorDataset(x, targets),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
    model.train()
    with intra_op_threads(num_threads):
        for _ in range(epochs):
            for x_batch, y_batch in data:
                x_batch, y_batch = x_batch.to(device), y_batch.to(device)
                logits = model(x_batch)
                if head is not None:
                    logits = head(logits)
                if class_columns is not None:
                    logits = logits.index_select(1, class_columns)
                loss = F.cross_entropy(logits, y_batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def evaluate_logits(model: nn.Module, x: Tensor, head: nn.Module | None = None, batch_size: int = 256) -> Tensor:
    """Logits (N, C) over all classes for x (N, ...), in eval mode and without gradients.

    C is ``head``'s class count when a head is given, else the model's output width. The
    model's train/eval flag is restored afterwards. Output is on the CPU.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    if head is not None:
        head = head.to(device).eval()
    try:
        outputs = []
        for x_batch in torch.split(x, batch_size):
            logits = model(x_batch.to(device))
            if head is not None:
                logits = head(logits)
            outputs.append(logits.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("evaluate_logits: x holds no samples")
    return torch.cat(outputs)
