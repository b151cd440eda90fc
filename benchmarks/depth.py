"""Depth-heterogeneous merging on digits: the analogue of Table I of "Training-free Heterogeneous
Model Merging" (Xu et al.), with the two-task protocol of ``fxmerge.experiments``.

Usage:
    python benchmarks/depth.py [--seeds 0 1 2] [--families resnet vgg] [--out benchmarks/results]

For every seed and family, four models are trained with ``fxmerge.experiments.train_task_models``
(scikit-learn digits, classes split into two disjoint 5-class tasks, one shared CLIP-style head):
a shallow and a deep model on task A, a shallow and a deep model on task B. Rows, as in the paper:

* Task A / Task B: the single models (mean of the shallow and the deep one; both in the details).
* Homo Avg / Permute / Zip: merge two models of the SAME depth, trained on A and on B (mean over
  the shallow pair and the deep pair).
* Hetero Permute+SMA, Permute+LMA, Zip+SMA, Zip+LMA: merge a shallow model trained on one task
  with a deep model trained on the other (mean over shallow-A + deep-B and deep-A + shallow-B),
  with ``fxmerge.merge(..., depth="sma" | "lma")``.

Columns: joint (10-way) and per-task (5-way) test accuracy and their average; mean ± sample std
over seeds. Also: the loss barrier (joint cross-entropy on the test set, 21 points on the linear
path) between the two models of each pair before and after aligning model B to model A with the
permutations found by ``method="permute"`` (a shallow model is first extended to the deep
structure, exactly as ``merge`` does). Writes depth.md, depth.json and CKA heatmaps.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Run from a checkout without installing: make the repository's fxmerge importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxmerge  # noqa: E402
from fxmerge.experiments import TaskModels, calibration_data, evaluate, evaluate_ensemble, train_task_models  # noqa: E402
from fxmerge.metrics import loss_barrier, loss_curve  # noqa: E402
from fxmerge.passes.depth import align_depth, compatibility, extend  # noqa: E402
from fxmerge.passes.repair import reset_batchnorm  # noqa: E402
from fxmerge.passes.units import find_units  # noqa: E402
from fxmerge.testing import permute_model  # noqa: E402
from fxmerge.zoo import resnet, vgg, vgg_cfg, vit  # noqa: E402
from homogeneous import digits_protocol_parser, machine_info, source_info  # noqa: E402

# family -> (shallow factory, deep factory, description) at width multiplier m; factories as in
# fxmerge.experiments. The papers merge x4-x16 nets; narrow (x1) ones merge badly with every method.
def pairs(m: int) -> dict[str, tuple[Any, Any, str]]:
    widths = tuple(w * m for w in (16, 32, 64))
    return {
        "resnet": (
            functools.partial(resnet, (1, 1, 1), 16, width_multiplier=m),
            functools.partial(resnet, (3, 3, 3), 16, width_multiplier=m),
            f"CIFAR-style ResNet x{m} (stage widths {'/'.join(map(str, widths))}): 1 vs 3 BasicBlocks per stage (ResNet-8 vs ResNet-20)",
        ),
        "vgg": (
            functools.partial(vgg, vgg_cfg((1, 1, 1), widths)),
            functools.partial(vgg, vgg_cfg((2, 2, 2), widths)),
            f"VGG with BatchNorm x{m}, widths {'/'.join(map(str, widths))}: 1 vs 2 convolutions per stage",
        ),
        # A VGG pair whose stages leave the depth DP a choice (1 vs 2 vs 3 convolutions: with 1
        # shallow convolution per stage, the only feasible segmentation is forced), so SMA and LMA
        # can differ.
        "vgg-2v3": (
            functools.partial(vgg, vgg_cfg((2, 2, 2), widths)),
            functools.partial(vgg, vgg_cfg((3, 3, 3), widths)),
            f"VGG with BatchNorm x{m}, widths {'/'.join(map(str, widths))}: 2 vs 3 convolutions per stage",
        ),
        # A transformer pair: the units are the attention and MLP sub-blocks (pre-norm residual
        # branches); an inserted one has its out_proj / last linear zeroed.
        "vit": (
            functools.partial(vit, patch_size=2, num_layers=2, num_heads=2, hidden_dim=16 * m, mlp_dim=32 * m),
            functools.partial(vit, patch_size=2, num_layers=4, num_heads=2, hidden_dim=16 * m, mlp_dim=32 * m),
            f"ViT (torchvision's, patch 2, 2 heads, width {16 * m}, MLP {32 * m}; LayerNorm, no BatchNorm): 2 vs 4 encoder layers",
        ),
        "resnet-2v3": (
            functools.partial(resnet, (2, 2, 2), 16, width_multiplier=m),
            functools.partial(resnet, (3, 3, 3), 16, width_multiplier=m),
            f"CIFAR-style ResNet x{m}: 2 vs 3 BasicBlocks per stage (ResNet-14 vs ResNet-20)",
        ),
    }


PAIRS = pairs(4)

# (method, unmerge, output_balance): the paper's methods (ZipIt!'s copy unmerge, no output balance),
# then fxmerge's regression unmerge and output balance
HOMO_METHODS = (
    ("average", "copy", "none"), ("permute", "copy", "none"), ("zip", "copy", "none"), ("permute", "regression", "none"),
    ("zip", "regression", "none"), ("zip", "regression", "norm"),
)
# (method, depth objective, how the inserted units' hidden channels are merged: fxmerge's default
# "inert", or "matched" as Xu et al.; unmerge; output_balance)
HETERO = (
    ("permute", "sma", "inert", "copy", "none"), ("permute", "lma", "inert", "copy", "none"),
    ("zip", "sma", "inert", "copy", "none"), ("zip", "lma", "inert", "copy", "none"), ("zip", "lma", "matched", "copy", "none"),
    ("permute", "lma", "inert", "regression", "none"), ("zip", "sma", "inert", "regression", "none"),
    ("zip", "lma", "inert", "regression", "none"), ("zip", "lma", "inert", "copy", "norm"),
    ("zip", "lma", "inert", "regression", "norm"),
)
LABELS = {"average": "Avg", "permute": "Permute", "zip": "Zip", "ensemble": "Ensemble"}
REGRESSION = ", regression unmerge"
BALANCED = ", output balance"


def _suffix(unmerge: str, balance: str) -> str:
    return (REGRESSION if unmerge == "regression" else "") + (BALANCED if balance == "norm" else "")


def homo_label(method: str, unmerge: str = "copy", balance: str = "none") -> str:
    return f"Homo {LABELS[method]}" + _suffix(unmerge, balance)


def hetero_label(method: str, depth: str, inserted: str, unmerge: str = "copy", balance: str = "none") -> str:
    label = f"Hetero {LABELS[method]}+{depth.upper()}"
    label += "" if inserted == "inert" else f", inserted units {inserted} (Xu et al.)"
    return label + _suffix(unmerge, balance)


COLUMNS = ("joint", "task_a", "task_b", "average")
HEADERS = ("joint", "task A", "task B", "avg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = digits_protocol_parser(__doc__.split("\n\n")[0], name="depth", epochs=15)
    parser.add_argument("--families", nargs="+", default=["resnet", "vgg", "vgg-2v3"], choices=sorted(PAIRS))
    parser.add_argument("--width-multiplier", type=int, default=4, help="every layer's width x this (default 4)")
    parser.add_argument("--barrier-steps", type=int, default=11)
    parser.add_argument("--no-barrier", action="store_true", help="skip the loss barriers")
    parser.add_argument("--render", type=Path, default=None,
                        help="only re-write the markdown (and print it) from a JSON file written by this script")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ helpers


def scores(report: dict[str, Any]) -> dict[str, float]:
    task_a, task_b = report["tasks"]
    return {"joint": report["joint"], "task_a": task_a, "task_b": task_b, "average": report["average"]}


def permuted_into_reference(result: fxmerge.MergeResult, model: nn.Module, example: torch.Tensor, k: int = 1) -> nn.Module:
    """``model`` (the k-th merged model, at the merged structure) with every free group permuted
    into model 0's unit order, read from a ``method="permute"`` merge (U_k is a permutation)."""
    analysis = fxmerge.analyze(model, example)
    permutations = {}
    for group in analysis.groups:
        if group.fixed:
            continue
        match = result.matches[group.name]
        unmerge = match.unmerge[k]  # (n_k, width): U_k[j, c] = 1 when unit j went to cluster c
        if unmerge.shape[0] != unmerge.shape[1] or not torch.equal(unmerge.sum(0), torch.ones(unmerge.shape[1], dtype=unmerge.dtype)):
            raise ValueError(f"group {group.name}: the permute merge did not give a permutation")
        permutations[analysis.space_ids[group.name]] = unmerge.argmax(dim=0)
    return permute_model(model, analysis, permutations)


def curve_with_batchnorm_reset(model_a, model_b, data, loss_fn, batches, steps: int) -> np.ndarray:
    """``fxmerge.metrics.loss_curve`` with every interpolated model's BatchNorm statistics
    recomputed on ``batches`` (as ``merge`` does for a merged model) instead of interpolated."""
    work = copy.deepcopy(model_a).eval()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    losses = []
    with torch.no_grad():
        for lam in np.linspace(0.0, 1.0, steps):
            work.load_state_dict({
                key: (1.0 - lam) * a + lam * state_b[key] if a.is_floating_point() else a for key, a in state_a.items()
            })
            reset_batchnorm(work, batches, quiet=True)
            losses.append(float(np.mean([float(loss_fn(work(x), y)) for x, y in data])))
    return np.asarray(losses)


def curve_summary(losses: np.ndarray) -> dict[str, Any]:
    """Barrier as ``fxmerge.metrics.loss_barrier`` defines it (max over the path minus the mean of
    the end points) and the midpoint excess (loss at lambda = 0.5 minus that mean)."""
    ends = (losses[0] + losses[-1]) / 2.0
    return {"barrier": float(losses.max() - ends), "midpoint_excess": float(losses[len(losses) // 2] - ends),
            "curve": [float(v) for v in losses]}


def barriers(result, model_a, model_b, head, split, example, steps: int, batches) -> dict[str, Any]:
    """Loss curves (joint CE on the test set) between A and B, as trained ("plain") and with B
    permuted into A's unit order ("aligned"), with BatchNorm statistics interpolated
    (``fxmerge.metrics.loss_curve``) or reset on ``batches`` at every point."""
    data = [(split.x_test, split.y_test)]

    def loss_fn(outputs, targets):
        return F.cross_entropy(head(outputs), targets)

    aligned_b = permuted_into_reference(result, model_b, example)
    with torch.no_grad():  # the permutation does not change B's function
        reference = model_b(split.x_test)
        drift = float((aligned_b(split.x_test) - reference).abs().max() / reference.abs().max())
    if drift > 1e-4:
        raise AssertionError(f"aligned model B differs from model B (relative {drift:.2e})")
    out = {}
    for name, other in (("plain", model_b), ("aligned", aligned_b)):
        out[f"{name}_bn_interpolated"] = curve_summary(loss_curve(model_a, other, data, loss_fn, steps)[1])
        out[f"{name}_bn_reset"] = curve_summary(curve_with_batchnorm_reset(model_a, other, data, loss_fn, batches, steps))
    # the library's own function agrees with the summary (same definition)
    assert abs(out["aligned_bn_interpolated"]["barrier"] - loss_barrier(model_a, aligned_b, data, loss_fn, steps)) < 1e-9
    return out


def feasible_segmentations(shallow: nn.Module, deep: nn.Module, example: torch.Tensor) -> int:
    """How many segmentations the depth DP chooses from (enumerated under its constraints)."""
    shallow_gm, deep_gm = fxmerge.trace(shallow, example), fxmerge.trace(deep, example)
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    first_ok, extra_ok = compatibility(deep_gm, deep_units, shallow_gm, shallow_units)
    m, n = first_ok.shape
    count = 0
    for inner in itertools.combinations(range(1, m), n - 1):
        starts, ends = (0, *inner), (*inner, m)
        count += all(first_ok[s, i] and extra_ok[s + 1 : e].all() for i, (s, e) in enumerate(zip(starts, ends)))
    return count


def extension_of(shallow: nn.Module, deep: nn.Module, batches, objective: str, k: int, expected_segments):
    """The shallow model extended to the deep structure, as ``merge`` builds it."""
    shallow_gm, deep_gm = fxmerge.trace(shallow, batches[0]), fxmerge.trace(deep, batches[0])
    alignment = align_depth(deep_gm, shallow_gm, batches, objective, k, quiet=True)
    if alignment.segments != expected_segments:
        raise AssertionError("the re-computed depth alignment differs from the merge's")
    return extend(shallow_gm, deep_gm, alignment, batches[0])


# ------------------------------------------------------------------------------------- the run


def run_seed(family: str, seed: int, args: argparse.Namespace, figures: Path | None) -> dict[str, Any]:
    make_shallow, make_deep, _ = pairs(args.width_multiplier)[family]
    start = time.perf_counter()
    shallow = train_task_models(make_shallow, make_shallow, seed=seed, epochs=args.epochs, embed_dim=args.embed_dim)
    deep = train_task_models(make_deep, make_deep, seed=seed, epochs=args.epochs, embed_dim=args.embed_dim)
    train_seconds = time.perf_counter() - start
    # One seed: one class split and one head for all four models.
    assert torch.equal(shallow.head.embeddings, deep.head.embeddings)
    assert shallow.split.classes_a == deep.split.classes_a and torch.equal(shallow.split.x_test, deep.split.x_test)
    head, split = shallow.head, shallow.split
    models = {"shallow A": shallow.model_a, "shallow B": shallow.model_b, "deep A": deep.model_a, "deep B": deep.model_b}
    depths = {name: len(find_units(fxmerge.trace(m, split.x_test[:8]))) for name, m in models.items()}
    depths["feasible segmentations"] = feasible_segmentations(models["shallow A"], models["deep A"], split.x_test[:8])
    singles = {name: scores(evaluate(m, head, split)) for name, m in models.items()}
    calibration = calibration_data(split, seed=seed, num_batches=args.calibration_batches)
    example = calibration[0]

    merges: list[dict[str, Any]] = []

    def ensemble(pair: str, a: str, b: str) -> None:
        record = {"pair": pair, "models": [a, b], "method": "ensemble", "depth": None, "inserted": None, "seconds": None}
        record.update(scores(evaluate_ensemble(TaskModels(models[a], models[b], head, split))))
        merges.append(record)

    def do_merge(pair: str, a: str, b: str, method: str, depth: str | None, inserted: str = "inert", unmerge: str = "copy",
                 balance: str = "none"):
        tm = TaskModels(models[a], models[b], head, split)
        began = time.perf_counter()
        result = fxmerge.merge(
            [tm.model_a, tm.model_b], calibration, method=method, depth=depth or "lma", inserted=inserted, unmerge=unmerge, output_balance=balance,
            calibration_batches=args.calibration_batches, quiet=True, alpha=args.alpha, beta=args.beta,
        )
        seconds = time.perf_counter() - began
        record: dict[str, Any] = {
            "pair": pair, "models": [a, b], "method": method, "depth": depth, "inserted": inserted if depth else None,
            "unmerge": unmerge, "output_balance": balance,
            "seconds": seconds,
        }
        record.update(scores(evaluate(result.module, head, split)))
        if result.alignment:
            alignment = result.alignment[0]
            record.update(
                shallow_model=alignment.model, segments=[list(s) for s in alignment.segments],
                objective_value=alignment.objective_value, cka=np.round(alignment.cka, 5).tolist(),
                deep_units=list(alignment.deep_units), shallow_units=list(alignment.shallow_units),
            )
        merges.append(record)
        return result

    barrier_records: dict[str, dict[str, float]] = {}
    for pair, a, b in (("homo shallow", "shallow A", "shallow B"), ("homo deep", "deep A", "deep B")):
        ensemble(pair, a, b)
        for method, unmerge, balance in HOMO_METHODS:
            result = do_merge(pair, a, b, method, None, unmerge=unmerge, balance=balance)
            if method == "permute" and unmerge == "copy" and not args.no_barrier:
                barrier_records[pair] = barriers(result, models[a], models[b], head, split, example, args.barrier_steps, calibration[:4])
    for pair, a, b in (("hetero shallow A + deep B", "shallow A", "deep B"), ("hetero deep A + shallow B", "deep A", "shallow B")):
        ensemble(pair, a, b)
        for method, depth, inserted, unmerge, balance in HETERO:
            result = do_merge(pair, a, b, method, depth, inserted, unmerge, balance)
            if inserted != "inert" or unmerge != "copy" or balance != "none":
                continue
            alignment = result.alignment[0]
            if figures is not None and seed == args.seeds[0] and pair.startswith("hetero shallow A") and method == "zip":
                from fxmerge.plots import plot_alignment, plot_groups

                plot_alignment(
                    alignment, figures / f"{args.name}_{family}_cka_{depth}.png",
                    title=f"{family}: CKA, deep model B (rows) vs shallow model A (columns), seed {seed}",
                )
                if depth == "lma":
                    plot_groups(result, figures / f"{args.name}_{family}_groups_zip_lma.png",
                                title=f"{family}: zip + LMA merge of shallow A and deep B, seed {seed}")
            if method == "permute" and depth == "lma" and not args.no_barrier:
                batches = calibration[: args.calibration_batches]
                if alignment.model == 0:
                    model_a = extension_of(models[a], models[b], batches, depth, 0, alignment.segments)
                    model_b = models[b]
                else:
                    model_a = models[a]
                    model_b = extension_of(models[b], models[a], batches, depth, 1, alignment.segments)
                barrier_records[pair] = barriers(result, model_a, model_b, head, split, example, args.barrier_steps, calibration[:4])
    total = time.perf_counter() - start
    print(f"{family} seed {seed}: {total:.1f} s (training {train_seconds:.1f} s)", file=sys.stderr)
    return {
        "singles": singles, "depths": depths, "merges": merges, "barriers": barrier_records,
        "train_seconds": train_seconds, "seconds": total,
    }


# -------------------------------------------------------------------------------- aggregation


def table_rows(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Paper-style rows: name -> seed -> scores (means over the rows' models / pairs)."""
    rows: dict[str, dict[int, dict[str, float]]] = {}

    def mean(items: list[dict[str, float]]) -> dict[str, float]:
        return {c: float(np.mean([item[c] for item in items])) for c in COLUMNS}

    for seed, data in per_seed.items():
        singles, merges = data["singles"], data["merges"]
        rows.setdefault("Task A", {})[seed] = mean([singles["shallow A"], singles["deep A"]])
        rows.setdefault("Task B", {})[seed] = mean([singles["shallow B"], singles["deep B"]])
        for method, unmerge, balance in HOMO_METHODS:
            chosen = [m for m in merges if m["pair"].startswith("homo") and m["method"] == method and _options(m) == (unmerge, balance)]
            rows.setdefault(homo_label(method, unmerge, balance), {})[seed] = mean(chosen)
        for depth in ("shallow", "deep"):  # not in the paper's table: the two pairs behind Homo Zip
            for method, unmerge, balance in (("zip", "copy", "none"), ("zip", "regression", "none"), ("zip", "regression", "norm"),
                                             ("ensemble", "copy", "none")):
                chosen = [m for m in merges if m["pair"] == f"homo {depth}" and m["method"] == method and _options(m) == (unmerge, balance)]
                rows.setdefault(f"{homo_label(method, unmerge, balance)}, {depth} pair only", {})[seed] = mean(chosen)
        rows.setdefault("Homo Ensemble", {})[seed] = mean([m for m in merges if m["pair"].startswith("homo") and m["method"] == "ensemble"])
        for method, depth, inserted, unmerge, balance in HETERO:
            chosen = [
                m for m in merges
                if m["pair"].startswith("hetero") and m["method"] == method and m["depth"] == depth
                and m.get("inserted", "inert") == inserted and _options(m) == (unmerge, balance)
            ]
            rows.setdefault(hetero_label(method, depth, inserted, unmerge, balance), {})[seed] = mean(chosen)
        rows.setdefault("Hetero Ensemble", {})[seed] = mean([m for m in merges if m["pair"].startswith("hetero") and m["method"] == "ensemble"])
    return rows


def _options(record: dict[str, Any]) -> tuple[str, str]:
    """(unmerge, output_balance) of a merge record; records written before the options say nothing."""
    return record.get("unmerge") or "copy", record.get("output_balance") or "none"


def detail_rows(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for seed, data in per_seed.items():
        for name, values in data["singles"].items():
            rows.setdefault(f"{name} model", {})[seed] = values
        for m in data["merges"]:
            label = f"{m['pair']}: {LABELS[m['method']]}" + (f"+{m['depth'].upper()}" if m["depth"] else "")
            label += f", inserted {m['inserted']}" if m.get("inserted") not in (None, "inert") else ""
            label += _suffix(*_options(m))
            rows.setdefault(label, {})[seed] = {c: m[c] for c in COLUMNS}
    return rows


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    array = scale * np.asarray(values, dtype=float)
    std = array.std(ddof=1) if len(array) > 1 else 0.0
    return f"{array.mean():.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> list[str]:
    lines = ["| method | " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * len(HEADERS)]
    for name, per_seed in rows.items():
        cells = [cell([per_seed[s][c] for s in seeds]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def checks(rows: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> list[dict[str, Any]]:
    """The paper's claims, per seed and on the seed means (differences in accuracy points)."""

    def value(row: str, column: str, seed: int | None = None) -> float:
        if seed is None:
            return float(np.mean([rows[row][s][column] for s in seeds])) * 100
        return rows[row][seed][column] * 100

    claims = []

    def claim(name: str, fn) -> None:
        per_seed = {s: fn(s) for s in seeds}
        held = [s for s in seeds if per_seed[s][0]]
        claims.append({"claim": name, "holds_on_means": fn(None)[0], "detail_on_means": fn(None)[1],
                       "seeds_holding": len(held), "seeds": len(seeds),
                       "per_seed": {str(s): per_seed[s][1] for s in seeds}})

    def within(a: str, b: str, column: str, tolerance: float):
        def fn(seed):
            diff = value(a, column, seed) - value(b, column, seed)
            return abs(diff) <= tolerance or diff > 0, f"{a} - {b} = {diff:+.1f} points ({column})"
        return fn

    def above(a: str, bs: list[str], column: str):
        def fn(seed):
            margin = value(a, column, seed) - max(value(b, column, seed) for b in bs)
            return margin > 0, f"{a} - best of {', '.join(bs)} = {margin:+.1f} points ({column})"
        return fn

    def at_least(a: str, b: str, column: str):
        def fn(seed):
            diff = value(a, column, seed) - value(b, column, seed)
            return diff >= 0, f"{a} - {b} = {diff:+.1f} points ({column})"
        return fn

    claim("hetero Zip+LMA within 2 points of (or above) homo Zip, per-task avg", within("Hetero Zip+LMA", "Homo Zip", "average", 2.0))
    claim("hetero Zip+LMA within 2 points of (or above) homo Zip, joint", within("Hetero Zip+LMA", "Homo Zip", "joint", 2.0))
    claim("hetero Zip+LMA within 2 points of (or above) homo Zip of the deep pair (the merged structure), per-task avg",
          within("Hetero Zip+LMA", "Homo Zip, deep pair only", "average", 2.0))
    claim("hetero Zip+LMA within 2 points of (or above) homo Zip of the deep pair, joint",
          within("Hetero Zip+LMA", "Homo Zip, deep pair only", "joint", 2.0))
    claim("homo Zip within 2 points of (or above) the ensemble of the same pairs, per-task avg",
          within("Homo Zip", "Homo Ensemble", "average", 2.0))
    claim("inserted units inert at least as good as matched (Xu et al.), hetero Zip+LMA, per-task avg",
          at_least("Hetero Zip+LMA", hetero_label("zip", "lma", "matched"), "average"))
    claim("inserted units inert at least as good as matched (Xu et al.), hetero Zip+LMA, joint",
          at_least("Hetero Zip+LMA", hetero_label("zip", "lma", "matched"), "joint"))
    claim("hetero Zip+LMA above both single models, per-task avg", above("Hetero Zip+LMA", ["Task A", "Task B"], "average"))
    claim("hetero Zip+LMA above both single models, joint", above("Hetero Zip+LMA", ["Task A", "Task B"], "joint"))
    claim("hetero Zip+LMA above homo Avg, per-task avg", above("Hetero Zip+LMA", ["Homo Avg"], "average"))
    for method in ("Zip", "Permute"):
        for column in ("average", "joint"):
            claim(f"{method}: LMA at least as good as SMA, {'per-task avg' if column == 'average' else 'joint'}",
                  at_least(f"Hetero {method}+LMA", f"Hetero {method}+SMA", column))
    # fxmerge's regression unmerge: the same claims, like with like, and against the copy unmerge
    hetero, homo = hetero_label("zip", "lma", "inert", "regression"), homo_label("zip", "regression")
    for column, text in (("average", "per-task avg"), ("joint", "joint")):
        claim(f"regression unmerge: hetero Zip+LMA within 2 points of (or above) homo Zip of the deep pair, {text}",
              within(hetero, f"{homo}, deep pair only", column, 2.0))
    for column, text in (("average", "per-task avg"), ("joint", "joint")):
        claim(f"regression unmerge: homo Zip within 2 points of (or above) the ensemble of the same pairs, {text}",
              within(homo, "Homo Ensemble", column, 2.0))
    claim("regression unmerge: Zip LMA at least as good as SMA, per-task avg",
          at_least(hetero, hetero_label("zip", "sma", "inert", "regression"), "average"))
    # and with the output layers balanced (output_balance="norm")
    hetero_b, homo_b = hetero_label("zip", "lma", "inert", "regression", "norm"), homo_label("zip", "regression", "norm")
    for column, text in (("average", "per-task avg"), ("joint", "joint")):
        claim(f"regression unmerge + output balance: hetero Zip+LMA within 2 points of (or above) homo Zip of the deep pair, {text}",
              within(hetero_b, f"{homo_b}, deep pair only", column, 2.0))
        claim(f"regression unmerge + output balance: homo Zip within 2 points of (or above) the ensemble, {text}",
              within(homo_b, "Homo Ensemble", column, 2.0))
        claim(f"output balance at least as good as none: hetero Zip+LMA, regression unmerge, {text}", at_least(hetero_b, hetero, column))
        claim(f"output balance at least as good as none: hetero Zip+LMA, copy unmerge, {text}",
              at_least(hetero_label("zip", "lma", "inert", "copy", "norm"), "Hetero Zip+LMA", column))
    for a, b in ((homo, "Homo Zip"), (hetero, "Hetero Zip+LMA"), (homo_label("permute", "regression"), "Homo Permute"),
                 (hetero_label("permute", "lma", "inert", "regression"), "Hetero Permute+LMA")):
        for column, text in (("average", "per-task avg"), ("joint", "joint")):
            claim(f"regression unmerge at least as good as copy: {b}, {text}", at_least(a, b, column))
    return claims


def segment_summary(per_seed: dict[int, dict[str, Any]], seeds: list[int]) -> list[str]:
    lines = []
    for seed in seeds:
        for m in per_seed[seed]["merges"]:
            if m["depth"] and m["method"] == "zip" and m.get("inserted", "inert") == "inert" and _options(m) == ("copy", "none"):
                segments = " ".join("[" + ",".join(map(str, s)) + "]" for s in m["segments"])
                lines.append(f"| {seed} | {m['pair']} | {m['depth'].upper()} | {segments} | {m['objective_value']:.3f} |")
    return ["| seed | pair | objective | segments (deep unit indices per shallow unit) | objective value |",
            "|---:|---|---|---|---:|", *lines]


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the tables (defaults left out)."""
    parts = ["python benchmarks/depth.py", "--seeds", *map(str, args.seeds), "--families", *args.families]
    if getattr(args, "no_barrier", False):
        parts.append("--no-barrier")
    for flag, default in (("epochs", 15), ("width_multiplier", 4), ("name", "depth")):
        value = getattr(args, flag, default)
        if value != default:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join(parts)


def markdown(results: dict[str, dict[int, dict[str, Any]]], args: argparse.Namespace, machine: dict, total: float) -> str:
    seeds = args.seeds
    lines = [
        "# Depth-heterogeneous merging on digits (analogue of Table I, Xu et al.)",
        "",
        f"Produced by `{command_line(args)}` (seeds {' '.join(map(str, seeds))}, {args.epochs} epochs, "
        f"width x{getattr(args, 'width_multiplier', 1)}, "
        f"embedding dim {args.embed_dim}, {args.calibration_batches} calibration batches of 64, zip alpha {args.alpha}, "
        f"beta {args.beta}); total {total / 60:.1f} min.",
        "",
        "Protocol (`fxmerge.experiments`, as `benchmarks/homogeneous.py`): scikit-learn digits (8x8), the 10 "
        "classes split into two disjoint 5-class tasks per seed, one fixed CLIP-style class-embedding head; "
        "for every seed a shallow and a deep model are trained on task A, and a shallow and a deep model on "
        f"task B (`train_task_models`, {args.epochs} epochs). Test accuracy in %: joint = argmax over all 10 classes, "
        "task A/B = argmax within the task's own 5 classes, avg = mean of task A and B. Mean ± sample std over "
        f"{len(seeds)} seeds. Calibration: the training inputs of both tasks, no labels; BatchNorm statistics "
        "are reset on them after every merge (as in ZipIt!).",
        "",
        "Rows as in the paper: **Task A / Task B** = mean of the shallow and the deep single model; **Homo** = "
        "merging two models of the same depth (mean of the shallow pair and the deep pair); **Hetero** = "
        "merging a shallow model with a deep model trained on the other task (mean of shallow-A + deep-B and "
        "deep-A + shallow-B), depth aligned by SMA (segment-wise: last unit of each segment) or LMA "
        "(layer-wise: every unit of each segment), the shallow model then extended with identity units. "
        "Permute = Hungarian alignment to one model and averaging; Zip = ZipIt! (full zipping). The inserted "
        "units of a residual net are zero-residual blocks: by default (`inserted=\"inert\"`) their hidden channels, "
        "which never reach the shallow model's output, take no part in the merge (those groups get the deep model's "
        "weights); the row marked *inserted units matched (Xu et al.)* merges them like real units, as the paper "
        "does. **Ensemble** = both models run, their logits under the shared head averaged "
        "(`fxmerge.evaluation.Ensemble`): the upper reference, with twice the compute. Rows marked *regression "
        "unmerge* (fxmerge's `unmerge=\"regression\"`, not in the paper): the same matches (M_k), but every layer "
        "reading a merged group sees the least-squares reconstruction of its model's units from all the merged "
        "units (fitted on the group's calibration statistics, shrunk toward the copy) instead of a copy of the one "
        "merged unit each went to (ZipIt!'s unmerge, the other rows). Rows marked *output balance* "
        "(`output_balance=\"norm\"`): each model's output layer weighted by 1 / the rms norm of its outputs on the "
        "calibration data (a deeper ResNet's embeddings have 2-3x the norm of a shallower one's).",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, Python {machine['python']}, torch "
        f"{machine['torch']}, {machine['torch_threads']} torch thread(s).",
    ]
    for family, per_seed in results.items():
        _, _, description = pairs(getattr(args, "width_multiplier", 1))[family]
        depths = per_seed[seeds[0]]["depths"]
        rows = table_rows(per_seed)
        lines += ["", f"## {family}: {description}", "",
                  f"Units along the spine (what the depth DP aligns): shallow {depths['shallow A']}, deep {depths['deep A']}; "
                  f"feasible segmentations under the DP's constraints: {depths.get('feasible segmentations', '?')}"
                  + (" (so SMA and LMA necessarily choose the same one)." if depths.get("feasible segmentations") == 1 else "."),
                  "", *markdown_table(rows, seeds), "", "Claims of the paper, checked (per seed and on the means):", ""]
        for c in checks(rows, seeds):
            verdict = "holds" if c["holds_on_means"] else "DOES NOT HOLD"
            lines.append(f"- {c['claim']}: {verdict} on the means ({c['detail_on_means']}); "
                         f"{c['seeds_holding']}/{c['seeds']} seeds")
        lines += ["", "<details><summary>Every model and pair</summary>", "", *markdown_table(detail_rows(per_seed), seeds),
                  "", "</details>", "", "Depth alignments of the zip merges:", "", *segment_summary(per_seed, seeds)]
        if not args.no_barrier:
            lines += ["", f"Loss barriers along the linear path between model A and model B (joint cross-entropy on the "
                      f"test set, {args.barrier_steps} points; barrier = max over the path minus the mean of the two end "
                      "points, as `fxmerge.metrics.loss_barrier`; midpoint = loss at lambda 0.5 minus that mean). "
                      "plain: B as trained; aligned: B's units permuted into A's order with the matching of the "
                      "permute merge. BN interpolated: BatchNorm running statistics interpolated like the weights "
                      "(`fxmerge.metrics.loss_curve`); BN reset: recomputed on 4 calibration batches at every point, "
                      "as a merge does (the aligned midpoint is then the permute merge). For a heterogeneous pair the "
                      "shallow model is first extended to the deep structure (LMA), as the merge does. The two models "
                      "are trained on different tasks, so their end-point losses on the joint task differ and the "
                      "maximum often sits at an end point: the barrier then equals half the end-point difference for "
                      "both plain and aligned; the midpoint column is the informative one.", "",
                      "| pair | barrier, BN interp.: plain / aligned | barrier, BN reset: plain / aligned "
                      "| midpoint, BN reset: plain / aligned |", "|---|---:|---:|---:|"]
            for pair in per_seed[seeds[0]]["barriers"]:
                cells = []
                for variant, key in (("bn_interpolated", "barrier"), ("bn_reset", "barrier"), ("bn_reset", "midpoint_excess")):
                    plain = cell([per_seed[s]["barriers"][pair][f"plain_{variant}"][key] for s in seeds], 1.0, 2)
                    aligned = cell([per_seed[s]["barriers"][pair][f"aligned_{variant}"][key] for s in seeds], 1.0, 2)
                    cells.append(f"{plain} / {aligned}")
                lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        lines += ["", f"CKA heatmaps (seed {seeds[0]}, zip merge of shallow A with deep B): "
                  f"`{args.name}_{family}_cka_lma.png`, `{args.name}_{family}_cka_sma.png`; merged groups: "
                  f"`{args.name}_{family}_groups_zip_lma.png`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        saved = argparse.Namespace(**{**payload["config"], "out": Path(payload["config"]["out"]), "render": None})
        results = {
            family: {int(seed): data for seed, data in entry["per_seed"].items()}
            for family, entry in payload["results"].items()
        }
        text = markdown(results, saved, payload["machine"], payload["total_seconds"])
        (args.render.parent / f"{saved.name}.md").write_text(text)
        print(text)
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for family in args.families:
        results[family] = {seed: run_seed(family, seed, args, args.out) for seed in args.seeds}
    total = time.perf_counter() - start
    machine = machine_info()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "config": config,
        "pairs": {family: pairs(args.width_multiplier)[family][2] for family in args.families},
        "machine": machine,
        "source": source_info(),
        "total_seconds": total,
        "results": {
            family: {
                "table": table_rows(per_seed),
                "checks": checks(table_rows(per_seed), args.seeds),
                "per_seed": {str(seed): data for seed, data in per_seed.items()},
            }
            for family, per_seed in results.items()
        },
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    text = markdown(results, args, machine, total)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
