"""The TraceError of a model torch.fx cannot trace says what failed (the original exception, the
module, the last traced node, the model's line) and why; only a branch on a traced value is
blamed on control flow, and every message points to capture="export" / --capture export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.errors import TraceError


class IteratesOverRows(nn.Module):
    """Python iteration over a traced tensor: torch.fx's Proxy cannot be iterated (torch.export can)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.stack([row * 2 for row in y])


class Branches(nn.Module):
    """Really data-dependent control flow: the branch taken depends on the input's values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.inner = Branches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.linear(x))


def _line(code: str) -> int:
    """The line of this file that holds ``code`` (the messages quote the model's line)."""
    lines = open(__file__, encoding="utf-8").read().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.strip() == code)


PROXY_ITERATION = (
    "cannot trace IteratesOverRows: failed in the forward of IteratesOverRows itself (TraceError: Proxy object "
    "cannot be iterated."
)


def test_iterating_a_proxy_names_the_failure_and_points_to_export() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(TraceError) as caught:
        fxmerge.trace(IteratesOverRows(), x, capture="fx")
    message = str(caught.value)
    assert message.startswith(PROXY_ITERATION), message
    assert "after graph node 'linear'" in message
    code = "return torch.stack([row * 2 for row in y])"
    assert f"at test_trace_errors.py:{_line(code)} in forward: `{code}`" in message
    assert (
        "Why: torch.fx's symbolic tracing runs the forward on Proxy objects, and this Python code cannot run on "
        "them (iterating one, turning it into a Python number, or rewriting the code of a forward that takes "
        "*args/**kwargs, which fails for some, e.g. HuggingFace's). "
        "Fix: capture='export' (command line: --capture export), which runs the forward's real Python code on fake "
        "tensors."
    ) in message
    assert "control flow that does not depend" not in message and "data-dependent" not in message
    assert isinstance(caught.value.__cause__, torch.fx.proxy.TraceError)
    # the fix works: "auto" (and "export") capture it, and the graph computes the model
    model = IteratesOverRows()
    gm = fxmerge.trace(model, x)
    assert gm.meta["fxmerge_capture"] == "export"
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))


def test_data_dependent_control_flow_is_called_that_and_names_the_module() -> None:
    with pytest.raises(TraceError) as caught:
        fxmerge.trace(Outer(), torch.randn(2, 4), capture="fx")
    assert str(caught.value) == (
        "cannot trace Outer: failed inside module 'inner' (Branches) (TraceError: symbolically traced variables "
        "cannot be used as inputs to control flow; after graph node 'gt'; "
        f"at test_trace_errors.py:{_line('if x.sum() > 0:')} in forward: "
        "`if x.sum() > 0:`). Why: the forward branches on a traced value (an if/while on a tensor's data or "
        "shape): torch.fx needs control flow that does not depend on tensor values. Fix: leaf_modules=['inner'] "
        "(or its type, Branches) keeps that module opaque — its channels then stay fixed; or rewrite the branch; "
        "or capture='export' (command line: --capture export) when the branch depends on shapes only."
    )
    with pytest.raises(TraceError) as caught:
        fxmerge.trace(Branches(), torch.randn(2, 4), capture="fx")
    assert "failed in the forward of Branches itself" in str(caught.value)
    assert "Fix: move the branch into a submodule passed as leaf_modules=" in str(caught.value)
    # torch.export fails on it too, and says it is data-dependent (auto gives both reasons)
    with pytest.raises(TraceError) as caught:
        fxmerge.trace(Branches(), torch.randn(2, 4))
    assert "torch.export: cannot export Branches (GuardOnDataDependentSymNode: " in str(caught.value)
    assert "torch.export needs a forward without data-dependent Python control flow" in str(caught.value)


def test_a_transformers_model_fx_cannot_trace_is_not_blamed_on_control_flow() -> None:
    """HuggingFace transformers 5.x: torch.fx cannot even set up the forward's arguments."""
    from conftest import tiny_bert

    with pytest.raises(TraceError) as caught:
        fxmerge.trace(tiny_bert(), {"input_ids": torch.randint(0, 100, (2, 8))}, capture="fx")
    message = str(caught.value)
    assert message.startswith(
        "cannot trace BertForSequenceClassification: failed in the forward of BertForSequenceClassification "
        "itself (ValueError: code: co_varnames is too small; after graph node '_kwargs')."
    ), message
    assert "Fix: capture='export' (command line: --capture export)" in message
    assert "control flow" not in message
