"""The ``fxmerge`` command (also ``python -m fxmerge``).

One sub-command per verb; each ``_add_<verb>`` registers its parser and sets ``handler`` to the
function that runs it, so ``merge`` and ``inspect`` slot in beside ``demo``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fxmerge.config import CAPTURES

__all__ = ["build_parser", "main"]

_GRAPH_INSTALL = "pip install 'fxmerge[graph]'"


def build_parser() -> argparse.ArgumentParser:
    from fxmerge import __version__

    parser = argparse.ArgumentParser(
        prog="fxmerge",
        description="Merge independently trained PyTorch networks into one torch.fx GraphModule, without training.",
    )
    parser.add_argument("--version", action="version", version=f"fxmerge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_merge(commands)
    _add_inspect(commands)
    _add_eval(commands)
    return parser


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from fxmerge.experiments import FAMILIES

    demo = commands.add_parser(
        "demo",
        help="train small model pairs on disjoint digit classes and merge them (CPU, under a minute, offline)",
        description=(
            "Train pairs of models from different seeds on two disjoint 5-class halves of scikit-learn's "
            "digits (shared CLIP-style class-embedding head) and merge them without training: two models "
            "of one architecture (weight averaging, permutation alignment, ZipIt-style zipping), a "
            "shallower with a deeper model (zipping, depth aligned by LMA) and a narrower with a wider "
            "one (zipping to the wider widths). Prints joint (10-class) and per-task (5-class) test "
            "accuracy of every model, merge and of the ensemble of the pair (both models run, logits "
            "averaged: the upper reference)."
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="task split, initialisations and calibration order (default: 0)")
    demo.add_argument("--family", choices=sorted(FAMILIES), default="resnet", help="model family of the three pairs (default: resnet)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="training epochs per model (default: 10)")
    demo.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch CPU threads (default: 1; the models are tiny, more threads mostly add contention)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    demo.set_defaults(handler=_run_demo)


def _add_merge(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge models given as factories + weight files (a YAML config or flags)",
        description=(
            "Merge two or more models into one torch.fx GraphModule and save it (code-free graph, "
            "safetensors weights, report.json). Models are importable factories 'package.module:callable' "
            "with keyword arguments, plus a weights file (.safetensors, or a state_dict .pt/.pth loaded "
            "with torch.load(weights_only=True)). Calibration data: a tensor file (.safetensors or .pt "
            "of shape (N, ...)), an image folder (torchvision ImageFolder), or a factory returning an "
            "iterable of batches."
        ),
        epilog=(
            "config example:\n"
            "  models:\n"
            "    - {factory: 'fxmerge.zoo:resnet', kwargs: {in_channels: 1, image_size: 8}, weights: a.safetensors}\n"
            "    - {factory: 'fxmerge.zoo:resnet', kwargs: {in_channels: 1, image_size: 8}, weights: b.safetensors}\n"
            "  calibration: {tensor: calib.safetensors, batch_size: 64}\n"
            "  merge: {method: zip, width: max}\n"
            "  out: merged/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("config", nargs="?", help="YAML config file; flags override its values (default: none, flags only)")
    merge.add_argument(
        "--model", action="append", default=[], metavar="FACTORY",
        help="'package.module:callable' (repeat per model; default: the config's 'models:')",
    )
    merge.add_argument(
        "--kwargs", action="append", default=[], metavar="YAML",
        help="factory keyword arguments, e.g. '{num_outputs: 10}' (repeat per model, or once for all; default: none)",
    )
    merge.add_argument(
        "--weights", action="append", default=[], metavar="FILE",
        help="weights file per model (repeat per model; default: none, an error unless --random-init)",
    )
    merge.add_argument(
        "--random-init", action="store_true", default=None,
        help="allow models without weights: merge their random initialisations on purpose "
        "(or 'random_init: true' in the config; default: off)",
    )
    merge.add_argument(
        "--calib", metavar="PATH",
        help="calibration tensor file, image folder, or 'package.module:callable' (default: the config's 'calibration:')",
    )
    merge.add_argument("--batch-size", type=_positive_int, default=None, help="calibration batch size (default: 64)")
    _add_config_flags(merge)
    merge.add_argument("--out", help="output directory (required: this flag or 'out:' in the config; default: none)")
    merge.add_argument(
        "--overwrite", action="store_true", default=None,
        help="write into an existing, non-empty output directory (or 'overwrite: true' in the config; default: off)",
    )
    merge.set_defaults(handler=_run_merge)


def _default_text(value: object) -> str:
    """How a MergeConfig default reads in --help."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``MergeConfig`` field: its help, choices and default come from the field.

    Flags keep their text (no ``type=``); ``MergeConfig.from_dict`` parses it like a YAML string,
    so a flag and a config key accept the same values. Unset flags are None (the config's value
    or the MergeConfig default applies).
    """
    from dataclasses import fields

    from fxmerge.config import MergeConfig

    for spec in fields(MergeConfig):
        meta = spec.metadata
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{meta['help']} (default: {_default_text(spec.default)})".replace("%", "%%")
        if isinstance(spec.default, bool):
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif meta["repeat"]:
            parser.add_argument(
                flag, dest=spec.name, action="append", default=None, metavar=meta["metavar"],
                help=help_text + "; repeat the flag per item",
            )
        else:
            parser.add_argument(
                flag, dest=spec.name, choices=meta["choices"], default=None,
                metavar=meta["metavar"] or (None if meta["choices"] else spec.name.upper()), help=help_text,
            )


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect_ = commands.add_parser(
        "inspect",
        help="show a saved merge (groups, alignment, graph, layer diff) or a model's channel groups",
        description=(
            "With a directory written by 'fxmerge merge' (or MergeResult.save): the groups table, the "
            "depth alignment, the merged graph (print_readable) and which layers were inserted or "
            "resized. With 'package.module:callable' (plus --kwargs and --input-shape): the dependency "
            "analysis of that model."
        ),
    )
    inspect_.add_argument("target", type=_inspect_target, help="a merge directory or a model factory 'package.module:callable'")
    inspect_.add_argument("--kwargs", default=None, metavar="YAML", help="factory keyword arguments (default: none)")
    inspect_.add_argument("--input-shape", default="1,3,32,32", help="example input shape for a factory (default: 1,3,32,32)")
    inspect_.add_argument(
        "--token-ids", type=_positive_int, default=None, metavar="VOCAB",
        help="the example input is random int64 token ids in [0, VOCAB) of --input-shape (a text model) "
        "(default: none, N(0, 1) floats)",
    )
    inspect_.add_argument(
        "--capture", choices=CAPTURES, default="auto",
        help="'fx', 'export' (torch.export, e.g. HuggingFace transformers) or 'auto' (fx, else export) (default: auto)",
    )
    inspect_.add_argument("--graph", action="store_true", help="also print the whole graph code (default: off)")
    inspect_.add_argument(
        "--svg", metavar="FILE",
        help=f"draw the graph with Graphviz into FILE (needs pydot: {_GRAPH_INSTALL}; default: none)",
    )
    inspect_.set_defaults(handler=_run_inspect)


def _inspect_target(text: str) -> str:
    """The ``inspect`` target as given; a path that names no folder is refused here, with the
    path in the message, instead of being read as a malformed 'package.module:callable'.

    A folder is what exists as one, ends with a path separator, is an absolute path, or has no ':'
    (a factory's form) and no importable top-level module ('merged', 'runs/zip'; a dotted
    'package.module.callable' stays a factory)."""
    import importlib.util
    import os

    if os.path.isdir(text):
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    top = text.split(".")[0]
    looks_like_folder = text.endswith(("/", os.sep)) or os.path.isabs(text) or (
        ":" not in text
        and ("/" in text or os.sep in text or not top.isidentifier() or importlib.util.find_spec(top) is None)
    )
    if looks_like_folder:
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fxmerge.experiments import (
        ENSEMBLE_LABEL, METHOD_LABELS, REGRESSION_ZIP, compare_pair, demo_pairs, format_demo, method_label,
    )

    pairs = demo_pairs(args.family)
    steps = sum(1 + len(pair.methods) for pair in pairs)
    results = []
    started = False
    with tqdm(total=steps, disable=args.quiet, leave=False, file=sys.stderr) as bar:
        def on_step(what: str) -> None:  # called before every step: the previous one is done
            nonlocal started
            if started:
                bar.update()
            started = True
            bar.set_description(what)

        for pair in pairs:
            results.append(compare_pair(pair, seed=args.seed, epochs=args.epochs, quiet=args.quiet, on_step=on_step))
        bar.update()
    split = results[0].task_models.split
    print(
        f"fxmerge demo: three pairs of models trained for {args.epochs} epochs from different seeds, A on "
        f"digits {_digits(split.classes_a)} and B on {_digits(split.classes_b)}, then merged without training. "
        "Test accuracy (%): joint = argmax over all 10 classes, task A/B = argmax within the task's 5 classes. "
        f"{ENSEMBLE_LABEL} runs both models and averages their logits (the compute of both): the upper "
        "reference for a merge."
    )
    print()
    print(format_demo(results))
    print()
    same = {row.name: row for row in results[0].rows}
    zip_row, average_row = same[METHOD_LABELS["zip"]], same[METHOD_LABELS["average"]]
    fitted = same[method_label(REGRESSION_ZIP)]
    best_single = max(results[0].rows[:2], key=lambda row: row.average)
    # the depth and width pairs' rows: A, B, zip, zip with the regression unmerge, ensemble
    (depth_zip, depth_fitted, depth_ensemble), (width_zip, width_fitted, width_ensemble) = (r.rows[-3:] for r in results[1:])
    print(
        f"Zip keeps {100 * zip_row.average:.1f}% per-task accuracy (best single model: "
        f"{100 * best_single.average:.1f}%, weight averaging: {100 * average_row.average:.1f}%, ensemble: "
        f"{100 * results[0].rows[-1].average:.1f}%) and reaches {100 * zip_row.joint:.1f}% joint accuracy where "
        f"weight averaging gets {100 * average_row.joint:.1f}%. Across depths it keeps {100 * depth_zip.average:.1f}% "
        f"(ensemble: {100 * depth_ensemble.average:.1f}%), across widths {100 * width_zip.average:.1f}% "
        f"(ensemble: {100 * width_ensemble.average:.1f}%). With unmerge=regression (each model's units "
        f"reconstructed from all merged units by least squares): {100 * fitted.average:.1f}%, "
        f"{100 * depth_fitted.average:.1f}% and {100 * width_fitted.average:.1f}%."
    )
    return 0


_CONFIG_KEYS = ("models", "calibration", "merge", "out", "random_init", "overwrite")


def _merge_settings(args: argparse.Namespace) -> dict:
    """The YAML config (if any) with command-line flags on top, checked for unknown keys."""
    import yaml

    from fxmerge.config import MergeConfig, option_names
    from fxmerge.errors import ConfigError

    config: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{args.config}: expected a mapping at the top level")
        unknown = set(config) - set(_CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{args.config}: unknown keys {sorted(unknown)} (allowed: {', '.join(_CONFIG_KEYS)})")
    models = list(config.get("models") or [])
    if args.model:
        kwargs = [yaml.safe_load(k) or {} for k in args.kwargs] or [{}]
        if len(kwargs) == 1:
            kwargs = kwargs * len(args.model)
        weights = args.weights or [None] * len(args.model)
        if len(kwargs) != len(args.model) or len(weights) != len(args.model):
            raise ConfigError("give one --kwargs (or one for all) and one --weights per --model")
        models = [{"factory": f, "kwargs": k, "weights": w} for f, k, w in zip(args.model, kwargs, weights)]
    calibration = dict(config.get("calibration") or {})
    if args.calib:
        calibration = {"path": args.calib}
    if args.batch_size:
        calibration["batch_size"] = args.batch_size
    options = config.get("merge") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{args.config}: 'merge:' must be a mapping of options")
    options = dict(options)
    for key in option_names():
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    merge_config = MergeConfig.from_dict(options, where=f"{args.config}: merge options" if args.config else "merge options")
    out = args.out or config.get("out")
    if not models:
        raise ConfigError("no models: give a config file with 'models:' or --model/--weights flags")
    if not calibration:
        raise ConfigError("no calibration data: give 'calibration:' in the config or --calib")
    if not out:
        raise ConfigError("no output directory: give 'out:' in the config or --out")
    switches = {}
    for key in ("random_init", "overwrite"):  # a flag turns it on; else the config's value; else off
        value = True if getattr(args, key, None) else config.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{args.config}: '{key}:' must be true or false, got {value!r}")
        switches[key] = value
    return {"models": models, "calibration": calibration, "config": merge_config, "out": out, **switches}


def _check_safe(settings: dict) -> None:
    """Refuse what would silently give a useless or destroy an earlier result: a model without
    weights (a random initialisation) unless ``random_init``; an existing, non-empty output
    directory unless ``overwrite``."""
    import os

    from fxmerge.errors import ConfigError

    if not settings["random_init"]:
        for k, spec in enumerate(settings["models"]):
            if not spec.get("weights"):
                raise ConfigError(
                    f"model {k} ({spec.get('factory')}) has no weights: give --weights (or 'weights:' in the "
                    "config), or pass --random-init to merge random initialisations on purpose"
                )
    out = str(settings["out"])
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output directory {out} is a file")
    if not settings["overwrite"] and os.path.isdir(out) and os.listdir(out):
        raise ConfigError(
            f"output directory {out} exists and is not empty: pass --overwrite (or 'overwrite: true' in the "
            "config) to write the merge into it, or choose another --out"
        )


def _run_merge(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from fxmerge.api import merge
    from fxmerge.loading import load_calibration, load_model

    settings = _merge_settings(args)
    _check_safe(settings)
    models = [load_model(spec) for spec in settings["models"]]
    batches = load_calibration(settings["calibration"])
    config = settings["config"]
    result = merge(models, batches, **{spec.name: getattr(config, spec.name) for spec in fields(config)})
    result.save(settings["out"])
    from fxmerge.io import update_report

    update_report(settings["out"], {"sources": _sources_record(settings)})  # lets `fxmerge eval` rebuild them
    free = sum(1 for g in result.groups if not g.fixed)
    print(f"merged {len(models)} models into {settings['out']}: {len(result.groups)} groups ({free} merged), "
          f"{sum(p.numel() for p in result.module.parameters())} parameters")
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()) + _threads_note(result.threads))
    return 0


def _threads_note(threads: int | None) -> str:
    """' (N torch threads)': the count a merge ran with (what reproduces its bits), or ''."""
    return f" ({threads} torch thread{'s' if threads != 1 else ''})" if threads else ""


def _run_inspect(args: argparse.Namespace) -> int:
    import os

    if os.path.isdir(args.target):
        from fxmerge.io import load_module, load_report

        module = load_module(args.target)
        report = load_report(args.target) or {}
        print(_format_report(report))
        if args.graph:
            print(module.print_readable(print_output=False))
        _maybe_svg(module, args.svg)
        return 0
    import yaml
    import torch

    from fxmerge.loading import load_model
    from fxmerge.passes.dependency import analyze

    model = load_model({"factory": args.target, "kwargs": yaml.safe_load(args.kwargs) if args.kwargs else {}})
    shape = tuple(int(s) for s in args.input_shape.split(","))
    example = torch.randint(0, args.token_ids, shape) if args.token_ids else torch.randn(*shape)
    analysis = analyze(model, example, capture=args.capture)
    print(f"captured by {analysis.graph_module.meta.get('fxmerge_capture', 'fx')}")
    print(analysis.summary())
    if args.graph:
        print(analysis.graph_module.print_readable(print_output=False))
    _maybe_svg(analysis.graph_module, args.svg)
    return 0


def _format_report(report: dict) -> str:
    lines = []
    options = report.get("config", {})
    if options:
        lines.append("options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    groups = report.get("groups", [])
    if groups:
        lines.append("")
        lines.append(f"{'group':48s} {'sizes':>14s} {'width':>6s} {'similarity':>10s}  source")
        for g in groups:
            sim = "" if g.get("similarity") is None else f"{g['similarity']:.3f}"
            lines.append(f"{g['name'][:48]:48s} {str(tuple(g['sizes'])):>14s} {g['width']:>6d} {sim:>10s}  {g.get('source', '')}")
        resized = [g for g in groups if len(set(g["sizes"])) > 1 or g["width"] != g["sizes"][0]]
        inserted = _inserted(report)
        counts = ", ".join(f"model {model}: {len(units)}" for model, units in inserted.items())
        total = sum(len(units) for units in inserted.values())
        lines.append("")
        lines.append(
            f"layer diff: {len(resized)} groups changed width, {total} identity units inserted"
            + (f" ({counts})" if counts else "") + (":" if resized or total else "")
        )
        for g in resized:
            lines.append(f"  {g['name']}: {tuple(g['sizes'])} -> {g['width']}")
        for model, units in inserted.items():
            for unit in units:
                where = f"after {unit['after']}" if unit.get("after") else "at the input"
                modules = f" ({_module_list(unit['modules'])})" if unit.get("modules") else ""
                lines.append(f"  model {model}: identity unit {unit['unit']}{modules} inserted {where}")
    for alignment in report.get("alignment") or []:
        lines.append("")
        lines.append(f"depth alignment of model {alignment['model']} (objective {alignment.get('objective_value', 0):.3f}):")
        deep = alignment["deep_units"]
        for i, segment in enumerate(alignment["segments"]):
            inserted = [deep[j] for j in segment[1:]]
            lines.append(
                f"  shallow unit {alignment['shallow_units'][i]} -> deep {deep[segment[0]]}"
                + (f"; identity units inserted for {', '.join(inserted)}" if inserted else "")
            )
    timings = report.get("timings", {})
    if timings:
        lines.append("")
        lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()) + _threads_note(report.get("threads")))
    return "\n".join(lines)


def _inserted(report: dict) -> dict[int, list[dict]]:
    """Per shallower model, the identity units the depth pass inserted (report.json's
    ``alignment[k]["inserted"]``; derived from the segments for a report written before it)."""
    from types import SimpleNamespace

    from fxmerge.io import inserted_units

    out = {}
    for alignment in report.get("alignment") or []:
        units = alignment.get("inserted")
        if units is None:
            units = inserted_units(SimpleNamespace(**alignment))
        if units:
            out[alignment["model"]] = units
    return out


def _module_list(modules: Sequence[str]) -> str:
    """``stage1.0.{conv1, bn1}`` for modules under one parent, else the names joined."""
    parents = {m.rpartition(".")[0] for m in modules}
    if len(modules) > 1 and len(parents) == 1 and "" not in parents:
        (parent,) = parents
        return f"{parent}.{{{', '.join(m.rpartition('.')[2] for m in modules)}}}"
    return ", ".join(modules)


def _maybe_svg(module, path: str | None) -> None:
    if not path:
        return
    from fxmerge.errors import MissingDependencyError

    try:
        import pydot  # noqa: F401  (torch's FxGraphDrawer needs it)
    except ImportError as error:
        raise MissingDependencyError(f"--svg needs pydot ({error}): {_GRAPH_INSTALL}, and Graphviz's 'dot' program") from None
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    try:
        FxGraphDrawer(module, "merged").get_dot_graph().write_svg(path)
    except Exception as error:  # pydot runs Graphviz's 'dot' program, which pip does not install
        raise MissingDependencyError(
            f"cannot draw the graph into {path} ({type(error).__name__}: {error}); is Graphviz's 'dot' program "
            "installed (e.g. apt install graphviz, brew install graphviz)?"
        ) from error
    print(f"graph drawn to {path}")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    eval_ = commands.add_parser(
        "eval",
        help="accuracy and loss of a saved merge and its source models on labelled data (written into report.json)",
        description=(
            "Load a folder written by 'fxmerge merge' and evaluate the merged model and, when report.json "
            "records them (fxmerge merge does), the source models on labelled data: joint accuracy, per-task "
            "accuracy (argmax within the task's classes, on the task's samples) and mean cross-entropy, or the "
            "MSE for float labels. Prints a table and stores it in report.json under 'evaluation' (the "
            "manifest is updated). --landscape draws the loss over the plane through the merged model and "
            "the aligned source models (re-running the recorded merge to get them)."
        ),
    )
    eval_.add_argument("directory", help="a folder written by 'fxmerge merge'")
    eval_.add_argument(
        "--data", required=True, metavar="SPEC",
        help="labelled data: a .safetensors/.pt file with tensors 'inputs' (N, ...) and 'labels' (N,), or "
             "'package.module:callable' returning (inputs, labels) or an iterable of (x, y) batches",
    )
    eval_.add_argument(
        "--keys", default=",".join(_data_keys()), metavar="INPUTS,LABELS",
        help=f"the tensor names in a data file (default {','.join(_data_keys())})",
    )
    eval_.add_argument(
        "--task", action="append", default=[], metavar="NAME=IDS",
        help="a task as its class ids, e.g. A=0,1,2,3,4 (repeat per task; default: no tasks, joint accuracy only)",
    )
    eval_.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch size (default 256)")
    eval_.add_argument(
        "--weights", action="append", default=[], metavar="FILE",
        help="a source model's weights file instead of the path report.json records (repeat per model, in order; default: the recorded paths)",
    )
    eval_.add_argument("--no-sources", action="store_true", help="evaluate the merged model only (default: also the sources report.json records)")
    eval_.add_argument("--landscape", metavar="FILE.png", help="draw the per-task loss landscape into FILE.png (needs matplotlib; default: none)")
    eval_.add_argument("--steps", type=_positive_int, default=11, help="landscape grid points per axis (default 11)")
    eval_.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's setting)")
    eval_.set_defaults(handler=_run_eval)


def _data_keys() -> tuple[str, ...]:
    from fxmerge.evaluation import DATA_KEYS

    return DATA_KEYS


def _sources_record(settings: dict) -> dict:
    """The models and calibration of a merge as report.json records them: file paths made
    absolute, so `fxmerge eval` finds them from any working directory."""
    import os

    def absolute(value: object) -> object:
        return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value

    models = [{**spec, "weights": absolute(spec.get("weights"))} for spec in settings["models"]]
    calibration = {key: absolute(value) if key in ("path", "tensor", "image_folder") else value
                   for key, value in settings["calibration"].items()}
    return {"models": models, "calibration": calibration}


def _parse_tasks(texts: Sequence[str]) -> dict[str, list[int]]:
    from fxmerge.errors import ConfigError

    tasks: dict[str, list[int]] = {}
    for text in texts:
        name, sep, ids = text.partition("=")
        try:
            classes = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            classes = []
        if not sep or not name or not classes or name in tasks:
            raise ConfigError(f"--task {text!r}: expected NAME=ID,ID,... with a new name and integer class ids, e.g. A=0,1,2")
        tasks[name] = classes
    return tasks


def _run_eval(args: argparse.Namespace) -> int:
    import os

    from fxmerge.errors import ConfigError
    from fxmerge.evaluation import evaluate_models, load_labelled
    from fxmerge.io import load_module, load_report, update_report
    from fxmerge.loading import load_model

    if not os.path.isdir(args.directory):
        raise ConfigError(f"{args.directory}: no such directory")
    if args.landscape:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--landscape needs matplotlib: pip install 'fxmerge[plot]'") from None
    module = load_module(args.directory)
    report = load_report(args.directory) or {}
    tasks = _parse_tasks(args.task) or None
    keys = tuple(k.strip() for k in args.keys.split(","))
    if len(keys) != 2:
        raise ConfigError(f"--keys {args.keys!r}: expected two names INPUTS,LABELS")
    data = load_labelled(args.data, batch_size=args.batch_size, keys=keys)
    sources = dict(report.get("sources") or {})
    if args.weights:
        recorded = sources.get("models") or []
        if len(args.weights) != len(recorded):
            raise ConfigError(f"--weights: give one file per source model ({len(recorded)} recorded in report.json), got {len(args.weights)}")
        sources["models"] = [{**spec, "weights": weights} for spec, weights in zip(recorded, args.weights)]
    source_models = [] if args.no_sources else [load_model(spec) for spec in sources.get("models", ())]
    named = {"merged": module, **{f"model {k}": m for k, m in enumerate(source_models)}}
    table = evaluate_models(named, data, tasks=tasks)
    print(table.format())
    if not sources.get("models"):
        print("(no source models: report.json records none; folders written by 'fxmerge merge' do)")
    update_report(args.directory, {"evaluation": {"data": args.data, "tasks": tasks, **table.to_dict()}})
    print(f"written into {os.path.join(args.directory, 'report.json')} under 'evaluation'")
    if args.landscape:
        from fxmerge.evaluation import landscape
        from fxmerge.plots import loss_landscape

        result, calibration = _remerge(report, module, source_models or [load_model(s) for s in sources.get("models", ())])
        view = landscape(result, data, tasks=tasks, calibration=calibration, steps=args.steps)
        loss_landscape(view, args.landscape)
        print(f"loss landscape ({view.batchnorm}) drawn to {args.landscape}")
    return 0


def _remerge(report: dict, module, models: list):
    """The saved merge, re-run from the sources report.json records (a merge is deterministic),
    for the aligned source models; refused when it does not reproduce the saved weights."""
    from dataclasses import fields, replace

    import torch

    from fxmerge.api import merge
    from fxmerge.config import MergeConfig
    from fxmerge.errors import ConfigError
    from fxmerge.loading import load_calibration

    sources = report.get("sources") or {}
    if len(models) != 2 or "calibration" not in sources or "config" not in report:
        raise ConfigError(
            "--landscape needs the two source models and the calibration data, which report.json records "
            "when the folder was written by 'fxmerge merge'"
        )
    calibration = load_calibration(sources["calibration"])
    config = replace(MergeConfig.from_dict(report["config"], where="report.json config"), quiet=True)
    result = merge(models, calibration, **{spec.name: getattr(config, spec.name) for spec in fields(config)})
    saved, rebuilt = module.state_dict(), result.module.state_dict()
    same = saved.keys() == rebuilt.keys() and all(
        saved[k].shape == rebuilt[k].shape and torch.allclose(saved[k].float(), rebuilt[k].float(), rtol=1e-5, atol=1e-6)
        for k in saved
    )
    if not same:
        raise ConfigError(
            "re-running the recorded merge does not reproduce the saved weights (the source weights or the "
            "calibration data changed since the merge): cannot place the aligned source models"
        )
    return result, calibration


def _digits(classes: Sequence[int]) -> str:
    return "{" + ",".join(str(c) for c in classes) + "}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxmerge`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    from fxmerge.errors import FxMergeError
    from fxmerge.threads import intra_op_threads

    # a command's --threads holds for the whole command (demo); merge's is a merge option, which merge() sets
    threads = getattr(args, "threads", None) if args.command != "merge" else None
    try:
        with intra_op_threads(threads):
            return args.handler(args)
    except FxMergeError as error:
        print(f"fxmerge {args.command}: error: {error}", file=sys.stderr)
        return 1
