"""Width-heterogeneous merging on digits: the analogue of Table III of the heterogeneous paper.

Usage:
    python benchmarks/width.py [--seeds 0 1 2] [--out benchmarks/results] [--epochs 10] [--skip-torchvision]

For every seed and pair below, model A (the narrower) is trained on digits task a and model B (the
wider) on task b with the protocol of ``fxmerge.experiments`` (different initialisations, one shared
CLIP-style head), then [A, B] is merged with zip (elastic neuron zipping) at width="max" (the
paper's r = largest width) and, for reference, at width="min". Pairs:

* resnet x1/x2, resnet x2/x4: ``zoo.resnet((1, 1, 1), 16)`` at width multipliers 1 and 2, 2 and 4;
* vgg x1/x2: the VGG of ``fxmerge.experiments.FAMILIES`` at multipliers 1 and 2;
* resnet depth+width: ``zoo.resnet((1, 1, 1), 16)`` x1 vs ``zoo.resnet((2, 2, 2), 16)`` x2, merged in
  one call (depth aligned by LMA, then width).

Writes ``width.md`` (mean ± sample std over seeds) and ``width.json`` (every per-seed number, the
protocol, the machine). Unless ``--skip-torchvision``, also times one merge of torchvision's
``resnet50`` with ``wide_resnet50_2`` (random weights, 2 calibration batches of 4x3x32x32) at
width="max" and "min" and records the widths of a few groups (too slow for the test suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Run from a checkout without installing: make the repository's fxmerge and the shared
# benchmark helpers (benchmarks/homogeneous.py) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxmerge.experiments import FAMILIES, Row, compare, train_task_models  # noqa: E402
from fxmerge.zoo import resnet  # noqa: E402
from homogeneous import COLUMNS, HEADERS, machine_info, source_info  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two model factories (A narrower, B wider); ``label_a``/``label_b`` name them in the table."""

    name: str
    factory_a: Callable[..., torch.nn.Module]
    factory_b: Callable[..., torch.nn.Module]
    label_a: str
    label_b: str


def _resnet(blocks: tuple[int, ...], multiplier: float) -> Callable[..., torch.nn.Module]:
    return functools.partial(resnet, blocks, 16, width_multiplier=multiplier)


def _vgg(multiplier: float) -> Callable[..., torch.nn.Module]:
    return functools.partial(FAMILIES["vgg"], width_multiplier=multiplier)


PAIRS: dict[str, Pair] = {
    "resnet_x1_x2": Pair("resnet x1/x2", _resnet((1, 1, 1), 1), _resnet((1, 1, 1), 2), "ResNet x1", "ResNet x2"),
    "resnet_x2_x4": Pair("resnet x2/x4", _resnet((1, 1, 1), 2), _resnet((1, 1, 1), 4), "ResNet x2", "ResNet x4"),
    "vgg_x1_x2": Pair("vgg x1/x2", _vgg(1), _vgg(2), "VGG x1", "VGG x2"),
    "resnet_depth_width": Pair(
        "resnet depth+width", _resnet((1, 1, 1), 1), _resnet((2, 2, 2), 2), "ResNet(1,1,1) x1", "ResNet(2,2,2) x2"
    ),
}

MERGES = (("max", "Zip width=max"), ("min", "Zip width=min"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="width", help="output file stem (default width)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=32, help="batches of 64 (the train set has 21)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--skip-torchvision", action="store_true", help="skip the resnet50 + wide_resnet50_2 timing")
    return parser.parse_args(argv)


def run_pair(pair: Pair, seed: int, args: argparse.Namespace) -> list[Row]:
    """Rows: model A, model B, then one zip merge per entry of ``MERGES``."""
    models = train_task_models(pair.factory_a, pair.factory_b, seed=seed, epochs=args.epochs, embed_dim=args.embed_dim)
    rows: list[Row] = []
    for width, label in MERGES:
        merged = compare(
            models, ("zip",), calibration_batches=args.calibration_batches, seed=seed,
            width=width, alpha=args.alpha, beta=args.beta,
        )
        if not rows:
            rows += [
                dataclasses.replace(merged[0], name=f"Task A: {pair.label_a}"),
                dataclasses.replace(merged[1], name=f"Task B: {pair.label_b}"),
            ]
        rows.append(dataclasses.replace(merged[2], name=label))
    return rows


def checks(rows: list[Row]) -> dict[str, bool]:
    """The claims of Table III, for one seed: the width=max zip beats both single models."""
    task_a, task_b, zip_max = rows[0], rows[1], rows[2]
    return {
        "zip_max_avg_beats_both_singles": zip_max.average > max(task_a.average, task_b.average),
        "zip_max_joint_beats_both_singles": zip_max.joint > max(task_a.joint, task_b.joint),
    }


def torchvision_timing() -> dict:
    """One merge of resnet50 with wide_resnet50_2 per width policy: seconds, pass timings, widths."""
    import torchvision.models as tvm

    from fxmerge.api import merge

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    torch.manual_seed(0)
    narrow, wide = tvm.resnet50().eval(), tvm.wide_resnet50_2().eval()
    watched = ("layer1.0.conv1:out", "layer1.0.conv3:out", "layer4.0.conv2:out", "layer4.0.conv3:out")
    out = {}
    for width in ("max", "min"):
        start = time.perf_counter()
        result = merge([narrow, wide], batches, method="zip", width=width, calibration_batches=2, quiet=True)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            y = result.module(batches[0])
        groups = {g.name: {"sizes": list(g.sizes), "width": g.width} for g in result.groups if g.name in watched}
        out[width] = {
            "seconds": seconds,
            "timings": result.timings,
            "groups": groups,
            "output_finite": bool(torch.isfinite(y).all()),
            "layer4.0.conv2.weight": list(result.module.get_submodule("layer4.0.conv2").weight.shape),
        }
        print(f"torchvision width={width}: {seconds:.1f} s", file=sys.stderr)
    return out


def _cell(values: np.ndarray) -> str:
    return f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}"


def markdown(results: dict[str, dict[int, list[Row]]], args: argparse.Namespace, machine: dict, tv: dict | None) -> str:
    seeds = args.seeds
    lines = [
        "# Width-heterogeneous merging on digits (Table III analogue)",
        "",
        "Produced by `python benchmarks/width.py` "
        f"(seeds {' '.join(map(str, seeds))}, {args.epochs} epochs, embedding dim {args.embed_dim}, "
        f"{args.calibration_batches} calibration batches of 64, zip alpha {args.alpha}, beta {args.beta}).",
        "",
        "Protocol (`fxmerge.experiments`, as in `benchmarks/homogeneous.py`): scikit-learn digits, 10 "
        "classes split into two disjoint 5-class tasks per seed; model A (the narrower) trained on task A, "
        "model B (the wider) on task B, from different initialisations, one fixed CLIP-style "
        "class-embedding head. Test accuracy in %: joint = argmax over all 10 classes, task A/B = argmax "
        "within the task's own classes, avg = mean of task A and B. Mean ± sample std over "
        f"{len(seeds)} seeds; per-seed numbers in the JSON file. Zip = elastic neuron zipping of [A, B] "
        "to width=\"max\" (the paper's r = the largest width) or width=\"min\"; calibration data = the "
        "training inputs of both tasks (no labels). Width multipliers scale every layer of "
        "`zoo.resnet((1, 1, 1), 16)` (stage widths 16/32/64 at x1) or of the VGG "
        "(16/32/64 convs, 64 hidden at x1). The depth+width pair is merged in one call: depth aligned "
        "by LMA, then width.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, python {machine['python']}, "
        f"torch {machine['torch']}, {machine['torch_threads']} torch thread(s).",
    ]
    for key, per_seed in results.items():
        names = [row.name for row in next(iter(per_seed.values()))]
        lines += ["", f"## {PAIRS[key].name}", "", "| model | " + " | ".join(HEADERS) + " | merge time (s) |",
                  "|---|" + "---:|" * (len(HEADERS) + 1)]
        for index, name in enumerate(names):
            cells = [_cell(100 * np.array([getattr(per_seed[s][index], c) for s in seeds])) for c in COLUMNS]
            seconds = [per_seed[s][index].seconds for s in seeds]
            time_cell = "-" if seconds[0] is None else f"{np.mean(seconds):.2f}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {time_cell} |")
        per_seed_checks = {s: checks(per_seed[s]) for s in seeds}
        lines.append("")
        for claim in next(iter(per_seed_checks.values())):
            held = [s for s in seeds if per_seed_checks[s][claim]]
            lines.append(f"- `{claim}`: holds for {len(held)}/{len(seeds)} seeds")
    if tv is not None:
        lines += [
            "",
            "## torchvision resnet50 + wide_resnet50_2 (timing only)",
            "",
            "Random weights, 2 calibration batches of 4x3x32x32, method zip. Too slow for the test suite.",
            "",
            "| width | merge time (s) | pass timings (s) | layer1.0.conv1:out | layer4.0.conv2:out | layer4.0.conv3:out |",
            "|---|---:|---|---|---|---|",
        ]
        for width, info in tv.items():
            passes = ", ".join(f"{k} {v:.1f}" for k, v in info["timings"].items())
            cells = [
                f"{tuple(info['groups'][g]['sizes'])} -> {info['groups'][g]['width']}"
                for g in ("layer1.0.conv1:out", "layer4.0.conv2:out", "layer4.0.conv3:out")
            ]
            lines.append(f"| {width} | {info['seconds']:.1f} | {passes} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, dict[int, list[Row]]] = {}
    for key in args.pairs:
        results[key] = {}
        for seed in args.seeds:
            began = time.perf_counter()
            results[key][seed] = run_pair(PAIRS[key], seed, args)
            print(f"{key} seed {seed}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    tv = None if args.skip_torchvision else torchvision_timing()
    total = time.perf_counter() - start
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "config": config,
        "machine": machine,
        "source": source_info(),
        "total_seconds": total,
        "pairs": {key: {"name": PAIRS[key].name, "a": PAIRS[key].label_a, "b": PAIRS[key].label_b} for key in results},
        "results": {
            key: {
                str(seed): {"rows": [dataclasses.asdict(row) for row in rows], "checks": checks(rows)}
                for seed, rows in per_seed.items()
            }
            for key, per_seed in results.items()
        },
        "torchvision": tv,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(results, args, machine, tv)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
