"""The merged model in the multi-task loss landscape (the MuDSC paper's picture), digits pair.

Trains the ResNet task pair of ``fxmerge.experiments`` (model A on task A, model B on task B, one
fixed CLIP-style head), merges it with zip, MuDSC and permute, and for each merge draws, per task,
the test loss over the plane through the merged model and the two aligned source models
(``fxmerge.evaluation.landscape``: merged model at the origin, ``interpolate((1, 0))`` on the x
axis, ``interpolate((0, 1))`` in the plane; BatchNorm statistics reset on the calibration data
at every grid point). Writes ``results/landscape_digits.png`` (one row per method, one panel per
task) and ``results/landscape.md`` (the command, the losses at the three points, the seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without installing: make the repository's fxmerge importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxmerge  # noqa: E402
from fxmerge.evaluation import landscape  # noqa: E402
from fxmerge.experiments import FAMILIES, METHOD_LABELS, calibration_data, train_task_models  # noqa: E402
from fxmerge.plots import loss_landscape  # noqa: E402

METHODS = ("zip", "mudsc", "permute")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="task split, initialisations, calibration order (default 0)")
    parser.add_argument("--family", default="resnet", choices=sorted(FAMILIES), help="model pair (default resnet)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model (default 10)")
    parser.add_argument("--steps", type=int, default=11, help="grid points per axis (default 11)")
    parser.add_argument("--calibration-batches", type=int, default=32, help="batches of 64 (default 32; the train set has 21)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    factory = FAMILIES[args.family]
    pair = train_task_models(factory, factory, seed=args.seed, epochs=args.epochs)
    calibration = calibration_data(pair.split, seed=args.seed, num_batches=args.calibration_batches)
    split = pair.split
    test = (split.x_test, split.y_test)
    tasks = {"A": split.classes_a, "B": split.classes_b}
    trained = time.perf_counter() - start
    views, rows = [], []
    for method in METHODS:
        begin = time.perf_counter()
        result = fxmerge.merge([pair.model_a, pair.model_b], calibration, method=method, quiet=True,
                               calibration_batches=args.calibration_batches)
        table = result.evaluate(test, tasks=tasks, models=[pair.model_a, pair.model_b], head=pair.head)
        view = landscape(result, test, tasks=tasks, calibration=calibration, steps=args.steps, head=pair.head,
                         label=METHOD_LABELS[method])
        views.append(view)
        seconds = time.perf_counter() - begin
        rows.append((method, view, table, seconds))
        print(f"{method}: {view!r}, {seconds:.1f} s", file=sys.stderr)
    figure = loss_landscape(views, args.out / f"landscape_{'digits' if args.family == 'resnet' else 'digits_' + args.family}.png",
                            title=f"digits {args.family} pair (seed {args.seed}): test loss per task on the plane "
                                  "through the merged model and the aligned sources")
    total = time.perf_counter() - start
    command = "python benchmarks/landscape.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "out" and v != parse_args([]).__dict__[k]
    )
    lines = [
        "# The merged model in the loss landscape (digits pair)",
        "",
        f"Produced by `{command}` ({args.family} pair of `fxmerge.experiments.train_task_models`, seed {args.seed}, "
        f"{args.epochs} epochs; {args.steps}x{args.steps} grid; {len(calibration)} calibration batches of 64; "
        f"{args.threads} thread(s); {total:.0f} s in all, training {trained:.0f} s).",
        "",
        f"![landscape]({figure.name})",
        "",
        "Per task (columns) and merge method (rows): the mean test cross-entropy of the task (logits "
        "restricted to the task's 5 classes, on the task's test samples) over the plane through the "
        "merged model (star, at the origin) and the two source models in the merged model's "
        "coordinates (`MergeResult.interpolate((1, 0))` / `((0, 1))`: circle = model A, square = model "
        "B). Axes: distances in weight space (all floating parameters). BatchNorm statistics are reset "
        "on the calibration data at every grid point, as the merge does. For permute the merge is the "
        "midpoint of the aligned pair, so the three are on one line and the second direction is a "
        "seeded random direction orthogonal to it.",
        "",
        "Loss columns: task cross-entropy at the marked points (`Landscape.point_losses`); \"trained\" is the "
        "source model itself (`MergeResult.evaluate(models=...)`). For permute the aligned point is that model "
        "permuted, with its BatchNorm statistics reset on the calibration data (the only difference); for "
        "zip/MuDSC it is the model's image through the merge/unmerge matrices. Accuracy: per-task average of "
        "the merged model (%).",
        "",
        "| method | A at merged | B at merged | A at aligned A | B at aligned B | A of trained A | B of trained B | merged avg acc | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, view, table, seconds in rows:
        at = view.point_losses
        trained_a, trained_b = table["model 0"].tasks[0].loss, table["model 1"].tasks[1].loss
        lines.append(
            f"| {METHOD_LABELS[method]} | {at['merged'][0]:.3f} | {at['merged'][1]:.3f} | {at['model 0'][0]:.3f} | "
            f"{at['model 1'][1]:.3f} | {trained_a:.3f} | {trained_b:.3f} | {100 * table['merged'].average:.1f} | {seconds:.1f} |"
        )
    (args.out / "landscape.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {figure} and {args.out / 'landscape.md'} in {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
