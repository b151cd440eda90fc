"""The ``fxmerge`` command (also ``python -m fxmerge``).

One sub-command per verb; each ``_add_<verb>`` registers its parser and sets ``handler`` to the
function that runs it, so ``merge`` and ``inspect`` slot in beside ``demo``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

_DEMO_METHODS = ("average", "permute", "zip")
_DEMO_ARCHITECTURE = {
    "resnet": "ResNets (3 stages of 1 BasicBlock, width 16)",
    "vgg": "VGGs (3 conv layers of 16/32/64 channels, 2-layer classifier)",
}


def build_parser() -> argparse.ArgumentParser:
    from fxmerge import __version__

    parser = argparse.ArgumentParser(
        prog="fxmerge",
        description="Merge independently trained PyTorch networks into one torch.fx GraphModule, without training.",
    )
    parser.add_argument("--version", action="version", version=f"fxmerge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands)
    return parser


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="train two small models on disjoint digit classes and merge them (CPU, under a minute, offline)",
        description=(
            "Train two models of one architecture from different seeds on two disjoint 5-class halves "
            "of scikit-learn's digits (shared CLIP-style class-embedding head), merge them with weight "
            "averaging, permutation alignment and ZipIt-style zipping, and print joint (10-class) and "
            "per-task (5-class) test accuracy of every model."
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="task split, initialisations and calibration order (default 0)")
    demo.add_argument("--family", choices=sorted(_DEMO_ARCHITECTURE), default="resnet", help="model family (default resnet)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="training epochs per model (default 10)")
    demo.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch CPU threads (default 1: the models are tiny, more threads mostly add contention)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_run_demo)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fxmerge.experiments import FAMILIES, METHOD_LABELS, compare, format_table, train_task_models

    factory = FAMILIES[args.family]
    with tqdm(total=1 + len(_DEMO_METHODS), desc="training A and B", disable=args.quiet, leave=False, file=sys.stderr) as bar:
        models = train_task_models(factory, factory, seed=args.seed, epochs=args.epochs)

        def on_merge(method: str) -> None:  # the previous step (training or a merge) is done
            bar.update()
            bar.set_description(f"merging: {method}")

        rows = compare(models, _DEMO_METHODS, seed=args.seed, quiet=args.quiet, on_merge=on_merge)
        bar.update()
    split = models.split
    print(
        f"fxmerge demo: two {_DEMO_ARCHITECTURE[args.family]} trained for {args.epochs} epochs from different "
        f"seeds, A on digits {_digits(split.classes_a)} and B on {_digits(split.classes_b)}, then merged "
        "without training. Test accuracy (%): joint = argmax over all 10 classes, task A/B = argmax "
        "within the task's 5 classes."
    )
    print()
    print(format_table(rows))
    print()
    by_name = {row.name: row for row in rows}
    zip_row, average_row = by_name[METHOD_LABELS["zip"]], by_name[METHOD_LABELS["average"]]
    best_single = max(rows[:2], key=lambda row: row.average)
    print(
        f"Zip keeps {100 * zip_row.average:.1f}% per-task accuracy (best single model: "
        f"{100 * best_single.average:.1f}%, weight averaging: {100 * average_row.average:.1f}%) and reaches "
        f"{100 * zip_row.joint:.1f}% joint accuracy where weight averaging gets {100 * average_row.joint:.1f}%."
    )
    return 0


def _digits(classes: Sequence[int]) -> str:
    return "{" + ",".join(str(c) for c in classes) + "}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxmerge`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.handler(args)
    finally:
        torch.set_num_threads(threads)
