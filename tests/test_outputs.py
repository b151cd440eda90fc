"""``output_balance="norm"`` (``fxmerge.passes.outputs``): which parameters are the output layers,
the rms norms of the outputs, and the merge that averages the output layers with 1 / rms.

The exact check: a model merged with a copy of itself whose output layer is scaled by 3 (the same
features, outputs y and 3y). The plain average gives 2y; balanced weights 1/rms give
(0.75 y + 0.25 * 3y) = 1.5y."""

from __future__ import annotations

import copy

import pytest
import torch

import fxmerge
from fxmerge import zoo
from fxmerge.errors import ConfigError
from fxmerge.passes.outputs import balanced_output_weights, output_layer_params, output_rms
from fxmerge.passes.repair import reset_batchnorm
from conftest import ConvBNNet, output_of, random_batches, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    batches = random_batches((16, 3, 8, 8))
    torch.manual_seed(seed)
    model = ConvBNNet((6, 5)).eval()
    reset_batchnorm(model, batches, quiet=True)  # the statistics a merge's BatchNorm reset recomputes
    return model.eval(), batches


def test_the_output_layers_are_the_parameters_nearest_the_output() -> None:
    model, batches = _model()
    assert output_layer_params(fxmerge.trace(model, batches[0])) == {"fc.weight", "fc.bias"}
    vit = zoo.vit(patch_size=2, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, in_channels=1, image_size=8)
    found = output_layer_params(fxmerge.trace(vit.eval(), torch.zeros(2, 1, 8, 8)))
    assert found and all(name.startswith("heads") for name in found)


def test_output_rms_is_the_root_mean_squared_norm_per_sample() -> None:
    model, batches = _model()
    gm = fxmerge.trace(model, batches[0])
    with torch.no_grad():
        outputs = torch.cat([model(x) for x in batches]).double()
    expected = float(outputs.square().sum(dim=1).mean().sqrt())
    assert output_rms([gm], batches) == [pytest.approx(expected, rel=1e-12)]


def test_balanced_weights_are_inverse_norms_times_the_model_weights() -> None:
    assert balanced_output_weights([1.0, 3.0], None) == pytest.approx((0.75, 0.25))
    assert balanced_output_weights([1.0, 3.0], (0.25, 0.75)) == pytest.approx((0.5, 0.5))
    assert balanced_output_weights([2.0, 0.0], None) == pytest.approx((0.5 / 2 / (0.25 + 0.5), 0.5 / (0.25 + 0.5)))


def test_a_model_with_its_scaled_copy_merges_to_the_balanced_average() -> None:
    model, batches = _model()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc.weight.mul_(3.0)
        scaled.fc.bias.mul_(3.0)
    y = output_of(model, batches[0])
    plain = fxmerge.merge([model, scaled], batches, quiet=True)
    assert relative_error(2.0 * y, output_of(plain.module, batches[0]), norm="l2") < 1e-5
    balanced = fxmerge.merge([model, scaled], batches, output_balance="norm", quiet=True)
    assert relative_error(1.5 * y, output_of(balanced.module, batches[0]), norm="l2") < 1e-5
    assert "outputs" in balanced.timings and "outputs" not in plain.timings
    # re-weighting keeps the measured norms: weights (0.25, 0.75) balance to (0.5, 0.5) -> 2y
    assert relative_error(2.0 * y, output_of(balanced.interpolate((0.25, 0.75)), batches[0]), norm="l2") < 1e-5
    assert all(not torch.equal(a, b) for a, b in zip(model.fc.parameters(), scaled.fc.parameters()))  # inputs kept


def test_a_permuted_twin_is_unchanged_by_output_balance() -> None:
    model, batches = _model()
    twin = fxmerge.testing.random_permute(model, batches[0], seed=1)
    result = fxmerge.merge([model, twin], batches, output_balance="norm", unmerge="regression", quiet=True)
    assert relative_error(output_of(model, batches[0]), output_of(result.module, batches[0]), norm="l2") < 1e-5


def test_output_balance_needs_calibration_data() -> None:
    model, batches = _model()
    with pytest.raises(ConfigError, match="output_balance='norm'"):
        fxmerge.merge([model, copy.deepcopy(model)], None, output_balance="norm", example_input=batches[0], quiet=True)
