"""The YAML flow (``fxmerge merge CONFIG.yaml``) on a busy machine: "auto" threads against torch's
default (issue 14).

Usage:
    python benchmarks/threads.py [--busy N] [--repeats 2] [--out benchmarks/results]

Trains the demo's two digits ResNets (``fxmerge.experiments.train_task_models``, 2 epochs),
writes their weights, 256 calibration images and a config like the README's, then runs
``fxmerge merge CONFIG.yaml --quiet --overwrite`` in fresh processes, interleaved, ``--repeats`` times each, with ``--threads auto``
(the default) and ``--threads T`` for T = torch's default thread count on this machine (what the
command used before). ``--busy N`` starts N processes that spin on a core for the whole
measurement (0: measure the machine as it is; the load average before and after is recorded).
Wall seconds of the whole command (imports, loading, merge, save). Writes ``threads.md`` and
``threads.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KWARGS = {"in_channels": 1, "image_size": 8, "num_outputs": 32, "width": 16}  # the demo's ResNet (FAMILIES["resnet"])


def _spin() -> None:
    while True:
        pass


def _prepare(folder: Path) -> Path:
    from safetensors.torch import save_file

    from fxmerge.experiments import FAMILIES, train_task_models

    trained = train_task_models(FAMILIES["resnet"], FAMILIES["resnet"], seed=0, epochs=2)
    split = trained.split
    lines = ["models:"]
    for task, model in (("a", trained.model_a), ("b", trained.model_b)):
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / f"{task}.safetensors")
        lines.append(f"  - {{factory: 'fxmerge.zoo:resnet', kwargs: {KWARGS}, weights: '{folder / f'{task}.safetensors'}'}}")
    save_file({"inputs": split.x_train[:256].contiguous()}, folder / "calib.safetensors")
    lines += [
        f"calibration: {{tensor: '{folder / 'calib.safetensors'}', batch_size: 64}}",
        "merge: {method: zip, width: max}",
        f"out: '{folder / 'merged'}'",
    ]
    config = folder / "merge.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def _run(config: Path, threads: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``fxmerge merge`` process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fxmerge", "merge", str(config), "--quiet", "--overwrite", "--threads", threads],
        check=True, env=env, capture_output=True, timeout=1800,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=0, help="spinning processes during the measurement (default: 0)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (default: 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder (default: benchmarks/results)")
    args = parser.parse_args()
    import torch

    default = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        config = _prepare(Path(tmp))
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
        for process in spinners:
            process.start()
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {"auto": [], str(default): []}
        cpu: dict[str, list[float]] = {setting: [] for setting in times}
        try:
            for _ in range(args.repeats):
                for setting in times:
                    wall, used = _run(config, setting)
                    times[setting].append(wall)
                    cpu[setting].append(used)
        finally:
            for process in spinners:
                process.terminate()
        load_after = os.getloadavg()[0]
    rows = {setting: statistics.median(values) for setting, values in times.items()}
    result = {
        "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_default_threads": default, "busy_processes": args.busy,
        "load_before": load_before, "load_after": load_after, "seconds": times, "cpu_seconds": cpu, "median": rows,
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# `fxmerge merge CONFIG.yaml` on a busy machine: threads",
        "",
        f"The demo's two digits ResNets (width 16, 2 epochs), 256 calibration images, zip; wall seconds of the whole command, median of "
        f"{args.repeats} interleaved runs. {os.cpu_count()} CPUs, torch's default {default} threads, {args.busy} extra "
        f"spinning processes, 1-minute load average {load_before:.1f} before and {load_after:.1f} after. "
        f"`python benchmarks/threads.py --busy {args.busy} --repeats {args.repeats}`.",
        "",
        "CPU s: user + system seconds of the process; for a one-thread run it is about what the command takes on "
        "an idle machine.",
        "",
        "| --threads | median s | runs (s) | CPU s (median) |",
        "|---|---:|---|---:|",
    ]
    for setting, values in times.items():
        label = "auto (default)" if setting == "auto" else f"{setting} (torch's default)"
        lines.append(
            f"| {label} | {rows[setting]:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(cpu[setting]):.1f} |"
        )
    (args.out / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
