"""``fxmerge.passes.infra``: the function-preserving ``PassBase`` wrappers check the module they
RETURN against their input (torch's ``PassBase.__call__`` would check the input against itself),
so a pass that breaks the function raises ``InvarianceError``; inputs are never modified."""

from __future__ import annotations

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import fxmerge
from fxmerge import zoo
from fxmerge.errors import InvarianceError
from fxmerge.passes.infra import BatchNormResetPass, DepthExtensionPass, RandomPermutePass
from fxmerge.passes.units import find_units
from conftest import output_of, random_batches, randomize_, relative_error, same_state

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = random_batches(count=3)
X = BATCHES[0]


def _resnet(stages: tuple[int, ...] = (1, 1, 1), seed: int = 0) -> torch.fx.GraphModule:
    model = randomize_(zoo.resnet(stages, width=8, in_channels=1, image_size=8), seed).eval()
    return fxmerge.trace(model, X)


def _perturb_first_weight(graph_module: torch.fx.GraphModule) -> None:
    with torch.no_grad():
        next(p for p in graph_module.parameters() if p.dim() > 1).add_(0.5)


class _BrokenPermute(RandomPermutePass):
    """Claims to preserve the function, but also shifts one weight of its output."""

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        result = super().call(graph_module)
        _perturb_first_weight(result.graph_module)
        return result


class _BrokenExtension(DepthExtensionPass):
    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        result = super().call(graph_module)
        _perturb_first_weight(result.graph_module)
        return result


def _snapshot(graph_module: torch.fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return {k: v.clone() for k, v in graph_module.state_dict().items()}, [m.training for m in graph_module.modules()]


def test_random_permute_pass_checks_and_preserves() -> None:
    gm = _resnet()
    gm.train()  # a train-mode input must come out in train mode: the check runs in eval mode
    state, flags = _snapshot(gm)
    result = RandomPermutePass(X, seed=1)(gm)
    assert [m.training for m in gm.modules()] == flags and all(flags)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    assert result.modified and not same_state(result.graph_module, gm)
    assert relative_error(output_of(gm.eval(), X), output_of(result.graph_module.eval(), X)) < 1e-5


def test_a_broken_function_preserving_pass_raises() -> None:
    gm = _resnet()
    with pytest.raises(InvarianceError, match="_BrokenPermute changed the outputs"):
        _BrokenPermute(X, seed=1)(gm)
    # through a PassManager too (it wraps the pass's error)
    with pytest.raises(Exception) as caught:
        PassManager([RandomPermutePass(X, seed=1), _BrokenPermute(X, seed=2)])(gm)
    assert isinstance(caught.value.__cause__, InvarianceError)
    # why the wrappers override __call__: torch's runs ``ensures`` on the INPUT module, and would
    # never see the broken output
    PassBase.__call__(_BrokenPermute(X, seed=1), gm)


def test_a_pass_that_changes_the_output_shape_raises() -> None:
    class Truncate(RandomPermutePass):
        def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
            result = super().call(graph_module)
            output = next(n for n in result.graph_module.graph.nodes if n.op == "output")
            with result.graph_module.graph.inserting_before(output):
                sliced = result.graph_module.graph.call_function(torch.narrow, (output.args[0], 1, 0, 3))
            output.args = (sliced,)
            result.graph_module.recompile()
            return result

    with pytest.raises(InvarianceError, match="output shapes"):
        Truncate(X, seed=1)(_resnet())


def test_depth_extension_pass_checks_its_output() -> None:
    shallow, deep = _resnet((1, 1, 1)), _resnet((2, 1, 2), seed=1)
    state, _ = _snapshot(shallow)
    extension = DepthExtensionPass(deep, BATCHES)
    result = extension(shallow)
    assert result.modified and len(find_units(result.graph_module)) == len(find_units(deep))
    assert relative_error(output_of(shallow, X), output_of(result.graph_module, X)) < 1e-5
    assert all(torch.equal(shallow.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(InvarianceError, match="_BrokenExtension"):
        _BrokenExtension(deep, BATCHES)(shallow)


def test_batchnorm_reset_pass_works_on_a_copy() -> None:
    gm = _resnet()
    state, _ = _snapshot(gm)
    result = BatchNormResetPass(BATCHES)(gm)
    assert result.modified and not same_state(result.graph_module, gm)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
