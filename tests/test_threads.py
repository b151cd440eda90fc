"""The ``threads`` option: merge() runs every stage under it and gives the caller's torch thread
count back (also when it raises); "auto" lowers torch's setting to the CPUs that are free."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import fxmerge
import fxmerge.api
from fxmerge import threads as fxthreads
from fxmerge import zoo
from fxmerge.config import MergeConfig
from fxmerge.errors import ConfigError

from conftest import random_batches, randomize_

STAGES = (
    "checked_inputs", "trace_models", "align_depths", "analyse", "check_structure", "collect_statistics",
    "match_widths", "rewrite", "attach_tails", "repair_stage",
)


@pytest.fixture
def caller_threads() -> Iterator[int]:
    """The test runs with 3 torch threads (a value neither 1 nor a default), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(previous)


@pytest.fixture
def seen(monkeypatch) -> dict[str, list[int]]:
    """Per stage of merge(), torch's thread count each time it ran."""
    record: dict[str, list[int]] = {}
    for name in STAGES:
        stage = getattr(fxmerge.api, name)

        def wrapped(*args, _stage=stage, _name=name, **kwargs):
            record.setdefault(_name, []).append(torch.get_num_threads())
            return _stage(*args, **kwargs)

        monkeypatch.setattr(fxmerge.api, name, wrapped)
    return record


def _models_and_batches():
    models = [randomize_(zoo.resnet((1, 1), width=4, in_channels=1, image_size=8, num_outputs=5), seed).eval() for seed in (0, 1)]
    return models, random_batches((8, 1, 8, 8), count=2)


def _machine(monkeypatch, *, usable: int | None, cpus: int, load: float | None) -> None:
    """Pretend: ``usable`` CPUs in the affinity mask (None: no sched_getaffinity), ``cpus`` in the
    machine, a 1-minute load average of ``load`` (None: no getloadavg)."""
    if usable is None:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    else:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if load is None:
        def no_load():
            raise OSError("no load average here")

        monkeypatch.setattr(os, "getloadavg", no_load, raising=False)
    else:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0), raising=False)


@pytest.mark.parametrize(
    ("usable", "cpus", "load", "torch_threads", "expected"),
    [
        (8, 8, 0.1, 8, 8),  # idle: every core torch would use
        (8, 8, 2.6, 8, 5),  # 8 - 2.6 = 5.4 -> 5
        (8, 8, 2.5, 8, 6),  # halves round up: 5.5 -> 6
        (8, 16, 4.0, 8, 6),  # the load spreads over 16 CPUs: 2 of it on ours
        (2, 2, 5.0, 2, 1),  # a busy 2-core box: at least 1
        (16, 16, 0.0, 4, 4),  # never more than torch's setting (OMP_NUM_THREADS, the caller's)
        (None, 4, 1.0, 4, 3),  # no affinity mask (macOS): os.cpu_count()
        (4, 4, None, 4, 4),  # no load average (Windows): all usable CPUs count as free
    ],
)
def test_auto_is_the_free_cpus_capped_by_torch(monkeypatch, usable, cpus, load, torch_threads, expected) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        _machine(monkeypatch, usable=usable, cpus=cpus, load=load)
        assert fxthreads.auto_threads() == expected
        assert fxthreads.resolve_threads("auto") == expected
        assert fxthreads.resolve_threads(7) == 7 and fxthreads.resolve_threads(None) is None
    finally:
        torch.set_num_threads(previous)


def test_every_stage_runs_under_the_threads_and_the_callers_count_comes_back(caller_threads, seen) -> None:
    models, batches = _models_and_batches()
    result = fxmerge.merge(models, batches, method="zip", quiet=True, threads=2)
    assert {name: set(counts) for name, counts in seen.items()} == {name: {2} for name in STAGES}
    assert torch.get_num_threads() == caller_threads
    seen.clear()
    result.interpolate((0.25, 0.75))  # re-weighting repeats the last stages, under the same option
    assert {name: set(counts) for name, counts in seen.items()} == {name: {2} for name in ("rewrite", "attach_tails", "repair_stage")}
    assert torch.get_num_threads() == caller_threads
    # the thread count is not part of the result: threads=None (the caller's 3 threads) gives the same weights
    again = fxmerge.merge(models, batches, method="zip", quiet=True, threads=None).module.state_dict()
    for key, value in result.module.state_dict().items():
        assert torch.equal(again[key], value), key
    assert set(seen["trace_models"]) == {caller_threads}


def test_auto_is_the_default_and_resolved_when_merge_runs(caller_threads, seen, monkeypatch) -> None:
    _machine(monkeypatch, usable=2, cpus=2, load=0.9)  # 2 - 0.9 = 1.1 -> 1 thread, though torch has 3
    models, batches = _models_and_batches()
    result = fxmerge.merge(models, batches, method="permute", quiet=True)
    assert result.config.threads == "auto"
    assert {name: set(counts) for name, counts in seen.items()} == {name: {1} for name in STAGES}
    assert torch.get_num_threads() == caller_threads
    # the count it ran with is in the result and its report, to reproduce the merge
    assert result.threads == 1 and result.to_dict()["threads"] == 1
    seen.clear()
    _machine(monkeypatch, usable=2, cpus=2, load=0.0)  # "auto" would now pick 2
    result.interpolate((0.25, 0.75))
    assert {name: set(counts) for name, counts in seen.items()} == {name: {1} for name in ("rewrite", "attach_tails", "repair_stage")}


def test_the_callers_count_comes_back_when_merge_raises(caller_threads, seen) -> None:
    models, batches = _models_and_batches()
    with pytest.raises(ConfigError, match=r"stop_at=99: the model has units 0\.\.4"):
        fxmerge.merge(models, batches, quiet=True, stop_at=99, threads=2)
    assert seen["check_structure"] == [2]  # the stage that raised ran under the option
    assert torch.get_num_threads() == caller_threads
    with pytest.raises(ConfigError, match="threads=0 must be an int >= 1, 'auto' or None"):
        fxmerge.merge(models, batches, quiet=True, threads=0)
    assert torch.get_num_threads() == caller_threads


def test_threads_option_values() -> None:
    assert MergeConfig().threads == "auto"
    assert MergeConfig.from_dict({"threads": "4"}).threads == 4
    assert MergeConfig.from_dict({"threads": None}).threads is None
    assert MergeConfig.from_dict({"threads": "none"}).threads is None  # the flag's spelling of None
    assert MergeConfig.from_dict(MergeConfig(threads=2).as_dict()) == MergeConfig(threads=2)
    for bad in ("many", 0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="must be an int >= 1, 'auto' or None"):
            MergeConfig(threads=bad)
