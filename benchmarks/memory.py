"""Peak memory and wall time of covariance accumulation and of whole merges; the feature-statistics
pass's seconds against the models' forward passes.

Usage:
    python benchmarks/memory.py [--cases update-8192 resnet50 wide_resnet50_2 wide_resnet50_2@512MiB
                                 speed-resnet18 speed-vit-tiny]
                                [--baseline-features FILE] [--threads 2] [--repeats 3] [--out benchmarks/results]

Every case runs in a fresh subprocess (``--child``), whose peak resident set size is read from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (tracemalloc does not see torch's allocations).
"before" is the process's resident size just before the measured call (models, data and torch
loaded), so "peak - before" is what the call itself added.

Cases:

* ``update-8192``: ``RunningMoments(8192)`` — the joint covariance of a group of 4096 units per
  model in 2 models (8192 x 8192 float64 = 512 MiB) — updated twice with 2048 samples given as
  the two models' (2048, 4096) float32 feature blocks.
* ``resnet50`` / ``wide_resnet50_2``: ``fxmerge.merge`` of two torchvision models of that
  architecture (random weights, seeds 0 and 1, eval mode), method zip, 4 calibration batches of
  8x3x64x64. "widest cov" is the largest joint covariance (N x N float64, N = the sum of the
  group's widths); "all covs" is the sum over every (group, tap) covariance held during the
  feature-statistics pass. "peak after pass" is ru_maxrss when each pass of ``merge`` ends.
  "features peak" is the peak resident size during the feature-statistics pass (VmHWM, reset
  with ``/proc/self/clear_refs`` when the pass starts) minus the resident size when it starts:
  everything the pass added at its peak (statistics, correlations, taps' features, buffers).
* ``wide_resnet50_2@512MiB``: the same merge with ``max_memory="512MiB"``: the statistics are
  scheduled over several passes ("passes"); "same weights" compares a SHA-256 of the merged
  state_dict with the unbounded case's.
* ``speed-resnet18`` / ``speed-vit-tiny``: a torchvision resnet18 pair and a ViT-Tiny-like pair
  (``fxmerge.zoo.vit(patch_size=8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768,
  image_size=64)``), seeds 0 and 1, eval, 8 batches of 16x3x64x64 randn, method zip, ONE torch
  thread: the features pass's seconds (``result.timings["features"]``) against the seconds of
  both models' forward passes over the batches, measured in the same process. Each version runs
  ``--repeats`` times, interleaved with the baseline; the table gives the medians.

``--baseline-features FILE`` additionally runs every case with another version of
``fxmerge/passes/features.py`` (e.g. ``git show <commit>:fxmerge/passes/features.py > old.py``)
patched in, for a before/after comparison.

Writes ``memory.md`` and ``memory.json`` (every number, the machine, the versions).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MERGE_CASES = {"resnet50": None, "wide_resnet50_2": None, "wide_resnet50_2@512MiB": "512MiB"}  # case -> max_memory
SPEED_CASES = ("speed-resnet18", "speed-vit-tiny")
CASES = ("update-8192", *MERGE_CASES, *SPEED_CASES)
MiB = 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # Linux: KiB


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MiB
    return float("nan")


def _reset_peak() -> None:
    """Reset the process's peak resident size (VmHWM) to its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _features_module(path: str | None) -> Any:
    """fxmerge.passes.features, or the version in ``path`` loaded and patched into fxmerge.api."""
    import fxmerge.api
    import fxmerge.passes.features as current

    if path is None:
        return current
    spec = importlib.util.spec_from_file_location("fxmerge_baseline_features", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    def feature_statistics(*args: Any, process_group: Any = None, max_memory: Any = None, **kwargs: Any) -> Any:
        if max_memory is not None:
            raise SystemExit("the baseline features.py has no max_memory")
        return module.feature_statistics(*args, **kwargs)  # an older signature: one process, no budget

    fxmerge.api.feature_statistics = feature_statistics
    return module


def _tally_moments(features: Any) -> list[int]:
    """Record the dimension of every RunningMoments the module creates."""
    dims: list[int] = []
    original = features.RunningMoments.__init__

    def init(self: Any, dim: int, *args: Any, **kwargs: Any) -> None:
        dims.append(dim)
        original(self, dim, *args, **kwargs)

    features.RunningMoments.__init__ = init
    return dims


def _child_update(features: Any) -> dict:
    import torch

    dim, samples = 8192, 2048
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(samples, dim // 2, generator=generator) + 1.0 for _ in range(2)]
    moments = features.RunningMoments(dim)
    chunked = "chunk_rows" in features.RunningMoments.update.__code__.co_varnames
    before = _rss_mib()
    start = time.perf_counter()
    for _ in range(2):
        # The pre-chunking update takes the joint (samples, dim) float32 matrix, which its
        # feature_statistics built with torch.cat: that copy counts against it.
        moments.update(blocks if chunked else torch.cat(blocks, dim=1))
    wall = time.perf_counter() - start
    cov_mib = dim * dim * 8 / MiB
    return {
        "wall_s": wall,
        "before_mib": before,
        "peak_mib": _peak_mib(),
        "widest_dim": dim,
        "widest_cov_mib": cov_mib,
        "all_covs_mib": cov_mib,
        "input_mib": sum(b.numel() * b.element_size() for b in blocks) / MiB,
    }


def _child_merge(case: str, features: Any) -> dict:
    import hashlib

    import torch
    import torchvision.models as tvm

    import fxmerge
    import fxmerge.api

    dims = _tally_moments(features)
    pass_peaks: dict[str, float] = {}
    features_pass: dict[str, float] = {}
    plans: list[int] = []
    timed = fxmerge.api._timed

    @contextmanager
    def recording(timings: dict[str, float], name: str) -> Iterator[None]:
        if name == "features":
            _reset_peak()
            features_pass["start_mib"] = _rss_mib()
        with timed(timings, name):
            yield
        if name == "features":
            features_pass["peak_mib"] = _rss_mib("VmHWM")
        pass_peaks[name] = _peak_mib()

    fxmerge.api._timed = recording
    if hasattr(features, "plan_passes"):
        plan = features.plan_passes

        def counting_plan(*args: Any) -> Any:
            passes = plan(*args)
            plans.append(len(passes))
            return passes

        features.plan_passes = counting_plan
    budget = MERGE_CASES[case]
    builder = getattr(tvm, case.split("@")[0])
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(builder(weights=None).eval())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 64, 64, generator=generator) for _ in range(4)]
    before = _rss_mib()
    start = time.perf_counter()
    # the process's thread count, not "auto": weights compared across processes must not depend
    # on the load of the moment (torch's convolutions round differently at 1 and 2 threads)
    result = fxmerge.merge(models, batches, method="zip", quiet=True, max_memory=budget, threads=torch.get_num_threads())
    wall = time.perf_counter() - start
    widest = max(result.groups, key=lambda g: sum(g.sizes) if not g.fixed else 0)
    digest = hashlib.sha256()
    for key, value in sorted(result.module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return {
        "wall_s": wall,
        "before_mib": before,
        "peak_mib": _peak_mib(),
        "widest_group": widest.name,
        "widest_sizes": list(widest.sizes),
        "widest_dim": max(dims),
        "widest_cov_mib": max(dims) ** 2 * 8 / MiB,
        "all_covs_mib": sum(d * d * 8 for d in dims) / MiB,
        "num_covs": len(dims),
        "pass_peaks_mib": pass_peaks,
        "features_start_mib": features_pass["start_mib"],
        "features_peak_mib": features_pass["peak_mib"],
        "max_memory": result.config.max_memory if hasattr(result.config, "max_memory") else None,
        "passes": plans[-1] if plans else 1,
        "models_mib": sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values()) / MiB,
        "state_sha256": digest.hexdigest(),
        "timings_s": result.timings,
    }


def _child_speed(case: str) -> dict:
    import torch
    import torchvision.models as tvm

    import fxmerge
    from fxmerge import zoo

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        if case == "speed-vit-tiny":
            model = zoo.vit(patch_size=8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, image_size=64)
        else:
            model = tvm.resnet18(weights=None)
        models.append(model.eval())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 64, 64, generator=generator) for _ in range(8)]
    with torch.no_grad():
        models[0](batches[0])  # warm-up
        start = time.perf_counter()
        for model in models:
            for batch in batches:
                model(batch)
        forward = time.perf_counter() - start
    start = time.perf_counter()
    result = fxmerge.merge(models, batches, method="zip", quiet=True, threads=torch.get_num_threads())
    wall = time.perf_counter() - start
    return {"wall_s": wall, "forward_s": forward, "features_s": result.timings["features"], "timings_s": result.timings}


def child(case: str, features_path: str | None, threads: int) -> None:
    import torch

    torch.set_num_threads(1 if case in SPEED_CASES else threads)
    features = _features_module(features_path)
    if case == "update-8192":
        record = _child_update(features)
    elif case in SPEED_CASES:
        record = _child_speed(case)
    else:
        record = _child_merge(case, features)
    print("RESULT " + json.dumps(record))


def run_case(case: str, features_path: str | None, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", case, "--threads", str(threads)]
    if features_path:
        command += ["--features", features_path]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    record = json.loads(lines[-1][len("RESULT ") :])
    return record if case in SPEED_CASES else derive(record)


def derive(record: dict) -> dict:
    """Add the derived figures: what the measured call added, and the statistics' footprint.

    footprint: the memory the covariance statistics took at their peak — for ``update-8192``
    the (pre-allocated) covariance plus what the updates added; for a merge, how much the
    feature-statistics pass raised the process's peak (ru_maxrss after it minus before it),
    which includes every covariance it holds, the taps' features and the update buffers.
    """
    record["added_mib"] = record["peak_mib"] - record["before_mib"]
    passes = record.get("pass_peaks_mib")
    if passes:
        record["footprint_mib"] = passes["features"] - passes["structure"]
    else:
        record["footprint_mib"] = record["widest_cov_mib"] + record["added_mib"]
    record["footprint_over_covs"] = record["footprint_mib"] / record["all_covs_mib"]
    if "features_peak_mib" in record:
        record["features_added_mib"] = record["features_peak_mib"] - record["features_start_mib"]
    return record


def machine_info(threads: int) -> dict:
    import torch
    import torchvision

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": __import__("numpy").__version__,
    }


def source_info() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "--", "fxmerge").splitlines()}


def _row(case: str, version: str, r: dict, results: dict) -> str:
    passes = r.get("pass_peaks_mib", {})
    where = ", ".join(f"{k} {v:.0f}" for k, v in passes.items() if k in ("trace", "features", "width", "rewrite", "repair"))
    features_s = r["timings_s"]["features"] if "timings_s" in r else r["wall_s"]
    widest = f"{r['widest_dim']} ({'+'.join(map(str, r['widest_sizes']))})" if "widest_sizes" in r else str(r["widest_dim"])
    budget = f"{r['max_memory'] / MiB:.0f}" if r.get("max_memory") else "-"
    unbounded = results.get(case.split("@")[0], {}).get(version, {})
    same = "-" if "@" not in case or "state_sha256" not in unbounded else (
        "yes" if r.get("state_sha256") == unbounded["state_sha256"] else "**no**"
    )
    added = f"{r['features_added_mib']:.0f}" if "features_added_mib" in r else "-"
    return (
        f"| {case} | {version} | {r['wall_s']:.1f} | {features_s:.1f} | {widest} | {r['widest_cov_mib']:.0f} | "
        f"{r['all_covs_mib']:.0f} | {r['footprint_mib']:.0f} | **{r['footprint_over_covs']:.2f}** | {budget} | "
        f"{r.get('passes', '-')} | {added} | {same} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | {where or '-'} |"
    )


def _speed_row(case: str, version: str, r: dict) -> str:
    runs = ", ".join(f"{run['features_s']:.2f}" for run in r["runs"])
    return (
        f"| {case} | {version} | **{r['features_s']:.2f}** | {r['forward_s']:.2f} | "
        f"{r['features_s'] / r['forward_s']:.2f} | {runs} |"
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def write(out: Path, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    lines = [
        "# Memory: covariance accumulation and whole merges; the statistics pass against forward passes",
        "",
        "Produced by `python benchmarks/memory.py"
        + (" --baseline-features FILE" if payload["baseline_features"] else "")
        + f" --threads {m['torch_threads']}`. Each row is a fresh process; peak = `ru_maxrss`, "
        "before = resident size just before the measured call (MiB). "
        "widest N = joint width of the widest group (per-model widths); widest cov = N x N float64; "
        "all covs = every (group, tap) covariance held during the feature-statistics pass. "
        "`update-8192`: two `RunningMoments(8192).update` calls with 2048 samples (two models' "
        "(2048, 4096) float32 blocks). resnet50 / wide_resnet50_2: `fxmerge.merge` of two torchvision "
        "models (random weights), method zip, 4 calibration batches of 8x3x64x64; statistics (s) = the "
        "features pass; the last column is ru_maxrss (MiB) when each pass ends. statistics footprint = "
        "for update-8192, the covariance plus what the updates added; for a merge, how much the "
        "feature-statistics pass raised the peak (every covariance it holds, taps' features, buffers). "
        "footprint / covs = footprint / all covs: the goal is at most about 2. "
        "`@512MiB`: the same merge with `max_memory=\"512MiB\"`; passes = statistics passes over the "
        "calibration data; features peak = the peak resident size during the features pass (VmHWM, "
        "reset when the pass starts) minus the resident size when it starts (MiB); same weights = the "
        "merged state_dict's SHA-256 equals the unbounded merge's.",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s) (speed cases: 1); "
        f"python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, numpy {m['numpy']}. Source: commit "
        f"{payload['source']['commit'][:10]}"
        + (f" with uncommitted changes in {len(payload['source']['modified'])} file(s)" if payload["source"]["modified"] else "")
        + ".",
        "",
    ]
    if payload["baseline_features"]:
        lines += [
            f"`baseline`: the same case with `{payload['baseline_features']}` "
            f"({payload.get('baseline_label') or 'another features.py'}) patched in.",
            "",
        ]
    merges = {case: versions for case, versions in payload["results"].items() if case not in SPEED_CASES}
    speeds = {case: versions for case, versions in payload["results"].items() if case in SPEED_CASES}
    if merges:
        lines += [
            "| case | features.py | wall (s) | statistics (s) | widest N | widest cov (MiB) | all covs (MiB) | "
            "statistics footprint (MiB) | footprint / covs | max_memory (MiB) | passes | features peak (MiB) | "
            "same weights | before (MiB) | peak (MiB) | peak after pass (MiB) |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for case, versions in merges.items():
            for version, record in versions.items():
                lines.append(_row(case, version, record, payload["results"]))
        lines.append("")
    if speeds:
        lines += [
            "Feature statistics against the models' forward passes (1 torch thread; the two models' forward "
            "passes over the 8 batches, measured in the same process; medians of the runs, interleaved "
            "with the baseline):",
            "",
            "| case | features.py | features (s) | forward passes (s) | features / forward | features, every run (s) |",
            "|---|---|---:|---:|---:|---|",
        ]
        for case, versions in speeds.items():
            for version, record in versions.items():
                lines.append(_speed_row(case, version, record))
        lines.append("")
    lines += payload.get("notes", [])
    (out / "memory.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--baseline-features", default=None, help="another features.py to compare with")
    parser.add_argument("--baseline-label", default=None, help="what the baseline is, for the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each speed case per version")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--render", action="store_true", help="rewrite memory.md from memory.json in --out")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--features", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.features, args.threads)
        return 0
    if args.render:
        payload = json.loads((args.out / "memory.json").read_text())
        for case, versions in payload["results"].items():
            for record in versions.values():
                if case not in SPEED_CASES:
                    derive(record)
        write(args.out, payload)
        return 0
    results: dict[str, dict[str, dict]] = {}
    for case in args.cases:
        results[case] = {}
        versions = [("current", None)]
        if args.baseline_features and "@" not in case:  # the budget is new: no baseline
            versions.append(("baseline", args.baseline_features))
        if case in SPEED_CASES:
            runs: dict[str, list[dict]] = {version: [] for version, _ in versions}
            for _ in range(args.repeats):
                for version, path in versions:
                    runs[version].append(run_case(case, path, args.threads))
            for version, records in runs.items():
                results[case][version] = {
                    "runs": records,
                    "features_s": _median([r["features_s"] for r in records]),
                    "forward_s": _median([r["forward_s"] for r in records]),
                }
                print(_speed_row(case, version, results[case][version]), flush=True)
            continue
        for version, path in versions:
            record = run_case(case, path, args.threads)
            results[case][version] = record
            print(_row(case, version, record, results), flush=True)
    payload = {
        "config": {"cases": args.cases, "threads": args.threads, "batches": "4 x (8, 3, 64, 64)", "method": "zip",
                   "speed_batches": "8 x (16, 3, 64, 64), 1 thread", "repeats": args.repeats},
        "baseline_features": args.baseline_features,
        "baseline_label": args.baseline_label,
        "machine": machine_info(args.threads),
        "source": source_info(),
        "results": results,
    }
    write(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
