"""Depth and width heterogeneous merging of Conv1d residual nets on digits read as 1d signals.

Usage:
    python benchmarks/conv1d.py [--seeds 0 1 2] [--width-multiplier 4] [--epochs 15] [--pairs ...]
                                [--out benchmarks/results] [--threads 1]

The 1d view: each 8x8 digit (N, 1, 8, 8) is read as a signal of 8 channels (its rows) and length 8
(its columns), ``x.flatten(1, 2)`` -> (N, 8, 8), and fed to ``zoo.resnet(..., dims=1)``: Conv1d,
BatchNorm1d, stride-2 stages over the length 8 -> 4 -> 2, global average pooling, a linear head.
With m = ``--width-multiplier`` (default 4: the papers' widths) the pairs are

* ``depth_width``: A = ``resnet((1, 1, 1), 16, width_multiplier=m, dims=1)`` (1 block per stage) vs
  B = ``resnet((2, 2, 2), 16, width_multiplier=2m, dims=1)`` (2 blocks per stage, twice as wide),
  merged in ONE call: depth aligned by LMA (the default ``depth="lma"``), then width;
* ``width``: ``resnet((1, 1, 1), 16, dims=1)`` at x(m) vs x(2m) (width only).

A is trained on task a, B on task b, with the two-task protocol of ``fxmerge.experiments`` (the
helpers of ``benchmarks/width.py``: ``run_pairs``, ``pair_claims``); [A, B] is merged with zip at
width="max" (and width="min" for reference), against the ensemble of A and B
(``fxmerge.experiments.evaluate_ensemble``). Writes ``conv1d.md`` (mean ± sample std over seeds,
every claim checked per seed and on the means) and ``conv1d.json`` (every per-seed number, the
protocol, the machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

# Run from a checkout without installing: make the repository's fxmerge and the shared
# benchmark helpers (benchmarks/homogeneous.py, benchmarks/width.py) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxmerge.experiments import Row  # noqa: E402
from fxmerge.zoo import resnet  # noqa: E402
from homogeneous import digits_protocol_parser, machine_info, source_info  # noqa: E402
from width import (  # noqa: E402
    Pair, _x, claims_markdown, command_line, mean_rows, pair_claims, results_json, run_pairs, table_markdown,
)


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


def pairs(m: float) -> dict[str, Pair]:
    """The Conv1d pairs at width multiplier ``m`` (see the module docstring)."""
    return {
        "depth_width": Pair(
            f"Conv1d resnet depth+width {_x(m)}/{_x(2 * m)}",
            functools.partial(conv1d_resnet, (1, 1, 1), m),
            functools.partial(conv1d_resnet, (2, 2, 2), 2 * m),
            f"Conv1d ResNet(1,1,1) {_x(m)}",
            f"Conv1d ResNet(2,2,2) {_x(2 * m)}",
        ),
        "width": Pair(
            f"Conv1d resnet width {_x(m)}/{_x(2 * m)}",
            functools.partial(conv1d_resnet, (1, 1, 1), m),
            functools.partial(conv1d_resnet, (1, 1, 1), 2 * m),
            f"Conv1d ResNet(1,1,1) {_x(m)}",
            f"Conv1d ResNet(1,1,1) {_x(2 * m)}",
        ),
    }


PAIR_KEYS = tuple(pairs(4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = digits_protocol_parser(__doc__.split("\n\n")[0], name="conv1d", epochs=15)
    parser.add_argument("--pairs", nargs="+", default=list(PAIR_KEYS), choices=list(PAIR_KEYS))
    parser.add_argument("--width-multiplier", type=float, default=4.0,
                        help="m: model A at x(m), model B at x(2m) (default 4)")
    return parser.parse_args(argv)


def markdown(results: dict[str, dict[int, list[Row]]], args: argparse.Namespace, machine: dict, command: str,
             total: float) -> str:
    seeds, table = args.seeds, pairs(args.width_multiplier)
    lines = [
        "# Conv1d depth + width merging on digits as 1d signals",
        "",
        f"Reproduce: `{command}` ({total / 60:.1f} min on the machine below).",
        "",
        f"Seeds {' '.join(map(str, seeds))}, {args.epochs} training epochs, width multiplier m = "
        f"{args.width_multiplier:g}, embedding dim {args.embed_dim}, {args.calibration_batches} calibration "
        f"batches of 64, zip alpha {args.alpha}, beta {args.beta}.",
        "",
        "Protocol (`fxmerge.experiments`, as in `benchmarks/width.py`): scikit-learn digits, 10 classes split "
        "into two disjoint 5-class tasks per seed; model A trained on task A, model B on task B, from "
        "different initialisations, one fixed CLIP-style class-embedding head. 1d view: every 8x8 image is "
        "a signal of 8 channels (its rows) of length 8 (its columns), `x.flatten(1, 2)`, fed to "
        "`zoo.resnet(..., dims=1)` (Conv1d + BatchNorm1d BasicBlocks, stride-2 stages, length 8 -> 4 -> 2; "
        "stage widths 16/32/64 times the multiplier). The depth+width pair is merged in ONE "
        "`fxmerge.merge([A, B], method=\"zip\", depth=\"lma\", width=...)` call: A is extended with "
        "identity blocks to B's depth (LMA), then zipped with B to width=\"max\" (the paper's r = the "
        "largest width) or width=\"min\"; calibration data = the training inputs of both tasks (no "
        "labels), BatchNorm statistics reset on them. Ensemble = `fxmerge.experiments.evaluate_ensemble` "
        "(A and B both run, logits under the shared head averaged: the upper reference of the per-task "
        "average; not always of the joint accuracy, see `width.md`). Test accuracy "
        "in %: joint = argmax over all 10 classes, task A/B = argmax within the task's own classes, avg = "
        f"mean of task A and B. Mean ± sample std over {len(seeds)} seeds; per-seed numbers in the JSON file.",
        "",
        "Claims checked (on the means and on each seed): Table III's (the width=max zip beats both single "
        "models, joint and per-task average; r = the largest width beats the smallest) and issue 13's bar "
        "(within 2 points of the ensemble's per-task average).",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, python {machine['python']}, "
        f"torch {machine['torch']}, {machine['torch_threads']} torch thread(s).",
    ]
    for key, per_seed in results.items():
        lines += ["", f"## {table[key].name}", ""] + table_markdown(per_seed) + [""]
        lines += claims_markdown({s: pair_claims(per_seed[s]) for s in seeds}, pair_claims(mean_rows(per_seed)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("conv1d.py", argv)
    table = pairs(args.width_multiplier)
    start = time.perf_counter()
    results = run_pairs(table, args)
    total = time.perf_counter() - start
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "command": command,
        "config": config,
        "machine": machine,
        "source": source_info(),
        "total_seconds": total,
        "view": "8 channels (rows) of length 8",
        **results_json(results, table),
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(results, args, machine, command, total)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
