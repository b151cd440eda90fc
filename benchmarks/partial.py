"""Partial zipping on digits: merge the first units, keep one tail per model.

Usage:
    python benchmarks/partial.py [--seeds 0 1 2] [--out benchmarks/results]

For every seed: train the ResNet task pair of ``fxmerge.experiments`` and evaluate
``merge([A, B], method="zip", stop_at=u)`` for every unit boundary u, full zipping, and the
ensemble of the two separate models (their embeddings averaged: no weights shared). ZipIt!
reports that partial zipping trades parameters for accuracy between these two ends.
Writes ``partial.md`` and ``partial.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from homogeneous import machine_info, source_info  # noqa: E402

from fxmerge import merge, trace  # noqa: E402
from fxmerge.experiments import FAMILIES, calibration_data, evaluate, train_task_models  # noqa: E402
from fxmerge.passes.units import find_units  # noqa: E402


class Ensemble(nn.Module):
    """Both models side by side, embeddings averaged (the 'no merging' end of partial zipping)."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x) + self.b(x)) / 2


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_seed(family: str, seed: int, epochs: int) -> list[dict]:
    models = train_task_models(FAMILIES[family], FAMILIES[family], seed=seed, epochs=epochs)
    calibration = calibration_data(models.split, seed=seed)
    units = find_units(trace(models.model_a, calibration[0]))
    rows = []
    ensemble = Ensemble(models.model_a, models.model_b).eval()
    report = evaluate(ensemble, models.head, models.split)
    rows.append({"name": "Ensemble (A and B, nothing shared)", "stop_at": None, "params": parameters(ensemble), **_flat(report)})
    for index, unit in enumerate(units[:-1]):
        start = time.perf_counter()
        result = merge([models.model_a, models.model_b], calibration, method="zip", stop_at=index, quiet=True)
        report = evaluate(result.module, models.head, models.split)
        rows.append({
            "name": f"Zip up to unit {index} ({unit.end})", "stop_at": index, "params": parameters(result.module),
            "seconds": time.perf_counter() - start, **_flat(report),
        })
    result = merge([models.model_a, models.model_b], calibration, method="zip", quiet=True)
    rows.append({"name": "Full zip", "stop_at": "full", "params": parameters(result.module), **_flat(evaluate(result.module, models.head, models.split))})
    return rows


def _flat(report: dict) -> dict:
    return {"joint": report["joint"], "task_a": report["tasks"][0], "task_b": report["tasks"][1], "average": report["average"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--family", default="resnet", choices=sorted(FAMILIES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    per_seed = {seed: run_seed(args.family, seed, args.epochs) for seed in args.seeds}
    names = [row["name"] for row in per_seed[args.seeds[0]]]
    lines = [
        f"# Partial zipping on digits ({args.family} pair)",
        "",
        f"Produced by `python benchmarks/partial.py` (seeds {' '.join(map(str, args.seeds))}, {args.epochs} epochs). "
        "Test accuracy in %, mean ± std over seeds; params = parameters of the merged GraphModule "
        "(shared trunk + one tail per model).",
        "",
        "| model | params | joint | task A | task B | avg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, name in enumerate(names):
        cells = []
        for column in ("joint", "task_a", "task_b", "average"):
            values = 100 * np.array([per_seed[s][index][column] for s in args.seeds])
            cells.append(f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}")
        lines.append(f"| {name} | {per_seed[args.seeds[0]][index]['params']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "partial.md").write_text(text)
    payload = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "source": source_info(), "results": per_seed}
    (args.out / "partial.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
