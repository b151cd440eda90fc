"""HuggingFace transformers through the torch.export front end: capture, invariance, recovery,
structure of inputs and outputs, torch.compile, interpolation, and the errors of bad inputs.

Models are tiny random-init BERTs and ViTs (``tests/conftest.py``); nothing is downloaded.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.errors import CalibrationError, ConfigError, TraceError
from fxmerge.inputs import tensor_leaves

from conftest import randomize_, relative_error, tiny_bert, tiny_vit, token_batches

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*calibration samples")]


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    (first,) = tensor_leaves(out)[:1]
    assert torch.isfinite(first).all()
    return first


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert(0)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit(0)


def pixel_batches(count: int = 4, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(size, 3, 16, 16, generator=generator)} for _ in range(count)]


def test_transformers_models_are_captured_by_export_under_auto(bert: nn.Module) -> None:
    batch = token_batches(1)[0]
    gm = fxmerge.trace(bert, batch)
    assert gm.meta["fxmerge_capture"] == "export"
    assert any(str(n.target) == "aten.scaled_dot_product_attention.default" for n in gm.graph.nodes)
    # the same inputs (keywords) and outputs (a ModelOutput), at another batch size and length
    other = {k: v[:3, :7] for k, v in token_batches(1, seed=5)[0].items()}
    with torch.no_grad():
        got, expected = gm(**other), bert(**other)
    assert type(got) is type(expected)
    assert torch.allclose(got.logits, expected.logits, atol=1e-6, rtol=1e-5)
    with pytest.raises(TraceError, match="cannot trace BertForSequenceClassification"):
        fxmerge.trace(bert, batch, capture="fx")


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_random_permute_is_invariant_and_covers_heads_mlp_and_residual(family: str, request) -> None:
    model = request.getfixturevalue(family)
    batches = token_batches(2) if family == "bert" else pixel_batches(2)
    analysis = fxmerge.analyze(model, batches[0])
    assert not analysis.warnings  # every op of the exported graph has a rule
    free = {g.name for g in analysis.free_groups}
    layer = "bert.encoder.layer.0" if family == "bert" else "vit.layers.0"
    mlp = "intermediate.dense" if family == "bert" else "mlp.fc1"
    residual = "bert.embeddings.word_embeddings:out" if family == "bert" else "vit.embeddings.cls_token[2]"
    query = "attention.self.query" if family == "bert" else "attention.q_proj"
    assert {f"{layer}.{mlp}:out", residual, f"{layer}.{query}:out/x0"} <= free  # MLP hidden, stream, heads
    assert analysis.coverage() == pytest.approx(1.0)
    twin, permutations = fxmerge.testing.random_permute(model, batches[0], seed=1, return_permutations=True)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in permutations.values())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, twin.state_dict()[k])]
    assert any("attention" in k for k in changed) and any("word_embeddings" in k or "cls_token" in k for k in changed)
    assert relative_error(logits(model, batches[1]), logits(twin, batches[1])) < 1e-5


@pytest.mark.parametrize(("family", "method"), [("bert", "permute"), ("bert", "zip"), ("vit", "permute")])
def test_merging_a_model_with_its_permuted_twin_gives_it_back(family: str, method: str, request) -> None:
    model = request.getfixturevalue(family)
    batches = token_batches(6, size=16) if family == "bert" else pixel_batches(4)
    twin = fxmerge.testing.random_permute(model, batches[0], seed=2)
    result = fxmerge.merge([model, twin], batches, method=method, quiet=True)
    assert result.capture == ("export", "export")
    held_out = token_batches(1, seed=9)[0] if family == "bert" else pixel_batches(1, seed=9)[0]
    with torch.no_grad():
        out = result.module(**held_out)
    assert type(out).__name__.endswith("ClassifierOutput")
    assert relative_error(logits(model, held_out), out.logits) < 1e-4


def test_merged_transformer_compiles_and_runs_at_other_shapes(bert: nn.Module) -> None:
    batches = token_batches(4, size=16)
    result = fxmerge.merge([bert, tiny_bert(1)], batches, method="permute", quiet=True)
    other = {k: v[:5, :9] for k, v in token_batches(1, seed=3)[0].items()}
    eager = logits(result.module, other)
    assert eager.shape == (5, 3)
    compiled = torch.compile(result.module, backend="aot_eager")
    assert relative_error(eager, logits(compiled, other)) < 1e-5


def test_interpolation_walks_from_one_aligned_model_to_the_other(bert: nn.Module) -> None:
    """With permute and equal widths, weights (1, 0) give model 0 and (0, 1) give model 1 — in
    model 0's channel order —; the midpoint is the merged module itself."""
    other = tiny_bert(1)
    batches = token_batches(6, size=16)
    result = fxmerge.merge([bert, other], batches, method="permute", quiet=True)
    test = token_batches(1, seed=4)[0]
    assert relative_error(logits(bert, test), logits(result.interpolate((1.0, 0.0)), test)) < 1e-5
    assert relative_error(logits(other, test), logits(result.interpolate((0.0, 1.0)), test)) < 1e-5
    assert torch.equal(logits(result.interpolate((0.5, 0.5)), test), logits(result.module, test))
    weighted = fxmerge.merge([bert, other], batches, method="permute", model_weights=(1, 3), quiet=True)
    assert torch.equal(logits(weighted.module, test), logits(result.interpolate((0.25, 0.75)), test))
    with pytest.raises(ConfigError, match="one weight per model"):
        result.interpolate((1.0, 0.0, 0.0))


def test_calibration_dicts_are_checked_key_by_key(bert: nn.Module) -> None:
    good = token_batches(3)
    missing = good[:1] + [{"input_ids": good[1]["input_ids"]}]
    with pytest.raises(CalibrationError, match=re.escape("calibration batch 1 has inputs ['input_ids']") + ".*missing \\['attention_mask'\\]"):
        fxmerge.merge([bert, bert], missing, quiet=True)
    extra = good[:1] + [{**good[1], "token_type_ids": torch.zeros_like(good[1]["input_ids"])}]
    with pytest.raises(CalibrationError, match="extra \\['token_type_ids'\\]"):
        fxmerge.merge([bert, bert], extra, quiet=True)
    shorter = good[:1] + [{k: v[:, :8] for k, v in good[1].items()}]
    with pytest.raises(CalibrationError, match="calibration batch 1: input 'input_ids' has shape \\(8, 8\\), batch 0 has \\(8, 12\\)"):
        fxmerge.merge([bert, bert], shorter, quiet=True)
    ragged = [{"input_ids": good[0]["input_ids"], "attention_mask": good[0]["attention_mask"][:4]}]
    with pytest.raises(CalibrationError, match="calibration batch 0: its inputs have different batch sizes"):
        fxmerge.merge([bert, bert], ragged, quiet=True)


def test_labels_in_a_batch_are_not_fed_to_the_model(bert: nn.Module) -> None:
    """A dict batch's "labels" (HF's Trainer convention) and an (input, label) tuple's label are
    dropped: the merge equals the merge of the bare inputs."""
    batches = token_batches(4, size=16)
    twin = fxmerge.testing.random_permute(bert, batches[0], seed=2)
    labelled = [{**b, "labels": torch.zeros(16, dtype=torch.long)} for b in batches[:2]] + [(b, 0) for b in batches[2:]]
    plain = fxmerge.merge([bert, twin], batches, method="permute", quiet=True)
    with_labels = fxmerge.merge([bert, twin], labelled, method="permute", quiet=True)
    test = token_batches(1, seed=4)[0]
    assert torch.equal(logits(plain.module, test), logits(with_labels.module, test))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if y.sum() > 0:
            return y.relu()
        return y


def test_a_model_neither_capture_handles_gets_one_error_with_both_reasons() -> None:
    with pytest.raises(TraceError) as caught:
        fxmerge.trace(DataDependent(), torch.randn(2, 4))
    message = str(caught.value)
    assert "neither capture can handle DataDependent" in message
    assert "torch.fx:" in message and "torch.export:" in message and "torch.cond" in message
    with pytest.raises(ConfigError, match="leaf_modules= needs capture='fx'"):
        fxmerge.trace(DataDependent(), torch.randn(2, 4), leaf_modules=["linear"], capture="export")
    with pytest.raises(ConfigError, match="capture='jit'"):
        fxmerge.trace(DataDependent(), torch.randn(2, 4), capture="jit")


def test_export_capture_of_a_plain_cnn_merges_like_fx() -> None:
    """capture="export" on a model fx also captures: the same merged function."""
    from fxmerge import zoo

    from conftest import random_batches

    a, b = (randomize_(zoo.resnet((1, 1), width=8, in_channels=1, image_size=8, num_outputs=5), seed).eval() for seed in (0, 1))
    batches = random_batches((16, 1, 8, 8), 3)
    by_fx = fxmerge.merge([a, b], batches, method="zip", capture="fx", quiet=True)
    by_export = fxmerge.merge([a, b], batches, method="zip", capture="export", quiet=True)
    assert by_export.capture == ("export", "export")
    test = random_batches((8, 1, 8, 8), 1, seed=7)[0]
    with torch.no_grad():
        assert relative_error(by_fx.module(test), by_export.module(test)) < 1e-5


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_depth_heterogeneous_transformers_merge_and_the_extension_is_exact(family: str) -> None:
    """A 2-layer and a 4-layer model: the exported graphs are cut into sub-block units (BERT's
    post-norm x -> LayerNorm(x + f(x)) included), the shallow one is extended with identity
    units, and re-weighting the merge to (0, 1) gives back the shallow model itself."""
    if family == "bert":
        deep, shallow, batches = tiny_bert(1, layers=4), tiny_bert(0, layers=2), token_batches(4, size=16)
        test = token_batches(1, seed=8)[0]
    else:
        deep, shallow, batches = tiny_vit(1, layers=4), tiny_vit(0, layers=2), pixel_batches(4, size=16)
        test = pixel_batches(1, seed=8)[0]
    result = fxmerge.merge([deep, shallow], batches, method="permute", depth="lma", quiet=True)
    (alignment,) = result.alignment
    assert len(alignment.deep_units) - len(alignment.shallow_units) == 4  # two layers of two sub-blocks
    assert sum(len(s) - 1 for s in alignment.segmentation.segments) == 4
    assert relative_error(logits(shallow, test), logits(result.interpolate((0.0, 1.0)), test)) < 1e-5
    assert relative_error(logits(deep, test), logits(result.interpolate((1.0, 0.0)), test)) < 1e-5
    assert logits(result.module, test).shape == (8, 3)
