"""Seconds per pass of ``fxmerge.merge`` for a few model pairs (random weights, CPU).

Usage:
    python benchmarks/timings.py [--out benchmarks/results]

Writes ``timings.md`` and ``timings.json``: for each pair and method, the wall time of every pass
(trace, depth, dependency, structure, features, width, rewrite, repair) as ``result.timings``
reports it. The matcher against the naive reference is timed by ``bench_matcher.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from homogeneous import machine_info, source_info  # noqa: E402

from fxmerge import merge, zoo  # noqa: E402

PASSES = ("trace", "depth", "dependency", "structure", "features", "width", "rewrite", "repair")


def cases() -> list[tuple[str, list[torch.nn.Module], tuple[int, ...]]]:
    torch.manual_seed(0)
    digits = dict(in_channels=1, image_size=8, num_outputs=10)
    return [
        ("zoo resnet (1,1,1) x2", [zoo.resnet(**digits).eval(), zoo.resnet(**digits).eval()], (64, 1, 8, 8)),
        ("zoo resnet (1,1,1) vs (3,3,3)", [zoo.resnet(**digits).eval(), zoo.resnet(blocks_per_stage=(3, 3, 3), **digits).eval()], (64, 1, 8, 8)),
        ("zoo vit 4 layers x2", [zoo.vit(**digits).eval(), zoo.vit(**digits).eval()], (64, 1, 8, 8)),
        ("torchvision resnet18 x2", [torchvision.models.resnet18(num_classes=10).eval() for _ in range(2)], (16, 3, 64, 64)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, models, shape in cases():
        batches = [torch.randn(*shape) for _ in range(args.batches)]
        for method in ("permute", "zip", "mudsc"):
            result = merge(models, batches, method=method, quiet=True)
            rows.append({"pair": name, "method": method, **{p: result.timings.get(p, 0.0) for p in PASSES},
                         "total": sum(result.timings.values())})
            print(rows[-1], file=sys.stderr)
    lines = [
        "# Seconds per pass of fxmerge.merge",
        "",
        f"Produced by `python benchmarks/timings.py` ({args.batches} calibration batches, random weights, 1 torch thread).",
        "",
        "| pair | method | " + " | ".join(PASSES) + " | total |",
        "|---|---|" + "---:|" * (len(PASSES) + 1),
    ]
    for row in rows:
        lines.append(f"| {row['pair']} | {row['method']} | " + " | ".join(f"{row[p]:.2f}" for p in PASSES) + f" | {row['total']:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timings.md").write_text(text)
    (args.out / "timings.json").write_text(json.dumps({"machine": machine_info(), "source": source_info(), "rows": rows}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
