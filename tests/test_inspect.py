"""Issue #14 item 4: ``fxmerge inspect DIR``'s layer diff names the identity units the depth pass
inserted — which model, how many, after which unit, with which modules — read from report.json.

The expected lines are built independently of the report: from the merge's segments (every
non-first deep unit of a segment is an identity in the shallower model) and the deep model's
units (``find_units`` of its own trace: the modules its nodes call).
"""

from __future__ import annotations

import pytest
import torch

import fxmerge
from fxmerge.cli import _format_report, main
from fxmerge.passes.units import find_units

from conftest import small_resnets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def depth_merge(one_thread: None, tmp_path_factory: pytest.TempPathFactory):
    (deep, shallow), batches = small_resnets((2, 3, 1), (1, 1, 1))
    result = fxmerge.merge([deep, shallow], batches, method="zip", quiet=True)  # the shallow one is model 1
    directory = tmp_path_factory.mktemp("inspect") / "merged"
    result.save(directory)
    return result, fxmerge.trace(deep, batches[0]), directory


def _expected_inserted(result, deep_gm) -> list[dict]:
    units = find_units(deep_gm)
    nodes = {n.name: n for n in deep_gm.graph.nodes}
    (alignment,) = result.alignment
    out = []
    for segment in alignment.segments:
        for j in segment[1:]:
            modules = list(dict.fromkeys(str(nodes[n].target) for n in units[j].nodes if nodes[n].op == "call_module"))
            out.append({"unit": units[j].end, "index": j, "after": units[j - 1].end, "modules": modules})
    return out


def test_the_report_records_the_inserted_units(depth_merge) -> None:
    result, deep_gm, directory = depth_merge
    (alignment,) = fxmerge.io.load_report(directory)["alignment"]
    expected = _expected_inserted(result, deep_gm)
    assert alignment["model"] == 1
    assert alignment["inserted"] == expected
    assert len(expected) == len(find_units(deep_gm)) - len(alignment["shallow_units"]) == 3


def test_inspect_lists_the_inserted_units_in_the_layer_diff(depth_merge, capsys) -> None:
    result, deep_gm, directory = depth_merge
    assert main(["inspect", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer diff:"))
    end = lines.index("", start)
    inserted = _expected_inserted(result, deep_gm)
    resized = [g for g in result.groups if len(set(g.sizes)) > 1 or g.width != g.sizes[0]]
    assert lines[start] == f"layer diff: {len(resized)} groups changed width, 3 identity units inserted (model 1: 3):"
    parents = [unit["modules"][0].rpartition(".")[0] for unit in inserted]
    assert lines[start + 1 + len(resized):end] == [
        f"  model 1: identity unit {unit['unit']} ({parent}.{{conv1, bn1, relu1, conv2, bn2, relu2}}) "
        f"inserted after {unit['after']}"
        for unit, parent in zip(inserted, parents)
    ]
    # the units are the deep model's BasicBlocks: every module of a block, under its block's path
    assert all(unit["modules"] == [f"{parent}.{m}" for m in ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2")]
               for unit, parent in zip(inserted, parents))


def test_layer_diff_of_reports_without_depth_alignment_or_written_before_inserted() -> None:
    groups = [
        {"name": "a:out", "sizes": [4, 4], "width": 4, "similarity": 0.5, "source": "activations"},
        {"name": "b:out", "sizes": [4, 6], "width": 6, "similarity": None, "source": "activations"},
    ]
    lines = _format_report({"groups": groups}).splitlines()
    assert lines[-2:] == ["layer diff: 1 groups changed width, 0 identity units inserted:", "  b:out: (4, 6) -> 6"]
    assert _format_report({"groups": groups[:1]}).splitlines()[-1] == "layer diff: 0 groups changed width, 0 identity units inserted"
    old = {  # an alignment entry as reports recorded it before "inserted" (no module names)
        "model": 0, "deep_units": ["x", "u1", "u2", "u3"], "shallow_units": ["x", "v1"],
        "segments": [[0, 1], [2, 3]], "objective_value": 1.0,
    }
    lines = _format_report({"groups": groups[:1], "alignment": [old]}).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer diff:"))
    assert lines[start:start + 3] == [
        "layer diff: 0 groups changed width, 2 identity units inserted (model 0: 2):",
        "  model 0: identity unit u1 inserted after x",
        "  model 0: identity unit u3 inserted after u2",
    ]
    first = dict(old, segments=[[0], [1, 2, 3]], deep_units=["u0", "u1", "u2", "u3"], inserted=[
        {"unit": "u0", "index": 0, "after": None, "modules": ["blocks.0.fc", "head.norm"]},
    ])
    assert "  model 0: identity unit u0 (blocks.0.fc, head.norm) inserted at the input" in _format_report(
        {"groups": groups[:1], "alignment": [first]}
    ).splitlines()
