"""The property tests of tests/test_properties.py with a long hypothesis profile: pass counts and time.

Usage:
    python benchmarks/properties.py [--examples 200] [--only recovery/programs ...] [--shrink]
                                    [--out benchmarks/results] [--strict]

Each property (invariance, permute recovery, identity extension, Net2Net recovery; on zoo models
and on random ``ProgramNet`` compositions) runs the same check on the same hypothesis strategy
as the test suite, deterministically (``derandomize=True``), with ``--examples`` examples
instead of the suite's 12-30. Failures do not stop a run: every example is counted as passed or
failed; failures are grouped by message (numbers blanked) with the first example of each, and
for program properties the block kinds of failing vs all examples are tallied (which op a bug
sits in). The table goes to ``properties.md`` / ``properties.json`` in ``--out``. ``--shrink``
then lets hypothesis minimise the first failure of every failing property (re-raising inside
``@given``) and reports the minimal example. Exit status 0 unless ``--strict`` and some example
failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from hypothesis import given  # noqa: E402
from hypothesis.errors import HypothesisException  # noqa: E402

import test_properties as properties  # noqa: E402
from homogeneous import machine_info, source_info  # noqa: E402


def _message(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:160]}"


def _signature(message: str) -> str:
    """The message with its numbers blanked: failures that differ only in an error size are one kind."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", message)


def _kinds(case) -> set[str]:
    """Block kinds of a ProgramNet program (empty for zoo specs)."""
    return {block.kind for block in getattr(case, "blocks", ())}


def run_property(name: str, examples: int) -> dict:
    """Run one property on ``examples`` examples, counting instead of stopping at a failure."""
    check, strategy, _ = properties.PROPERTIES[name]
    counts: Counter[str] = Counter()
    failures: dict[str, dict] = {}  # signature -> first message, first example, count
    kinds_all: Counter[str] = Counter()  # block kinds over all program examples ...
    kinds_failed: Counter[str] = Counter()  # ... and over the failing ones
    seconds: list[float] = []

    @properties.property_settings(examples)
    @given(case=strategy)
    def run(case) -> None:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                check(case)
        except Exception as error:  # every failure is a data point
            if isinstance(error, HypothesisException):
                raise
            counts["failed"] += 1
            message = _message(error)
            entry = failures.setdefault(_signature(message), {"message": message, "first_example": repr(case), "count": 0})
            entry["count"] += 1
            kinds_failed.update(_kinds(case))
        else:
            counts["passed"] += 1
        kinds_all.update(_kinds(case))
        seconds.append(time.perf_counter() - start)

    start = time.perf_counter()
    run()
    total = time.perf_counter() - start
    return {
        "property": name,
        "examples": counts["passed"] + counts["failed"],
        "passed": counts["passed"],
        "failed": counts["failed"],
        "seconds": round(total, 2),
        "mean_example_seconds": round(sum(seconds) / max(len(seconds), 1), 3),
        "failures": list(failures.values()),
        # for program properties: how many examples (all / failing) contain each block kind
        "block_kinds": {k: {"all": kinds_all[k], "failed": kinds_failed[k]} for k in sorted(kinds_all)},
    }


def shrink(name: str, examples: int) -> str | None:
    """Let hypothesis minimise the first failure of ``name``; the minimal example, or None."""
    check, strategy, _ = properties.PROPERTIES[name]
    minimal: list[str] = []

    @properties.property_settings(examples)
    @given(case=strategy)
    def run(case) -> None:
        try:
            check(case)
        except BaseException:
            minimal[:] = [repr(case)]
            raise

    try:
        run()
    except Exception as error:  # noqa: BLE001 - the failure itself is the result
        return f"{minimal[0] if minimal else '?'}\n{_message(error)}"
    return None


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Property tests, long profile",
        "",
        f"`python benchmarks/properties.py --examples {meta['examples']}`: the checks of "
        "`tests/test_properties.py` on hypothesis-generated models (derandomized: the same examples every run). "
        f"Machine: {meta['machine']['processor']}, {meta['machine']['torch_threads']} torch thread(s), "
        f"torch {meta['machine']['torch']}; commit {meta['source']['commit'][:10]}"
        + (" with local changes" if meta["source"]["modified"] else "")
        + ".",
        "",
        "| property | examples | passed | failed | seconds | s / example |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['property']} | {row['examples']} | {row['passed']} | {row['failed']} | {row['seconds']:.1f} "
            f"| {row['mean_example_seconds']:.2f} |"
        )
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"Total: {sum(r['examples'] for r in rows)} examples, {total:.0f} s.", ""]
    failing = [r for r in rows if r["failures"]]
    if failing:
        lines += ["## Failures (grouped by message, first example of each)", ""]
        for row in failing:
            for failure in row["failures"]:
                lines.append(f"- **{row['property']}**, {failure['count']} example(s): `{failure['message']}`  ")
                lines.append(f"  first: `{failure['first_example']}`")
            kinds = ", ".join(
                f"{kind} {counts['failed']}/{counts['all']}" for kind, counts in row["block_kinds"].items() if counts["failed"]
            )
            if kinds:
                lines.append(f"  block kinds in failing / all examples: {kinds}")
            if row.get("minimal"):
                lines.append(f"  minimal (hypothesis shrink): `{row['minimal'].splitlines()[0]}`")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="hypothesis max_examples per property")
    parser.add_argument("--only", nargs="+", choices=sorted(properties.PROPERTIES), help="subset of properties")
    parser.add_argument("--shrink", action="store_true", help="minimise the first failure of each failing property")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="properties", help="output file stem (default properties)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any example failed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.only or list(properties.PROPERTIES):
        row = run_property(name, args.examples)
        print(
            f"{name:22s} {row['passed']:4d}/{row['examples']:<4d} passed  {row['seconds']:7.1f} s "
            f"({row['mean_example_seconds']:.2f} s/example)",
            flush=True,
        )
        for failure in row["failures"]:
            print(f"    FAIL x{failure['count']} {failure['message']}\n         e.g. {failure['first_example']}", flush=True)
        if row["failed"] and row["block_kinds"]:
            tally = ", ".join(f"{k} {c['failed']}/{c['all']}" for k, c in row["block_kinds"].items())
            print(f"    block kinds in failing/all examples: {tally}", flush=True)
        if args.shrink and row["failed"]:
            row["minimal"] = shrink(name, args.examples)
            print(f"    minimal: {row['minimal']}", flush=True)
        rows.append(row)

    meta = {"examples": args.examples, "machine": machine_info(), "source": source_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(rows, meta))
    print(f"total {sum(r['seconds'] for r in rows):.0f} s; wrote {args.out / (args.name + '.md')}")
    return 1 if args.strict and any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
