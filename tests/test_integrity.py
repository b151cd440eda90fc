"""Issue #14 item 3: every reader of a saved folder verifies every file before using any of it.

One small depth-heterogeneous merge (so the folder holds every kind of file ``MergeResult.save``
writes: graph, weights, report, code.py, groups.png, alignment_0.png, manifest) is saved once;
each case works on a copy. For every file the manifest lists, and the manifest itself, a flipped
byte and a deletion make every reader — ``fxmerge.load`` (``load_module``), ``load_report`` and
``fxmerge inspect DIR`` — refuse with a ``LoadError`` naming the file; an unlisted file a reader
or a person could take for part of the model (a second weights file, a ``.tmp``, a ``.json``,
code, a folder) is refused too, while unlisted figures and notes are not. A clean copy loads,
computes bit for bit what the merged module computes, and re-saving or ``update_folder`` keeps
the folder verifiable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import fxmerge
from fxmerge.cli import main
from fxmerge.errors import LoadError, SaveError
from fxmerge.io import load_module, load_report, save_module, update_folder

from conftest import rehash, small_resnets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SAVED_FILES = [
    "alignment_0.png", "code.py", "graph.json", "groups.png", "manifest.json", "report.json", "weights.safetensors",
]
LISTED = [name for name in SAVED_FILES if name != "manifest.json"]
TEST_INPUT = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def saved(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[fxmerge.MergeResult, Path]:
    pytest.importorskip("matplotlib")  # the figures are part of the folder under test
    (shallow, deep), batches = small_resnets((1, 1, 1), (2, 1, 1))
    result = fxmerge.merge([shallow, deep], batches, method="zip", quiet=True)
    directory = tmp_path_factory.mktemp("saved") / "merged"
    result.save(directory)
    return result, directory


@pytest.fixture()
def folder(saved, tmp_path: Path) -> Path:
    """A fresh copy of the saved folder."""
    return Path(shutil.copytree(saved[1], tmp_path / "merged"))


def _inspect(directory: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["inspect", str(directory)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_every_reader_refuses(directory: Path, capsys: pytest.CaptureFixture, *, match: str) -> None:
    for reader in (load_module, fxmerge.load, load_report):
        with pytest.raises(LoadError, match=match):
            reader(directory)
    code, text = _inspect(directory, capsys)
    assert code == 1 and text.startswith("fxmerge inspect: error: ")
    assert re.search(match, text), text


def _named(name: str) -> str:
    return name.replace(".", r"\.")


def test_the_manifest_lists_every_file_save_writes_and_a_clean_folder_loads(saved, folder: Path, capsys) -> None:
    result, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == SAVED_FILES
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == LISTED
    assert manifest["format_version"] == "1.2"
    loaded = fxmerge.load(folder)
    with torch.no_grad():
        expected, got = result.module(TEST_INPUT), loaded(TEST_INPUT)
    assert expected.abs().max() > 0 and torch.equal(expected, got)
    assert load_report(folder) == result.to_dict()
    code, text = _inspect(folder, capsys)
    assert code == 0 and "layer diff:" in text


@pytest.mark.parametrize("name", SAVED_FILES)
def test_a_flipped_byte_in_any_file_is_refused_by_every_reader(folder: Path, capsys, name: str) -> None:
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert_every_reader_refuses(folder, capsys, match=f"{_named(name)}.*modified after saving")


@pytest.mark.parametrize("name", SAVED_FILES)
def test_a_deleted_file_is_refused_by_every_reader(folder: Path, capsys, name: str) -> None:
    (folder / name).unlink()
    if name == "manifest.json":
        assert_every_reader_refuses(folder, capsys, match=r"manifest\.json is missing: not a folder written by")
    else:
        assert_every_reader_refuses(folder, capsys, match=f"{_named(name)} is missing .*modified after saving")


def test_an_edited_report_is_refused_by_fxmerge_load(folder: Path, capsys) -> None:
    """The issue's case: an edit that keeps report.json valid JSON, hashes not updated."""
    path = folder / "report.json"
    report = json.loads(path.read_text())
    report["groups"][0]["width"] += 1
    path.write_text(json.dumps(report, indent=1))
    assert_every_reader_refuses(folder, capsys, match=r"tampered or corrupted: .*report\.json.*modified after saving")


@pytest.mark.parametrize("name", ["weights.pt", "model.safetensors", "graph.json.tmp", "config.json", "code_v2.py", "extra"])
def test_an_unlisted_file_a_reader_could_take_for_the_model_is_refused(folder: Path, capsys, name: str) -> None:
    if name == "extra":
        (folder / name).mkdir()
    else:
        (folder / name).write_bytes((folder / "weights.safetensors").read_bytes())
    assert_every_reader_refuses(folder, capsys, match=f"{_named(name)} is not listed in manifest\\.json.*modified after saving")


def test_unlisted_figures_and_notes_are_never_read_and_tolerated(saved, folder: Path, capsys) -> None:
    (folder / "notes.txt").write_text("my merge")
    (folder / "landscape.PNG").write_bytes(b"not even a png")
    (folder / "graph.svg").write_text("<svg/>")
    assert load_report(folder) == saved[0].to_dict()
    with torch.no_grad():
        assert torch.equal(fxmerge.load(folder)(TEST_INPUT), saved[0].module(TEST_INPUT))
    assert _inspect(folder, capsys)[0] == 0


def test_saving_again_removes_the_earlier_saves_files_and_refuses_foreign_ones(saved, folder: Path) -> None:
    result, _ = saved
    (folder / "notes.txt").write_text("kept")
    save_module(result.module, folder)  # no report, no code.py, no figures this time
    assert sorted(p.name for p in folder.iterdir()) == ["graph.json", "manifest.json", "notes.txt", "weights.safetensors"]
    assert load_report(folder) is None
    with torch.no_grad():
        assert torch.equal(fxmerge.load(folder)(TEST_INPUT), result.module(TEST_INPUT))
    (folder / "weights.pt").write_bytes(b"someone else's")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SaveError, match=r"holds weights\.pt, which fxmerge did not write there"):
        result.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written


def test_update_folder_adds_files_and_rewrites_the_manifest_over_all(saved, folder: Path, capsys) -> None:
    result, _ = saved
    report = result.to_dict() | {"evaluation": {"joint": 0.5}}
    update_folder(folder, report=report, extra={"landscape.png": b"\x89PNG figure"})
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted([*LISTED, "landscape.png"])
    assert load_report(folder) == json.loads(json.dumps(report))
    assert _inspect(folder, capsys)[0] == 0
    (folder / "landscape.png").write_bytes(b"\x89PNG edited")  # now listed: an edit is refused
    assert_every_reader_refuses(folder, capsys, match=r"landscape\.png.*modified after saving")
    with pytest.raises(LoadError, match=r"landscape\.png"):
        update_folder(folder, report=report)  # never builds on a folder that fails verification
    with pytest.raises(SaveError, match=r"extra file '\.\./x\.png'"):
        update_folder(saved[1], extra={"../x.png": b""})


def test_a_format_1_1_folder_still_loads_and_is_still_checked(saved, folder: Path, capsys) -> None:
    """Folders written before format 1.2: no manifest hash of its own, code.py unlisted."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = "1.1"
    del manifest["manifest_sha256"]
    for name in ("code.py", "groups.png", "alignment_0.png"):
        del manifest["files"][name]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        assert torch.equal(fxmerge.load(folder)(TEST_INPUT), saved[0].module(TEST_INPUT))
    old = folder.parent / "old"
    shutil.copytree(folder, old)
    update_folder(folder, extra={"notes.md": b"# checked"})  # lists code.py from now on
    assert "code.py" in json.loads((folder / "manifest.json").read_text())["files"]
    (folder / "code.py").write_text("edited")
    assert_every_reader_refuses(folder, capsys, match=r"code\.py.*modified after saving")
    save_module(saved[0].module, old)  # saving over a 1.1 folder removes its unlisted code.py (figures stay)
    assert sorted(p.name for p in old.iterdir()) == [
        "alignment_0.png", "graph.json", "groups.png", "manifest.json", "weights.safetensors",
    ]
    with torch.no_grad():
        assert torch.equal(fxmerge.load(old)(TEST_INPUT), saved[0].module(TEST_INPUT))


@pytest.mark.parametrize("name", ["../graph.json", "/etc/passwd", "manifest.json"])
def test_a_manifest_naming_paths_outside_the_folder_is_refused(folder: Path, capsys, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = manifest["files"]["graph.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rehash(folder, "manifest.json")
    assert_every_reader_refuses(folder, capsys, match=r"manifest\.json: malformed 'files' entry")
