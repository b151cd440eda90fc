"""Time the zip matcher against its naive O(N^3) reference and check they make the same merges.

Usage:
    python benchmarks/bench_matcher.py [--sizes 256 512 1024 2048 4096] [--naive-max 2048]
        [--compare-rev REV] [--memory] [--match-sizes 64 128 256 512 768] [--cold] [--json out.json]

For each n: two models of n units, a correlation matrix of their 2n units (seed 0; model 1 is a noisy
permuted copy of model 0, as for two trainings of one network), zip down to n merged units.  Prints a
markdown table; the fast time is the best of --repeats runs, the naive time a single run (only up to
--naive-max units per model: it is O(N^3)).  --compare-rev REV also times the fast matcher of git
revision REV (its fxmerge/match/zip.py, loaded from a temporary file) and checks that the current one
makes bit-identical merges at every size.  --memory adds the peak memory numpy allocates during one
call (tracemalloc; the input similarity is not counted).

--match-sizes adds a table of fxmerge.match.match(method="zip") per call at those units per model
(real merges call it many times at small sizes: argument checks and matrices included), and --cold
one of the first call in a fresh interpreter at the largest --sizes (page faults of new memory
included); both run in fresh interpreters, for --compare-rev on that revision's fxmerge exported by
git archive.

--recorded resnet18 vit replays the zip matchings of real merges (their per-merge cost, at the sizes
real merges use): ``fxmerge.merge(models, batches, method="zip", quiet=True)`` of a pair of
torchvision ``resnet18(num_classes=10)`` or of ``fxmerge.zoo.vit(patch_size=8, num_layers=6,
num_heads=3, hidden_dim=192, mlp_dim=768, image_size=64)`` (both models built after
torch.manual_seed(0), eval; 8 batches of randn(16, 3, 64, 64) after torch.manual_seed(0); one torch
thread) with ``fxmerge.match.zip.zip_matching`` wrapped to save its arguments (cached in
--recorded-cache).  Each matcher then replays every call on a fresh copy of its similarity (copies
outside the timing; best of --repeats over all calls), and the merges are compared with the naive
reference's and --compare-rev's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import inspect
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np

# Run from a checkout without installing: make the repository's fxmerge importable.
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from fxmerge.match.reference import naive_zip_matching  # noqa: E402
from fxmerge.match.zip import zip_matching  # noqa: E402

SAMPLES = 1024


def correlated_models_similarity(n_units: int, seed: int = 0) -> np.ndarray:
    """(2n, 2n) correlation of two models' units; model 1 = model 0's units permuted, plus noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n_units, SAMPLES))
    model_0 = shared + 0.7 * rng.normal(size=(n_units, SAMPLES))
    model_1 = shared[rng.permutation(n_units)] + 0.7 * rng.normal(size=(n_units, SAMPLES))
    similarity = np.corrcoef(np.concatenate([model_0, model_1]))
    return (similarity + similarity.T) / 2  # exactly symmetric, as fxmerge.match.match makes it


def best_time(fn, repeats: int):
    """(the fastest wall time in seconds over repeats runs, the fastest CPU time, the last result).

    On a shared machine the CPU time (process_time: user + system, one thread) is the steadier figure.
    """
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - start_wall)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best_wall, best_cpu, result


def peak_megabytes(fn) -> float:
    """Peak traced memory (MiB) allocated while fn runs, above what was allocated before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def zip_matching_at(revision: str):
    """zip_matching of fxmerge/match/zip.py as of git revision ``revision`` (loaded from a temp file)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:fxmerge/match/zip.py"], cwd=REPOSITORY, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_zip.py", delete=False) as file:
        file.write(source)
    name = f"zip_at_{revision.replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_file_location(name, file.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    os.unlink(file.name)
    return module.zip_matching


def exported_fxmerge(revision: str, directory: Path) -> Path:
    """Extract git revision's fxmerge package under directory (git archive); returns the import root."""
    archive = subprocess.run(["git", "archive", revision, "fxmerge"], cwd=REPOSITORY, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")
    return directory


def fresh_process_seconds(import_root: Path, statement: str, n_units: int, repeats: int) -> list[list[float]]:
    """[wall, CPU] seconds of repeats runs of statement in a fresh interpreter importing fxmerge from import_root.

    The statement sees ``similarity`` (correlated_models_similarity(n_units)), ``n``, ``match`` and
    ``zip_matching``.
    """
    script = "\n".join(
        [
            "import json, sys, time",
            f"sys.path.insert(0, {str(import_root)!r})",
            "import numpy as np",
            "from fxmerge.match import match",
            "from fxmerge.match.zip import zip_matching",
            f"SAMPLES = {SAMPLES}",
            textwrap.dedent(inspect.getsource(correlated_models_similarity)),
            f"n = {n_units}",
            "similarity = correlated_models_similarity(n)",
            "times = []",
            f"for _ in range({repeats}):",
            "    start, start_cpu = time.perf_counter(), time.process_time()",
            f"    {statement}",
            "    times.append([time.perf_counter() - start, time.process_time() - start_cpu])",
            "print(json.dumps(times))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


RECORDED_CASES = ("resnet18", "vit")


def record_merge_matchings(case: str) -> list[tuple]:
    """The arguments of every zip_matching call of one real merge (see the module docstring).

    Returns [(similarity (N, N) as passed, sizes, target_width, alpha, beta, overwrite_similarity)].
    """
    import torch
    import torchvision

    import fxmerge
    import fxmerge.match.zip as zip_module
    from fxmerge import zoo

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if case == "resnet18":
        models = [torchvision.models.resnet18(num_classes=10).eval() for _ in range(2)]
    else:
        models = [
            zoo.vit(patch_size=8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, image_size=64).eval()
            for _ in range(2)
        ]
    torch.manual_seed(0)
    batches = [torch.randn(16, 3, 64, 64) for _ in range(8)]
    calls = []
    original = zip_module.zip_matching

    def recording(similarity, sizes, target_width, alpha, beta, *, overwrite_similarity=False):
        saved = np.array(similarity, dtype=np.float64, copy=True)
        calls.append((saved, list(sizes), int(target_width), float(alpha), float(beta), overwrite_similarity))
        return original(similarity, sizes, target_width, alpha, beta, overwrite_similarity=overwrite_similarity)

    zip_module.zip_matching = recording
    try:
        fxmerge.merge(models, batches, method="zip", quiet=True)
    finally:
        zip_module.zip_matching = original
    return calls


def recorded_matchings(case: str, cache: Path) -> list[tuple]:
    """record_merge_matchings(case), cached as cache/<case>.pkl."""
    path = cache / f"{case}.pkl"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(record_merge_matchings(case)))
    return pickle.loads(path.read_bytes())


def replay_seconds(fn, calls: list[tuple], repeats: int, naive: bool = False):
    """(best CPU seconds over repeats of all calls, their results); copies of the similarities are made outside the timing."""
    best, results = float("inf"), None
    for _ in range(repeats):
        seconds, results = 0.0, []
        for similarity, sizes, target_width, alpha, beta, overwrite in calls:
            scratch = similarity.copy()
            start = time.process_time()
            if naive:
                results.append(fn(scratch, sizes, target_width, alpha, beta))
            else:
                results.append(fn(scratch, sizes, target_width, alpha, beta, overwrite_similarity=overwrite))
            seconds += time.process_time() - start
        best = min(best, seconds)
    return best, results


def recorded_rows(cases: list[str], cache: Path, old_zip_matching, repeats: int) -> list[dict]:
    """One row per (case, N) and one per case ("all"): calls, merges, CPU seconds, same merges."""
    rows = []
    for case in cases:
        calls = recorded_matchings(case, cache)
        groups = {}
        for call in calls:
            groups.setdefault(sum(call[1]), []).append(call)
        for n_total, group in [*sorted(groups.items()), ("all", calls)]:
            row = {"case": case, "N": n_total, "calls": len(group), "merges": sum(sum(c[1]) - c[2] for c in group)}
            row["fast_cpu_s"], fast = replay_seconds(zip_matching, group, repeats)
            if old_zip_matching is not None:
                row["old_cpu_s"], old = replay_seconds(old_zip_matching, group, repeats)
                row["identical_to_old"] = all(same_merges(a, b) for a, b in zip(fast, old))
            if n_total != "all":
                _, naive = replay_seconds(naive_zip_matching, group, 1, naive=True)
                row["identical_to_naive"] = all(same_merges(a, b) for a, b in zip(fast, naive))
            else:
                row["identical_to_naive"] = all(r["identical_to_naive"] for r in rows if r["case"] == case)
            rows.append(row)
            print(f"recorded {case} N={n_total}: {row}", file=sys.stderr, flush=True)
    return rows


def print_recorded(rows: list[dict], compare_rev: str | None) -> None:
    print(
        "\nzip_matching calls of real merges (--recorded; CPU seconds of all the calls, best of --repeats"
        + (f"; old = the fast matcher at {compare_rev}" if compare_rev else "")
        + "):\n"
    )
    head = "| merge | N | calls | merges | fast CPU (s) | fast per merge (us) |"
    rule = "|:---|---:|---:|---:|---:|---:|"
    if compare_rev:
        head += " old CPU (s) | old / fast | same merges as old |"
        rule += "---:|---:|:---:|"
    print(head + " same merges as naive |")
    print(rule + ":---:|")
    yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
    for row in rows:
        cells = [row["case"], str(row["N"]), str(row["calls"]), str(row["merges"])]
        cells += [f"{row['fast_cpu_s']:.3f}", f"{1e6 * row['fast_cpu_s'] / row['merges']:.0f}"]
        if compare_rev:
            cells += [f"{row['old_cpu_s']:.3f}", f"{row['old_cpu_s'] / row['fast_cpu_s']:.1f}x", yes(row["identical_to_old"])]
        cells.append(yes(row["identical_to_naive"]))
        print("| " + " | ".join(cells) + " |")


MATCH_STATEMENT = 'match(similarity, [n, n], n, method="zip")'
ZIP_STATEMENT = "zip_matching(similarity, [n, n], n, 0.5, 1.0)"


def same_merges(a, b) -> bool:
    """Bit-identical merge lists (kept, absorbed, score as float64 bits) and labels."""
    return (
        len(a.merges) == len(b.merges)
        and all(
            (ka, aa) == (kb, ab) and np.float64(sa).tobytes() == np.float64(sb).tobytes()
            for (ka, aa, sa), (kb, ab, sb) in zip(a.merges, b.merges)
        )
        and np.array_equal(a.labels, b.labels)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="units per model")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast matchers (best is kept)")
    parser.add_argument("--naive-max", type=int, default=2048, help="largest n the naive reference runs at")
    parser.add_argument("--compare-rev", help="git revision whose fast matcher is timed and compared too")
    parser.add_argument("--memory", action="store_true", help="also measure each fast matcher's peak memory")
    parser.add_argument("--match-sizes", type=int, nargs="*", default=[], help="units per model for match() per call")
    parser.add_argument("--cold", action="store_true", help="also time first calls in fresh interpreters")
    parser.add_argument("--recorded", nargs="*", default=[], choices=RECORDED_CASES, help="replay real merges' calls")
    parser.add_argument("--recorded-cache", type=Path, default=Path(tempfile.gettempdir()) / "fxmerge_bench_matcher")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    old_zip_matching = zip_matching_at(args.compare_rev) if args.compare_rev else None
    load_before = os.getloadavg()[0]
    rows = []
    for n_units in args.sizes:
        similarity = correlated_models_similarity(n_units)
        sizes = [n_units, n_units]

        def run(fn, similarity=similarity, sizes=sizes, n_units=n_units):
            return lambda: fn(similarity, sizes, n_units, args.alpha, args.beta)

        fast_seconds, fast_cpu, fast = best_time(run(zip_matching), args.repeats)
        row = {"n": n_units, "merges": len(fast.merges), "fast_s": fast_seconds, "fast_cpu_s": fast_cpu}
        if args.memory:
            row["fast_peak_mib"] = peak_megabytes(run(zip_matching))
        if old_zip_matching is not None:
            row["old_s"], row["old_cpu_s"], old = best_time(run(old_zip_matching), args.repeats)
            row["identical_to_old"] = same_merges(fast, old)
            if args.memory:
                row["old_peak_mib"] = peak_megabytes(run(old_zip_matching))
        if n_units <= args.naive_max:
            row["naive_s"], _, naive = best_time(run(naive_zip_matching), 1)
            row["identical_to_naive"] = same_merges(fast, naive)
        rows.append(row)
        print(f"n={n_units}: {row}", file=sys.stderr, flush=True)

    load_after = os.getloadavg()[0]
    print(
        f"zip to n units of 2 models x n units (N = 2n), alpha={args.alpha}, beta={args.beta}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; fast = best of {args.repeats}, naive = 1 run "
        f"(n <= {args.naive_max}); {os.cpu_count()} CPUs shared, load average {load_before:.1f} before, "
        f"{load_after:.1f} after"
        + (f"; old = the fast matcher at {args.compare_rev}" if args.compare_rev else "")
        + "\n"
    )
    columns = [("n", "n", "{}"), ("merges", "merges", "{}"), ("fast (s)", "fast_s", "{:.3f}")]
    columns += [("fast CPU (s)", "fast_cpu_s", "{:.3f}")]
    if old_zip_matching is not None:
        columns += [("old (s)", "old_s", "{:.3f}"), ("old CPU (s)", "old_cpu_s", "{:.3f}")]
        columns += [("old / fast (CPU)", "old_speedup", "{:.1f}x")]
    columns += [("naive (s)", "naive_s", "{:.3f}"), ("naive / fast", "naive_speedup", "{:.1f}x")]
    if args.memory:
        columns += [("fast peak (MiB)", "fast_peak_mib", "{:.0f}")]
        if old_zip_matching is not None:
            columns += [("old peak (MiB)", "old_peak_mib", "{:.0f}")]
    columns += [("same merges as naive", "identical_to_naive", None)]
    if old_zip_matching is not None:
        columns += [("same merges as old", "identical_to_old", None)]
    for row in rows:
        if "old_s" in row:
            row["old_speedup"] = row["old_cpu_s"] / row["fast_cpu_s"]
        if "naive_s" in row:
            row["naive_speedup"] = row["naive_s"] / row["fast_s"]
    if args.memory:
        print(
            "peak = the most memory numpy held at once during one call, above the input similarity "
            "(tracemalloc); the (N, N) float64 scores alone are 8 N^2 bytes.\n"
        )
    print("| " + " | ".join(title for title, _, _ in columns) + " |")
    print("|" + "|".join(":---:" if fmt is None else "---:" for _, _, fmt in columns) + "|")
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            if key not in row:
                cells.append("not run")
            elif fmt is None:
                cells.append("yes" if row[key] else "NO")
            else:
                cells.append(fmt.format(row[key]))
        print("| " + " | ".join(cells) + " |")
    with tempfile.TemporaryDirectory() as directory:
        roots = {"fast": REPOSITORY}
        if args.compare_rev:
            roots["old"] = exported_fxmerge(args.compare_rev, Path(directory))
        match_rows = []
        for n_units in args.match_sizes:
            row = {"n": n_units, "N": 2 * n_units}
            for name, root in roots.items():
                times = fresh_process_seconds(root, MATCH_STATEMENT, n_units, 5 * args.repeats)
                row[f"{name}_ms"] = 1e3 * min(wall for wall, _ in times)
                row[f"{name}_cpu_ms"] = 1e3 * min(cpu for _, cpu in times)
            match_rows.append(row)
            print(f"match n={n_units}: {row}", file=sys.stderr, flush=True)
        cold_rows = []
        if args.cold:
            n_units = max(args.sizes)
            for call, statement in [("zip_matching", ZIP_STATEMENT), ("match", MATCH_STATEMENT)]:
                row = {"call": call, "n": n_units}
                for name, root in roots.items():
                    (row[f"{name}_first_s"], row[f"{name}_first_cpu_s"]), (row[f"{name}_second_s"], row[f"{name}_second_cpu_s"]) = (
                        fresh_process_seconds(root, statement, n_units, 2)
                    )
                cold_rows.append(row)
                print(f"cold {call}: {row}", file=sys.stderr, flush=True)
    names = list(roots)
    if match_rows:
        print(f"\nmatch(similarity, [n, n], n, method='zip') per call (ms, best of {5 * args.repeats}, fresh interpreter):\n")
        print(
            "| n | N | "
            + " | ".join(f"{name} (ms) | {name} CPU (ms)" for name in names)
            + (" | old / fast (CPU) |" if "old" in roots else " |")
        )
        print("|---:|---:|" + "---:|---:|" * len(names) + ("---:|" if "old" in roots else ""))
        for row in match_rows:
            cells = [str(row["n"]), str(row["N"])]
            cells += [f"{row[f'{name}_ms']:.2f} | {row[f'{name}_cpu_ms']:.2f}" for name in names]
            if "old" in roots:
                cells.append(f"{row['old_cpu_ms'] / row['fast_cpu_ms']:.1f}x")
            print("| " + " | ".join(cells) + " |")
    if cold_rows:
        print(f"\nFirst and second call in a fresh interpreter at n = {max(args.sizes)} (s; the first pays the page faults of new memory):\n")
        print("| call | " + " | ".join(f"{name} first (CPU) | {name} second (CPU)" for name in names) + " |")
        print("|:---|" + "---:|---:|" * len(names))
        for row in cold_rows:
            cells = [row["call"]]
            cells += [
                f"{row[f'{name}_first_s']:.3f} ({row[f'{name}_first_cpu_s']:.3f}) | "
                f"{row[f'{name}_second_s']:.3f} ({row[f'{name}_second_cpu_s']:.3f})"
                for name in names
            ]
            print("| " + " | ".join(cells) + " |")
    recorded = recorded_rows(args.recorded, args.recorded_cache, old_zip_matching, args.repeats) if args.recorded else []
    if recorded:
        print_recorded(recorded, args.compare_rev)
    if args.json is not None:
        document = {"zip_matching": rows, "match_per_call": match_rows, "first_call": cold_rows, "recorded": recorded}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    checks = [row[key] for row in rows + recorded for key in ("identical_to_naive", "identical_to_old") if key in row]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
