"""Regenerate every results table and plot under benchmarks/results/ with one command.

Usage:
    python benchmarks/run_all.py [--only NAME ...] [--quick]

Runs each benchmark script in its own process (so peak-memory figures are per script) and stops
at the first failure. ``--quick`` passes one seed to the accuracy benchmarks (a smoke run: the
committed tables use three seeds, depth.md five).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "coverage": ["coverage.py"],
    "torchvision": ["torchvision_models.py"],
    "matcher": ["bench_matcher.py", "--sizes", "256", "512", "1024", "2048", "4096", "--naive-max", "2048", "--memory",
                "--match-sizes", "64", "128", "256", "512", "768", "--cold", "--json", str(HERE / "results" / "matcher.json")],
    "homogeneous": ["homogeneous.py"],
    "depth": ["depth.py", "--seeds", "0", "1", "2", "3", "4", "--families", "resnet", "vgg", "--no-barrier"],
    "depth_vit": ["depth.py", "--families", "vit", "--no-barrier", "--name", "depth_vit"],
    "depth_choice": ["depth.py", "--families", "vgg-2v3", "resnet-2v3", "--no-barrier", "--name", "depth_choice"],
    "width": ["width.py"],
    "conv1d": ["conv1d.py"],
    "partial": ["partial.py"],
    "repair": ["repair.py"],
    "landscape": ["landscape.py"],
    "threads": ["threads.py", "--busy", "2", "--repeats", "3"],
    "timings": ["timings.py"],
    "speed": ["speed.py", "--cases", "resnet18", "vit-tiny", "resnet50", "vit-b16", "--zipit-model"],
    "memory": ["memory.py"],
    "properties": ["properties.py"],
    "timm": ["timm_models.py"],
    "first_touch": ["first_touch.py"],
}
SEEDED = {"homogeneous", "depth", "depth_choice", "depth_vit", "width", "conv1d", "partial", "repair"}
CAPTURED = {"matcher": HERE / "results" / "matcher.md"}  # scripts that print their table only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS))
    parser.add_argument("--quick", action="store_true", help="one seed for the accuracy tables")
    args = parser.parse_args(argv)
    for name in args.only or list(SCRIPTS):
        command = [sys.executable, str(HERE / SCRIPTS[name][0]), *SCRIPTS[name][1:]]
        if not (HERE / SCRIPTS[name][0]).exists():
            print(f"== {name}: {SCRIPTS[name][0]} missing, skipped", flush=True)
            continue
        if args.quick and name in SEEDED:
            command += ["--seeds", "0"]  # the last --seeds wins (argparse)
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        if name in CAPTURED:
            completed = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
            sys.stdout.write(completed.stdout)
            CAPTURED[name].write_text(completed.stdout)
        else:
            completed = subprocess.run(command, cwd=HERE.parent)
        if completed.returncode != 0:
            print(f"== {name} failed", flush=True)
            return 1
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
