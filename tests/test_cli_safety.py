"""What ``fxmerge`` refuses instead of doing something silently wrong: models without weights,
overwriting a folder, a missing folder read as a factory, ``--svg`` without pydot; every option's
help names its default; ``--threads`` is the merge option."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fxmerge
import fxmerge.api
from fxmerge import zoo
from fxmerge.cli import _inspect_target, build_parser, main

from conftest import random_batches, randomize_

KWARGS = "{blocks_per_stage: [1, 1], width: 4, in_channels: 1, image_size: 8, num_outputs: 5}"
FACTORY = "fxmerge.zoo:resnet"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Two weight files of tiny ResNets and a calibration tensor file."""
    folder = tmp_path_factory.mktemp("safety")
    for k in range(2):
        model = randomize_(zoo.resnet((1, 1), width=4, in_channels=1, image_size=8, num_outputs=5), k)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / f"m{k}.safetensors")
    save_file({"inputs": torch.cat(random_batches((8, 1, 8, 8), count=2))}, folder / "calib.safetensors")
    return folder


def _argv(files: Path, out: Path, *, weights: bool = True) -> list[str]:
    argv = ["merge", "--quiet", "--calib", str(files / "calib.safetensors"), "--batch-size", "8", "--out", str(out)]
    for k in range(2):
        argv += ["--model", FACTORY, "--kwargs", KWARGS] + (["--weights", str(files / f"m{k}.safetensors")] if weights else [])
    return argv


def _config(files: Path, out: Path, *, extra: str = "", weights: bool = True) -> Path:
    lines = ["models:"]
    for k in range(2):
        weight = f", weights: '{files / f'm{k}.safetensors'}'" if weights else ""
        lines.append(f"  - {{factory: '{FACTORY}', kwargs: {KWARGS}{weight}}}")
    lines += [f"calibration: {{tensor: '{files / 'calib.safetensors'}', batch_size: 8}}", f"out: '{out}'", extra]
    path = out.parent / f"{out.name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_model_without_weights_is_an_error_unless_random_init(files, tmp_path, capsys) -> None:
    expected = (
        "fxmerge merge: error: model 0 (fxmerge.zoo:resnet) has no weights: give --weights (or 'weights:' in the "
        "config), or pass --random-init to merge random initialisations on purpose\n"
    )
    assert main(_argv(files, tmp_path / "flags", weights=False)) == 1
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "flags").exists()  # refused before anything was written
    assert main(["merge", str(_config(files, tmp_path / "yaml", weights=False)), "--quiet"]) == 1
    assert capsys.readouterr().err == expected
    # on purpose: the flag, or the config's key; both merge the factories' initialisations (the
    # same ones: the global RNG is seeded alike), so they give the same merge
    torch.manual_seed(5)
    assert main(_argv(files, tmp_path / "flags", weights=False) + ["--random-init"]) == 0
    config = _config(files, tmp_path / "yaml", weights=False, extra="random_init: true")
    torch.manual_seed(5)
    assert main(["merge", str(config), "--quiet"]) == 0
    capsys.readouterr()
    flags, yaml = fxmerge.load(tmp_path / "flags"), fxmerge.load(tmp_path / "yaml")
    probe = random_batches((4, 1, 8, 8), count=1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(flags(probe), yaml(probe))
    bad = _config(files, tmp_path / "bad", weights=False, extra="random_init: yes please")
    assert main(["merge", str(bad)]) == 1
    assert "'random_init:' must be true or false, got 'yes please'" in capsys.readouterr().err


def test_a_non_empty_output_folder_is_refused_unless_overwrite(files, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    out.mkdir()  # an empty folder is fine
    assert main(_argv(files, out)) == 0
    first = (out / "weights.safetensors").read_bytes()
    capsys.readouterr()
    argv = _argv(files, out) + ["--method", "permute"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"fxmerge merge: error: output directory {out} exists and is not empty: pass --overwrite (or "
        "'overwrite: true' in the config) to write the merge into it, or choose another --out\n"
    )
    assert (out / "weights.safetensors").read_bytes() == first  # untouched
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "weights.safetensors").read_bytes() != first
    assert json.loads((out / "report.json").read_text())["config"]["method"] == "permute"
    fxmerge.load(out)  # a consistent folder: its manifest matches the new files
    capsys.readouterr()
    config = _config(files, out, extra="overwrite: true")
    assert main(["merge", str(config), "--quiet"]) == 0  # the config's key
    (tmp_path / "file").write_text("x")
    assert main(_argv(files, tmp_path / "file", weights=True)) == 1
    assert "output directory " + str(tmp_path / "file") + " is a file" in capsys.readouterr().err


def test_inspect_on_a_missing_folder_says_so(tmp_path, capsys) -> None:
    for target in ("merged/", "merged", str(tmp_path / "nowhere"), "runs/zip.v2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", target])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.endswith(f"fxmerge inspect: error: argument target: no such directory: {target}\n")
    (tmp_path / "merge.yaml").write_text("models: []\n")
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "merge.yaml")])
    assert f"not a directory: {tmp_path / 'merge.yaml'}" in capsys.readouterr().err
    # factories, in both spellings, stay factories; an existing folder is a folder
    for target in ("fxmerge.zoo:resnet", "fxmerge.zoo.resnet", str(tmp_path)):
        assert _inspect_target(target) == target


def test_svg_without_pydot_exits_1_with_the_install_command(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pydot", None)  # `import pydot` raises ImportError
    svg = tmp_path / "graph.svg"
    argv = ["inspect", FACTORY, "--kwargs", KWARGS, "--input-shape", "2,1,8,8", "--svg", str(svg)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxmerge inspect: error: --svg needs pydot (")
    assert "pip install 'fxmerge[graph]'" in err and not svg.exists()
    # the extra it names exists (tomllib is Python >= 3.11 only: the line is read as text)
    assert re.search(r'^graph = \["pydot>=[0-9.]+"\]$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help_naming_its_default() -> None:
    commands = _subcommands()
    assert {"demo", "merge", "inspect"} <= set(commands)
    for name in ("demo", "merge", "inspect"):
        for action in commands[name]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help.split()) >= 3, f"{where} has no help"
            if action.required:
                continue
            assert "default" in action.help, f"{where}: the help does not state the default: {action.help!r}"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert str(action.default) in action.help, f"{where}: default {action.default!r} not in {action.help!r}"
    merge = {a.dest: a.help for a in commands["merge"]._actions}
    for option, default in [("method", "zip"), ("depth", "lma"), ("alpha", "0.5"), ("beta", "1.0"),
                            ("balance", "0.5"), ("output", "shared"), ("threads", "auto")]:
        assert f"(default: {default})" in merge[option], option
    assert "seed" not in merge  # a removed option (tests/test_config.py)
    assert "(default: 0)" in {a.dest: a.help for a in commands["demo"]._actions}["seed"]


def test_threads_is_one_flag_the_merge_option_and_demo_keeps_1(files, tmp_path, monkeypatch, capsys) -> None:
    merge = _subcommands()["merge"]
    assert [a.option_strings for a in merge._actions if a.dest == "threads"] == [["--threads"]]
    assert build_parser().parse_args(["demo"]).threads == 1
    seen = []
    original = fxmerge.api.match_widths

    def match_widths(*args):
        seen.append(torch.get_num_threads())
        return original(*args)

    monkeypatch.setattr(fxmerge.api, "match_widths", match_widths)
    previous = torch.get_num_threads()
    assert main(_argv(files, tmp_path / "two") + ["--threads", "2"]) == 0
    config = _config(files, tmp_path / "three", extra="merge: {threads: 3}")
    assert main(["merge", str(config), "--quiet"]) == 0
    assert seen == [2, 3] and torch.get_num_threads() == previous
    assert main(_argv(files, tmp_path / "zero") + ["--threads", "0"]) == 1
    assert "threads=0 must be an int >= 1, 'auto' or None" in capsys.readouterr().err
