"""Tracing a model into a torch.fx GraphModule with tensor shapes recorded on every node."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torch.fx.passes.shape_prop import ShapeProp

from fxmerge import ops
from fxmerge.errors import TraceError

LeafSpec = type[nn.Module] | str


class _LeafTracer(Tracer):
    """torch.fx Tracer whose leaves are the torch.nn layers plus user-chosen types or module paths.

    It also remembers which module it was inside when tracing failed, so errors can name it.
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
        self.leaf_paths = frozenset(leaf for leaf in leaf_modules if isinstance(leaf, str))
        self.current_path: list[str] = []
        # the innermost module being traced when an error was raised (the stack above is
        # already unwound when the caller sees the exception)
        self.failed_path: str | None = None

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_paths or isinstance(module, self.leaf_types):
            return True
        if ops.is_user_module(module):  # a module class taught with fxmerge.ops.register: its rule describes it whole
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.current_path.append(self.path_of_module(module))
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.current_path[-1]
            raise
        finally:
            self.current_path.pop()


def _as_tuple(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def trace(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    leaf_modules: Sequence[LeafSpec] = (),
) -> GraphModule:
    """Trace ``model`` (a copy of it, in eval mode) and record shapes on every node.

    Args:
        model: any module torch.fx can trace. It is not modified: a deep copy is traced, in eval
            mode, because ``self.training`` is frozen into the graph at trace time.
        example_input: one input tensor (e.g. ``(N, C, H, W)``) or a tuple of positional inputs;
            used by ``ShapeProp`` to fill ``node.meta["tensor_meta"]``.
        leaf_modules: extra module types or qualified module names to keep as single
            ``call_module`` nodes instead of tracing through them.

    Returns:
        A ``GraphModule`` (in eval mode) whose nodes carry ``meta["tensor_meta"]``.

    Raises:
        TraceError: the model cannot be traced symbolically; the message names the module and
            suggests ``leaf_modules=`` or ``concrete_args=``-style fixes.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    copied = copy.deepcopy(model).eval()
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(copied)
    except Exception as error:  # torch.fx raises many types: TraceError, TypeError, RuntimeError…
        where = tracer.failed_path
        if where:
            fix = (
                f"pass leaf_modules=['{where}'] (or its type, {type(copied.get_submodule(where)).__name__}) "
                f"to keep that module opaque — its channels then stay fixed — or rewrite the "
                f"data-dependent branch."
            )
            place = f"inside module '{where}'"
        else:
            fix = "move the data-dependent branch into a submodule passed as leaf_modules=, or rewrite it."
            place = f"in the forward of {type(model).__name__} itself"
        raise TraceError(
            f"cannot trace {type(model).__name__}: failed {place} "
            f"({type(error).__name__}: {error}). torch.fx needs control flow that does not "
            f"depend on tensor values. Fix: {fix}"
        ) from error
    # torch.fx creates the node of a proxy attribute (``x.shape``) lazily, when it is first used.
    # Formatting it into an assert message (torchvision's ViT) creates it, but the generated code
    # of the resulting GraphModule never uses it, so re-tracing a GraphModule would drop it and
    # a model and its traced copy would have different graphs. Dead attribute nodes go here.
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is getattr and not node.users:
            graph.erase_node(node)
    name = type(model).__name__
    gm = GraphModule(tracer.root, graph, name)
    gm.eval()
    inputs = _as_tuple(example_input)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as error:
        raise TraceError(
            f"{name} traced, but running it on the example input of shape "
            f"{[tuple(getattr(t, 'shape', ())) for t in inputs]} failed: {error}"
        ) from error
    return gm
