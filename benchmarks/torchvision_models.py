"""Every torchvision classification builder: invariance, coverage and recovery of a permuted twin.

Usage:
    python benchmarks/torchvision_models.py [--out benchmarks/results] [--models resnet18 ...]
        [--jobs 2] [--timeout 900] [--zip-budget 30] [--batches 4] [--batch-size 8]

For each builder of ``torchvision.models.list_models(module=torchvision.models)`` (random init, no
download; every parameter and buffer randomised as in the tests' ``randomize_`` so that no
constant init hides a mismatched parameter; BatchNorm statistics then set to the calibration
data's, ``fxmerge.passes.repair.reset_batchnorm``, so that the merge's BN reset is exact):

* ``invariance``: relative error (max-abs, ``tests/conftest.py: relative_error``) of
  ``fxmerge.testing.random_permute(m, x, seed=1)`` against ``m`` on one calibration batch;
* ``coverage``: ``fxmerge.analyze(m, x).coverage()``, the numbers of groups and free groups;
* ``permute`` / ``zip``: relative error of ``fxmerge.merge([m, twin], batches, method=...)``
  against ``m``, the seconds of the merge, the number of warnings it raised (and how many of them
  groups the merge's one "too few calibration samples" warning counts) and the number of fixed groups. zip runs when
  the permute merge took less than ``--zip-budget`` seconds.

Inputs are the smallest each builder accepts (32x32 for most; inception_v3 75x75; ViTs are
built with ``image_size`` the smallest multiple of their patch >= 28; MaxViT needs 224x224),
``--batches`` batches of ``--batch-size`` standard-normal images. Each model runs in its own
process (one torch thread; ``--jobs`` at once, the largest builders alone and last) with a
``--timeout``; a model that fails or times out is listed with the reason. Results are written to
``torchvision.json`` / ``torchvision.md`` in ``--out`` after every model (partial tables show
which rows are missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: the repository's fxmerge, and the tests' helpers
# (``randomize_``, ``relative_error``: one definition each).
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

ALONE_PARAMS = 150e6  # builders at least this large run one at a time, after the others


def input_size(name: str) -> int:
    """The smallest image side the builder ``name`` accepts (ViTs: built for it, see ``build``)."""
    name = VARIANTS.get(name, (name, {}))[0]
    if name == "inception_v3":
        return 75
    if name == "maxvit_t":
        return 224  # 5 stride-2 stages, and the last one's map must be a multiple of the 7x7 partition
    if name.startswith("vit_"):
        patch = int(name.split("_")[-1])
        return -(-28 // patch) * patch
    if name == "alexnet":
        return 63
    if name.startswith("squeezenet"):
        return 32
    return 32


# extra rows: a builder with other arguments, "NAME (ARG=VALUE)" -> (builder, keyword arguments)
VARIANTS = {
    "googlenet (aux_logits=False)": ("googlenet", {"aux_logits": False}),
    "inception_v3 (aux_logits=False)": ("inception_v3", {"aux_logits": False}),
}


def build(name: str):
    import torchvision.models as tvm

    name, extra = VARIANTS.get(name, (name, {}))
    kwargs = {"weights": None, **extra}
    if name.startswith("vit_"):
        kwargs["image_size"] = input_size(name)
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # the default, said explicitly (None warns)
    return tvm.get_model(name, **kwargs).eval()


def num_params(name: str) -> int:
    import torchvision.models as tvm

    name = VARIANTS.get(name, (name, {}))[0]
    return tvm.get_model_weights(name).DEFAULT.meta["num_params"]


def _caught_count(caught: list, text: str | None = None) -> int:
    return sum(1 for w in caught if issubclass(w.category, UserWarning) and (text is None or text in str(w.message)))


# the merge's one "too few calibration samples" warning: "N group(s) had no more calibration
# samples ...: NAME (S samples, U units), ... [and K more]"
TOO_FEW_COUNT = re.compile(r"^(\d+) group\(s\) had no more calibration samples")
TOO_FEW_NAME = re.compile(r"(\S+) \(\d+ samples, \d+ units\)")


def _too_few(caught: list) -> tuple[int, set[str]]:
    """How many groups the too-few-samples warning counts, and the names it lists (at most 8)."""
    for w in caught:
        found = TOO_FEW_COUNT.match(str(w.message))
        if found:
            return int(found.group(1)), set(TOO_FEW_NAME.findall(str(w.message)))
    return 0, set()


def wrong_groups(result, permutations: dict) -> list[str]:
    """Groups whose merged units do not pair each unit of m with its own image in the twin.

    Twin unit j is unit ``permutations[name][j]`` of m, so a recovered group has
    ``labels[1][j] == labels[0][perm[j]]`` for every j, with distinct labels. Groups reported
    under another name than a permuted space (composites, labelled head-major) are not checked.
    """
    wrong = []
    for group in result.groups:
        perm = permutations.get(group.name)
        if group.fixed or perm is None or len(group.labels[0]) != len(perm):
            continue
        mine, twins = group.labels
        if len(set(mine)) != len(mine) or any(twins[j] != mine[int(i)] for j, i in enumerate(perm)):
            wrong.append(group.name)
    return wrong


def measure(name: str, batches: int, batch_size: int, zip_budget: float) -> dict:
    """One model's row (see the module docstring)."""
    import torch

    import fxmerge
    from conftest import randomize_, relative_error
    from fxmerge.passes.repair import reset_batchnorm
    from fxmerge.testing import random_permute

    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = randomize_(build(name))
    size = input_size(name)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches)]
    reset_batchnorm(model, data, quiet=True)
    x = data[0]
    with torch.no_grad():
        y = model(x)
    row = {"model": name, "input": f"{size}x{size}", "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    row["build_s"] = time.perf_counter() - start

    begin = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = fxmerge.analyze(model, x)
    row["analysis_s"] = time.perf_counter() - begin
    row["groups"] = len(analysis.groups)
    row["free"] = len(analysis.free_groups)
    row["coverage"] = analysis.coverage()
    row["analysis_warnings"] = _caught_count(caught)
    twin, permutations = random_permute(model, x, seed=1, return_permutations=True)
    twin.eval()
    with torch.no_grad():
        row["invariance"] = relative_error(y, twin(x))
        if row["invariance"] > 1e-5:  # float32 rounding, or a wrong twin? float64 tells
            row["invariance_f64"] = relative_error(copy.deepcopy(model).double()(x.double()), copy.deepcopy(twin).double()(x.double()))

    methods = ["permute", "zip"]
    for method in methods:
        if method == "zip" and row["permute_s"] >= zip_budget:
            row["zip_skipped"] = f"permute took {row['permute_s']:.0f} s >= --zip-budget {zip_budget:.0f} s"
            break
        begin = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fxmerge.merge([model, twin], data, method=method, quiet=True)
        row[f"{method}_s"] = time.perf_counter() - begin
        with torch.no_grad():
            row[method] = relative_error(y, result.module(x))
        row[f"{method}_warnings"] = _caught_count(caught)
        starved, warned = _too_few(caught)
        row[f"{method}_too_few"] = starved
        row[f"{method}_fixed"] = sum(1 for g in result.groups if g.fixed)
        wrong = wrong_groups(result, permutations)
        row[f"{method}_wrong"] = wrong
        # the warning lists at most 8 groups by name: the others count as warned when it says more
        listed_all = starved <= len(warned)
        row[f"{method}_wrong_unwarned"] = [n for n in wrong if n not in warned and (listed_all or not starved)]
        del result
    row["total_s"] = time.perf_counter() - start
    row["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return row


# ----------------------------------------------------------------------------------- reporting


def _fmt(value, spec: str = ".1e") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], missing: list[str]) -> str:
    lines = [
        "| model | input | params (M) | invariance | coverage | free/groups | permute err | zip err | "
        "warnings (too few samples); mismatched groups | fixed groups | permute (s) | zip (s) | total (s) | peak RSS (GB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('input', '-')} | {_fmt(r.get('params_M'), '.1f')} | "
                         f"not measured: {r['error']} ||||||||||")
            continue
        warn = f"{r['permute_warnings']} ({r['permute_too_few']})"
        if "zip_warnings" in r:
            warn += f" / zip {r['zip_warnings']} ({r['zip_too_few']})"
        zip_err = _fmt(r.get("zip")) if "zip" in r else f"skipped ({r.get('zip_skipped', '?')})"
        for method in ("permute", "zip"):
            if r.get(f"{method}_wrong"):
                unwarned = r[f"{method}_wrong_unwarned"]
                warn += (f"; {method} mismatched {', '.join(r[f'{method}_wrong'])} "
                         f"({'NOT warned: ' + ', '.join(unwarned) if unwarned else 'all warned'})")
        f64 = f" (float64 {r['invariance_f64']:.0e})" if "invariance_f64" in r else ""
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params_M']:.1f} | {r['invariance']:.1e}{f64} | {r['coverage']:.1%} | "
            f"{r['free']}/{r['groups']} | {r['permute']:.1e} | {zip_err} | {warn} | {r['permute_fixed']} | "
            f"{r['permute_s']:.1f} | {_fmt(r.get('zip_s'), '.1f')} | {r['total_s']:.1f} | {_fmt(r.get('peak_rss_GB'), '.1f')} |"
        )
    for name in missing:
        lines.append(f"| {name} | - | - | not finished (queued or running when the run was stopped or this table was written) ||||||||||")
    return "\n".join(lines)


def write(out: Path, rows: list[dict], missing: list[str], args: argparse.Namespace) -> None:
    import torch
    import torchvision

    ordered = sorted(rows, key=lambda r: r["model"])
    done = [r for r in ordered if "error" not in r]
    bad = [
        f"{r['model']} ({m} {r[m]:.1e})" for r in done for m in ("permute", "zip") if r.get(m, 0.0) >= 1e-4
    ]
    header = (
        "# Every torchvision classification builder: invariance, coverage, recovery of a permuted twin\n\n"
        "Generated by `python benchmarks/torchvision_models.py` "
        f"(--batches {args.batches} --batch-size {args.batch_size} --zip-budget {args.zip_budget:g} "
        f"--timeout {args.timeout:g} --jobs {args.jobs}). Random init, every parameter and buffer "
        "randomised (tests' `randomize_`), BatchNorm statistics set to the calibration data's. "
        "`invariance`: relative error (max|y - y'| / max|y|) of `fxmerge.testing.random_permute` "
        "against the model; `coverage`: `fxmerge.analyze(...).coverage()`; `permute err` / `zip err`: "
        "relative error of `fxmerge.merge([m, twin], calibration, method=...)` against m; warnings "
        "raised by that merge (in brackets: how many groups had too few calibration samples for "
        "their width; rows measured before this landing's last commits counted one warning per group, "
        "now one warning names them all); fixed groups of the merge; seconds of each merge and of the whole row (build, "
        "analysis, twin, merges). Inputs: the smallest each builder accepts. Wall clock, one torch "
        "thread per model, on a machine shared with other jobs: indicative only. Invariance is "
        "measured in float32; above 1e-5 it is measured again in float64 (in brackets), which tells "
        "rounding from a wrong twin. At these input sizes the last stages see few samples "
        "(batches x batch size x their spatial positions), fewer than they have channels: the merge "
        "warns for each such group and breaks ties with weight similarity.\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, 1 thread per model, {args.jobs} model(s) at a time.\n\n"
        f"Rows: {len(done)} measured, {len(ordered) - len(done)} failed or timed out, {len(missing)} not finished, "
        f"of {len(done) + len(ordered) - len(done) + len(missing)} builders. "
        f"Recovery error >= 1e-4: {', '.join(bad) if bad else 'none'}.\n\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "torchvision.md").write_text(header + table(ordered, missing) + "\n")
    (out / "torchvision.json").write_text(json.dumps({"rows": ordered, "missing": missing}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", nargs="*", help="subset of builder names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="models measured at once (one process each)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--zip-budget", type=float, default=30.0, help="run zip when permute took less (s)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out/torchvision.json; --models: re-measure those only")
    parser.add_argument("--report-only", action="store_true", help="rewrite torchvision.md from torchvision.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: measure one model, print its row
    args = parser.parse_args(argv)

    if args.report_only:
        saved = json.loads((args.out / "torchvision.json").read_text())
        write(args.out, saved["rows"], saved["missing"], args)
        return 0

    if args.one:
        try:
            row = measure(args.one, args.batches, args.batch_size, args.zip_budget)
        except Exception as error:  # reported in the table, with its type and message
            traceback.print_exc()
            row = {"model": args.one, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        print("ROW " + json.dumps(row), flush=True)
        return 0

    import torchvision.models as tvm

    names = args.models or [*tvm.list_models(module=tvm), *VARIANTS]
    names = sorted(names, key=num_params)
    rows: list[dict] = []
    unfinished: list[str] = []
    if args.resume and (args.out / "torchvision.json").exists():
        # keep the rows of an earlier run (and its models not asked for now); measure the others
        saved = json.loads((args.out / "torchvision.json").read_text())
        rows = saved["rows"]
        measured = {r["model"] for r in rows}
        if args.models:
            rows = [r for r in rows if r["model"] not in names]
            unfinished = [n for n in saved["missing"] if n not in names]  # still listed as not finished
        else:
            names = [n for n in names if n not in measured]
    small = [n for n in names if num_params(n) < ALONE_PARAMS]
    large = [n for n in names if num_params(n) >= ALONE_PARAMS]
    pending = list(names) + unfinished
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    queue = list(small) + list(large)
    while queue or running:
        jobs = args.jobs if not (queue and queue[0] in large) and not any(n in large for n in running) else 1
        while queue and len(running) < jobs and not (queue[0] in large and running):
            name = queue.pop(0)
            command = [sys.executable, __file__, "--one", name, "--batches", str(args.batches),
                       "--batch-size", str(args.batch_size), "--zip-budget", str(args.zip_budget)]
            running[name] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=env, cwd=ROOT), time.perf_counter())
        time.sleep(0.5)
        for name, (process, started) in list(running.items()):
            elapsed = time.perf_counter() - started
            if process.poll() is None and elapsed < args.timeout:
                continue
            if process.poll() is None:
                process.kill()
                process.communicate()
                row = {"model": name, "error": f"timed out after {args.timeout:.0f} s"}
            else:
                stdout, stderr = process.communicate()
                lines = [line for line in stdout.splitlines() if line.startswith("ROW ")]
                if lines:
                    row = json.loads(lines[-1][4:])
                else:
                    tail = (stderr.strip().splitlines() or ["no output"])[-1][:160]
                    why = "killed by SIGKILL, out of memory?" if process.returncode == -9 else tail
                    row = {"model": name, "error": f"process exited with {process.returncode} ({why})"}
            del running[name]
            pending.remove(name)
            rows.append(row)
            summary = row.get("error") or (
                f"inv {row['invariance']:.1e} cov {row['coverage']:.1%} permute {row['permute']:.1e} "
                f"zip {_fmt(row.get('zip'))} warn {row['permute_warnings']} ({row['permute_too_few']}) "
                f"{row['total_s']:.0f}s"
            )
            print(f"{name}: {summary}", file=sys.stderr, flush=True)
            write(args.out, rows, pending, args)
    write(args.out, rows, pending, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
