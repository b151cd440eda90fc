"""Distributed statistics (a torch.distributed process group) and chunked covariance accumulation.

* ``RunningMoments`` in chunks (and from per-model blocks) equals the unchunked update and a
  two-pass float64 reference (float64 samples; float32 ones: ``test_features.py``); the in-place
  correlation equals ``fxmerge.metrics.correlation``.
* Two processes (gloo on localhost, a file:// rendezvous: no network beyond loopback), each
  merging two zoo ResNets of different depths with HALF of the calibration batches and
  ``process_group=WORLD``, give the single-process merge on all batches: the same depth
  alignment and matching decisions (identical M/U matrices), feature correlations and CKA equal
  to float64 rounding, state_dicts (BatchNorm running statistics included) equal to float32
  rounding, and the same bits on both ranks; feature statistics within a memory budget (several
  passes, each summed over the processes) equal the one-pass ones bit for bit.

The workers are this file run as a script (``python test_distributed.py --worker ...``).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fxmerge
from fxmerge import zoo
from fxmerge.errors import CalibrationError, ConfigError
from fxmerge.metrics import correlation
from fxmerge.passes.dependency import analyze_graph, state_name_map
from fxmerge.passes.features import (
    NonFiniteSamples, RunningMoments, _correlation_, feature_statistics, plan_passes, smallest_max_memory,
    statistics_footprint,
)
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.trace import trace

WORLD_SIZE = 2
NUM_BATCHES = 6  # rank r takes batches r, r + 2, r + 4: a different order than one process


# ------------------------------------------------------------------------------------ the case


def _models() -> list[torch.nn.Module]:
    """Two CIFAR-style ResNets of different depths and widths, with calibrated BatchNorms."""
    models = []
    for seed, blocks, multiplier in ((0, (2, 1, 1), 1.0), (1, (1, 1, 1), 1.5)):
        torch.manual_seed(seed)
        model = zoo.resnet(blocks, width=8, width_multiplier=multiplier, in_channels=1, image_size=8).eval()
        generator = torch.Generator().manual_seed(100 + seed)
        reset_batchnorm(model, [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(2)], quiet=True)
        models.append(model)
    return models


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(NUM_BATCHES)]


def _equal_depth_statistics(batches: list[torch.Tensor], process_group=None) -> dict[str, np.ndarray]:
    """Correlation matrices of every free group of two equal-depth ResNets (feature_statistics)."""
    models = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        models.append(zoo.resnet((1, 1, 1), width=8, in_channels=1, image_size=8).eval())
    graphs = [trace(model, batches[0]) for model in models]
    analyses = [analyze_graph(gm, state_name_map(model)) for gm, model in zip(graphs, models)]
    names = [g.name for g in analyses[0].groups if not g.fixed]
    free = [[a.group(name) for name in names] for a in analyses]
    statistics = feature_statistics(graphs, free, batches, quiet=True, process_group=process_group)
    # within a memory budget (several passes, each summed over the processes): the same bits
    keys, footprint = statistics_footprint(graphs, free, batches)
    budget = smallest_max_memory(keys, footprint)
    assert len(plan_passes(keys, footprint, budget)) >= 2
    bounded = feature_statistics(graphs, free, batches, quiet=True, process_group=process_group, max_memory=budget)
    assert bounded.keys() == statistics.keys()
    assert all(np.array_equal(bounded[name].correlation, s.correlation) for name, s in statistics.items())
    return {name: s.correlation for name, s in statistics.items()} | {
        f"{name}/samples": np.array(s.samples) for name, s in statistics.items()
    }


def _run(batches: list[torch.Tensor], process_group=None) -> dict:
    result = fxmerge.merge(_models(), batches, method="zip", quiet=True, process_group=process_group)
    (alignment,) = result.alignment
    probe = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        output = result.module(probe)
    return {
        "state": {k: v.clone() for k, v in result.module.state_dict().items()},
        "merge": {name: [m.clone() for m in g.merge] for name, g in result.matches.items() if g.merge is not None},
        "unmerge": {name: [u.clone() for u in g.unmerge] for name, g in result.matches.items() if g.unmerge is not None},
        "cka": torch.from_numpy(alignment.cka.copy()),
        "segments": alignment.segments,
        "output": output,
        "statistics": {k: torch.from_numpy(np.asarray(v).copy()) for k, v in _equal_depth_statistics(batches, process_group).items()},
    }


# ---------------------------------------------------------------------------------- the worker


def _worker(rank: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        shard = _batches()[rank::WORLD_SIZE]
        record = _run(shard, dist.group.WORLD)
        # A data error on one process raises on every process instead of leaving the others
        # waiting in a collective.
        from fxmerge.distributed import raise_together

        try:
            raise_together(CalibrationError("bad shard") if rank == 1 else None, dist.group.WORLD, "test")
            record["raised"] = None
        except CalibrationError as error:
            record["raised"] = str(error)
        torch.save(record, out)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ the tests




def test_distributed_merge_equals_single_process(tmp_path: Path, one_thread) -> None:
    start = time.perf_counter()
    rendezvous = tmp_path / "rendezvous"
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    # the workers import this checkout's fxmerge (not an installed one: they run as scripts)
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(rendezvous), str(outs[rank])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    try:
        single = _run(_batches())  # meanwhile, in this process: all batches at once
        logs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for rank, (w, log) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"rank {rank} failed:\n{log}"
    ranks = [torch.load(out, weights_only=False) for out in outs]

    # Every rank holds the same bits.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert torch.equal(ranks[0]["output"], ranks[1]["output"])
    for name in ranks[0]["statistics"]:
        assert torch.equal(ranks[0]["statistics"][name], ranks[1]["statistics"][name]), name

    for record in ranks:
        # Depth alignment: the same segments, CKA equal to float64 rounding.
        assert record["segments"] == single["segments"]
        torch.testing.assert_close(record["cka"], single["cka"], rtol=1e-12, atol=1e-14)
        # Feature statistics: the same sample counts, correlations equal to float64 rounding.
        assert record["statistics"].keys() == single["statistics"].keys()
        for name, value in single["statistics"].items():
            torch.testing.assert_close(record["statistics"][name], value, rtol=0, atol=1e-12, msg=name)
        # Matching decisions: identical merge / unmerge matrices.
        assert record["merge"].keys() == single["merge"].keys() and record["unmerge"].keys() == single["unmerge"].keys()
        for name in single["unmerge"]:
            for mine, theirs in zip(record["unmerge"][name], single["unmerge"][name]):
                assert torch.equal(mine, theirs), name
            for mine, theirs in zip(record["merge"][name], single["merge"][name]):
                assert torch.equal(mine, theirs), name
        # The merged model: weights identical, BatchNorm statistics equal to float32 rounding.
        assert record["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():
            got = record["state"][key]
            if not value.is_floating_point():
                assert torch.equal(got, value), key
                continue
            scale = value.abs().max().clamp_min(1e-12)
            assert float((got - value).abs().max() / scale) < 1e-6, key
        torch.testing.assert_close(record["output"], single["output"], rtol=1e-5, atol=1e-6)

    # A failure on rank 1 was raised on both ranks.
    assert ranks[1]["raised"] == "bad shard"
    assert ranks[0]["raised"] is not None and "process 1" in ranks[0]["raised"] and "bad shard" in ranks[0]["raised"]
    assert time.perf_counter() - start < 60


def test_process_group_must_be_a_group() -> None:
    batches = _batches()[:2]
    with pytest.raises(ConfigError, match="process_group"):
        reset_batchnorm(_models()[0], batches, quiet=True, process_group="default")


# ------------------------------------------------------------------------ chunked accumulation


def _reference_moments(batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([b.double().numpy() for b in batches])
    mean = data.mean(axis=0)
    centred = data - mean
    return mean, centred.T @ centred


@pytest.mark.parametrize("chunk_rows", [1, 37, 256, 10_000])
def test_chunked_update_equals_unchunked(chunk_rows: int) -> None:
    """float64 samples (multiplied in float64): chunks change nothing beyond float64 rounding.
    (float32 samples: ``tests/test_features.py`` checks the float32 products against float64.)"""
    generator = torch.Generator().manual_seed(0)
    # An offset mean and unequal scales: the centring has to be done right.
    batches = [
        torch.randn(n, 96, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 5.0, 96, dtype=torch.float64)
        + 30.0
        for n in (500, 1, 333, 1024)
    ]
    unchunked = RunningMoments(96)
    chunked = RunningMoments(96)
    for batch in batches:
        unchunked.update(batch, chunk_rows=batch.shape[0])  # one chunk: the plain update
        chunked.update(batch, chunk_rows=chunk_rows)
    assert chunked.count == unchunked.count == sum(b.shape[0] for b in batches)
    torch.testing.assert_close(chunked.mean, unchunked.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked.scatter, unchunked.scatter, rtol=1e-10, atol=1e-10)
    mean, scatter = _reference_moments(batches)
    np.testing.assert_allclose(chunked.mean.numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(chunked.scatter.numpy(), scatter, rtol=1e-10, atol=1e-8)


def test_default_chunks_and_blocks() -> None:
    """A small chunk budget forces many chunks; per-model blocks equal their concatenation (float64
    samples, so the chunks and blocks are the only difference)."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3000, 40, generator=generator, dtype=torch.float64)
    b = torch.randn(3000, 24, generator=generator, dtype=torch.float64) * 3 + 1
    joint = RunningMoments(64)
    blocks = RunningMoments(64, chunk_bytes=64 * 64 * 8)  # 64-row chunks
    assert blocks.chunk_rows() == 64
    joint.update(torch.cat([a, b], dim=1), chunk_rows=3000)
    blocks.update([a, b])
    torch.testing.assert_close(blocks.mean, joint.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(blocks.scatter, joint.scatter, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="sum d_k = 64"):
        blocks.update([a])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_samples_are_refused(bad: float) -> None:
    moments = RunningMoments(6)
    moments.update(torch.randn(10, 6))
    mean, scatter = moments.mean.clone(), moments.scatter.clone()
    samples = torch.randn(50, 6)
    samples[33, 4] = bad
    with pytest.raises(NonFiniteSamples):
        moments.update([samples[:, :2], samples[:, 2:]], chunk_rows=8)
    assert moments.count == 10 and torch.equal(moments.mean, mean) and torch.equal(moments.scatter, scatter)


def test_feature_statistics_names_the_non_finite_node() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # float32 overflow on the first hidden layer
    batches = [torch.rand(5, 4) + 1.0 for _ in range(2)]
    graphs = [trace(model, batches[0]), trace(model, batches[0])]
    analyses = [analyze_graph(gm, state_name_map(model)) for gm in graphs]
    names = [g.name for g in analyses[0].groups if not g.fixed]
    free = [[a.group(name) for name in names] for a in analyses]
    with pytest.raises(CalibrationError, match="non-finite features at node"):
        feature_statistics(graphs, free, batches, quiet=True)


def test_in_place_correlation_is_metrics_correlation() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(200, 50, generator=generator, dtype=torch.float64)
    x[:, 7] = 0.0  # a zero-variance unit
    x[:, 9] = 2.0
    cov = torch.cov(x.T)
    expected = correlation(cov)
    got = _correlation_(cov.clone(), block_rows=16)
    assert torch.equal(got, expected)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
