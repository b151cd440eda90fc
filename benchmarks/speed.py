"""What a merge costs against the forward passes it needs (issue 12): ratio, seconds per stage, peak memory.

Usage:
    python benchmarks/speed.py [--cases resnet18 vit-tiny resnet50 vit-b16] [--repeats 3]
                               [--batches 8] [--batch-size 16] [--threads 1] [--device cpu]
                               [--methods zip mudsc] [--zipit-model] [--out benchmarks/results] [--update]

A merge needs at least one forward pass of every model over the calibration data (feature
statistics) and one of the merged model (BatchNorm reset): K + 1 passes. For every case (a pair of
random-init models, seeds 0 and 1, eval mode; ``--batches`` batches of ``--batch-size`` x 3 x 64 x
64 N(0, 1) images, seed 1) and method, one fresh process measures, ``--repeats`` times and
interleaved (forward passes, merge, forward passes, merge, ...):

* ``forward``: the K models over every batch, plus model 0 again in the merged model's place (at
  ``width="max"`` the merged model has model 0's architecture and widths), under ``no_grad``;
* ``merge``: ``fxmerge.merge(models, batches, method=..., quiet=True)``, and its stages
  (``result.timings``).

The table gives medians over the repeats; ratio = merge / forward (the goal: <= 2.0 for zip,
<= 2.5 for mudsc on resnet18 and vit-tiny). Peak memory is the process's peak resident set
(``ru_maxrss``) and, before the first merge, its resident set with models, data and torch loaded;
on CUDA, ``torch.cuda.max_memory_allocated``.

``--zipit-model``: the same merge with ZipIt!'s matcher in place of fxmerge's. The ZipIt! code
(github.com/gstoica27/ZipIt) hand-writes a graph per architecture, so only its matcher can be
compared like for like on these models: every zip matching the merge makes is timed again with
``fxmerge.match.reference.naive_zip_matching`` — the direct O(N^3) transcription of ZipIt!'s
``match_tensors_zipit`` loop (one full-matrix argmax per merge), which makes the same merges —
and the column gives merge - fxmerge's matcher seconds + the reference's (one run, not a median).

Floor (CPU): the table also gives, per merge, the seconds of the two parts of the feature
statistics no implementation can skip — the models' forward passes with the taps, and the Gram
products of the statistics with their float64 accumulation — and the floor ratio (those two +
the matcher + the repair stage's BatchNorm pass) / forward: what the ratio would be if the merge
spent nothing else (trace, weight similarity, centring, rewrite, ...).

Cases: ``resnet18`` / ``resnet50`` (torchvision, 10 classes), ``vit-tiny`` (``fxmerge.zoo.vit``:
6 layers, width 192, 3 heads, MLP 768, patch 8), ``vit-b16`` (12 layers, width 768, 12 heads, MLP
3072, patch 16; torchvision's VisionTransformer at 64 x 64).

Writes ``speed.md`` and ``speed.json`` (every number, the machine, the versions).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = ("resnet18", "vit-tiny", "resnet50", "vit-b16")
STAGES = ("trace", "depth", "dependency", "structure", "features", "width", "rewrite", "repair")
MiB = 2**20


def build(case: str, seed: int) -> Any:
    import torch
    import torchvision

    from fxmerge import zoo

    torch.manual_seed(seed)
    if case == "resnet18":
        return torchvision.models.resnet18(num_classes=10).eval()
    if case == "resnet50":
        return torchvision.models.resnet50(num_classes=10).eval()
    if case == "vit-tiny":
        return zoo.vit(patch_size=8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, image_size=64).eval()
    if case == "vit-b16":
        return zoo.vit(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, image_size=64).eval()
    raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One case and method, measured in this (fresh) process."""
    import torch

    import fxmerge.match.zip as zip_module
    from fxmerge import merge
    from homogeneous import source_info
    from memory import _rss_mib  # the resident set size, as the memory benchmark reads it

    torch.set_num_threads(args.threads)
    device = args.device
    models = [build(args.case, seed).to(device) for seed in (0, 1)]
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch_size, 3, 64, 64, generator=generator).to(device) for _ in range(args.batches)]

    def forward_passes() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for model in (*models, models[0]):  # K models, and the merged model's architecture
                for batch in batches:
                    model(batch)
        _sync(device)
        return time.perf_counter() - start

    forward_passes()  # warm-up: first-call allocations and kernel choices are not the merge's
    rss_before = _rss_mib()
    forwards, merges, stages = [], [], []
    matcher_calls: list[tuple[Any, ...]] = []
    matcher_seconds = [0.0]
    original = zip_module.zip_matching

    def timed_zip_matching(similarity, sizes, target_width, alpha, beta, **options):  # type: ignore[no-untyped-def]
        if recording[0]:  # before the matcher may overwrite it
            matcher_calls.append((similarity.copy(), list(sizes), target_width, alpha, beta))
        start = time.perf_counter()
        result = original(similarity, sizes, target_width, alpha, beta, **options)
        matcher_seconds[0] += time.perf_counter() - start
        return result

    recording = [False]  # the matchings are recorded in one more merge, after the peak is read
    zip_module.zip_matching = timed_zip_matching
    floor_seconds = {"taps": 0.0, "gram": 0.0, "gram_macs": 0.0}
    floor_measured = not device.startswith("cuda")  # the wrappers time without synchronising
    restore_floor = _time_floor_parts(floor_seconds) if floor_measured else (lambda: None)
    matcher_per_merge: list[float] = []
    taps_per_merge: list[float] = []
    gram_per_merge: list[float] = []
    for repeat in range(args.repeats):
        forwards.append(forward_passes())
        matcher_seconds[0] = 0.0
        floor_seconds.update(taps=0.0, gram=0.0, gram_macs=0.0)
        _sync(device)
        start = time.perf_counter()
        result = merge(models, batches, method=args.method, quiet=True, threads=args.threads)
        _sync(device)
        merges.append(time.perf_counter() - start)
        stages.append(dict(result.timings))
        matcher_per_merge.append(matcher_seconds[0])
        taps_per_merge.append(floor_seconds["taps"])
        gram_per_merge.append(floor_seconds["gram"])
    row: dict[str, Any] = {
        "case": args.case,
        "method": args.method,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "forward_s": forwards,
        "merge_s": merges,
        "stages_s": stages,
        "matcher_s": matcher_per_merge,
        **({"taps_s": taps_per_merge, "gram_s": gram_per_merge} if floor_measured else {}),
        **({"gram_macs": floor_seconds["gram_macs"], "forward_macs": _forward_macs(models, batches)} if floor_measured else {}),
        "ratio": statistics.median(merges) / statistics.median(forwards),
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB,
        "params_m": sum(p.numel() for p in models[0].parameters()) / 1e6,
        "commit": source_info()["commit"][:10],
    }
    if device.startswith("cuda"):
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MiB
    if args.zipit_model:
        from fxmerge.match.reference import naive_zip_matching

        recording[0] = True
        merge(models, batches, method=args.method, quiet=True, threads=args.threads)

        start = time.perf_counter()
        for similarity, sizes, target, alpha, beta in matcher_calls:
            naive_zip_matching(similarity, sizes, target, alpha, beta)
        row["zipit_matcher_s"] = time.perf_counter() - start
        row["zipit_model_merge_s"] = statistics.median(merges) - statistics.median(matcher_per_merge) + row["zipit_matcher_s"]
        row["zipit_matcher_calls"] = len(matcher_calls)
        row["largest_matching"] = max((sum(c[1]) for c in matcher_calls), default=0)
    zip_module.zip_matching = original
    restore_floor()
    return row


def _forward_macs(models: list[Any], batches: list[Any]) -> float:
    """Multiply-accumulates of the forward passes ``forward_passes`` times (torch's FlopCounterMode
    over one batch of each model; every batch has the same shape)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    per_batch = []
    for model in models:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(batches[0])
        per_batch.append(counter.get_total_flops() / 2)
    return (sum(per_batch) + per_batch[0]) * len(batches)  # K models and the merged architecture


def _time_floor_parts(seconds: dict[str, float]) -> Any:
    """Add to ``seconds`` what a merge spends in the two parts of its feature statistics that no
    implementation can skip: "taps", the models' forward passes with the taps
    (``tap_extractor``'s modules), and "gram", the statistics' Gram products with their float64
    accumulation (``RunningMoments.update``'s ``_add_upper_gram_`` calls, not the rank-one
    corrections). CPU only (no synchronisation). Returns a function that undoes the wrapping."""
    import fxmerge.passes.features as features

    original_extractor, original_gram, original_update = (
        features.tap_extractor, features._add_upper_gram_, features.RunningMoments.update,
    )
    inside_update = [False]

    def timed_extractor(gm, node_names):  # type: ignore[no-untyped-def]
        extractor = original_extractor(gm, node_names)
        forward = extractor.forward

        def timed_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                seconds["taps"] += time.perf_counter() - start

        extractor.forward = timed_forward
        return extractor

    def timed_gram(scatter, chunk, panels, other=None, **options):  # type: ignore[no-untyped-def]
        if other is not None or not inside_update[0]:  # rank-one terms; weight similarity's Gram
            return original_gram(scatter, chunk, panels, other, **options)
        start = time.perf_counter()
        original_gram(scatter, chunk, panels, **options)
        seconds["gram"] += time.perf_counter() - start
        seconds["gram_macs"] += chunk.shape[0] * sum((hi - lo) * (scatter.shape[1] - lo) for lo, hi in panels)

    def flagged_update(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        inside_update[0] = True
        try:
            return original_update(self, *args, **kwargs)
        finally:
            inside_update[0] = False

    features.tap_extractor, features._add_upper_gram_ = timed_extractor, timed_gram
    features.RunningMoments.update = flagged_update

    def restore() -> None:
        features.tap_extractor, features._add_upper_gram_ = original_extractor, original_gram
        features.RunningMoments.update = original_update

    return restore


def _median_stages(row: dict[str, Any]) -> dict[str, float]:
    return {stage: statistics.median(s.get(stage, 0.0) for s in row["stages_s"]) for stage in STAGES}


def _rows_by_commit(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row.get("commit", "?"), []).append(f"{row['case']} {row['method']}")
    return found


def _floor_cells(row: dict[str, Any], stages: dict[str, float]) -> str:
    """tap forwards | statistics Gram | Gram / forward MACs | floor ratio: (tap forwards + Gram +
    matcher + repair) / forward, the ratio of a merge that spent nothing else ("-": not measured
    in that row)."""
    if "taps_s" not in row:
        return "- | - | - | -"
    taps, gram, matcher = (statistics.median(row[key]) for key in ("taps_s", "gram_s", "matcher_s"))
    floor = (taps + gram + matcher + stages["repair"]) / statistics.median(row["forward_s"])
    macs = f"{row['gram_macs'] / row['forward_macs']:.2f}" if "gram_macs" in row else "-"
    return f"{taps:.2f} | {gram:.2f} | {macs} | {floor:.2f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    from homogeneous import machine_info, source_info

    machine = {**machine_info(), "torch_threads": args.threads}  # the measuring processes' setting
    lines = [
        "# Speed: a merge against the forward passes it needs",
        "",
        f"Produced by `{' '.join(['python benchmarks/speed.py', *sys.argv[1:]])}`.",
        "",
        f"{args.batches} calibration batches of {args.batch_size}x3x64x64, random-init pairs (seeds 0, 1), "
        f"{args.threads} torch thread(s), device {rows[0]['device'] if rows else args.device}; medians of "
        f"{args.repeats} interleaved repeats in one fresh process per row. forward = the K = 2 models and the "
        "merged model's architecture over every batch (K + 1 passes, what a merge needs at least); "
        "ratio = merge / forward (goal: <= 2.0 for zip, <= 2.5 for mudsc, on resnet18 and vit-tiny). "
        "tap forwards = the models' forward passes inside the features stage, statistics Gram = its Gram "
        "products and their float64 sums, Gram / forward MACs = the multiply-accumulates of those products "
        "over those of the forward passes (FlopCounterMode); floor ratio = (tap forwards + statistics Gram + matcher + repair) / "
        "forward, the ratio of a merge that spent nothing else. "
        "Peak RSS = the process's peak (models, data, torch and the merge); before = resident size before "
        "the first merge (MiB).",
        "",
        f"Machine: {machine}. Source: {source_info()}; rows measured at "
        + ", ".join(f"{commit} ({', '.join(cases)})" for commit, cases in _rows_by_commit(rows).items()) + ".",
        "",
        "| pair | method | params (M) | forward (s) | merge (s) | **ratio** | "
        + " | ".join(STAGES)
        + " | matcher (s) | tap forwards (s) | statistics Gram (s) | Gram / forward MACs | floor ratio | peak RSS (MiB) | before (MiB) "
        "| ZipIt! matcher model (s) |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        stages = _median_stages(row)
        zipit = (
            f"{row['zipit_model_merge_s']:.1f} ({row['zipit_matcher_s']:.1f} in {row['zipit_matcher_calls']} "
            f"matchings, up to {row['largest_matching']} units)"
            if "zipit_model_merge_s" in row else "-"
        )
        peak = f"{row['peak_rss_mib']:.0f}" + (f" (CUDA {row['peak_cuda_mib']:.0f})" if "peak_cuda_mib" in row else "")
        lines.append(
            f"| {row['case']} | {row['method']} | {row['params_m']:.1f} | {statistics.median(row['forward_s']):.2f} | "
            f"{statistics.median(row['merge_s']):.2f} | **{row['ratio']:.2f}** | "
            + " | ".join(f"{stages[s]:.2f}" for s in STAGES)
            + f" | {statistics.median(row['matcher_s']):.2f} | {_floor_cells(row, stages)} | {peak} | "
            f"{row['rss_before_mib']:.0f} | {zipit} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES[:2]), choices=CASES)
    parser.add_argument("--methods", nargs="+", default=["zip", "mudsc"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--zipit-model", action="store_true", help="also time ZipIt!'s matcher on the same matchings")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--update", action="store_true", help="keep the rows of speed.json in --out that this run does not measure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for case in args.cases:
        for method in args.methods:
            command = [
                sys.executable, __file__, "--child", "--case", case, "--method", method,
                "--repeats", str(args.repeats), "--batches", str(args.batches), "--batch-size", str(args.batch_size),
                "--threads", str(args.threads), "--device", args.device,
            ] + (["--zipit-model"] if args.zipit_model and method == "zip" else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{case} {method}: the measuring process failed (exit {done.returncode})")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps({k: rows[-1][k] for k in ("case", "method", "ratio")}), file=sys.stderr, flush=True)
    if args.update and (args.out / "speed.json").exists():
        measured = {(row["case"], row["method"]) for row in rows}
        kept = [row for row in json.loads((args.out / "speed.json").read_text())["rows"] if (row["case"], row["method"]) not in measured]
        order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in CASES for m in ("zip", "mudsc"))}
        rows = sorted(kept + rows, key=lambda row: order.get((row["case"], row["method"]), len(order)))
    text = table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    from homogeneous import machine_info, source_info, write_keeping_notes

    write_keeping_notes(args.out / "speed.md", text)

    (args.out / "speed.json").write_text(
        json.dumps({"machine": machine_info(), "source": source_info(), "rows": rows}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
