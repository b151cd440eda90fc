"""timm models merged with their permuted twin give the model back, and save/load round-trips.

fx traces into timm's ``BatchNormAct2d``, leaving ``F.batch_norm`` on ``get_attr`` buffers: the
merge must reset those statistics like ``nn.BatchNorm2d`` modules. Each model starts with timm's
initial statistics (0 / 1); the reference ``m`` is the same model with statistics recomputed on the
calibration batches. ``merge([fresh, random_permute(fresh)])`` equals ``m`` only if the merge's BN
reset covers every batch norm (before it did, the error was 1.0-1.8). The merged module saves and
loads bit-identically; with ``BatchNormAct2d`` kept as a leaf it loads when the class is trusted.
Two different models merge to the same model whether their batch norms are functional or modules.
The whole list (15+ models, permute and zip) is benchmarks/timm_models.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fxmerge
from fxmerge.errors import LoadError
from fxmerge.passes.repair import reset_batchnorm

from conftest import relative_error

timm = pytest.importorskip("timm")  # the test extra installs it
from timm.layers import BatchNormAct2d  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _case(name: str, size: int = 32) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.Tensor]]:
    """The model with timm's initial statistics, the same with calibration statistics, the batches."""
    torch.manual_seed(0)
    fresh = timm.create_model(name, pretrained=False, num_classes=10).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, size, size, generator=generator) for _ in range(3)]
    m = copy.deepcopy(fresh)
    reset_batchnorm(m, batches, quiet=True)
    return fresh, m, batches


def _output(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    assert torch.equal(_output(a, x), _output(b, x))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "lcnet_050", "resnet18"])
def test_merge_with_permuted_twin_recovers_the_recalibrated_model(name: str, tmp_path: Path) -> None:
    fresh, m, batches = _case(name)
    x = batches[0]
    twin = fxmerge.testing.random_permute(fresh, x, seed=1).eval()
    assert relative_error(_output(fresh, x), _output(twin, x)) < 1e-4  # the twin is the same function
    assert relative_error(_output(m, x), _output(fresh, x)) > 0.1  # the statistics matter
    result = fxmerge.merge([fresh, twin], batches, method="permute", calibration_batches=len(batches), quiet=True)
    assert relative_error(_output(m, x), _output(result.module, x)) < 1e-4
    result.save(tmp_path)
    _assert_bit_identical(result.module, fxmerge.load(tmp_path), x)


def test_batchnormact_leaf_merges_and_loads_when_trusted(tmp_path: Path) -> None:
    fresh, m, batches = _case("mobilenetv3_small_100")
    x = batches[0]
    twin = fxmerge.testing.random_permute(fresh, x, seed=1, leaf_modules=[BatchNormAct2d]).eval()
    result = fxmerge.merge(
        [fresh, twin], batches, method="permute", calibration_batches=len(batches), quiet=True,
        leaf_modules=[BatchNormAct2d],
    )
    assert any(type(module) is BatchNormAct2d for module in result.module.modules())
    assert relative_error(_output(m, x), _output(result.module, x)) < 1e-4
    result.save(tmp_path)
    with pytest.raises(LoadError, match=r"BatchNormAct2d.*modules=\[BatchNormAct2d\]"):
        fxmerge.load(tmp_path)
    _assert_bit_identical(result.module, fxmerge.load(tmp_path, modules=[BatchNormAct2d]), x)


def test_functional_and_module_batch_norms_merge_to_the_same_model() -> None:
    """Two different models (seeds 0, 1) zipped: traced into (F.batch_norm on get_attr buffers) or
    with BatchNormAct2d kept as a leaf (_BatchNorm modules), the reset gives the same merged model."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model("lcnet_050", pretrained=False, num_classes=10).eval())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=generator) for _ in range(3)]
    options = {"method": "zip", "calibration_batches": len(batches), "quiet": True}
    functional = fxmerge.merge(models, batches, **options).module
    modules = fxmerge.merge(models, batches, leaf_modules=[BatchNormAct2d], **options).module
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in functional.modules())
    assert sum(type(m) is BatchNormAct2d for m in modules.modules()) > 10
    x = batches[0]
    assert relative_error(_output(modules, x), _output(functional, x)) < 1e-6
