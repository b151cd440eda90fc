"""Shared helpers of the test suite.

``relative_error`` is THE relative-error measure of the tests (max-abs by default, ``norm="l2"``
for the Frobenius ratio); ``random_batches``, ``output_of``, ``same_state`` and the ``one_thread``
fixture are shared by the merge tests; ``tiny_bert``, ``tiny_vit`` and ``token_batches`` by the
HuggingFace (torch.export) tests; ``small_resnets`` and ``rehash`` by the saved-folder tests.

The central check of the analysis / invariance tests is ``assert_invariant``: permute every free group of a model (with
permutations that are never the identity), then require

* the outputs to agree in eval mode to ``rtol`` relative to the output scale,
* every state tensor to change exactly when one of its axes carries a free group of size > 1
  (and to stay bit-identical otherwise), and at least one tensor to change.

Models are first passed through ``randomize_``: many default inits are constants (zero biases,
LayerNorm weight 1, BatchNorm running stats 0/1, ViT's zero head, ConvNeXt's layer scale), and a
parameter that should have been permuted but was not would go unnoticed while it is constant.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from fxmerge.groups import Opaque
from fxmerge.passes.dependency import Analysis, analyze
from fxmerge.testing import permute_model, random_permutations


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite EVERY floating parameter and buffer with random values, in place; returns the model.

    Matrices/kernels get N(0, 1/fan_in) (so deep nets stay finite), vectors (biases, norm
    weights, running means, layer scales) N(0, 0.5^2); BatchNorm running variances are drawn
    from U(0.5, 1.5) (they must stay positive). Integer buffers (num_batches_tracked, index
    tables) are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers(remove_duplicate=True))
        for name, tensor in tensors:
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                value = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5
            elif tensor.dim() >= 2:
                fan_in = max(1, tensor[0].numel())
                value = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) / fan_in**0.5
            else:
                value = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.5
            tensor.copy_(value)
    return model


def free_spaces(analysis: Analysis) -> set[int]:
    """Leaf space ids of the free groups of size > 1 (those a permutation can actually move)."""
    return {analysis.space_ids[g.name] for g in analysis.free_groups if g.size > 1}


def nontrivial_permutations(analysis: Analysis, seed: int = 0) -> dict[int, torch.Tensor]:
    """``random_permutations`` with every permutation of size > 1 forced away from the identity."""
    perms = random_permutations(analysis, seed)
    for space, perm in perms.items():
        if len(perm) > 1 and torch.equal(perm, torch.arange(len(perm))):
            perms[space] = torch.roll(perm, 1)
    return perms


def expected_changed(analysis: Analysis, state: dict[str, torch.Tensor]) -> set[str]:
    """State keys whose tensor has an axis carrying a free group of size > 1."""
    free = free_spaces(analysis)
    changed = set()
    for key in state:
        canonical = analysis.aliases.get(key, key)
        layouts = analysis.param_layouts.get(canonical)
        if layouts is None:
            continue
        for layout in layouts:
            if layout is None:
                continue
            if any(not isinstance(f, Opaque) and f in free for piece in layout for f in piece):
                changed.add(key)
    return changed


def relative_error(expected: torch.Tensor, got: torch.Tensor, *, norm: str = "max") -> float:
    """How far ``got`` is from ``expected``, relative to ``expected``'s scale.

    ``norm="max"``: max|expected - got| / max|expected|; ``norm="l2"``: ||expected - got|| /
    ||expected|| (Frobenius). The scale is floored at 1e-12 (an all-zero reference gives a huge
    error instead of NaN, so a test cannot pass on it by accident).
    """
    difference = (expected - got).double()
    if norm == "max":
        error, scale = difference.abs().max(), expected.double().abs().max()
    elif norm == "l2":
        error, scale = difference.norm(), expected.double().norm()
    else:
        raise ValueError(f"norm={norm!r}: expected 'max' or 'l2'")
    return (error / scale.clamp_min(1e-12)).item()


class ConvBNNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> spatial mean -> linear, on (N, 3, H, W) inputs;
    ``widths``: the two convolutions' output channels, ``classes``: the outputs."""

    def __init__(self, widths: tuple[int, int] = (6, 5), classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.fc = nn.Linear(widths[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = nn.functional.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def random_batches(shape: tuple[int, ...] = (16, 1, 8, 8), count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """``count`` standard-normal batches of ``shape`` from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def output_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without gradients, checked to be finite."""
    with torch.no_grad():
        y = module(x)
    assert torch.isfinite(y).all(), "output is not finite"
    return y


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules have the same state_dict keys with bit-identical tensors of one dtype."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def tiny_bert(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64) -> nn.Module:
    """A randomly initialised (then ``randomize_``d) HF ``BertForSequenceClassification``, 3 labels,
    vocabulary 100, eval mode; nothing is downloaded."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=64, num_labels=3,
    )
    return randomize_(BertForSequenceClassification(config), seed).eval()


def tiny_vit(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4) -> nn.Module:
    """A randomised HF ``ViTForImageClassification`` on 16x16 RGB images, patch 4, 3 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        image_size=16, patch_size=4, num_labels=3,
    )
    return randomize_(ViTForImageClassification(config), seed).eval()


def token_batches(count: int = 4, size: int = 8, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """HF-style keyword batches: ``input_ids`` (size, length) in [0, 100) and an ``attention_mask``
    with a padded tail in every other row."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mask = torch.ones(size, length, dtype=torch.long)
        mask[::2, length - 3 :] = 0
        out.append({"input_ids": torch.randint(0, 100, (size, length), generator=generator), "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a test module (tiny models on a shared machine: more threads only add
    contention); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    return []


def _call(model: nn.Module, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def assert_invariant(
    model: nn.Module,
    x,
    analysis: Analysis | None = None,
    *,
    seed: int = 0,
    rtol: float = 1e-4,
    leaf_modules: Sequence = (),
    min_changed_fraction: float = 0.0,
) -> tuple[Analysis, nn.Module]:
    """Permute every free group of ``model`` and check that its eval-mode outputs do not move.

    Returns the analysis and the permuted twin.
    """
    model.eval()
    if analysis is None:
        analysis = analyze(model, x, leaf_modules=leaf_modules)
    perms = nontrivial_permutations(analysis, seed)
    twin = permute_model(model, analysis, perms).eval()

    ys, ys2 = _flat_outputs(_call(model, x)), _flat_outputs(_call(twin, x))
    assert len(ys) == len(ys2) >= 1
    for y, y2 in zip(ys, ys2):
        assert torch.isfinite(y).all(), "reference output is not finite: randomisation too wild"
        assert y.abs().max() > 0, "reference output is all zeros: the test would prove nothing"
        err = relative_error(y, y2)
        assert err <= rtol, f"permuted model differs: max|y-y'|/max|y| = {err:.3e} > {rtol:.0e}"

    before, after = model.state_dict(), twin.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = expected_changed(analysis, before)
    assert changed == expected, (
        f"tensors changed but carry no free group: {sorted(changed - expected)}; "
        f"carry a free group but did not change: {sorted(expected - changed)}"
    )
    if free_spaces(analysis):
        assert changed, "free groups exist but no tensor changed"
    floating = [k for k, v in before.items() if v.is_floating_point()]
    if min_changed_fraction:
        fraction = len(changed) / len(floating)
        assert fraction >= min_changed_fraction, f"only {fraction:.0%} of the floating tensors were permuted"
    return analysis, twin


@pytest.fixture
def invariant():
    """The ``assert_invariant`` helper as a fixture (tests may also import it from conftest)."""
    return assert_invariant


def rehash(directory, name: str) -> None:
    """Rewrite the manifest of a saved folder so it vouches for ``name`` as it is now (its sha256
    and size) and for itself (``manifest_sha256``), as an editor who knows the format would: the
    refusals that must not rest on the hashes (allowlists) are tested behind this."""
    import hashlib
    import json
    from pathlib import Path

    from fxmerge.io import _manifest_digest

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if name != "manifest.json":
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def small_resnets(*blocks: tuple[int, ...], width: int = 4) -> tuple[list[nn.Module], list[torch.Tensor]]:
    """Zoo ResNets on (1, 8, 8) inputs, one per ``blocks`` (blocks per stage; model k seeded k), in
    eval mode, and 3 calibration batches of 16: the smallest depth-heterogeneous merges."""
    from fxmerge import zoo

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(3)]
    models = []
    for seed, stage_blocks in enumerate(blocks):
        torch.manual_seed(seed)
        models.append(zoo.resnet(stage_blocks, width, in_channels=1, image_size=8).eval())
    return models, batches
