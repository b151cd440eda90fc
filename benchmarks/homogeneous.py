"""Merging two models of the same architecture trained on different tasks (digits, ZipIt protocol).

Usage:
    python benchmarks/homogeneous.py [--seeds 0 1 2] [--out benchmarks/results] [--epochs 10]

For every seed and family (a ResNet pair and a VGG pair, see ``fxmerge.experiments.FAMILIES``):
train model A on digits task a and model B on task b (different initialisations, shared
CLIP-style head), merge [A, B] with average, permute, zip and MuDSC (balance 0.5), and evaluate
joint (10-way) and per-task (5-way) test accuracy. Writes ``homogeneous.md`` (mean ± sample std
over seeds) and ``homogeneous.json`` (every per-seed number, the protocol, the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Run from a checkout without installing: make the repository's fxmerge importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxmerge.experiments import FAMILIES, Row, compare, train_task_models  # noqa: E402

METHODS = ("average", "permute", "zip", "mudsc")
COLUMNS = ("joint", "task_a", "task_b", "average")
HEADERS = ("joint", "task A", "task B", "avg")


def digits_protocol_parser(description: str, *, name: str, epochs: int) -> argparse.ArgumentParser:
    """The options every digits merging benchmark shares (``fxmerge.experiments``' protocol):
    seeds, output folder and file stem, training epochs, head embedding size, calibration
    batches, zip's alpha/beta and the torch thread count; the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default=name, help=f"output file stem (default {name})")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=32, help="batches of 64 (the train set has 21)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = digits_protocol_parser(__doc__.split("\n\n")[0], name="homogeneous", epochs=10)
    parser.add_argument("--families", nargs="+", default=["resnet", "vgg"], choices=sorted(FAMILIES))
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--balance", type=float, default=0.5, help="MuDSC weight-vs-activation factor")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, dict[int, list[Row]]]:
    """family -> seed -> rows (Task A model, Task B model, then one per method)."""
    results: dict[str, dict[int, list[Row]]] = {}
    for family in args.families:
        factory = functools.partial(FAMILIES[family], width_multiplier=args.width_multiplier)
        results[family] = {}
        for seed in args.seeds:
            start = time.perf_counter()
            models = train_task_models(factory, factory, seed=seed, epochs=args.epochs, embed_dim=args.embed_dim)
            rows = compare(
                models, METHODS, calibration_batches=args.calibration_batches, seed=seed,
                alpha=args.alpha, beta=args.beta, balance=args.balance,
            )
            results[family][seed] = rows
            print(f"{family} seed {seed}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results


def _by_name(rows: list[Row]) -> dict[str, Row]:
    return {row.name: row for row in rows}


def checks(rows: list[Row]) -> dict[str, bool]:
    """The claims the benchmark tests, for one seed."""
    named = _by_name(rows)
    best_single = max(named["Task A model"].average, named["Task B model"].average)
    return {
        "zip_avg_beats_best_single": named["Zip"].average > best_single,
        "zip_avg_beats_permute": named["Zip"].average > named["Permute"].average,
        "zip_joint_beats_average": named["Zip"].joint > named["Average"].joint,
        "zip_joint_beats_best_single": named["Zip"].joint > max(named["Task A model"].joint, named["Task B model"].joint),
    }


def markdown(results: dict[str, dict[int, list[Row]]], args: argparse.Namespace, machine: dict) -> str:
    seeds = args.seeds
    lines = [
        "# Homogeneous merging on digits (two tasks, same architecture)",
        "",
        "Produced by `python benchmarks/homogeneous.py` "
        f"(seeds {' '.join(map(str, seeds))}, {args.epochs} epochs, embedding dim {args.embed_dim}, "
        f"width multiplier {args.width_multiplier}, {args.calibration_batches} calibration batches of 64, "
        f"alpha {args.alpha}, beta {args.beta}, MuDSC balance {args.balance}).",
        "",
        "Protocol (`fxmerge.experiments`): scikit-learn digits, 10 classes split into two disjoint "
        "5-class tasks per seed; model A trained on task A, model B on task B, from different "
        "initialisations, both with one fixed CLIP-style class-embedding head. Test accuracy in %: "
        "joint = argmax over all 10 classes, task A/B = argmax within the task's own classes, "
        f"avg = mean of task A and B. Mean ± sample std over {len(seeds)} seeds; per-seed numbers in "
        "the JSON file. Merges use the training inputs of both tasks as calibration data (no labels); "
        "zip is full zipping (no partial zipping).",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['torch_threads']} torch thread(s).",
    ]
    for family, per_seed in results.items():
        names = [row.name for row in next(iter(per_seed.values()))]
        lines += ["", f"## {family}", "", "| model | " + " | ".join(HEADERS) + " | merge time (s) |",
                  "|---|" + "---:|" * (len(HEADERS) + 1)]
        for index, name in enumerate(names):
            cells = []
            for column in COLUMNS:
                values = 100 * np.array([getattr(per_seed[s][index], column) for s in seeds])
                cells.append(f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}")
            seconds = [per_seed[s][index].seconds for s in seeds]
            time_cell = "-" if seconds[0] is None else f"{np.mean(seconds):.2f}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {time_cell} |")
        per_seed_checks = {s: checks(per_seed[s]) for s in seeds}
        lines += [""]
        for claim in next(iter(per_seed_checks.values())):
            held = [s for s in seeds if per_seed_checks[s][claim]]
            lines.append(f"- `{claim}`: holds for {len(held)}/{len(seeds)} seeds")
    return "\n".join(lines) + "\n"


def previous_rows(path: Path) -> dict[str, dict]:
    """Rows of an earlier table's JSON by model (a ``--models`` run replaces only its own rows); a
    row without a ``commit`` gets "before <the file's commit>"."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    before = "before " + data.get("meta", {}).get("source", {}).get("commit", "?")[:7]
    return {r["model"]: {"commit": before, **r} for r in data.get("rows", [])}


def measure_rows(
    path: Path, names: list[str], selected, measure, *, fresh: bool = False
) -> list[dict]:
    """The rows of a model table in ``names`` order: ``measure(name)`` (a dict, tagged with
    ``measured_commit()`` and echoed to stderr as JSON) for every name in ``selected``, the rows of
    ``path`` (an earlier run's JSON; none when ``fresh``) for the others."""
    rows = {} if fresh else previous_rows(path)
    commit = measured_commit()
    for name in names:
        if name not in selected:
            continue
        row = measure(name)
        row["commit"] = commit
        rows[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "warning_first"}), file=sys.stderr, flush=True)
    return [rows[name] for name in names if name in rows]


def relative_error(y: torch.Tensor, y2: torch.Tensor) -> float:
    """Max-abs error over the max-abs of ``y`` (tests/conftest.py's relative_error)."""
    return (y - y2).abs().max().item() / y.abs().max().item()


def error_text(error: BaseException) -> str:
    """A table cell for a step that raised: the exception's type and first line (200 characters)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


def table_cell(value: object, fmt: str = ".1e") -> str:
    """A markdown cell: "-" for None, floats in ``fmt``, "|" made harmless."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value).replace("|", "/")


def bit_identical(a: torch.nn.Module, b: torch.nn.Module, run, x) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``run(a, x)`` and ``run(b, x)`` and the two state dicts (keys, dtypes, values) are equal."""
    sa, sb = a.state_dict(), b.state_dict()
    return (
        torch.equal(run(a, x), run(b, x)) and list(sa) == list(sb)
        and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    )


def write_keeping_notes(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, keeping the hand-written ``## Notes`` section of the file already there."""
    old = path.read_text() if path.exists() else ""
    notes = old[old.index("\n## Notes"):] if "\n## Notes" in old else ""
    path.write_text(text + notes)


def measured_commit() -> str:
    """The last commit that changed fxmerge/ (the code a row measures), ``+modified`` when fxmerge/
    differs from it (the per-row ``commit`` column of the model tables)."""
    last = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", "fxmerge"], cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True,
    ).stdout.strip()
    return (last or "?") + ("+modified" if source_info()["modified"] else "")


def source_info() -> dict:
    """The git commit of the checkout and the files of the package that differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "--", "fxmerge").splitlines()}


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_plots(results: dict[str, dict[int, list[Row]]], args: argparse.Namespace) -> None:
    """One accuracy bar chart per family (means over seeds), if matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from fxmerge.plots import plot_accuracy

    for family, per_seed in results.items():
        rows = [
            {"name": name, **{c: float(np.mean([getattr(per_seed[s][i], c) for s in per_seed])) for c in COLUMNS}}
            for i, name in enumerate(row.name for row in next(iter(per_seed.values())))
        ]
        plot_accuracy(rows, args.out / f"{args.name}_{family}.png", title=f"{family}: merged vs single models (mean of {len(per_seed)} seeds)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args)
    total = time.perf_counter() - start
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "config": config,
        "machine": machine,
        "source": source_info(),
        "total_seconds": total,
        "results": {
            family: {
                str(seed): {"rows": [dataclasses.asdict(row) for row in rows], "checks": checks(rows)}
                for seed, rows in per_seed.items()
            }
            for family, per_seed in results.items()
        },
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(results, args, machine)
    (args.out / f"{args.name}.md").write_text(text)
    write_plots(results, args)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
