"""HuggingFace encoder families merged with their own permuted twin: capture, invariance, recovery,
coverage, torch.compile, save/load.

Usage:
    python benchmarks/hf_models.py [--out benchmarks/results] [--models bert vit ...]
                                   [--batches 4] [--batch-size 8] [--fresh] [--table-only]

Every model is a ``*ForSequenceClassification`` / ``*ForImageClassification`` from a TINY config
(hidden 32, 2 layers, 4 heads, intermediate 64, 3 labels; the vision ones on 32x32 images), random
init under ``torch.manual_seed(0)`` with N(0, 0.1) noise added to every parameter HF initialises
to a constant (``noise_constants``: biases, norm weights, position-bias tables, layer scales; else an
unpermuted one goes unseen), eval mode, BatchNorm statistics (MobileViT's) set to the
calibration data's with ``reset_batchnorm`` (from the initial ones its activations underflow to 0);
nothing is downloaded. Calibration: ``--batches``
dict batches of ``--batch-size`` (text: ``input_ids`` (N, 12) drawn from the 100-token vocabulary
with an ``attention_mask`` that pads the last 3 tokens of every other row; vision: ``pixel_values``
(N, 3, 32, 32) from N(0, 1)); ``x`` is the first batch. Per model:

* capture: ``fxmerge.trace(m, x, capture="auto")``: which capture it used (``gm.meta
  ["fxmerge_capture"]``: fx or export) and the seconds it took;
* invariance: ``fxmerge.testing.random_permute(m, x, capture="auto")`` against ``m`` (relative error
  of the logits: max-abs over max-abs, as tests/conftest.py; goal < 1e-5);
* coverage: ``fxmerge.analyze(m, x, capture="auto").coverage()`` and free / total groups; and
  whether the attention heads, the MLP hidden channels and the residual stream are free groups,
  read off ``Analysis.groups`` by size (the config's head count, intermediate size, hidden size),
  heads and MLP also by name (the groups of size ``num_heads`` / ``intermediate`` whose name
  is attention's / the MLP's), the residual stream as the group of hidden size with the most
  producers: ``free / found`` per kind;
* recovery: ``merge([m, twin], batches, method=...)`` for permute and zip, against ``m`` (goal < 1e-4);
* compile: the permute result under ``torch.compile(module, backend="aot_eager")`` against the same
  module uncompiled (relative error, goal < 1e-5) and seconds;
* save/load: the permute result through ``MergeResult.save`` and ``fxmerge.load``: ``ok`` when the
  outputs and the state dict are bit-identical;
* warnings: how many the row raised (first one in the JSON); seconds: the whole row, wall clock.

A step that raises records ``Err: message`` in its cell and the row goes on. The table goes to
``hf.md`` and ``hf.json`` in ``--out``; ``--models`` replaces only those rows of an earlier
``hf.json`` (``--fresh``: start over), and each row names the last commit that changed fxmerge/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import transformers as hf  # noqa: E402

import fxmerge  # noqa: E402
import fxmerge.errors  # noqa: E402
from fxmerge.passes.repair import reset_batchnorm  # noqa: E402
from homogeneous import (  # noqa: E402
    bit_identical, error_text, machine_info, measure_rows, relative_error, source_info, table_cell, write_keeping_notes,
)

VOCAB, LENGTH, IMAGE = 100, 12, 32
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=40, num_labels=3,
)
VISION = dict(
    image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, num_labels=3,
)
HEADS_NAME = re.compile(r"attn|attention|query|key|value|q_lin|k_lin|v_lin|qkv|\.q:|\.k:|\.v:")
MLP_NAME = re.compile(r"intermediate|mlp|ffn|fc1|lin1|dense|pwconv1")


@dataclass(frozen=True)
class Spec:
    """One family: its builder, input kind ("text"/"vision") and the sizes its groups should have."""

    families: str
    build: Callable[[], nn.Module]
    inputs: str
    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    residual: tuple[int, ...]


def _text(families: str, model: str, config: str, **extra: Any) -> Spec:
    build = lambda: getattr(hf, model)(getattr(hf, config)(**{**TEXT, **extra}))  # noqa: E731
    return Spec(families, build, "text", (4,), (64,), (32,))


def _vision(families: str, model: str, config: str, **extra: Any) -> Spec:
    build = lambda: getattr(hf, model)(getattr(hf, config)(**{**VISION, **extra}))  # noqa: E731
    return Spec(families, build, "vision", (4,), (64,), (32,))


MODELS: dict[str, Spec] = {
    "bert": _text("post-LN encoder, token types", "BertForSequenceClassification", "BertConfig"),
    "roberta": _text("BERT with padding-offset positions", "RobertaForSequenceClassification", "RobertaConfig"),
    "xlm-roberta": _text("RoBERTa", "XLMRobertaForSequenceClassification", "XLMRobertaConfig"),
    "data2vec-text": _text("RoBERTa", "Data2VecTextForSequenceClassification", "Data2VecTextConfig"),
    "distilbert": Spec(
        "BERT without token types or pooler",
        lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40, num_labels=3,
        )),
        "text", (4,), (64,), (32,),
    ),
    "electra": _text(
        "embedding 16 projected to hidden 32", "ElectraForSequenceClassification", "ElectraConfig", embedding_size=16
    ),
    "albert": _text(
        "one layer shared by both depths, embedding 16 projected", "AlbertForSequenceClassification", "AlbertConfig",
        embedding_size=16,
    ),
    "mpnet": _text("relative position bias", "MPNetForSequenceClassification", "MPNetConfig"),
    "deberta-v2": _text("disentangled relative attention", "DebertaV2ForSequenceClassification", "DebertaV2Config"),
    "vit": _vision("pre-LN, cls token, patch conv", "ViTForImageClassification", "ViTConfig"),
    "deit": _vision("ViT", "DeiTForImageClassification", "DeiTConfig"),
    "beit": _vision("relative position bias, layer scale, mean pooling", "BeitForImageClassification", "BeitConfig"),
    "data2vec-vision": _vision("BEiT", "Data2VecVisionForImageClassification", "Data2VecVisionConfig"),
    "dinov2": Spec(  # MLP hidden = mlp_ratio 4 x hidden 32
        "layer scale, interpolated positions",
        lambda: hf.Dinov2ForImageClassification(hf.Dinov2Config(**VISION)), "vision", (4,), (128,), (32,),
    ),
    "swin": Spec(
        "shifted windows, patch merging (2 stages)",
        lambda: hf.SwinForImageClassification(hf.SwinConfig(
            image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3,
        )),
        "vision", (2, 4), (64, 128), (16, 32),
    ),
    "convnext": Spec(
        "convolutional: depthwise 7x7, LayerNorm, layer scale (no attention)",
        lambda: hf.ConvNextForImageClassification(hf.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3,
        )),
        "vision", (), (64, 128), (16, 32),
    ),
    "mobilevit": Spec(
        "inverted residuals + transformer blocks on unfolded patches",
        lambda: hf.MobileViTForImageClassification(hf.MobileViTConfig(
            image_size=IMAGE, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=3,
        )),
        "vision", (4,), (64, 96, 128), (32, 48, 64),
    ),
}


def noise_constants(model: nn.Module, std: float = 0.1) -> int:
    """Add N(0, std) to every float parameter HF initialises to one constant (biases, norm weights,
    Swin's relative position bias tables, layer scales): a parameter the analysis forgets to permute
    is invisible while it is constant (tests/conftest.py's ``randomize_`` does the same). Returns how
    many were changed; seeded by the caller's ``torch.manual_seed``."""
    changed = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(torch.randn_like(parameter) * std)
                changed += 1
    return changed


def batches_for(spec: Spec, count: int, size: int) -> list[dict[str, torch.Tensor]]:
    """``count`` calibration batches of ``size`` (text: ids + mask padding every other row's last 3)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if spec.inputs == "text":
            mask = torch.ones(size, LENGTH, dtype=torch.long)
            mask[::2, -3:] = 0
            ids = torch.randint(3, VOCAB, (size, LENGTH), generator=generator)
            out.append({"input_ids": ids, "attention_mask": mask})
        else:
            out.append({"pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=generator)})
    return out


def logits(output: Any) -> torch.Tensor:
    """The logits of an HF ``ModelOutput`` / dict / tuple (or a bare tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


def _run(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return logits(model(**x))


def kinds(spec: Spec, groups: Any) -> dict[str, dict]:
    """Heads / MLP / residual groups found in ``Analysis.groups``: names, free count, found count."""
    found: dict[str, list] = {}
    sized = lambda sizes: [g for g in groups if g.size in sizes]  # noqa: E731
    found["heads"] = [g for g in sized(spec.heads) if HEADS_NAME.search(g.name)]
    found["mlp"] = [g for g in sized(spec.mlp) if MLP_NAME.search(g.name)]
    found["residual"] = []
    for size in spec.residual:  # one residual stream per stage width: the group with most producers
        candidates = [g for g in groups if g.size == size]
        if candidates:
            found["residual"].append(max(candidates, key=lambda g: len(g.producers)))
    return {
        kind: {"free": sum(not g.fixed for g in gs), "found": len(gs), "names": [g.name for g in gs][:8]}
        for kind, gs in found.items()
    }


def measure(name: str, batches_count: int, batch_size: int) -> dict:
    spec = MODELS[name]
    row: dict = {"model": name, "class": "", "families": spec.families}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _measure(row, spec, batches_count, batch_size)
    row["warnings"] = len(caught)
    row["warning_first"] = str(caught[0].message)[:200] if caught else ""
    row["seconds"] = time.perf_counter() - start
    return row


def _measure(row: dict, spec: Spec, batches_count: int, batch_size: int) -> None:
    """Fill ``row``; a failing build or capture ends it early."""
    try:
        torch.manual_seed(0)
        m = spec.build().eval()
        row["constants_noised"] = noise_constants(m)
        row["class"] = type(m).__name__
        row["params_k"] = sum(p.numel() for p in m.parameters()) / 1e3
        batches = batches_for(spec, batches_count, batch_size)
        # Random-init MobileViT's activations underflow to 0 through BatchNorms with the initial
        # statistics; set them to the calibration data's (as timm.md; the merge's reset is then exact).
        row["batchnorms_reset"] = reset_batchnorm(m, batches, quiet=True)
        x = batches[0]
        row["input"] = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in x.items()) + f"; {batches_count} batches"
        y = _run(m, x)
    except Exception as error:  # noqa: BLE001 - the config does not build or run
        row["build"] = error_text(error)
        return
    try:
        start = time.perf_counter()
        gm = fxmerge.trace(m, x, capture="auto")
        row["capture_seconds"] = time.perf_counter() - start
        row["capture"] = str(getattr(gm, "meta", {}).get("fxmerge_capture", "?"))
    except Exception as error:  # noqa: BLE001
        row["capture"] = error_text(error)
        return
    try:
        analysis = fxmerge.analyze(m, x, capture="auto")
        row["groups"], row["free"] = len(analysis.groups), len(analysis.free_groups)
        row["coverage"] = analysis.coverage()
        row["kinds"] = kinds(spec, analysis.groups)
    except Exception as error:  # noqa: BLE001
        row["analysis"] = error_text(error)
    try:
        twin = fxmerge.testing.random_permute(m, x, seed=1, capture="auto")
        row["invariance"] = relative_error(y, _run(twin, x))
    except Exception as error:  # noqa: BLE001
        row["invariance"] = error_text(error)
        return
    result = None
    for method in ("permute", "zip"):
        try:
            merged = fxmerge.merge(
                [m, twin], batches, method=method, calibration_batches=batches_count, quiet=True
            )
            row[method] = relative_error(y, _run(merged.module, x))
            if method == "permute":
                result = merged
        except Exception as error:  # noqa: BLE001
            row[method] = error_text(error)
    if result is None:
        return
    start = time.perf_counter()
    try:
        torch._dynamo.reset()  # each row compiles from scratch: no cache from an earlier model
        compiled = torch.compile(result.module, backend="aot_eager")
        row["compile"] = relative_error(_run(result.module, x), _run(compiled, x))
    except Exception as error:  # noqa: BLE001
        row["compile"] = error_text(error)
    row["compile_seconds"] = time.perf_counter() - start
    try:
        with tempfile.TemporaryDirectory() as directory:
            result.save(directory)
            loaded = fxmerge.load(directory)
            row["save_load"] = "ok" if bit_identical(result.module, loaded, _run, x) else "differs"
    except fxmerge.errors.SaveError as error:
        # Storing torch.export graphs (pytree inputs/outputs) is the io helper's part of the issue.
        pytree = "PyTreeCodeGen" in str(error)
        row["save_load"] = f"n/a: io helper ({error_text(error)[:60]}...)" if pytree else error_text(error)
    except Exception as error:  # noqa: BLE001
        row["save_load"] = error_text(error)


def _kind_cell(row: dict) -> str:
    if "kinds" not in row:
        return "-"
    return ", ".join(f"{v['free']}/{v['found']}" for v in row["kinds"].values())


def table(rows: list[dict]) -> str:
    lines = [
        "| model | class | families | input | params (k) | capture (s) | free / groups | coverage | heads, MLP, "
        "residual free / found | invariance | permute | zip | compile (s) | save/load | warnings | s | commit |",
        "|---|---|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        capture = table_cell(r.get("capture"))
        if "capture_seconds" in r:
            capture += f" ({r['capture_seconds']:.1f})"
        compiled = table_cell(r.get("compile"))
        if "compile_seconds" in r:
            compiled += f" ({r['compile_seconds']:.0f})"
        groups = f"{r['free']} / {r['groups']}" if "groups" in r else table_cell(r.get("analysis"))
        cells = [
            r["model"], r.get("class", ""), r["families"], table_cell(r.get("input")), table_cell(r.get("params_k"), ".1f"),
            capture, groups, f"{r['coverage']:.1%}" if "coverage" in r else "-", _kind_cell(r),
            table_cell(r.get("invariance")), table_cell(r.get("permute")), table_cell(r.get("zip")), compiled,
            table_cell(r.get("save_load")).split(" (SaveError")[0], table_cell(r.get("warnings")), table_cell(r.get("seconds"), ".0f"), table_cell(r.get("commit")),
        ]
        if r.get("build"):
            cells[5] = f"build fails: {table_cell(r['build'])}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--models", nargs="*", help=f"subset of: {', '.join(MODELS)} (default: all)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fresh", action="store_true", help="drop the rows of an earlier hf.json in --out")
    parser.add_argument("--table-only", action="store_true", help="measure nothing: rewrite hf.md from hf.json")
    args = parser.parse_args(argv)
    unknown = set(args.models or ()) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    path = args.out / "hf.json"
    ordered = measure_rows(
        path, list(MODELS), () if args.table_only else (args.models or list(MODELS)),
        lambda name: measure(name, args.batches, args.batch_size), fresh=args.fresh,
    )
    text = table(ordered)
    print(text)
    header = (
        "# HuggingFace encoder families merged with their permuted twin\n\n"
        "Generated by `python benchmarks/hf_models.py` (see its docstring for the exact protocol), run "
        "model by model (`--models NAME` replaces only that row of `hf.json`); `commit` names the last "
        "commit that changed `fxmerge/` in the checkout that measured the row. Tiny configs (hidden 32, "
        "2 layers, 4 heads, intermediate 64, 3 labels; Swin/ConvNeXt/MobileViT: 2-3 stages of width "
        "16-64), random init under `torch.manual_seed(0)` with N(0, 0.1) noise added to every parameter HF "
        "initialises to a constant (biases, norm weights, Swin's relative position bias tables, layer scales: "
        "a parameter left unpermuted is invisible while constant), BatchNorm statistics (MobileViT's) set to the "
        "calibration data's first (with the initial ones its activations underflow to 0), nothing downloaded; "
        "transformers "
        f"{hf.__version__}. Calibration: {parser.get_default('batches')} dict batches of "
        f"{parser.get_default('batch_size')} unless the input column says more (text: "
        f"`input_ids` {LENGTH} tokens of a {VOCAB}-token vocabulary, `attention_mask` padding the last 3 "
        f"tokens of every other row; vision: `pixel_values` 3x{IMAGE}x{IMAGE} from N(0, 1)). Errors are "
        "relative (max-abs over max-abs of the logits). `capture`: what `fxmerge.trace(m, x, "
        "capture=\"auto\")` used and its seconds; `invariance`: `fxmerge.testing.random_permute(m, x, "
        "capture=\"auto\")` against m (goal < 1e-5); `coverage`: `Analysis.coverage()` (fraction of "
        "hidden channels in free groups); `heads, MLP, residual`: free / found groups of each kind (found "
        "by size and name, the residual stream as the hidden-size group with most producers, one per "
        "stage; the names are in hf.json); `permute` / `zip`: `merge([m, twin])` against m (goal < 1e-4); "
        "`compile`: the permute result under `torch.compile(module, backend=\"aot_eager\")` against the "
        "same module uncompiled (goal < 1e-5; in parentheses: seconds); `save/load`: the permute result "
        "through `MergeResult.save` and `fxmerge.load`, `ok` = bit-identical logits and state dict; "
        "`Err: ...`: the step raised (first line of the message). Seconds: the whole row, wall clock, on "
        "a shared machine (indicative only).\n\n"
        f"Machine: {machine_info()}.\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_keeping_notes(args.out / "hf.md", header + text + "\n")
    meta = {
        "machine": machine_info(), "source": source_info(), "transformers": hf.__version__,
        "batches": parser.get_default("batches"), "batch_size": parser.get_default("batch_size"),
        "note": "calibration of rows whose input says more batches: see the row",
    }
    path.write_text(json.dumps({"meta": meta, "rows": ordered}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
