"""How much of a merge's time is the machine handing out fresh memory (issue 12).

Usage:
    python benchmarks/first_touch.py [--cases resnet18 vit-tiny vit-b16] [--out benchmarks/results]

Two measurements, each in a fresh process, one torch thread:

* the machine: ``--blocks`` float64 (6144, 6144) tensors (302 MB each, the joint covariance of a
  ViT-B/16 MLP group) allocated with ``torch.zeros`` and kept, against zeroing one that is
  already resident (``zero_()``): the first costs a page fault per 4 KiB page, the second none;
* a merge: the pair and data of ``benchmarks/speed.py`` (random init, seeds 0 and 1, 8 batches of
  16 x 3 x 64 x 64, zip), merged once to warm up and once measured: the process's minor page
  faults (``ru_minflt``, 4 KiB each: memory the merge touched for the first time) and kernel
  seconds (``ru_stime``) in each stage, with the stage's seconds.

Writes ``first_touch.md`` and ``first_touch.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGE_FUNCTIONS = {  # fxmerge.api's stage functions -> result.timings' names
    "trace_models": "trace", "collect_statistics": "features", "match_widths": "width", "rewrite": "rewrite",
    "repair_stage": "repair",
}
GiB = 2**30
PAGE = resource.getpagesize()


def _usage() -> tuple[int, float]:
    """(minor page faults, kernel seconds) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def child_machine(blocks: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    kept = []
    start = time.perf_counter()
    for _ in range(blocks):
        kept.append(torch.zeros(6144, 6144, dtype=torch.float64))
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    for block in kept:
        block.zero_()
    resident = time.perf_counter() - start
    size = blocks * kept[0].numel() * 8 / GiB
    return {"GiB": size, "fresh_s": fresh, "resident_s": resident}


def child_merge(case: str) -> dict[str, Any]:
    import warnings

    import torch

    import fxmerge
    import fxmerge.api
    from speed import build

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the starved-group warnings of random-init pairs
    models = [build(case, seed) for seed in (0, 1)]
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 3, 64, 64, generator=generator) for _ in range(8)]
    used: dict[str, tuple[int, float]] = {}
    for function, stage in STAGE_FUNCTIONS.items():
        original = getattr(fxmerge.api, function)

        def counted(*args: Any, _original: Any = original, _stage: str = stage, **kwargs: Any) -> Any:
            before = _usage()
            try:
                return _original(*args, **kwargs)
            finally:
                after, previous = _usage(), used.get(_stage, (0, 0.0))
                used[_stage] = (previous[0] + after[0] - before[0], previous[1] + after[1] - before[1])

        setattr(fxmerge.api, function, counted)
    fxmerge.merge(models, batches, method="zip", quiet=True, threads=1)  # warm-up
    used.clear()
    before = _usage()
    start = time.perf_counter()
    result = fxmerge.merge(models, batches, method="zip", quiet=True, threads=1)
    seconds = time.perf_counter() - start
    after = _usage()
    return {
        "case": case, "merge_s": seconds, "GiB": (after[0] - before[0]) * PAGE / GiB, "kernel_s": after[1] - before[1],
        "stages": {
            stage: {"GiB": faults * PAGE / GiB, "kernel_s": kernel, "s": result.timings.get(stage, 0.0)}
            for stage, (faults, kernel) in used.items()
        },
    }


def _run_child(*argv: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(machine_row: dict[str, Any], rows: list[dict[str, Any]], command: str) -> str:
    from homogeneous import machine_info

    fresh_rate = machine_row["GiB"] / machine_row["fresh_s"]
    resident_rate = machine_row["GiB"] / machine_row["resident_s"]
    lines = [
        "# Fresh memory: what first touching pages costs a merge",
        "",
        f"Produced by `{command}`. Machine: {({**machine_info(), 'torch_threads': 1})}.",
        "",
        f"**This machine:** {machine_row['GiB']:.1f} GiB of `torch.zeros` float64 (6144, 6144) blocks, kept: "
        f"{machine_row['fresh_s']:.2f} s ({fresh_rate:.2f} GiB/s); zeroing the same blocks once resident: "
        f"{machine_row['resident_s']:.2f} s ({resident_rate:.1f} GiB/s), {resident_rate / fresh_rate:.0f}x faster.",
        "",
        "**Merges** (the pairs and data of `speed.py`, zip, 1 thread, the second of two merges in one process): "
        "the GiB of pages the merge touched for the first time (minor page faults x 4 KiB: a transparent huge page, "
        "which numpy asks for on large arrays, counts as one fault, so this undercounts), the seconds the kernel "
        "spent for the process meanwhile (`ru_stime`: mostly those faults) and the wall seconds; per stage as "
        "GiB / kernel s / wall s.",
        "",
        "| pair | merge (s) | fresh GiB | kernel (s) | " + " | ".join(STAGE_FUNCTIONS.values()) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(STAGE_FUNCTIONS),
    ]
    for row in rows:
        cells = []
        for stage in STAGE_FUNCTIONS.values():
            entry = row["stages"].get(stage, {"GiB": 0.0, "kernel_s": 0.0, "s": 0.0})
            cells.append(f"{entry['GiB']:.2f} / {entry['kernel_s']:.2f} / {entry['s']:.2f}")
        lines.append(
            f"| {row['case']} | {row['merge_s']:.2f} | {row['GiB']:.2f} | {row['kernel_s']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["resnet18", "vit-tiny", "vit-b16"])
    parser.add_argument("--blocks", type=int, default=16, help="302 MB blocks of the machine measurement (default 16)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, value = args.child
        print(json.dumps(child_machine(int(value)) if kind == "machine" else child_merge(value)))
        return 0
    machine_row = _run_child("machine", str(args.blocks))
    rows = [_run_child("merge", case) for case in args.cases]
    command = "python benchmarks/first_touch.py" + (f" --cases {' '.join(args.cases)}" if args.cases != parser.get_default("cases") else "")
    command += f" --blocks {args.blocks}" if args.blocks != parser.get_default("blocks") else ""
    text = markdown(machine_row, rows, command)
    from homogeneous import write_keeping_notes

    args.out.mkdir(parents=True, exist_ok=True)
    write_keeping_notes(args.out / "first_touch.md", text)
    (args.out / "first_touch.json").write_text(json.dumps({"machine": machine_row, "rows": rows}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
