"""Time the zip matcher against its naive O(N^3) reference and check they make the same merges.

Usage:
    python benchmarks/bench_matcher.py [--sizes 256 512 1024 2048] [--json out.json]

For each n: two models of n units, a correlation matrix of their 2n units (seed 0; model 1 is a noisy
permuted copy of model 0, as for two trainings of one network), zip down to n merged units.  Prints a
markdown table; the fast time is the best of --repeats runs, the naive time a single run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# Run from a checkout without installing: make the repository's fxmerge importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    """(the fastest wall time in seconds over repeats runs, the last result)."""
    best = float("inf")
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="units per model")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast matcher (best is kept)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows = []
    for n_units in args.sizes:
        similarity = correlated_models_similarity(n_units)
        sizes = [n_units, n_units]
        fast_seconds, fast = best_time(
            lambda: zip_matching(similarity, sizes, n_units, args.alpha, args.beta), args.repeats
        )
        naive_seconds, naive = best_time(
            lambda: naive_zip_matching(similarity, sizes, n_units, args.alpha, args.beta), 1
        )
        identical = fast.merges == naive.merges and np.array_equal(fast.labels, naive.labels)
        rows.append(
            {
                "n": n_units,
                "merges": len(fast.merges),
                "fast_s": fast_seconds,
                "naive_s": naive_seconds,
                "speedup": naive_seconds / fast_seconds,
                "identical": bool(identical),
            }
        )
        print(f"n={n_units}: fast {fast_seconds:.3f} s, naive {naive_seconds:.3f} s", file=sys.stderr, flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"zip to n units of 2 models x n units, alpha={args.alpha}, beta={args.beta}; "
        f"fast = best of {args.repeats}, naive = 1 run; {os.cpu_count()} CPUs, load average {load:.1f}\n"
    )
    print("| n | merges | fast (s) | naive (s) | speed-up | identical merges |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for row in rows:
        print(
            f"| {row['n']} | {row['merges']} | {row['fast_s']:.3f} | {row['naive_s']:.3f} | "
            f"{row['speedup']:.1f}x | {'yes' if row['identical'] else 'NO'} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
