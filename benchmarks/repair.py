"""repair="bn" / "none" / "repair" and the data-free merge, on digits: a BN ResNet pair and a
LayerNorm ViT pair (two tasks, ZipIt protocol).

Usage:
    python benchmarks/repair.py [--seeds 0 1 2] [--out benchmarks/results] [--epochs 10] [--vit-epochs 20]

For every seed and family: train model A on digits task a and B on task b
(``fxmerge.experiments.train_task_models``; the ResNet of ``FAMILIES["resnet"]``, and a
torchvision ViT from ``fxmerge.zoo.vit``: patch 2, 2 layers, 2 heads, width 32, MLP 64, LayerNorm,
no BatchNorm), then merge [A, B] with permute and zip under repair="bn", "none" and "repair", and
data-free (``calibration=None``: weight matching, statistics kept). Joint (10-way) and per-task
average (5-way) test accuracy. Writes ``repair.md`` (mean ± sample std over seeds) and
``repair.json`` (per-seed numbers).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxmerge.api import merge  # noqa: E402
from fxmerge.experiments import FAMILIES, calibration_data, evaluate, train_task_models  # noqa: E402
from fxmerge.passes.repair import reset_batchnorm  # noqa: E402
from fxmerge.zoo import vit  # noqa: E402
from homogeneous import write_keeping_notes  # noqa: E402

VIT = functools.partial(vit, patch_size=2, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
MODELS = {"resnet": FAMILIES["resnet"], "vit": VIT}
# (label, method, repair, data-free: False | True | "then bn": data-free matching, then the
# BatchNorm statistics recomputed on the calibration data — a diagnostic that splits the data-free
# loss into matching and statistics; it uses data, so it is not a data-free merge)
VARIANTS = (
    ("permute, repair=bn", "permute", "bn", False),
    ("permute, repair=none", "permute", "none", False),
    ("permute, repair=repair", "permute", "repair", False),
    ("permute, data-free", "permute", "none", True),
    ("permute, data-free matching, then bn (diagnostic)", "permute", "none", "then bn"),
    ("zip, repair=bn", "zip", "bn", False),
    ("zip, repair=none", "zip", "none", False),
    ("zip, repair=repair", "zip", "repair", False),
    ("zip, data-free", "zip", "none", True),
    ("zip, data-free matching, then bn (diagnostic)", "zip", "none", "then bn"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--epochs", type=int, default=10, help="ResNet training epochs")
    parser.add_argument("--vit-epochs", type=int, default=20, help="ViT training epochs")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches of 64")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, dict[int, list[dict]]]:
    results: dict[str, dict[int, list[dict]]] = {}
    for family in args.families:
        results[family] = {}
        epochs = args.vit_epochs if family == "vit" else args.epochs
        for seed in args.seeds:
            start = time.perf_counter()
            tm = train_task_models(MODELS[family], MODELS[family], seed=seed, epochs=epochs)
            calibration = calibration_data(tm.split, seed=seed, num_batches=args.calibration_batches)
            rows = []
            for name, model in (("Task A model", tm.model_a), ("Task B model", tm.model_b)):
                report = evaluate(model, tm.head, tm.split)
                rows.append({"model": name, "joint": report["joint"], "average": report["average"], "seconds": None})
            for label, method, repair, data_free in VARIANTS:
                begin = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = merge(
                        [tm.model_a, tm.model_b], None if data_free else calibration, method=method, repair=repair,
                        example_input=calibration[0][:1] if data_free else None, quiet=True,
                        calibration_batches=args.calibration_batches,
                    )
                if data_free == "then bn":
                    reset_batchnorm(result.module, calibration, quiet=True)
                seconds = time.perf_counter() - begin
                report = evaluate(result.module, tm.head, tm.split)
                unrescaled = sorted({str(w.message).split("'")[3] for w in caught if "repair='repair': node" in str(w.message)})
                rows.append({
                    "model": label, "joint": report["joint"], "average": report["average"], "seconds": seconds,
                    "not_rescaled": unrescaled,
                })
            results[family][seed] = rows
            print(f"{family} seed {seed}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return results


def cell(values: list[float]) -> str:
    array = 100 * np.array(values)
    return f"{array.mean():.1f} ± {array.std(ddof=1) if len(array) > 1 else 0.0:.1f}"


def markdown(results: dict[str, dict[int, list[dict]]], args: argparse.Namespace, command: str) -> str:
    seeds = args.seeds
    lines = [
        "# repair= modes and the data-free merge on digits",
        "",
        f"Produced by `{command}` ({platform.platform()}, torch {torch.__version__}, {args.threads} thread(s)).",
        "",
        "Protocol (`fxmerge.experiments`): digits split into two disjoint 5-class tasks per seed, model A "
        "trained on task A and model B on task B (different initialisations, one fixed CLIP-style head). "
        f"ResNet: `FAMILIES['resnet']` (BatchNorm), {args.epochs} epochs; ViT: torchvision ViT via "
        "`fxmerge.zoo.vit` (patch 2, 2 layers, 2 heads, width 32, MLP 64; LayerNorm, no BatchNorm), "
        f"{args.vit_epochs} epochs. Calibration: {args.calibration_batches} batches of 64 training inputs "
        "(no labels). Data-free rows get no calibration data (weight matching; statistics kept), only "
        "an example input for its shape; the diagnostic rows recompute the BatchNorm statistics of a "
        "data-free merge on the calibration data (matching without data, statistics with data). Test accuracy in %: joint = argmax over all 10 classes, "
        f"avg = mean per-task accuracy (argmax within the task's 5 classes). Mean ± sample std over "
        f"{len(seeds)} seeds ({' '.join(map(str, seeds))}); per-seed numbers in repair.json.",
    ]
    for family, per_seed in results.items():
        names = [row["model"] for row in per_seed[seeds[0]]]
        lines += ["", f"## {family}", "", "| model | joint | per-task avg | merge time (s) |", "|---|---:|---:|---:|"]
        for index, name in enumerate(names):
            rows = [per_seed[s][index] for s in seeds]
            time_cell = "-" if rows[0]["seconds"] is None else f"{np.mean([r['seconds'] for r in rows]):.2f}"
            lines.append(f"| {name} | {cell([r['joint'] for r in rows])} | {cell([r['average'] for r in rows])} | {time_cell} |")
        skipped = sorted({n for s in seeds for r in per_seed[s] for n in r.get("not_rescaled", [])})
        if skipped:
            lines += ["", f"repair='repair' could not rescale (warned, left as merged): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/repair.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_keeping_notes(args.out / "repair.md", markdown(results, args, command))
    (args.out / "repair.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print((args.out / "repair.md").read_text())


if __name__ == "__main__":
    main()
