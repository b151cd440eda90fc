"""timm models merged with their own permuted twin: invariance, coverage, recovery, BN repair, save/load.

Usage:
    python benchmarks/timm_models.py [--out benchmarks/results] [--models efficientnet_b0 ...]
                                     [--image-size 64] [--batches 4] [--batch-size 8] [--fresh] [--table-only]

For each model (random init, ``pretrained=False``, 10 classes, eval mode; a classifier timm
initialises to zeros, the MLP-mixers', drawn from N(0, 0.02) instead so the logits are not all 0;
inputs ``--batch-size`` images of ``--image-size`` pixels unless the model needs its own size) and ``--batches``
calibration batches drawn from N(0, 1):

* ``fresh``: the model with timm's initial BatchNorm statistics (0 / 1); ``m``: a copy whose
  BatchNorm statistics are set to the calibration data's (``reset_batchnorm``), so that the BN
  reset a merge ends with is exact and ``m`` is the function a merge with its twin must give back.
* invariance: ``fxmerge.testing.random_permute(m, x)`` against ``m`` (relative error, max-abs
  over max-abs of the output, as in tests/conftest.py) — the analysis's own check;
* coverage: ``Analysis.coverage()`` and the free/total group counts;
* recovery: ``merge([m, twin], calibration, method=...)`` for permute and zip, against ``m``;
* BN repair: ``merge([fresh, twin of fresh], method="permute")`` against ``m`` — the merged model
  only equals ``m`` if the reset recomputes every batch norm, including the functional
  ``F.batch_norm`` nodes fx leaves when it traces into timm's ``BatchNormAct2d`` (before the
  repair covered them, this error was 1.0-1.8 for BatchNormAct models);
* compile: the permute result under ``torch.compile(module, backend="aot_eager")`` against the
  same module uncompiled (relative error, goal < 1e-5) and the seconds compiling it took;
* save/load: the permute result saved with ``MergeResult.save`` and read with ``fxmerge.load``:
  ``ok`` when outputs and state dict are bit-identical;
* seconds: wall clock of the whole row (analysis, three merges, compile, save/load) on this machine.

A step that raises records the exception in its cell (``Err: message``) and the row goes on. The
table goes to ``timm.md`` and ``timm.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import timm  # noqa: E402

import fxmerge  # noqa: E402
from fxmerge.passes.repair import reset_batchnorm  # noqa: E402
from homogeneous import (  # noqa: E402
    bit_identical, error_text, machine_info, measure_rows, relative_error, source_info, table_cell, write_keeping_notes,
)

# name -> (families, input size or None for --image-size, create_model kwargs)
MODELS: dict[str, tuple[str, int | None, dict]] = {
    "efficientnet_b0": ("BatchNormAct, SE, depthwise", None, {}),
    "mobilenetv3_small_100": ("BatchNormAct, SE, depthwise, hard-swish", None, {}),
    "regnety_002": ("BatchNormAct, SE, grouped", None, {}),
    "densenet121": ("BatchNormAct, concat", None, {}),
    "cspresnet50": ("BatchNormAct, cross-stage split/concat", None, {}),
    "resnet18": ("BatchNorm modules, residual", None, {}),
    "resnet26d": ("deep stem, avg-pool shortcut", None, {}),
    "seresnet18": ("SE", None, {}),
    "ecaresnet26t": ("ECA (conv1d over channels)", None, {}),
    "mixnet_s": ("BatchNormAct, mixed depthwise split/concat, SE", None, {}),
    "ghostnet_050": ("ghost modules (concat, slice), SE", None, {}),
    "dla34": ("concat aggregation trees", None, {}),
    "dpn68": ("grouped, dual-path split/concat", None, {}),
    "res2net50_14w_8s": ("split/concat hierarchy", None, {}),
    "hrnet_w18_small": ("multi-resolution branches, upsample", None, {}),
    "rexnet_100": ("BatchNormAct, SE, channel-padding residual", None, {}),
    "lcnet_050": ("BatchNormAct, depthwise, SE", None, {}),
    "efficientnet_lite0": ("BatchNormAct, depthwise", None, {}),
    "tinynet_e": ("BatchNormAct, SE, depthwise", None, {}),
    "resnext26ts": ("grouped (ResNeXt), SiLU", None, {}),
    "convnext_atto": ("depthwise, LayerNorm2d, layer scale", None, {}),
    "levit_128s": ("attention, conv stem (BatchNorm in linear layers)", 224, {}),
    "coat_lite_tiny": ("attention, conv position encoding", 224, {}),
    "efficientformer_l1": ("attention, meta-blocks", 224, {}),
    # Token models built for 64x64 inputs (timm's img_size kwarg: 16 patches of 16x16) to keep rows small.
    "vit_tiny_patch16_224": ("attention (ViT: cls token, position embedding)", None, {"img_size": 64}),
    "deit_tiny_distilled_patch16_224": ("attention (cls + distillation tokens, two heads)", None, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (
        "attention (shifted windows, patch merging)", None, {"img_size": 64, "window_size": 4}
    ),
    "mixer_s16_224": ("MLP-mixer (token-mixing MLP)", None, {"img_size": 64}),
    "resmlp_12_224": ("MLP-mixer (ResMLP: affine norms, layer scale)", None, {"img_size": 64}),
    "gmlp_ti16_224": ("MLP-mixer (gMLP: spatial gating split)", None, {"img_size": 64}),
}


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def measure(name: str, size: int, batches_count: int, batch_size: int) -> dict:
    row: dict = {"model": name, "families": MODELS[name][0], "input": f"{batch_size}x3x{size}x{size}"}
    if MODELS[name][2]:
        row["kwargs"] = MODELS[name][2]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _measure(row, name, size, batches_count, batch_size)
    row["warnings"] = len(caught)
    row["warning_first"] = str(caught[0].message)[:160] if caught else ""
    row["seconds"] = time.perf_counter() - start
    return row


def _measure(row: dict, name: str, size: int, batches_count: int, batch_size: int) -> None:
    """Fill ``row``; a failing build or analysis ends it early."""
    try:
        torch.manual_seed(0)
        fresh = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name][2]).eval()
        head = fresh.get_classifier()
        if isinstance(head, nn.Linear) and not head.weight.any():  # timm zero-inits mixer heads: logits all 0
            nn.init.normal_(head.weight, std=0.02)
            row["head"] = "re-initialised N(0, 0.02)"
        row["params_m"] = sum(p.numel() for p in fresh.parameters()) / 1e6
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches_count)]
        x = batches[0]
        m = copy.deepcopy(fresh)
        reset_batchnorm(m, batches, quiet=True)
        y = _run(m, x)
    except Exception as error:  # noqa: BLE001 - the model does not build or run at this size
        row["build"] = error_text(error)
        return
    try:
        analysis = fxmerge.analyze(m, x)
        row["groups"], row["free"] = len(analysis.groups), len(analysis.free_groups)
        row["coverage"] = analysis.coverage()
        twin = fxmerge.testing.random_permute(m, x, seed=1).eval()
        row["invariance"] = relative_error(y, _run(twin, x))
    except Exception as error:  # noqa: BLE001
        row["analysis"] = error_text(error)
        return
    result = None
    for method in ("permute", "zip"):
        try:
            merged = fxmerge.merge([m, twin], batches, method=method, calibration_batches=batches_count, quiet=True)
            row[method] = relative_error(y, _run(merged.module, x))
            if method == "permute":
                result = merged
        except Exception as error:  # noqa: BLE001
            row[method] = error_text(error)
    try:
        fresh_twin = fxmerge.testing.random_permute(fresh, x, seed=1).eval()
        repaired = fxmerge.merge([fresh, fresh_twin], batches, method="permute", calibration_batches=batches_count, quiet=True)
        row["bn_repair"] = relative_error(y, _run(repaired.module, x))
        row["fresh_vs_m"] = relative_error(y, _run(fresh, x))  # what an unrepaired merge is off by
    except Exception as error:  # noqa: BLE001
        row["bn_repair"] = error_text(error)
    if result is not None:
        _compile(row, result.module, x)
        try:
            with tempfile.TemporaryDirectory() as directory:
                result.save(directory)
                loaded = fxmerge.load(directory)
                row["save_load"] = "ok" if bit_identical(result.module, loaded, _run, x) else "differs"
        except Exception as error:  # noqa: BLE001
            row["save_load"] = error_text(error)


def _compile(row: dict, module: nn.Module, x: torch.Tensor) -> None:
    """``compile``: ``torch.compile(module, backend="aot_eager")`` against ``module`` (relative error)."""
    start = time.perf_counter()
    try:
        torch._dynamo.reset()  # each row compiles from scratch: no cache from an earlier model
        compiled = torch.compile(module, backend="aot_eager")
        row["compile"] = relative_error(_run(module, x), _run(compiled, x))
    except Exception as error:  # noqa: BLE001
        row["compile"] = error_text(error)
    row["compile_seconds"] = time.perf_counter() - start


def table(rows: list[dict]) -> str:
    lines = [
        "| model | families | input | params (M) | free / groups | coverage | invariance | permute | zip | BN repair "
        "(fresh stats: before) | compile (s) | save/load | warnings | s | commit |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        failure = r.get("build") or r.get("analysis")
        groups = f"{r['free']} / {r['groups']}" if "groups" in r else "-"
        coverage = f"{r['coverage']:.1%}" if "coverage" in r else "-"
        repair = table_cell(r.get("bn_repair"))
        if "fresh_vs_m" in r:
            repair += f" ({r['fresh_vs_m']:.1e})"
        compiled = table_cell(r.get("compile"))
        if "compile_seconds" in r:
            compiled += f" ({r['compile_seconds']:.0f})"
        cells = [
            r["model"], r["families"], r["input"], table_cell(r.get("params_m"), ".1f"), groups, coverage,
            table_cell(r.get("invariance")), table_cell(r.get("permute")), table_cell(r.get("zip")), repair, compiled,
            table_cell(r.get("save_load")), table_cell(r.get("warnings")), table_cell(r.get("seconds"), ".0f"),
            table_cell(r.get("commit")),
        ]
        if failure:
            stage = "build" if r.get("build") else "analyze"
            cells[6] = f"{stage} fails: {table_cell(failure)}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--models", nargs="*", help="subset of model names (default: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fresh", action="store_true", help="drop the rows of an earlier timm.json in --out")
    parser.add_argument("--table-only", action="store_true", help="measure nothing: rewrite timm.md from timm.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    unknown = set(args.models or ()) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    ordered = measure_rows(
        args.out / "timm.json", list(MODELS), () if args.table_only else (args.models or list(MODELS)),
        lambda name: measure(name, MODELS[name][1] or args.image_size, args.batches, args.batch_size),
        fresh=args.fresh,
    )
    text = table(ordered)
    print(text)
    header = (
        "# timm models merged with their permuted twin\n\n"
        "Generated by `python benchmarks/timm_models.py` (see its docstring for the exact protocol), "
        "run model by model (`--models NAME`, which replaces only that row of `timm.json`); the `commit` "
        "column names the last commit that changed `fxmerge/` in the checkout that measured the row. "
        "Random init (`pretrained=False`, 10 classes; the classifiers timm initialises to zeros, the "
        "MLP-mixers', drawn from N(0, 0.02) so the logits are not all 0); calibration: "
        f"{args.batches} batches of {args.batch_size} N(0, 1) images at {args.image_size}x{args.image_size} "
        "(levit, coat and efficientformer at their native 224x224; the ViT/DeiT/Swin/mixer rows are built "
        "for 64x64 through timm's `img_size` kwarg, Swin with `window_size=4`). Errors are relative (max-abs "
        "over max-abs of the output). `invariance`: the analysis's permuted twin against the model; "
        "`permute` / `zip`: `merge([m, twin])` against m (m's BatchNorm statistics set to the calibration "
        "data's first); `BN repair`: the same permute merge of the model with timm's initial statistics, "
        "against m (in parentheses: how far the initial-statistics model itself is from m, i.e. what a "
        "merge that skipped the reset would be off by); `compile`: the permute result under "
        "`torch.compile(module, backend=\"aot_eager\")` against the same module uncompiled (in parentheses: "
        "seconds to compile and run it once); `save/load`: the permute result through `MergeResult.save` "
        "and `fxmerge.load`, `ok` = bit-identical outputs and state dict. Goal: every error < 1e-4 "
        "(invariance and compile < 1e-5); "
        "0.0e+00 means bit-identical outputs (the twin's permutation is recovered exactly, the average of "
        "two equal weights is exact, and the statistics are recomputed on the same activations). "
        "Seconds: the whole row, wall clock, on a shared machine (indicative only).\n\n"
        f"Machine: {machine_info()}; timm {timm.__version__}.\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_keeping_notes(args.out / "timm.md", header + text + "\n")
    meta = {
        "machine": machine_info(), "source": source_info(), "timm": timm.__version__,
        "image_size": args.image_size, "batches": args.batches, "batch_size": args.batch_size,
    }
    (args.out / "timm.json").write_text(json.dumps({"meta": meta, "rows": ordered}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
