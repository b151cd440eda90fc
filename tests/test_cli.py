"""The ``fxmerge`` command line: help output and a short real demo run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from fxmerge.cli import main

DEMO_ROWS = ("Task A model", "Task B model", "Average", "Permute", "Zip")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_prints_usage_and_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fxmerge")
    if argv == ["--help"]:
        assert "demo" in out
    else:
        for option in ("--seed", "--family", "--epochs", "--quiet"):
            assert option in out


def test_missing_command_and_bad_option_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["demo", "--epochs", "0"], ["demo", "--family", "mlp"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "error" in capsys.readouterr().err


def test_python_dash_m_fxmerge_help() -> None:
    done = subprocess.run([sys.executable, "-m", "fxmerge", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fxmerge")


def _tables(out: str) -> list[dict[str, list[float]]]:
    """The demo's tables (one per pair), each: row name -> [joint, task A, task B, avg] in percent."""
    tables: list[dict[str, list[float]]] = []
    for line in out.splitlines():
        if line.startswith("| model |"):
            tables.append({})
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if tables and line.startswith("|") and cells[0] not in ("model", "---"):
            tables[-1][cells[0]] = [float(c) for c in cells[1:5]]
            time_cell = cells[5]
            merged = cells[0] in DEMO_ROWS[2:] or cells[0].startswith("Zip (")
            assert re.fullmatch(r"\d+\.\d\d s", time_cell) if merged else time_cell == "-"
    return tables


def test_demo_prints_the_comparison_table(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert main(["demo", "--quiet", "--epochs", "3"]) == 0
    assert torch.get_num_threads() == threads  # the process-wide setting is restored
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bars
    tables = _tables(captured.out)
    assert [list(rows) for rows in tables] == [
        [*DEMO_ROWS, "Zip (unmerge=regression)", "Ensemble A+B"],  # same architecture
        ["Task A model", "Task B model", "Zip (depth=lma)", "Zip (unmerge=regression, depth=lma)", "Ensemble A+B"],
        ["Task A model", "Task B model", "Zip (width=max)", "Zip (unmerge=regression, width=max)", "Ensemble A+B"],
    ]
    for rows in tables:
        for name, values in rows.items():
            assert all(0.0 <= v <= 100.0 for v in values), (name, values)
            assert values[3] == pytest.approx((values[1] + values[2]) / 2, abs=0.1)
        assert rows["Task A model"][1] > 80.0  # model A knows its own task
        assert rows["Task B model"][2] > 80.0
    assert "Zip keeps" in captured.out.splitlines()[-1] and "With unmerge=regression" in captured.out.splitlines()[-1]
