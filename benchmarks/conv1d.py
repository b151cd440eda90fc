"""Depth and width heterogeneous merging of Conv1d residual nets on digits read as 1d signals.

Usage:
    python benchmarks/conv1d.py [--seeds 0 1 2] [--out benchmarks/results] [--epochs 10]

The 1d view: each 8x8 digit (N, 1, 8, 8) is read as a signal of 8 channels (its rows) and length 8
(its columns), ``x.flatten(1, 2)`` -> (N, 8, 8), and fed to ``zoo.resnet(..., dims=1)``: Conv1d,
BatchNorm1d, stride-2 stages over the length 8 -> 4 -> 2, global average pooling, a linear head.
Model A is ``resnet((1, 1, 1), 16, dims=1)`` (1 block per stage, stage widths 16/32/64) trained on
task a, model B is ``resnet((2, 2, 2), 16, width_multiplier=2, dims=1)`` (2 blocks per stage,
widths 32/64/128) trained on task b, with the two-task protocol of ``fxmerge.experiments`` (the
helpers of ``benchmarks/width.py``: ``run_pair``, ``checks``); [A, B] is merged in ONE call with
zip, depth aligned by LMA (the default ``depth="lma"``) and width="max" (and width="min" for
reference). Writes ``conv1d.md`` (mean ± sample std over seeds, and every seed's check) and
``conv1d.json`` (every per-seed number, the protocol, the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

# Run from a checkout without installing: make the repository's fxmerge and the shared
# benchmark helpers (benchmarks/homogeneous.py, benchmarks/width.py) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxmerge.experiments import Row  # noqa: E402
from fxmerge.zoo import resnet  # noqa: E402
from homogeneous import COLUMNS, HEADERS, machine_info, source_info  # noqa: E402
from width import Pair, _cell, checks, run_pair  # noqa: E402


class RowsAsChannels(nn.Module):
    """(N, 1, H, W) images -> ``net`` on (N, H, W): H channels (the rows) of length W."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1, 2))


def conv1d_resnet(blocks: tuple[int, ...], multiplier: float, *, in_channels: int, image_size: int, num_outputs: int) -> nn.Module:
    """A factory for ``train_task_models`` (called with the digits' in_channels=1, image_size=8)."""
    net = resnet(
        blocks, 16, width_multiplier=multiplier, dims=1,
        in_channels=in_channels * image_size, image_size=image_size, num_outputs=num_outputs,
    )
    return RowsAsChannels(net)


PAIR = Pair(
    "Conv1d resnet depth+width",
    functools.partial(conv1d_resnet, (1, 1, 1), 1),
    functools.partial(conv1d_resnet, (2, 2, 2), 2),
    "Conv1d ResNet(1,1,1) x1",
    "Conv1d ResNet(2,2,2) x2",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="conv1d", help="output file stem (default conv1d)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=32, help="batches of 64 (the train set has 21)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args(argv)


def _seed_line(seed: int, rows: list[Row]) -> str:
    """One seed's check, with the numbers it rests on (percent)."""
    task_a, task_b, zip_max = rows[0], rows[1], rows[2]
    verdict = checks(rows)
    parts = []
    for column, claim in (("average", "zip_max_avg_beats_both_singles"), ("joint", "zip_max_joint_beats_both_singles")):
        merged, best = 100 * getattr(zip_max, column), 100 * max(getattr(task_a, column), getattr(task_b, column))
        parts.append(f"{column} {merged:.1f} vs best single {best:.1f}: {'holds' if verdict[claim] else 'DOES NOT HOLD'}")
    return f"- seed {seed}: " + "; ".join(parts)


def markdown(per_seed: dict[int, list[Row]], args: argparse.Namespace, machine: dict, total: float) -> str:
    seeds = args.seeds
    lines = [
        "# Conv1d depth + width merging on digits as 1d signals",
        "",
        "Produced by `python benchmarks/conv1d.py` "
        f"(seeds {' '.join(map(str, seeds))}, {args.epochs} epochs, embedding dim {args.embed_dim}, "
        f"{args.calibration_batches} calibration batches of 64, zip alpha {args.alpha}, beta {args.beta}); "
        f"total {total / 60:.1f} min.",
        "",
        "Protocol (`fxmerge.experiments`, as in `benchmarks/width.py`): scikit-learn digits, 10 classes split "
        "into two disjoint 5-class tasks per seed; model A trained on task A, model B on task B, from "
        "different initialisations, one fixed CLIP-style class-embedding head. 1d view: every 8x8 image is "
        "a signal of 8 channels (its rows) of length 8 (its columns), `x.flatten(1, 2)`, fed to "
        "`zoo.resnet(..., dims=1)` (Conv1d + BatchNorm1d BasicBlocks, stride-2 stages, length 8 -> 4 -> 2). "
        "A = `resnet((1, 1, 1), 16, dims=1)` (1 block per stage, widths 16/32/64), B = "
        "`resnet((2, 2, 2), 16, width_multiplier=2, dims=1)` (2 blocks per stage, widths 32/64/128). "
        "Each merge is ONE `fxmerge.merge([A, B], method=\"zip\", depth=\"lma\", width=...)` call: A is "
        "extended with identity blocks to B's depth (LMA), then zipped with B to width=\"max\" (the paper's "
        "r = the largest width) or width=\"min\"; calibration data = the training inputs of both tasks (no "
        "labels), BatchNorm statistics reset on them. Test accuracy in %: joint = argmax over all 10 "
        "classes, task A/B = argmax within the task's own classes, avg = mean of task A and B. Mean ± "
        f"sample std over {len(seeds)} seeds; per-seed numbers in the JSON file.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, python {machine['python']}, "
        f"torch {machine['torch']}, {machine['torch_threads']} torch thread(s).",
        "",
        f"## {PAIR.name}",
        "",
        "| model | " + " | ".join(HEADERS) + " | merge time (s) |",
        "|---|" + "---:|" * (len(HEADERS) + 1),
    ]
    names = [row.name for row in per_seed[seeds[0]]]
    for index, name in enumerate(names):
        cells = [_cell(100 * np.array([getattr(per_seed[s][index], c) for s in seeds])) for c in COLUMNS]
        seconds = [per_seed[s][index].seconds for s in seeds]
        time_cell = "-" if seconds[0] is None else f"{np.mean(seconds):.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {time_cell} |")
    per_seed_checks = {s: checks(per_seed[s]) for s in seeds}
    lines.append("")
    for claim in per_seed_checks[seeds[0]]:
        held = [s for s in seeds if per_seed_checks[s][claim]]
        lines.append(f"- `{claim}`: holds for {len(held)}/{len(seeds)} seeds")
    lines += ["", "Per seed (Zip width=max against the better single model):", ""]
    lines += [_seed_line(s, per_seed[s]) for s in seeds]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed: dict[int, list[Row]] = {}
    for seed in args.seeds:
        began = time.perf_counter()
        per_seed[seed] = run_pair(PAIR, seed, args)
        print(f"seed {seed}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    total = time.perf_counter() - start
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "config": config,
        "machine": machine,
        "source": source_info(),
        "total_seconds": total,
        "pair": {"name": PAIR.name, "a": PAIR.label_a, "b": PAIR.label_b, "view": "8 channels (rows) of length 8"},
        "results": {
            str(seed): {"rows": [dataclasses.asdict(row) for row in rows], "checks": checks(rows)}
            for seed, rows in per_seed.items()
        },
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(per_seed, args, machine, total)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
