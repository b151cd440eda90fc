"""Capturing a model as a GraphModule (torch.fx symbolic tracing or torch.export) with tensor shapes
recorded on every node."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Tracer
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from fxmerge import ops
from fxmerge.config import CAPTURES
from fxmerge.errors import ConfigError, TraceError
from fxmerge.inputs import Batch, as_batch

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


def trace(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Sequence[LeafSpec] = (),
    capture: str = "auto",
) -> GraphModule:
    """Capture ``model`` (a copy of it, in eval mode) as a GraphModule with shapes on every node.

    Args:
        model: the module to capture. It is not modified: a deep copy is captured, in eval mode,
            because ``self.training`` is frozen into the graph.
        example_inputs: one input tensor (e.g. ``(N, C, H, W)``), a tuple of positional inputs, a
            dict of keyword inputs (``{"input_ids": (N, L) int64, "attention_mask": ...}``) or a
            ``fxmerge.inputs.Batch``; the graph's nodes get ``meta["tensor_meta"]`` from it.
        leaf_modules: extra module types or qualified module names kept as single ``call_module``
            nodes (torch.fx only: torch.export has no leaves).
        capture: "fx" (``torch.fx`` symbolic tracing), "export" (``torch.export.export``,
            ``strict=False``, the batch dim and the sequence dim of integer inputs dynamic where
            the model allows it: the graph runs at other batch sizes and sequence lengths; its module takes the same args/kwargs and
            returns the same structure, e.g. an HF ``ModelOutput``) or "auto": fx, and export
            when fx cannot trace the model (HuggingFace transformers 5.x).

    Returns:
        A ``GraphModule`` (in eval mode) whose nodes carry ``meta["tensor_meta"]``;
        ``gm.meta["fxmerge_capture"]`` says which capture made it ("fx" or "export").

    Raises:
        TraceError: the model cannot be captured; the message names the module and the fix (with
            "auto", the reasons of both captures).
        ConfigError: an unknown ``capture``, or ``leaf_modules`` with ``capture="export"``.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    if capture not in CAPTURES:
        raise ConfigError(f"capture={capture!r}: choose one of {', '.join(map(repr, CAPTURES))}")
    if capture == "export" and leaf_modules:
        raise ConfigError(
            "leaf_modules= needs capture='fx': torch.export traces through every module (drop leaf_modules, "
            "or register the module's rule with fxmerge.ops.register)"
        )
    batch = as_batch(example_inputs)
    if capture == "auto" and _is_exported(model) and not leaf_modules:
        # an ExportedProgram's module: re-exporting keeps its input/output structure (fx would
        # trace through its pytree code and return a plain dict instead of an HF ModelOutput)
        capture = "export"
    if capture == "fx":
        return _fx_capture(model, batch, leaf_modules)
    if capture == "export":
        return _export_capture(model, batch)
    try:
        return _fx_capture(model, batch, leaf_modules)
    except TraceError as fx_error:
        if leaf_modules:
            raise TraceError(
                f"{fx_error} (torch.export was not tried: it cannot keep the leaf_modules= opaque)"
            ) from fx_error
        try:
            return _export_capture(model, batch)
        except TraceError as export_error:
            raise TraceError(
                f"neither capture can handle {type(model).__name__}. torch.fx: {fx_error} — torch.export: "
                f"{export_error}"
            ) from export_error


def _is_exported(model: nn.Module) -> bool:
    from torch.fx.graph import _PyTreeCodeGen

    return isinstance(model, GraphModule) and isinstance(model.graph._codegen, _PyTreeCodeGen)


def _fx_capture(model: nn.Module, batch: Batch, leaf_modules: Sequence[LeafSpec]) -> GraphModule:
    copied = copy.deepcopy(model).eval()
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(copied, concrete_args=_unused_defaults(copied, batch))
    except Exception as error:  # torch.fx raises many types: TraceError, TypeError, RuntimeError…
        raise _fx_failure(model, copied, tracer, error) from error
    # torch.fx creates the node of a proxy attribute (``x.shape``) lazily, when it is first used.
    # Formatting it into an assert message (torchvision's ViT) creates it, but the generated code
    # of the resulting GraphModule never uses it, so re-tracing a GraphModule would drop it and
    # a model and its traced copy would have different graphs. Dead attribute nodes go here.
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is getattr and not node.users:
            graph.erase_node(node)
    gm = GraphModule(tracer.root, graph, type(model).__name__)
    return _with_shapes(gm, batch, "fx", type(model).__name__)


def _fx_failure(model: nn.Module, copied: nn.Module, tracer: _LeafTracer, error: Exception) -> TraceError:
    """The TraceError for a failed torch.fx trace: what failed (the exception, the module, the last
    traced node, the line of model code), why, and the fix. Only a branch on a traced value is
    called control flow; everything else torch.fx's Proxy objects cannot do (be iterated, become
    Python numbers, or rewrite a forward with ``**kwargs``: HuggingFace's ``co_varnames is too small``)
    points to torch.export, which runs the real Python code on fake tensors."""
    name = type(model).__name__
    where = tracer.failed_path
    place = (
        f"inside module '{where}' ({type(copied.get_submodule(where)).__name__})" if where
        else f"in the forward of {name} itself"
    )
    details = [f"{type(error).__name__}: {_first_line(error)}"]
    graph = getattr(tracer, "graph", None)
    nodes = list(graph.nodes) if graph is not None else []
    if nodes:
        details.append(f"after graph node '{nodes[-1].name}'")
    line = _model_code_line(error)
    if line:
        details.append(f"at {line}")
    export = "capture='export' (command line: --capture export)"
    leaf = (
        f"leaf_modules=['{where}'] (or its type, {type(copied.get_submodule(where)).__name__}) keeps that "
        "module opaque — its channels then stay fixed" if where else None
    )
    if isinstance(error, torch.fx.proxy.TraceError) and "cannot be used as inputs to control flow" in str(error):
        why = ("the forward branches on a traced value (an if/while on a tensor's data or shape): torch.fx "
               "needs control flow that does not depend on tensor values")
        fixes = [
            leaf or "move the branch into a submodule passed as leaf_modules=", "rewrite the branch",
            export + " when the branch depends on shapes only",
        ]
    else:
        why = ("torch.fx's symbolic tracing runs the forward on Proxy objects, and this Python code cannot "
               "run on them (iterating one, turning it into a Python number, or rewriting the code of a forward "
               "that takes *args/**kwargs, which fails for some, e.g. HuggingFace's)")
        fixes = [export + ", which runs the forward's real Python code on fake tensors"] + ([leaf] if leaf else [])
    return TraceError(
        f"cannot trace {name}: failed {place} ({'; '.join(details)}). Why: {why}. Fix: {'; or '.join(fixes)}."
    )


def _model_code_line(error: BaseException) -> str | None:
    """'file.py:12 in forward: `code`' for the innermost frame of ``error``'s traceback outside torch,
    fxmerge and the standard library (the model's code), or None."""
    import sysconfig
    import traceback
    from pathlib import Path

    paths = sysconfig.get_paths()
    libraries = [Path(p).resolve() for p in (Path(torch.__file__).parent, Path(__file__).parent)]
    stdlib = Path(paths["stdlib"]).resolve()
    installed = [Path(paths[key]).resolve() for key in ("purelib", "platlib")]  # may lie under stdlib

    def model_code(filename: str) -> bool:
        if filename.startswith("<"):
            return False
        path = Path(filename).resolve()
        if any(path.is_relative_to(root) for root in libraries):
            return False
        return not path.is_relative_to(stdlib) or any(path.is_relative_to(root) for root in installed)

    frames = [f for f in traceback.extract_tb(error.__traceback__) if model_code(f.filename)]
    if not frames:
        return None
    frame = frames[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}{code}"


def _unused_defaults(model: nn.Module, batch: Batch) -> dict[str, Any] | None:
    """For keyword inputs: the forward's other parameters, fixed at their defaults (an HF-style
    forward has many optional inputs; traced as proxies, ``if mask is None`` would fail)."""
    if not batch.kwargs:
        return None
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    given = set(batch.kwargs) | {p.name for p in parameters[: len(batch.args)]}
    return {
        p.name: p.default
        for p in parameters
        if p.name not in given and p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    } or None


def _dynamic_shapes(model: nn.Module, batch: Batch) -> Any:
    """The batch dim of every tensor input dynamic, and the sequence dim (dim 1) of integer inputs
    (token ids, masks), keyed by the forward's parameter names; ``Dim.AUTO``: export keeps static
    what the model needs static. Other dims (image sizes) stay static: making them symbolic costs
    minutes of symbolic reasoning on windowed models (a 2-layer HF Swin: 250 s against 4 s)."""
    from torch.export import Dim

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            axes = (0,) if value.is_floating_point() or value.dim() < 2 else (0, 1)
            return {axis: Dim.AUTO for axis in axes if axis < value.dim()}
        if isinstance(value, Mapping):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        return None

    bound = inspect.signature(model.forward).bind(*batch.args, **dict(batch.kwargs))
    return {name: spec(value) for name, value in bound.arguments.items()}


def _export_capture(model: nn.Module, batch: Batch) -> GraphModule:
    name = type(model).__name__
    copied = copy.deepcopy(model).eval()
    try:
        dynamic = _dynamic_shapes(copied, batch)
    except TypeError as error:
        raise TraceError(f"cannot export {name}: its forward does not take the inputs {batch!r} ({error})") from error
    try:
        with warnings.catch_warnings(), _quiet_export_log():
            warnings.simplefilter("ignore")  # torch.export's own deprecation chatter
            program = torch.export.export(
                copied, tuple(batch.args), dict(batch.kwargs), dynamic_shapes=dynamic, strict=False
            )
    except Exception as error:  # torch.export raises UserError, GuardOnDataDependentSymNode, …
        if "data-dependent" in str(error) or "DataDependent" in type(error).__name__:
            why = ("torch.export needs a forward without data-dependent Python control flow; fix: rewrite the "
                   "branch with torch.cond, or capture='fx' with leaf_modules=")
        else:
            why = ("torch.export could not run the forward on fake tensors; fix: capture='fx' (with "
                   "leaf_modules= for a module it cannot trace either), or make that code export-friendly")
        raise TraceError(f"cannot export {name} ({type(error).__name__}: {_first_line(error)}). {why}.") from error
    exported = program.module()
    # ExportedProgram.module() refuses .eval()/.train(); a plain GraphModule over the same graph
    # and submodules keeps the input/output structure (the graph's pytree codegen) and the weights.
    gm = GraphModule(exported, exported.graph, name)
    return _with_shapes(gm, batch, "export", name)


@contextlib.contextmanager
def _quiet_export_log() -> Iterator[None]:
    """torch.export logs a warning for every Dim.AUTO dim it specialises (image channels, a batch
    of one); that is the intended outcome of "dynamic where the model allows it"."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _ShapeProp(ShapeProp):
    """torch's ShapeProp (real tensors) without its ``traceback.print_exc()`` when a node fails:
    the failure is raised as it is, and the caller says what failed."""

    def run_node(self, n: Any) -> Any:
        result = Interpreter.run_node(self, n)
        found_tensor = False

        def extract_tensor_meta(obj: Any) -> Any:
            nonlocal found_tensor
            if isinstance(obj, torch.Tensor):
                found_tensor = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract_tensor_meta)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _with_shapes(gm: GraphModule, batch: Batch, capture: str, name: str) -> GraphModule:
    gm.eval()
    gm.meta["fxmerge_capture"] = capture
    try:
        with torch.no_grad():
            _ShapeProp(gm).propagate(*batch.placeholders(gm))
    except Exception as error:
        raise TraceError(f"{name} was captured ({capture}), but running it on {batch!r} failed: {error}") from error
    return gm


def capture_of(gm: GraphModule) -> str:
    """"fx" or "export": how ``gm`` was captured (``trace``)."""
    return str(gm.meta.get("fxmerge_capture", "fx"))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
