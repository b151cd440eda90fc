"""fxmerge's passes as ``torch.fx.passes.infra`` ``PassBase`` objects, for torch.fx pipelines.

Each pass takes a GraphModule and returns a ``PassResult``; the function-preserving ones
(``RandomPermutePass``, ``DepthExtensionPass``) check in ``ensures`` that the module they RETURN
computes what their input computed on the example (raising ``InvarianceError``), in the spirit of
Torch-TensorRT's ``validate_inference``. None of them modifies its input. They compose with
``PassManager``::

    from torch.fx.passes.infra.pass_manager import PassManager
    manager = PassManager([RandomPermutePass(x, seed=0), BatchNormResetPass(batches)])
    result = manager(fxmerge.trace(model, x))
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmerge.errors import InvarianceError
from fxmerge.inputs import as_batch, tensor_leaves
from fxmerge.passes.dependency import analyze_graph, state_name_map
from fxmerge.passes.repair import reset_batchnorm


def _outputs(graph_module: GraphModule, example: torch.Tensor) -> list[torch.Tensor]:
    """The tensors ``graph_module`` returns on ``example`` in eval mode, no gradients; the modules'
    training flags are restored (a pass's input is not touched)."""
    flags = [(module, module.training) for module in graph_module.modules()]
    try:
        with torch.no_grad():
            return tensor_leaves(as_batch(example).run(graph_module.eval()))
    finally:
        for module, training in flags:
            module.training = training


class _FunctionPreserving(PassBase):
    """A pass whose OUTPUT module must compute what its input computes on ``example``.

    torch's ``PassBase.__call__`` runs ``ensures`` on the pass's *input* module, which would
    compare the input with itself; ``__call__`` here runs ``requires`` on the input (recording
    its outputs) and ``ensures`` on the returned ``PassResult.graph_module``. ``ensures`` raises
    ``InvarianceError`` when the largest absolute difference over all output tensors exceeds
    ``rtol`` times the largest absolute reference output.
    """

    def __init__(self, example: torch.Tensor, rtol: float = 1e-4) -> None:
        super().__init__()
        self.example = example
        self.rtol = rtol
        self._expected: list[torch.Tensor] | None = None

    def __call__(self, graph_module: GraphModule) -> PassResult | None:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    def requires(self, graph_module: GraphModule) -> None:
        self._expected = _outputs(graph_module, self.example)

    def ensures(self, graph_module: GraphModule) -> None:
        expected = self._expected
        if expected is None:
            raise RuntimeError(f"{type(self).__name__}.ensures ran before requires")
        got = _outputs(graph_module, self.example)
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise InvarianceError(
                f"{type(self).__name__} changed the output shapes: {[tuple(e.shape) for e in expected]} -> "
                f"{[tuple(g.shape) for g in got]}"
            )
        scale = max(e.abs().max().item() for e in expected) if expected else 0.0
        difference = max(((g - e).abs().max().item() for g, e in zip(got, expected)), default=0.0)
        error = difference / max(scale, 1e-12)
        if not error <= self.rtol:  # NaN fails too
            raise InvarianceError(f"{type(self).__name__} changed the outputs (relative error {error:.2e})")


class RandomPermutePass(_FunctionPreserving):
    """Permute every free group of the graph's weights at random (a self-test of the analysis)."""

    def __init__(self, example: torch.Tensor, seed: int = 0, rtol: float = 1e-4) -> None:
        super().__init__(example, rtol)
        self.seed = seed

    def call(self, graph_module: GraphModule) -> PassResult:
        from fxmerge.testing import permute_model, random_permutations

        analysis = analyze_graph(graph_module, state_name_map(graph_module))
        permuted = permute_model(graph_module, analysis, random_permutations(analysis, self.seed))
        return PassResult(permuted, modified=any(not g.fixed for g in analysis.groups))


class DepthExtensionPass(_FunctionPreserving):
    """Extend a shallower graph to a deeper graph's structure with identity units (see depth.py)."""

    def __init__(self, deep: GraphModule, batches: Sequence[torch.Tensor], objective: str = "lma") -> None:
        super().__init__(batches[0])
        self.deep = deep
        self.batches = list(batches)
        self.objective = objective
        self.alignment: Any = None

    def call(self, graph_module: GraphModule) -> PassResult:
        from fxmerge.passes.depth import align_depth, extend

        self.alignment = align_depth(self.deep, graph_module, self.batches, self.objective, 1, quiet=True)
        extended = extend(graph_module, self.deep, self.alignment, self.example)
        return PassResult(extended, modified=len(self.alignment.deep_units) != len(self.alignment.shallow_units))


class BatchNormResetPass(PassBase):
    """Recompute BatchNorm running statistics on calibration batches (a copy; input untouched)."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.batches = list(batches)

    def call(self, graph_module: GraphModule) -> PassResult:
        repaired = copy.deepcopy(graph_module)
        count = reset_batchnorm(repaired, self.batches, quiet=True)
        return PassResult(repaired, modified=count > 0)


class MergePass(PassBase):
    """Merge the incoming graph with ``others`` (``fxmerge.merge`` options as keyword arguments)."""

    def __init__(self, others: Sequence[torch.nn.Module], calibration: Sequence[Any], **options: Any) -> None:
        super().__init__()
        self.others = list(others)
        self.calibration = calibration
        self.options = options
        self.result: Any = None

    def call(self, graph_module: GraphModule) -> PassResult:
        from fxmerge.api import merge

        self.result = merge([graph_module, *self.others], self.calibration, **self.options)
        return PassResult(self.result.module, modified=True)
