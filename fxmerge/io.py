"""Safe saving and loading of merged models: a folder of data, never pickle, never code.

A pickled GraphModule loses ``node.meta``, fails on lambda targets, and can only be read with
``torch.load(weights_only=False)``, which runs whatever code the file names. This format stores the
graph and the module tree as JSON data and the tensors with safetensors; loading rebuilds the
model from allowlists only (``torch.nn`` layer classes, fxmerge's ``ChannelMap`` and ``InputGuards``,
and the module classes the caller passes to ``load_module(modules=[...])``; tensor functions from
``torch``/``torch.nn.functional``/``operator``/``math``/torchvision's fx-wrapped functions, and
ATen operator overloads ``torch.ops.aten.<op>.<overload>``, checked against the dispatcher's table).
Nothing in the folder is evaluated, executed, imported or unpickled.

Modules captured by ``torch.export`` (``ExportedProgram.module()``, what fxmerge's export front end
merges) round-trip too: their ATen calls, their parameters and buffers under the original module
paths, lifted constants, and their pytree codegen — the loaded module takes the same args/kwargs and
returns the same structure (a HuggingFace ``SequenceClassifierOutput``...), with output types looked up
among those registered with ``torch.utils._pytree`` in the loading process (``import transformers``
first), never imported by a name from the file. ``node.meta`` (FakeTensor values, capture-time shapes,
stale once a merge rewrote widths) is not kept: every shape the loaded module uses comes from its
tensors and node arguments. ``_guards_fn``, the input check torch.export generates as Python source
and runs through ``exec``, is code and is not stored: it is replaced by an :class:`InputGuards` built
from the recorded input shapes and ``range_constraints`` — static sizes, size ranges and equal sizes,
the checks export derives from its dynamic shapes, raising the same ``AssertionError("Guard failed:
...")``. Guards that export's tracer writes as expressions (``x.size()[1] % 4 == 0``, ViT's ``//
patch != 1``) are not kept; ``save_module`` warns, naming them. Export's forward pre-hook (which checks
the input structure) is not kept either; the generated ``forward(input_ids, attention_mask)`` signature
refuses unknown keywords.

Parameters and buffers are stored wherever they sit: in layers, and in the plain ``nn.Module``
containers fx creates for ``get_attr`` targets when it traces into a module (timm's
``BatchNormAct2d`` becomes ``F.batch_norm`` on ``bn1.running_mean``...). A module class outside
torch.nn (a leaf such as ``BatchNormAct2d``, a user's RMSNorm) is stored by its name
``module.qualname`` with its constructor arguments, and rebuilt only when the loader is given the
class: ``fxmerge.load(directory, modules=[BatchNormAct2d])``.

Format ``fxmerge.graphmodule``, version 1.2 (1.1 adds ``codegen`` and ATen targets; 1.2 lists every
file and hashes the manifest itself) — a directory holding:

``manifest.json``
    ``{"format": "fxmerge.graphmodule", "format_version": "1.2", "fxmerge_version",
    "torch_version", "safetensors_version", "files": {name: {"sha256", "bytes"}}, "manifest_sha256"}``
    for every other file of the folder (``graph.json``, ``weights.safetensors``, ``report.json``
    when present, and what ``MergeResult.save`` adds for people: ``code.py``, ``groups.png``,
    ``alignment_<k>.png``); ``manifest_sha256`` is the sha256 of the manifest's canonical JSON
    (sorted keys, no spaces) without that entry. Written last. Every reader (``load_module`` =
    ``fxmerge.load``, ``load_report``, ``fxmerge inspect``) verifies the whole folder before using
    any of it, and refuses (``LoadError`` naming the file and the folder) an unknown format, a newer
    major version, an edited manifest, a listed file that is missing or whose size or sha256 differs,
    and an unlisted file unless it ends in .png, .svg, .pdf, .txt or .md (figures and notes: no reader
    opens them; an unlisted ``.json``, ``.safetensors``, ``.py``, ``.tmp``... could be taken for part
    of the model). The hashes detect damage and edits; safety does not rest on them (an editor can
    rewrite them) but on the allowlists.
``graph.json``
    ``{"class_name", "modules": [...], "tensors": {...}, "nodes": [...]}``:

    * ``modules``: every submodule path of the tree, parents first:
      ``{"path": "stage1.0.conv1", "class": "torch.nn.Conv2d", "args": {"in_channels": 16, ...}}``
      — constructor arguments read back from the module's attributes (``bias=False`` when its bias
      is None), checked at save time to rebuild the same module (for a class outside torch.nn,
      ``"class"`` is ``module.qualname`` and every attribute is checked) — or ``{"path", "alias_of"}``
      where one module object sits at two paths.
    * ``tensors``: the names of the ``parameters``, ``buffers``, ``nonpersistent_buffers`` and
      plain tensor ``attributes`` (``get_attr`` constants), ``frozen`` parameters
      (``requires_grad=False``) and ``tied`` names (``alias: canonical``, one copy stored).
    * ``nodes``: ``{"name", "op", "target", "args", "kwargs"}`` per graph node, in order, plus
      ``"tensor_meta"`` when the node had one (not for torch.export graphs). ``call_function`` targets
      are qualified names (``_operator.add``, ``torch.cat``, ``torch.nn.functional.relu``,
      ``builtins.getattr``, ``torch.ops.aten.linear.default``).
    * ``codegen`` (torch.export graphs only): ``{"orig_args": forward's argument names, "in_spec",
      "out_spec"}``, each spec ``{"type": pytree serialized type name, "context": JSON data, "children":
      [...]}`` (a leaf: type and context null, no children); inputs are tuples, lists and dicts with
      identifier keys.
    * values are tagged JSON: null/booleans/ints/finite floats/strings as themselves,
      ``{"node": name}``, ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": [[key, value],
      ...]}``, ``{"slice": [start, stop, step]}``, ``{"ellipsis": null}``, ``{"float": "nan"}``,
      ``{"dtype": "float32"}``, ``{"device": "cpu"}``, ``{"size": [...]}``, ``{"memory_format":
      "contiguous_format"}``, ``{"layout": "strided"}``; in constructor arguments only also
      ``{"function": qualified name}`` and ``{"empty": {"shape", "dtype"}}`` (a tensor argument
      whose value comes from the weights).
``weights.safetensors``
    every tensor named in ``tensors`` (tied aliases once), as contiguous CPU copies.
``report.json``
    optional: ``MergeResult.to_dict()`` (config, groups, timings, the thread count, depth alignment: per shallower
    model its units, CKA, segments and the ``inserted`` identity units with their modules).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import keyword
import math
import operator
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.fx.passes.shape_prop import TensorMetadata

from fxmerge.errors import ConfigError, FxMergeError, LoadError, SaveError
from fxmerge.passes.tails import ChannelMap

FORMAT = "fxmerge.graphmodule"
FORMAT_VERSION = "1.2"
MANIFEST, GRAPH, WEIGHTS, REPORT = "manifest.json", "graph.json", "weights.safetensors", "report.json"

__all__ = [
    "FORMAT", "FORMAT_VERSION", "HUMAN_SUFFIXES", "InputGuards", "load_module", "load_report", "result_to_dict",
    "save_module", "update_folder", "update_report",
]

# ------------------------------------------------------------------------------------ allowlists

# Attributes ``builtins.getattr`` may read in a graph (fx records ``x.shape`` as getattr(x, "shape")).
# Anything else — above all dunder names, the road from a tensor to ``__globals__`` — is refused.
SAFE_ATTRIBUTES = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "T", "mT", "H", "mH", "real",
    "imag", "is_cuda", "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes",
})

# Tensor methods that take callables, run autograd hooks or expose raw storage.
_DENIED_METHODS = frozenset({
    "apply_", "map_", "map2_", "backward", "register_hook", "register_post_accumulate_grad_hook",
    "share_memory_", "storage", "untyped_storage",
})

# ``operator`` functions without ``attrgetter``/``methodcaller``/``call``, which reach any attribute
# or call any callable.
_OPERATOR_NAMES = (
    "abs", "add", "and_", "concat", "contains", "eq", "floordiv", "ge", "getitem", "gt", "iadd",
    "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "index", "inv", "invert",
    "ior", "ipow", "irshift", "is_", "is_not", "isub", "itruediv", "ixor", "le", "lshift", "lt",
    "matmul", "mod", "mul", "ne", "neg", "not_", "or_", "pos", "pow", "rshift", "setitem", "sub",
    "truediv", "truth", "xor",
)

_DENIED_TORCH = frozenset({"from_file"})  # reads a file

_SYMBOLIC_NUMBERS = ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum")

_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _qualified_name(fn: Any) -> str | None:
    """torch.fx's qualified name of ``fn`` (``builtins.`` made explicit), or None."""
    import builtins

    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or name == "<lambda>":
        return None
    if getattr(builtins, name, None) is fn:
        return f"builtins.{name}"
    try:
        return torch.fx.node._get_qualified_name(fn)
    except Exception:  # noqa: BLE001 - anything fx cannot name is refused by the caller
        return None


def _is_function(obj: Any) -> bool:
    return isinstance(
        obj,
        (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType),
    )


def _register(table: dict[str, Callable], obj: Any, prefixes: tuple[str, ...] = ("",)) -> None:
    if not _is_function(obj):
        return
    name = _qualified_name(obj)
    if name is None or not name.startswith(prefixes):
        return
    if table.get(name, obj) is not obj:  # two objects, one name: ambiguous, allow neither
        table[name] = None  # type: ignore[assignment]
        return
    table[name] = obj


def _public(module: Any) -> Iterator[tuple[str, Any]]:
    for name in dir(module):
        if not name.startswith("_"):
            yield name, getattr(module, name, None)


@lru_cache(maxsize=None)
def _core_functions() -> dict[str, Callable]:
    """Qualified name -> function for every call_function target fxmerge saves and loads."""
    import builtins

    import torch.nn.functional as F

    table: dict[str, Callable] = {}
    variable_functions = torch._C._VariableFunctions
    for name in dir(variable_functions):
        if name.startswith("_") or name in _DENIED_TORCH:
            continue
        obj = getattr(torch, name, None)
        if obj is not None and obj is getattr(variable_functions, name):
            _register(table, obj, ("torch.",))
    for name in torch.functional.__all__:
        _register(table, getattr(torch, name, None), ("torch.",))
    _register(table, torch._assert)
    for _, obj in _public(F):  # not F's helpers (handle_torch_function, boolean_dispatch, ...)
        _register(table, obj, ("torch.nn.functional.", "torch._C._nn."))
    for _, obj in _public(torch._C._nn):
        _register(table, obj, ("torch._C._nn.",))
    for namespace in (torch.fft, torch.linalg, torch.special):
        for _, obj in _public(namespace):
            _register(table, obj, ("torch.",))
    for name, obj in _public(torch.Tensor):
        if name not in _DENIED_METHODS:
            _register(table, obj, ("torch.Tensor.",))
    for name in _OPERATOR_NAMES:
        _register(table, getattr(operator, name))
    for _, obj in _public(math):
        _register(table, obj, ("math.",))
    _register(table, builtins.getattr)
    for name in _SYMBOLIC_NUMBERS:  # torch.export graphs compute sizes with these on SymInts
        _register(table, getattr(torch, name, None), ("torch.",))
    table.update(_wrapped_functions("torch.fx."))
    return {name: fn for name, fn in table.items() if fn is not None}


def _wrapped_functions(prefix: str) -> dict[str, Callable]:
    """Functions registered with ``torch.fx.wrap`` by modules under ``prefix`` (torchvision's)."""
    registry = getattr(torch.fx._symbolic_trace, "_wrapped_fns_to_patch", {})
    items = registry.items() if isinstance(registry, dict) else ((None, g) for g in registry)
    table: dict[str, Callable] = {}
    for key, namespace in items:
        name = key[1] if isinstance(key, tuple) else None
        if not isinstance(namespace, dict) or not isinstance(name, str):
            continue
        module = namespace.get("__name__")
        if isinstance(module, str) and module.startswith(prefix):
            _register(table, namespace.get(name), (prefix,))
    return table


@lru_cache(maxsize=None)
def _torchvision_functions() -> dict[str, Callable]:
    """torchvision.ops functions and torchvision's fx-wrapped functions (imports torchvision)."""
    import torchvision  # noqa: F401 - a fixed, allowlisted import: registers its fx-wrapped functions
    import torchvision.ops

    table: dict[str, Callable] = {}
    for name in getattr(torchvision.ops, "__all__", ()):
        _register(table, getattr(torchvision.ops, name, None), ("torchvision.ops.",))
    table.update(_wrapped_functions("torchvision."))
    return {name: fn for name, fn in table.items() if fn is not None}


# torch.export graphs call ATen operator overloads (``torch.ops.aten.linear.default``). Only the
# ``aten`` namespace loads: it is what torch.export's IR is made of (``prims`` appear only after a
# core-ATen decomposition, which fxmerge never runs, so they stay out); custom and third-party
# namespaces (``torch.ops.mylib.*``) and higher-order operators (``torch.ops.higher_order.cond``, which
# call stored subgraphs) are refused. Denied ATen operators read files, print, or re-point storage.
OP_NAMESPACES = ("aten",)
_DENIED_ATEN = frozenset({"from_file", "_print", "set", "set_", "save"})


def _operator_problem(name: str) -> str | None:
    """Why ``torch.ops.<namespace>.<packet>.<overload>`` is not an allowlisted operator, or None."""
    parts = name.split(".")
    if len(parts) != 5 or not all(_is_identifier(part) for part in parts):
        return "not of the form torch.ops.aten.<operator>.<overload>"
    _, _, namespace, packet, overload = parts
    if namespace not in OP_NAMESPACES:
        return f"namespace {namespace!r} is not allowed (only {', '.join(OP_NAMESPACES)}: custom operators cannot be loaded)"
    if packet in _DENIED_ATEN:
        return f"aten.{packet} is denied (it reads files, prints or re-points storage)"
    try:  # the dispatcher's table of registered operators: a look-up, nothing is imported
        torch._C._dispatch_find_schema_or_throw(f"aten::{packet}", "" if overload == "default" else overload)
    except RuntimeError:
        return f"aten.{packet}.{overload} is not a registered ATen operator overload"
    return None


def _operator(name: str) -> Callable | None:
    """The ATen OpOverload named ``name`` (``torch.ops.aten.linear.default``), or None."""
    if _operator_problem(name) is not None:
        return None
    _, _, _, packet, overload = name.split(".")
    op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
    if not isinstance(op, torch._ops.OpOverload) or (op.namespace, op._overloadname) != ("aten", overload):
        return None
    return op


def _function(name: str) -> Callable | None:
    """The allowlisted function named ``name``, or None. Only table look-ups: no import by name."""
    if name.startswith("torch.ops."):
        return _operator(name)
    if name.startswith("operator."):
        name = "_" + name
    if name.startswith("torchvision."):
        return _torchvision_functions().get(name)
    return _core_functions().get(name)


def _function_name(fn: Any) -> str | None:
    """The name under which ``fn`` is allowlisted, or None."""
    name = _qualified_name(fn)
    if name is None:
        return None
    if name.startswith("torchvision.") and "torchvision" not in sys.modules:
        return None
    return name if _function(name) is fn else None


@lru_cache(maxsize=None)
def _module_classes() -> dict[str, type[nn.Module]]:
    """Stored class name -> class for every module class the format rebuilds."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    table: dict[str, type[nn.Module]] = {}
    for name, obj in _public(nn):
        if (
            isinstance(obj, type)
            and issubclass(obj, nn.Module)
            and obj.__module__.startswith("torch.nn.modules.")
            and not name.startswith("Lazy")
            and obj not in (nn.ParameterList, nn.ParameterDict)
        ):
            table[f"torch.nn.{name}"] = obj
    table["torch.nn.Module"] = nn.Module
    table["torch.nn.modules.linear.NonDynamicallyQuantizableLinear"] = NonDynamicallyQuantizableLinear
    table["fxmerge.passes.tails.ChannelMap"] = ChannelMap
    table["fxmerge.io.InputGuards"] = InputGuards
    return table


def _class_name(cls: type) -> str | None:
    for name, known in _module_classes().items():
        if known is cls:
            return name
    return None


def custom_class_name(cls: type) -> str:
    """The name a module class outside the allowlist is stored under: ``module.qualname``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _trusted_classes(modules: Sequence[type[nn.Module]]) -> dict[str, type[nn.Module]]:
    """Stored name -> class for the user's trusted classes (``load_module(modules=)``)."""
    if isinstance(modules, type):
        modules = [modules]
    table: dict[str, type[nn.Module]] = {}
    for cls in modules:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"load(modules=...) takes nn.Module subclasses, got {cls!r}")
        table[custom_class_name(cls)] = cls
    return table


def _trusted_class(name: Any, trusted: Mapping[str, type[nn.Module]]) -> type[nn.Module] | None:
    """The trusted class stored as ``name``; else the only trusted class of the same qualname (the
    defining module may be imported under another name, e.g. ``__main__``), else None."""
    if not isinstance(name, str):
        return None
    if name in trusted:
        return trusted[name]
    same = [cls for cls in trusted.values() if name.endswith("." + cls.__qualname__)]
    return same[0] if len(same) == 1 else None


# ------------------------------------------------------------------------------- value encoding

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Module / tensor path components: fx writes non-identifiers as getattr(self, "<part>") into the
# code it generates, so quotes, backslashes and the like are never let through.
_PATH_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def _safe_path(path: str) -> bool:
    return all(_PATH_PART.match(part) for part in path.split("."))


def _enum_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


@lru_cache(maxsize=None)
def _torch_constants(kind: type) -> dict[str, Any]:
    """Name -> value of torch's dtypes / memory formats / layouts (``vars``: no lazy imports)."""
    return {_enum_name(v): v for v in vars(torch).values() if isinstance(v, kind)}


def _torch_constant(name: Any, kind: type, where: str) -> Any:
    value = _torch_constants(kind).get(name) if isinstance(name, str) else None
    if value is None:
        raise LoadError(f"{where}: {name!r} is not a torch.{kind.__name__}")
    return value


def _is_identifier(name: Any) -> bool:
    """A Python identifier that is not a keyword: safe to appear in the code fx generates."""
    return isinstance(name, str) and bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name)


def _encode(value: Any, where: str, *, constructor: bool = False) -> Any:
    """Tagged JSON of a node argument (or, with ``constructor``, a module constructor argument)."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, torch.Size):
        return {"size": [int(v) for v in value]}
    if isinstance(value, tuple) and type(value) is tuple:
        return {"tuple": [_encode(v, where, constructor=constructor) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, where, constructor=constructor) for v in value]}
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise SaveError(f"{where}: a dict argument with non-string keys cannot be stored")
        return {"dict": [[k, _encode(v, where, constructor=constructor)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype):
        return {"dtype": _enum_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": _enum_name(value)}
    if isinstance(value, torch.layout):
        return {"layout": _enum_name(value)}
    if constructor and callable(value) and _function_name(value) is not None:
        return {"function": _function_name(value)}
    raise SaveError(
        f"{where}: a value of type {type(value).__module__}.{type(value).__qualname__} cannot be stored "
        "as data (supported: None, bool, int, float, str, tuple, list, dict, slice, Ellipsis, graph nodes, "
        "torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)"
    )


def _decode(data: Any, env: Mapping[str, Node], where: str, *, constructor: bool = False) -> Any:
    if data is None or type(data) in (bool, int, float, str):
        return data
    if not isinstance(data, dict) or len(data) != 1:
        raise LoadError(f"{where}: malformed value {str(data)[:80]!r}")
    (tag, body), = data.items()

    def items(expected: type = list) -> Any:
        if not isinstance(body, expected):
            raise LoadError(f"{where}: malformed {tag!r} value")
        return body

    if tag == "node":
        if not isinstance(body, str) or body not in env:
            raise LoadError(f"{where}: refers to node {body!r}, which is not defined before it")
        return env[body]
    if tag in ("tuple", "list"):
        decoded = [_decode(v, env, where, constructor=constructor) for v in items()]
        return tuple(decoded) if tag == "tuple" else decoded
    if tag == "dict":
        out = {}
        for pair in items():
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
                raise LoadError(f"{where}: malformed dict entry")
            out[pair[0]] = _decode(pair[1], env, where, constructor=constructor)
        return out
    if tag == "slice":
        parts = items()
        if len(parts) != 3:
            raise LoadError(f"{where}: malformed slice")
        return slice(*(_decode(v, env, where) for v in parts))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        if body not in ("nan", "inf", "-inf"):
            raise LoadError(f"{where}: malformed float {body!r}")
        return float(body)
    if tag == "size":
        values = items()
        if not all(type(v) is int for v in values):
            raise LoadError(f"{where}: malformed torch.Size")
        return torch.Size(values)
    if tag == "dtype":
        return _torch_constant(body, torch.dtype, where)
    if tag == "memory_format":
        return _torch_constant(body, torch.memory_format, where)
    if tag == "layout":
        return _torch_constant(body, torch.layout, where)
    if tag == "device":
        if not isinstance(body, str) or not re.match(r"^[a-z_]+(:[0-9]+)?$", body):
            raise LoadError(f"{where}: malformed device {body!r}")
        return torch.device(body)
    if constructor and tag == "function":
        fn = _function(body) if isinstance(body, str) else None
        if fn is None:
            raise LoadError(f"{where}: function {body!r} is not allowed")
        return fn
    if constructor and tag == "empty":
        spec = items(dict)
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(type(v) is int and v >= 0 for v in shape):
            raise LoadError(f"{where}: malformed tensor shape")
        return torch.empty(shape, dtype=_torch_constant(spec.get("dtype"), torch.dtype, where), device="meta")
    raise LoadError(f"{where}: unknown value tag {tag!r}")


def _encode_meta(value: Any) -> Any:
    """``tensor_meta`` (a TensorMetadata or a tuple/list of them) as JSON; None if it cannot be."""
    if value is None:
        return None
    if isinstance(value, TensorMetadata):
        if value.is_quantized:
            raise SaveError("quantized tensor meta")
        return {
            "shape": [int(v) for v in value.shape], "dtype": _enum_name(value.dtype),
            "requires_grad": bool(value.requires_grad), "stride": [int(v) for v in value.stride],
            "memory_format": None if value.memory_format is None else _enum_name(value.memory_format),
        }
    if isinstance(value, (tuple, list)):
        return {"items": [_encode_meta(v) for v in value], "list": isinstance(value, list)}
    raise SaveError("unsupported tensor meta")


def _decode_meta(data: Any, where: str) -> Any:
    if data is None:
        return None
    if "items" in data:
        items = [_decode_meta(v, where) for v in data["items"]]
        return items if data.get("list") else tuple(items)
    memory_format = data["memory_format"]
    return TensorMetadata(
        torch.Size(int(v) for v in data["shape"]), _torch_constant(data["dtype"], torch.dtype, where),
        bool(data["requires_grad"]), tuple(int(v) for v in data["stride"]),
        None if memory_format is None else _torch_constant(memory_format, torch.memory_format, where),
        False, {},
    )


# ------------------------------------------------------------------------------------ modules

def _owner(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    owner_path, _, name = qualified.rpartition(".")
    return (root.get_submodule(owner_path) if owner_path else root), name


_SPECIAL_ARGUMENTS: dict[tuple[type, str], Callable[[nn.Module], Any]] = {
    (nn.MultiheadAttention, "bias"): lambda m: m.in_proj_bias is not None,
    (nn.MultiheadAttention, "add_bias_kv"): lambda m: m.bias_k is not None,
}


def _constructor_args(module: nn.Module, path: str) -> dict[str, Any]:
    """Encoded constructor arguments of ``module``, read from its same-named attributes."""
    cls = type(module)
    if cls in _CONTAINERS:
        return {}
    where = f"module {path!r} ({cls.__name__})"
    args: dict[str, Any] = {}
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype") or p.name.startswith("_"):
            continue
        special = _SPECIAL_ARGUMENTS.get((cls, p.name))
        if special is not None:
            args[p.name] = special(module)
            continue
        missing = object()
        value = getattr(module, p.name, missing)
        if value is missing:
            if p.default is p.empty:
                raise SaveError(
                    f"{where}: constructor argument {p.name!r} has no same-named attribute to read it from"
                )
            continue  # the default; the rebuild check below catches a wrong guess
        if isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # bias=True/False from whether the parameter exists
        elif isinstance(value, torch.Tensor):
            if not any(value is t for t in (*module._parameters.values(), *module._buffers.values())):
                raise SaveError(f"{where}: tensor argument {p.name!r} is not a parameter or buffer of the module")
            args[p.name] = {"empty": {"shape": list(value.shape), "dtype": _enum_name(value.dtype)}}
            continue
        elif isinstance(value, nn.Module):
            raise SaveError(f"{where}: constructor argument {p.name!r} is a module; it cannot be rebuilt from data")
        args[p.name] = _encode(value, f"{where}, argument {p.name!r}", constructor=True)
    return args


def _plain(value: Any) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (tensor dicts, hooks)


def _signature(module: nn.Module, path: str, *, custom: bool = False) -> dict[str, Any]:
    """What a rebuilt module must share with the original: own tensors' shapes and child names (those
    the constructor makes; others are placed by name), and every plain attribute (sizes, flags, strides) except
    ``training``. ``custom`` (a class outside torch.nn): every other attribute too, by its encoding —
    one that has none (a plain tensor, an object) cannot be checked and is refused."""
    tensors = {k: None if v is None else tuple(v.shape) for k, v in (*module._parameters.items(), *module._buffers.items())}
    plain = {k: v for k, v in vars(module).items() if k != "training" and _plain(v)}
    if custom:
        where = f"module {path!r} ({custom_class_name(type(module))})"
        for k, v in vars(module).items():
            if k in _MODULE_INTERNALS or k in plain:
                continue
            if isinstance(v, torch.Tensor):
                raise SaveError(
                    f"{where}: attribute {k!r} is a tensor that is neither a parameter nor a buffer, so its value "
                    "cannot be stored: register it with register_buffer"
                )
            plain[k] = _encode(v, f"{where}, attribute {k!r}", constructor=True)
    return {"tensors": tensors, "children": sorted(module._modules), "attributes": plain}


def _construct(cls: type[nn.Module], args: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):  # no memory is allocated, whatever the sizes say
        return cls(**args)


def _check_rebuild(module: nn.Module, path: str, args: dict[str, Any], *, custom: bool = False) -> None:
    cls = type(module)
    decoded = {k: _decode(json.loads(json.dumps(v)), {}, path, constructor=True) for k, v in args.items()}
    where = f"module {path!r} ({cls.__name__})"
    try:
        fresh = _construct(cls, decoded)
    except Exception as error:  # noqa: BLE001
        raise SaveError(f"{where}: cannot be rebuilt from its attributes {decoded}: {error}") from error
    expected, got = _signature(module, path, custom=custom), _signature(fresh, path, custom=custom)
    if set(got["children"]) <= set(expected["children"]):  # the children are rebuilt on their own
        got["children"] = expected["children"]
    # tensors the constructor does not make (a container's get_attr parameters) are placed by name
    got["tensors"] = {**{k: v for k, v in expected["tensors"].items() if v is not None}, **got["tensors"]}
    for part in ("tensors", "children", "attributes"):
        if expected[part] != got[part]:
            raise SaveError(
                f"{where}: rebuilding it from its constructor arguments {decoded} gives different {part} "
                f"({got[part]} instead of {expected[part]}): it was modified after construction in a way "
                "the format cannot store"
            )


def _has_hooks(module: nn.Module, *, exported: bool = False) -> bool:
    """Whether ``module`` has hooks; ``exported``: other than those ``ExportedProgram.module()`` adds."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(
        not (exported and _export_hook(hook)) for name in names for hook in (getattr(module, name, None) or {}).values()
    )


def _module_records(gm: GraphModule) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    seen: dict[int, str] = {id(gm): ""}
    if _has_hooks(gm, exported=_is_exported(gm)):
        raise SaveError("the GraphModule has hooks; they would be lost: remove them before saving")
    for path, module in gm.named_modules(remove_duplicate=False):
        if path == "":
            continue
        if _is_guards_fn(module):
            module = _input_guards(gm, module)
            if module is None:
                continue  # dropped, with its call (see graph_to_dict)
        if not _safe_path(path):
            raise SaveError(f"module path {path!r}: only letters, digits, '_' and '-' are allowed in module names")
        if id(module) in seen:
            records.append({"path": path, "alias_of": seen[id(module)]})
            continue
        seen[id(module)] = path
        cls = type(module)
        name = _class_name(cls)
        if _has_hooks(module):
            raise SaveError(f"module {path!r} ({cls.__name__}) has hooks; they would be lost: remove them before saving")
        if name is not None:
            args = _constructor_args(module, path)
            _check_rebuild(module, path, args)
        else:  # a class outside torch.nn: stored by name, rebuilt only if the loader trusts it
            name = custom_class_name(cls)
            try:
                args = _constructor_args(module, path)
                _check_rebuild(module, path, args, custom=True)
            except SaveError as error:
                raise SaveError(
                    f"{error}. A module class outside torch.nn ({name}) is saved as its constructor arguments, read "
                    "back from same-named attributes, and rebuilt at load time by fxmerge.load(..., modules=[its "
                    "class]); this one cannot be. Trace the model so that it is not a leaf (its code becomes graph "
                    "nodes), or give it an attribute per constructor argument"
                ) from error
        records.append({"path": path, "class": name, "args": args})
    return records


# ------------------------------------------------------------------------------------ tensors

def _tensor_entries(gm: GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``tensors`` record of graph.json and the tensors to write (tied aliases once)."""
    parameters: list[str] = []
    buffers: list[str] = []
    nonpersistent: list[str] = []
    attributes: list[str] = []
    frozen: list[str] = []
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    stored: dict[str, torch.Tensor] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        if not _safe_path(name):
            raise SaveError(f"tensor {name!r}: only letters, digits, '_' and '-' are allowed in names")
        if tensor.is_sparse or tensor.is_quantized or tensor.is_meta or tensor.layout != torch.strided:
            raise SaveError(f"tensor {name!r}: only dense, materialised tensors can be saved")
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
            return
        first[id(tensor)] = name
        stored[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)

    for path, module in gm.named_modules(remove_duplicate=False):  # aliases: tied below
        prefix = f"{path}." if path else ""
        for name, param in module._parameters.items():
            if param is not None:
                parameters.append(prefix + name)
                if not param.requires_grad:
                    frozen.append(prefix + name)
                add(prefix + name, param)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                (nonpersistent if name in module._non_persistent_buffers_set else buffers).append(prefix + name)
                add(prefix + name, buffer)
    known = set(parameters) | set(buffers) | set(nonpersistent)
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in known or node.target in modules:
            continue
        try:
            owner, name = _owner(gm, node.target)
            value = getattr(owner, name)
        except AttributeError as error:
            raise SaveError(f"node {node.name!r}: get_attr target {node.target!r} does not exist") from error
        if not isinstance(value, torch.Tensor):
            raise SaveError(
                f"node {node.name!r}: get_attr target {node.target!r} is a {type(value).__name__}; only tensors "
                "and modules can be stored"
            )
        attributes.append(node.target)
        known.add(node.target)
        add(node.target, value)
    record = {
        "parameters": parameters, "buffers": buffers, "nonpersistent_buffers": nonpersistent,
        "attributes": attributes, "frozen": frozen, "tied": tied,
    }
    return record, stored


# ------------------------------------------------------------------------------- torch.export

def _is_exported(gm: nn.Module) -> bool:
    """Whether ``gm`` is an ``ExportedProgram.module()`` (a ``_StatefulGraphModule``)."""
    return any(
        cls.__name__ == "_StatefulGraphModule" and cls.__module__ == "torch.export._unlift" for cls in type(gm).__mro__
    )


def _export_hook(hook: Any) -> bool:
    """A hook ``ExportedProgram.module()`` installs: its input check (``_check_input_constraints_pre_hook``)
    and the enter/exit hooks for nn.Module-typed inputs (lambdas of ``_create_stateful_graph_module``)."""
    name = getattr(hook, "__qualname__", "")
    return getattr(hook, "__module__", None) == "torch.export._unlift" and (
        name == "_check_input_constraints_pre_hook" or name.startswith("_create_stateful_graph_module.<locals>.")
    )


def _is_guards_fn(module: nn.Module) -> bool:
    """torch.export's ``_guards_fn``: a ``GuardsFn`` whose ``forward`` is Python source that export
    generated from the input shape guards and ran through ``exec``. Code is not stored: it is replaced
    by an :class:`InputGuards` made from the recorded input shapes."""
    cls = type(module)
    return cls.__name__ == "GuardsFn" and cls.__module__ == "torch.export._unlift"


def _guard(condition: bool, message: str) -> None:
    torch._assert(condition, f"Guard failed: {message}")


class InputGuards(nn.Module):
    """The input checks of a module captured by torch.export, as data (what its ``_guards_fn`` checks).

    ``sizes[i]``: per dimension of input ``i`` (called ``names[i]`` in messages), a static size (int),
    a symbol (str: the same size wherever the symbol appears, within ``ranges[symbol] = [min, max]``, max
    None when unbounded) or None (not checked); ``sizes[i]`` None: input ``i`` is not checked. A failed
    check raises ``AssertionError("Guard failed: input_ids.size()[1] <= 64")``, as export's does. The
    guards export's tracer adds beyond these (divisibility, ``!= 1``...) are Python expressions and are
    not kept (``save_module`` warns, naming them).
    """

    _is_impure = True  # fx's dead-code elimination must keep the call: its effect is the check

    def __init__(self, names: list[str], sizes: list[list[int | str | None] | None], ranges: dict[str, list[int | None]]) -> None:
        super().__init__()
        if not (isinstance(names, list) and len(names) == len(sizes) and all(isinstance(n, str) for n in names)):
            raise ValueError("InputGuards: names must be one string per input")
        for entry in sizes:
            if entry is not None and not (
                isinstance(entry, list) and all(e is None or type(e) in (int, str) for e in entry)
            ):
                raise ValueError(f"InputGuards: malformed sizes {str(entry)[:80]}")
        for symbol, bounds in ranges.items():
            if not (
                isinstance(symbol, str) and isinstance(bounds, list) and len(bounds) == 2 and type(bounds[0]) is int
                and (bounds[1] is None or type(bounds[1]) is int)
            ):
                raise ValueError(f"InputGuards: malformed range {symbol!r}: {bounds!r}")
        self.names, self.sizes, self.ranges = names, sizes, ranges

    def checks(self) -> list[str]:
        """The conditions :meth:`forward` checks, written as export writes its guards."""
        out: list[str] = []
        seen: dict[str, str] = {}
        for name, sizes in zip(self.names, self.sizes):
            for dim, expected in enumerate(sizes or ()):
                where = f"{name}.size()[{dim}]"
                if type(expected) is int:
                    out.append(f"{where} == {expected}")
                elif expected in seen:
                    out.append(f"{where} == {seen[expected]}")
                elif expected is not None:
                    low, high = self.ranges.get(expected, [0, None])
                    out += ([f"{where} >= {low}"] if low > 2 else []) + ([f"{where} <= {high}"] if high is not None else [])
                    seen[expected] = where
        return out

    def forward(self, *inputs: Any) -> None:
        seen: dict[str, tuple[int, str]] = {}
        for name, sizes, value in zip(self.names, self.sizes, inputs):
            if sizes is None:
                continue
            _guard(isinstance(value, torch.Tensor) and value.dim() == len(sizes), f"{name}.dim() == {len(sizes)}")
            for dim, expected in enumerate(sizes):
                size, where = value.size(dim), f"{name}.size()[{dim}]"
                if type(expected) is int:
                    _guard(size == expected, f"{where} == {expected}")
                elif expected in seen:
                    _guard(size == seen[expected][0], f"{where} == {seen[expected][1]}")
                elif expected is not None:
                    low, high = self.ranges.get(expected, [0, None])
                    # export checks a minimum only above 2: its default, which sizes 0 and 1 may pass
                    _guard(low <= 2 or size >= low, f"{where} >= {low}")
                    _guard(high is None or size <= high, f"{where} <= {high}")
                    seen[expected] = (size, where)


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is a finite integer (int, sympy Integer), else None (``int_oo``...)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return int(value) if getattr(value, "is_Integer", False) else None


def _input_names(info: Any, count: int) -> list[str]:
    """Names of the flat inputs as export's guard messages write them: ``input_ids``, ``x``, ``x[0]``."""
    spec = info.in_spec
    if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple and spec.child(1).type is dict:
        subtrees = [*spec.child(0).children(), *spec.child(1).children()]
    else:
        subtrees = list(spec.children())
    names = [
        arg + pytree.keystr(path)
        for arg, subtree in zip(info.orig_args, subtrees)
        for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * subtree.num_leaves, subtree))[0]
    ]
    return names if len(names) == count else [f"input {i}" for i in range(count)]


def _export_guard_messages(guards_fn: nn.Module) -> set[str]:
    """The conditions export's generated guard function checks, read from its code objects' constant
    strings (``"Guard failed: ..."``): data, for the warning about guards not kept; nothing is run."""
    functions = [guards_fn.forward]
    for cell in getattr(guards_fn.forward, "__closure__", None) or ():
        try:
            functions.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return {
        const.removeprefix("Guard failed: ")
        for fn in functions for const in getattr(getattr(fn, "__code__", None), "co_consts", ())
        if isinstance(const, str) and const.startswith("Guard failed: ")
    }


def _input_guards(gm: GraphModule, guards_fn: nn.Module) -> InputGuards | None:
    """An :class:`InputGuards` with the checks of export's ``_guards_fn`` on input sizes, from the
    placeholders' recorded values and ``gm.range_constraints``; None (with a warning) without them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None or not any(isinstance(n.meta.get("val"), torch.Tensor) for n in placeholders):
        warnings.warn(
            "save_module: torch.export's input guards (_guards_fn) are dropped: the graph's placeholders have no "
            "recorded shapes to rebuild them from; the loaded module does not check its input shapes",
            stacklevel=4,
        )
        return None
    constraints = getattr(gm, "range_constraints", None) or {}
    sizes: list[list[int | str | None] | None] = []
    ranges: dict[str, list[int | None]] = {}
    for node in placeholders:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            sizes.append(None)
            continue
        entry: list[int | str | None] = []
        for size in value.shape:
            expr = size.node.expr if isinstance(size, torch.SymInt) else size
            if _integer(expr) is not None:
                entry.append(_integer(expr))
            elif getattr(expr, "is_Symbol", False):
                # export's range_constraints; a copy of the module may have lost them (deepcopy does):
                # then the range the capture's shape environment recorded
                shape_env = getattr(size.node, "shape_env", None)
                bounds = constraints.get(expr) or getattr(shape_env, "var_to_range", {}).get(expr)
                low = _integer(getattr(bounds, "lower", None))
                if low is not None:
                    ranges[str(expr)] = [low, _integer(bounds.upper)]  # an infinite upper bound: None
                entry.append(str(expr))
            else:
                entry.append(None)  # a derived size (2 * s0 ...): not checked
        sizes.append(entry)
    guards = InputGuards(_input_names(info, len(placeholders)), sizes, ranges)
    kept = {c.replace(" ", "") for c in guards.checks()}
    lost = sorted(m for m in _export_guard_messages(guards_fn) if m.replace(" ", "") not in kept)
    if lost:
        warnings.warn(
            f"save_module: torch.export's input guards {lost} are Python expressions and are not kept; the loaded "
            "module checks static sizes, ranges and equal sizes of its inputs only",
            stacklevel=4,
        )
    return guards


def _calls_guards_fn(gm: GraphModule, node: Node) -> bool:
    if node.op != "call_module" or not isinstance(node.target, str):
        return False
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return False
    if not _is_guards_fn(module):
        return False
    if node.users:
        raise SaveError(f"node {node.name!r}: the result of torch.export's guard function is used; it cannot be dropped")
    return True


_INPUT_CONTAINERS = (tuple, list, dict)


def _encode_spec(spec: Any, where: str, *, inputs: bool = False) -> Any:
    """A pytree ``TreeSpec`` as data: ``{"type": serialized type name, "context": JSON data, "children":
    [...]}``; a leaf is ``{"type": null, "context": null, "children": []}`` (as in torch's
    ``treespec_dumps``). Only node types registered with ``torch.utils._pytree`` under a serialized name
    and with a plain-data context (tuples, lists, dicts, HF ModelOutputs) can be stored; ``inputs``:
    tuples, lists and dicts with identifier keys only (fx writes the keys into the code)."""
    if spec.is_leaf():
        return {"type": None, "context": None, "children": []}
    node_def = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
    type_name = getattr(spec.type, "__qualname__", repr(spec.type))
    if (
        node_def is None or not isinstance(node_def.serialized_type_name, str)
        or node_def.to_dumpable_context is not None or node_def.from_dumpable_context is not None
    ):
        raise SaveError(
            f"{where}: the pytree node type {type_name} has no data-only serialization (register it with "
            "torch.utils._pytree.register_pytree_node(..., serialized_type_name=...) and a JSON context)"
        )
    if inputs and spec.type not in _INPUT_CONTAINERS:
        raise SaveError(f"{where}: inputs structured as {type_name} cannot be stored (tuples, lists and dicts only)")
    context = spec.context
    try:
        plain = json.loads(json.dumps(context, allow_nan=False)) == context
    except (TypeError, ValueError):
        plain = False
    if not plain:
        raise SaveError(f"{where}: the pytree context {context!r} of {type_name} is not plain JSON data")
    if inputs and spec.type is dict and not all(_is_identifier(k) for k in context):
        raise SaveError(f"{where}: keyword inputs must be named by identifiers, got {context!r}")
    children = [_encode_spec(child, where, inputs=inputs) for child in spec.children()]
    return {"type": node_def.serialized_type_name, "context": context, "children": children}


def _decode_spec(data: Any, where: str, *, inputs: bool = False) -> Any:
    """The TreeSpec :func:`_encode_spec` stored. Node types are looked up among those registered with
    ``torch.utils._pytree`` in this process — never imported by a name read from the file."""
    if not isinstance(data, dict) or set(data) != {"type", "context", "children"} or not isinstance(data["children"], list):
        raise LoadError(f"{where}: malformed pytree spec")
    name, context = data["type"], data["context"]
    if name is None and context is None and not data["children"]:
        return pytree.treespec_leaf()
    cls = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name) if isinstance(name, str) else None
    if cls is None:
        raise LoadError(
            f"{where}: pytree type {name!r} is not registered with torch.utils._pytree in this process (types are "
            "never imported from the file): import the library that registers it first (`import transformers` "
            "for HuggingFace ModelOutputs)"
        )
    if pytree.SUPPORTED_SERIALIZED_TYPES[cls].from_dumpable_context is not None:
        raise LoadError(f"{where}: pytree type {name!r} has a custom context format, which is not read")
    if inputs and cls not in _INPUT_CONTAINERS:
        raise LoadError(f"{where}: inputs structured as {name!r} are not allowed (tuples, lists and dicts only)")
    children = [_decode_spec(child, where, inputs=inputs) for child in data["children"]]
    if cls in (tuple, list) and context is not None:
        raise LoadError(f"{where}: malformed {name} context")
    if cls is dict and not (
        isinstance(context, list) and len(context) == len(children)
        and all(_is_identifier(k) if inputs else isinstance(k, (str, int)) for k in context)
    ):
        raise LoadError(f"{where}: malformed dict keys {str(context)[:80]!r}")
    return pytree.TreeSpec(cls, context, children)


def _codegen_record(gm: GraphModule) -> dict[str, Any] | None:
    """The pytree codegen of an exported module as data (None for plain CodeGen): the forward's argument
    names and the input/output specs, so that the loaded module takes the same args/kwargs and returns
    the same structure (e.g. a HuggingFace ``SequenceClassifierOutput``)."""
    codegen = gm.graph._codegen
    if type(codegen) is CodeGen:
        return None
    if type(codegen) is not _PyTreeCodeGen:
        raise SaveError(f"the graph uses {type(codegen).__name__}; only CodeGen and pytree codegen graphs can be stored")
    info = codegen.pytree_info
    names = list(info.orig_args)
    if not all(_is_identifier(n) for n in names) or "self" in names or len(set(names)) != len(names):
        raise SaveError(f"the forward's argument names {names} must be distinct identifiers")
    record = {
        "orig_args": names,
        "in_spec": None if info.in_spec is None else _encode_spec(info.in_spec, "the graph's input spec", inputs=True),
        "out_spec": None if info.out_spec is None else _encode_spec(info.out_spec, "the graph's output spec"),
    }
    if info.in_spec is not None and _decode_spec(record["in_spec"], "input spec", inputs=True) != info.in_spec:
        raise SaveError(f"the graph's input spec {info.in_spec} does not survive storing as data")
    if info.out_spec is not None and _decode_spec(record["out_spec"], "output spec") != info.out_spec:
        raise SaveError(f"the graph's output spec {info.out_spec} does not survive storing as data")
    return record


def _build_codegen(record: Any, graph: Graph) -> CodeGen:
    """The codegen stored by :func:`_codegen_record`, checked against ``graph``'s inputs and outputs."""
    if record is None:
        return CodeGen()
    where = f"{GRAPH}: codegen"
    if not isinstance(record, dict) or set(record) != {"orig_args", "in_spec", "out_spec"}:
        raise LoadError(f"{where}: malformed")
    names = record["orig_args"]
    if (  # fx writes these names into the forward's signature
        not isinstance(names, list) or not all(_is_identifier(n) for n in names)
        or "self" in names or len(set(names)) != len(names)
    ):
        raise LoadError(f"{where}: the argument names {str(names)[:80]!r} must be distinct identifiers")
    in_spec = None if record["in_spec"] is None else _decode_spec(record["in_spec"], f"{where}: in_spec", inputs=True)
    out_spec = None if record["out_spec"] is None else _decode_spec(record["out_spec"], f"{where}: out_spec")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if in_spec is not None and in_spec.num_leaves != len(placeholders):
        raise LoadError(f"{where}: the input spec has {in_spec.num_leaves} leaves for {len(placeholders)} placeholders")
    output = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    count = len(output) if isinstance(output, (tuple, list)) else 1
    if out_spec is not None and out_spec.num_leaves != count:
        raise LoadError(f"{where}: the output spec has {out_spec.num_leaves} leaves for {count} graph outputs")
    return _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))


# -------------------------------------------------------------------------------------- graph

def _check_call(op: str, target: Any, args: tuple, kwargs: Mapping, where: str, error: type[Exception]) -> None:
    """Rules shared by save and load for call_method targets and ``builtins.getattr``."""
    if op == "call_method":
        if (
            not _is_identifier(target) or target.startswith("_")
            or target in _DENIED_METHODS or not hasattr(torch.Tensor, target)
        ):
            raise error(f"{where}: call_method {target!r} is not allowed (public torch.Tensor methods only)")
    elif op == "call_function" and target is getattr:
        if kwargs or len(args) not in (2, 3) or not (isinstance(args[1], str) and args[1] in SAFE_ATTRIBUTES):
            raise error(
                f"{where}: getattr reads only the literal attributes {sorted(SAFE_ATTRIBUTES)}, "
                f"got {args[1:2]!r}"
            )


def _node_record(node: Node, *, keep_meta: bool = True) -> dict[str, Any]:
    where = f"node {node.name!r} ({node.op} {node.target!r})"
    if node.op == "call_function":
        target = _function_name(node.target)
        name = _qualified_name(node.target)
        if target is None and isinstance(name, str) and name.startswith("torch.ops."):
            raise SaveError(
                f"node {node.name!r}: operator {name}: {_operator_problem(name) or 'not loadable'}"
            )
        if target is None:
            raise SaveError(
                f"node {node.name!r}: call_function target {node.target!r} ({_qualified_name(node.target)}) is not "
                "in the allowlist (torch, torch.nn.functional, operator, math, builtins.getattr, torchvision ops "
                "and fx-wrapped functions, ATen operators torch.ops.aten.*); lambdas and user functions cannot be "
                "stored as data"
            )
    elif node.op in ("call_module", "call_method", "get_attr", "placeholder", "output"):
        target = node.target
        if not isinstance(target, str):
            raise SaveError(f"{where}: target must be a string")
    else:
        raise SaveError(f"{where}: unknown op {node.op!r}")
    _check_call(node.op, node.target, node.args, node.kwargs, where, SaveError)
    record = {
        "name": node.name, "op": node.op, "target": target,
        "args": [_encode(a, where) for a in node.args],
        "kwargs": {k: _encode(v, where) for k, v in node.kwargs.items()},
    }
    if keep_meta and "tensor_meta" in node.meta:
        try:
            record["tensor_meta"] = _encode_meta(node.meta["tensor_meta"])
        except SaveError:
            pass  # meta is optional: drop what cannot be stored
    return record


def graph_to_dict(gm: GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """graph.json's content and the tensors for weights.safetensors. Raises SaveError."""
    if not isinstance(gm, GraphModule):
        raise SaveError(f"save_module needs a torch.fx.GraphModule, got {type(gm).__name__}")
    codegen = _codegen_record(gm)
    class_name = "GraphModule" if _is_exported(gm) else type(gm).__name__
    if not _IDENTIFIER.match(class_name):
        class_name = "GraphModule"
    modules = _module_records(gm)
    tensors, stored = _tensor_entries(gm)
    # torch.export's node.meta describes the shapes seen at capture (symbolic, and stale once a merge
    # rewrote widths): not stored; every shape a loaded module uses comes from the tensors and node args
    keep_meta = not any("val" in node.meta for node in gm.graph.nodes)
    dropped = not any(r.get("class") == "fxmerge.io.InputGuards" for r in modules)
    nodes = [
        _node_record(node, keep_meta=keep_meta) for node in gm.graph.nodes if not (dropped and _calls_guards_fn(gm, node))
    ]
    data = {"class_name": class_name, "modules": modules, "tensors": tensors, "nodes": nodes}
    if codegen is not None:
        data["codegen"] = codegen
    return data, stored


# -------------------------------------------------------------------------------------- files

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8")


# Suffixes of files a reader never opens (figures, notes): tolerated in a folder when the manifest
# does not list them. Any other unlisted file — a second graph or weights file, code, a half-written
# ``.tmp`` — is refused, since a person or a tool could take it for part of the model.
HUMAN_SUFFIXES = frozenset({".png", ".svg", ".pdf", ".txt", ".md"})
_MODEL_FILES = (MANIFEST, GRAPH, WEIGHTS, REPORT)


def _plain_name(name: Any) -> bool:
    """A file name directly inside the folder: no separators, no '.', '..' or hidden tricks."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\x00" not in name


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` entry: an edit
    of any value of manifest.json is detected like an edit of the files it lists."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def _previous_files(out: Path) -> set[str]:
    """The plain file names an earlier manifest in ``out`` lists (empty when there is none or it is
    unreadable): files a new save replaces or removes."""
    try:
        files = json.loads((out / MANIFEST).read_bytes()).get("files")
    except (OSError, ValueError, RecursionError, AttributeError):
        return set()
    return {name for name in files if _plain_name(name)} if isinstance(files, dict) else set()


def _stale_files(out: Path, keep: Mapping[str, bytes]) -> list[Path]:
    """The files of an earlier save in ``out`` that the new one does not write (removed, so that no
    unlisted model file stays behind). Raises SaveError when ``out`` holds a file that fxmerge did
    not write there and a reader would refuse (see ``HUMAN_SUFFIXES``)."""
    if not out.is_dir():
        return []
    previous = _previous_files(out)
    if previous:
        previous.add("code.py")  # saves before format 1.2 wrote it unlisted
    ours = previous | set(_MODEL_FILES) | {name + ".tmp" for name in previous | set(_MODEL_FILES) | set(keep)}
    stale, foreign = [], []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in keep or name == MANIFEST:
            continue
        if name in ours and entry.is_file():
            stale.append(entry)
        elif not (entry.is_file() and entry.suffix.lower() in HUMAN_SUFFIXES):
            foreign.append(name)
    if foreign:
        raise SaveError(
            f"{out} holds {', '.join(foreign)}, which fxmerge did not write there: fxmerge.load would refuse "
            f"the folder (it reads only the files its {MANIFEST} lists); remove them or save to an empty folder"
        )
    return stale


def save_module(
    gm: GraphModule, directory: str | os.PathLike, *, report: Mapping[str, Any] | None = None,
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``gm`` to ``directory`` (created if needed) as graph.json + weights.safetensors
    (+ report.json when ``report`` is given, + the ``extra`` files, name -> bytes, such as code.py
    and figures, which no reader opens) and, last, manifest.json listing the sha256 of every file
    written. Files of an earlier save in ``directory`` that this one does not write are removed.
    Returns the directory.

    Raises SaveError, before writing anything, when the module cannot be stored as data: a module
    class outside the allowlist, a call_function target that is not an allowlisted function
    (lambdas, user functions, custom operators), an argument value without an encoding, or hooks
    (other than those ``ExportedProgram.module()`` installs); and when ``directory`` holds a file
    fxmerge did not write there that a reader would refuse. Warns when torch.export input guards
    are not kept (see the module docstring).
    """
    graph, tensors = graph_to_dict(gm)
    report_bytes = _json_bytes(_jsonable(report)) if report is not None else None
    graph_bytes = _json_bytes(graph)
    try:
        weights_bytes = safetensors.torch.save(tensors, metadata={"format": "pt", "fxmerge_format": FORMAT})
    except Exception as error:  # noqa: BLE001
        raise SaveError(f"safetensors cannot store the weights: {error}") from error
    files = {GRAPH: graph_bytes, WEIGHTS: weights_bytes}
    if report_bytes is not None:
        files[REPORT] = report_bytes
    files |= _extra_files(extra)
    out = Path(directory)
    return _write_folder(out, files, _stale_files(out, files))


def _write_folder(out: Path, files: Mapping[str, bytes], stale: Sequence[Path], *, kept: Mapping[str, bytes] | None = None) -> Path:
    """Write ``files`` into ``out`` and remove ``stale``, then write the manifest over them and the
    ``kept`` files already there (last: a folder left half-written by a crash fails its hashes)."""
    from fxmerge import __version__

    out.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.unlink()
    for name, data in files.items():
        _write(out / name, data)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fxmerge_version": __version__,
        "torch_version": torch.__version__, "safetensors_version": safetensors.__version__,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in ({**(kept or {}), **files}).items()},
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    _write(out / MANIFEST, _json_bytes(manifest))
    return out


def update_folder(directory: str | os.PathLike, *, report: Mapping[str, Any] | None = None, extra: Mapping[str, bytes] | None = None) -> Path:
    """Replace report.json and/or add or replace ``extra`` files (name -> bytes, never read) in a
    folder written by :func:`save_module`, after verifying every file it holds; the manifest is
    rewritten last, over every file. For steps that add to a saved merge (an evaluation's results,
    a figure) without saving the model again. Raises LoadError when the folder fails verification,
    SaveError for a bad extra file name."""
    return _rewrite_folder(Path(directory), lambda kept: report, extra)


def _rewrite_folder(
    directory: Path, new_report: Callable[[dict[str, bytes]], Mapping[str, Any] | None], extra: Mapping[str, bytes] | None
) -> Path:
    """``update_folder``'s work: the folder verified once, ``new_report(verified file bytes)``
    (None: report.json unchanged) and ``extra`` written, the manifest last."""
    manifest, kept = _verified_folder(directory)
    if _minor(manifest) < 2 and (directory / "code.py").is_file():  # 1.1 left it unlisted: list it now
        kept["code.py"] = (directory / "code.py").read_bytes()
    changed = _extra_files(extra)
    report = new_report(kept)
    if report is not None:
        changed[REPORT] = _json_bytes(_jsonable(report))
    return _write_folder(directory, changed, (), kept=kept)


def _extra_files(extra: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """``extra`` checked: bytes under plain file names that are not the model files'."""
    out = {}
    for name, data in (extra or {}).items():
        if not _plain_name(name) or name in _MODEL_FILES or name.endswith(".tmp"):
            raise SaveError(f"extra file {name!r}: give a plain file name other than {', '.join(_MODEL_FILES)}")
        if not isinstance(data, bytes):
            raise SaveError(f"extra file {name!r}: expected bytes, got {type(data).__name__}")
        out[name] = data
    return out


def _modified(directory: Path, what: str) -> LoadError:
    return LoadError(f"{directory}: {what}: the folder was modified after saving (save the model again)")


def _read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise LoadError(f"{directory}: not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise LoadError(f"{directory}: {MANIFEST} is missing: not a folder written by fxmerge.io.save_module")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise LoadError(f"{path}: not valid JSON ({error}): the folder {directory} was modified after saving") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise LoadError(f"{path}: unknown format {found!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    match = re.match(r"^(\d+)\.(\d+)$", version) if isinstance(version, str) else None
    if match is None:
        raise LoadError(f"{path}: malformed format_version {version!r}")
    if int(match.group(1)) != int(FORMAT_VERSION.split(".")[0]):
        raise LoadError(
            f"{path}: format version {version} is not readable by this fxmerge (reads {FORMAT_VERSION.split('.')[0]}.x); "
            f"it was written by fxmerge {manifest.get('fxmerge_version')!r}"
        )
    if int(match.group(2)) >= 2 and manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise LoadError(
            f"tampered or corrupted: {path} (its manifest_sha256 does not match its contents): "
            f"the folder {directory} was modified after saving"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        _plain_name(name) and name != MANIFEST and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        and type(entry.get("bytes", 0)) is int
        for name, entry in files.items()
    ):
        raise LoadError(f"{path}: malformed 'files' entry")
    return manifest


def _minor(manifest: Mapping[str, Any]) -> int:
    """The minor format version of a manifest ``_read_manifest`` accepted (1.1 manifests carry no
    hash of their own and left code.py unlisted)."""
    return int(manifest["format_version"].split(".")[1])


def _verified_folder(directory: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the bytes of every file it lists, each checked for presence, size and
    sha256, and the folder checked for unlisted files a reader could take for part of the model.
    Every reader calls this before using any file, so no reader trusts a file another would refuse.
    Raises LoadError naming the file and the folder."""
    manifest = _read_manifest(directory)
    listed = manifest["files"]
    tolerated = {"code.py"} if _minor(manifest) < 2 else set()  # written unlisted before format 1.2
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name in listed or name == MANIFEST or name in tolerated:
            continue
        if entry.is_file() and entry.suffix.lower() in HUMAN_SUFFIXES:
            continue  # a figure or a note: no reader opens it
        raise _modified(directory, f"{name} is not listed in {MANIFEST} (fxmerge reads only the files the manifest lists; remove {name})")
    contents = {}
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            raise _modified(directory, f"{name} is missing (the manifest lists it)")
        data = path.read_bytes()
        digest = _sha256(data)
        if digest != entry["sha256"] or len(data) != entry.get("bytes", len(data)):
            raise LoadError(
                f"tampered or corrupted: {path} (sha256 {digest[:16]}... does not match the manifest's "
                f"{entry['sha256'][:16]}...): the folder {directory} was modified after saving"
            )
        contents[name] = data
    return manifest, contents


def _listed(directory: Path, contents: Mapping[str, bytes], name: str) -> bytes:
    """The verified bytes of ``name``, one of the model files every folder has."""
    if name not in contents:
        raise LoadError(f"{directory}: {MANIFEST} does not list {name}")
    return contents[name]


def _parse_json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise LoadError(f"{name}: not valid JSON: {error}") from error


def load_report(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The report.json saved next to a model, or None if none was. The whole folder is verified
    first, as by :func:`load_module`: a report is never read from a folder the loader would refuse."""
    directory = Path(directory)
    _, contents = _verified_folder(directory)
    if REPORT not in contents:
        return None
    return _parse_json(contents[REPORT], REPORT)


def update_report(directory: str | os.PathLike, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Set the top-level keys ``changes`` in the folder's report.json (created when there is
    none) through :func:`update_folder`: the folder is verified first, so a tampered report is
    refused rather than re-signed; it is read and hashed once. Returns the new report."""
    report: dict[str, Any] = {}

    def updated(kept: dict[str, bytes]) -> dict[str, Any]:
        report.update(_parse_json(kept[REPORT], REPORT) if REPORT in kept else {})
        report.update(_jsonable(dict(changes)))
        return report

    _rewrite_folder(Path(directory), updated, None)
    return report


# -------------------------------------------------------------------------------------- loading

def _string_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LoadError(f"{GRAPH}: malformed tensors.{key}")
    return value


def _check_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not _safe_path(path):
        raise LoadError(f"{GRAPH}: malformed {what} {path!r}")
    return path


def _build_modules(gm: GraphModule, records: Any, trusted: Mapping[str, type[nn.Module]]) -> None:
    if not isinstance(records, list):
        raise LoadError(f"{GRAPH}: malformed 'modules'")
    classes = _module_classes()
    for record in records:
        if not isinstance(record, dict):
            raise LoadError(f"{GRAPH}: malformed module record")
        path = _check_path(record.get("path"), "module path")
        parent_path, _, name = path.rpartition(".")
        try:
            parent = gm.get_submodule(parent_path) if parent_path else gm
        except AttributeError as error:
            raise LoadError(f"{GRAPH}: module {path!r} is listed before its parent") from error
        if "alias_of" in record:
            target = _check_path(record["alias_of"], "alias")
            try:
                module = gm.get_submodule(target)
            except AttributeError as error:
                raise LoadError(f"{GRAPH}: module {path!r} aliases unknown module {target!r}") from error
        else:
            cls = classes.get(record.get("class")) or _trusted_class(record.get("class"), trusted)  # type: ignore[arg-type]
            if cls is None:
                stored = record.get("class")
                short = stored.rpartition(".")[2] if isinstance(stored, str) else "TheClass"
                raise LoadError(
                    f"{GRAPH}: module {path!r} has class {stored!r}, which is not allowed (torch.nn layer classes, "
                    "containers, fxmerge's ChannelMap and InputGuards only, and the classes passed as modules=). "
                    f"If you trust that class, import it and pass it: fxmerge.load(directory, modules=[{short}]) — its "
                    "constructor then runs with the saved arguments"
                )
            raw = record.get("args", {})
            if not isinstance(raw, dict):
                raise LoadError(f"{GRAPH}: module {path!r}: malformed args")
            where = f"{GRAPH}: module {path!r}"
            args = {k: _decode(v, {}, where, constructor=True) for k, v in raw.items()}
            try:
                module = _construct(cls, args)
            except Exception as error:  # noqa: BLE001
                raise LoadError(f"{where}: {cls.__name__}({args}) fails: {error}") from error
        if hasattr(parent, name) and name not in parent._modules:
            raise LoadError(f"{GRAPH}: module path {path!r} collides with an attribute")
        parent.add_module(name, module)


def _place_tensors(gm: GraphModule, record: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Create slots that no constructor made, set non-state tensors; return the state dict to load."""
    parameters = _string_list(record, "parameters")
    buffers = _string_list(record, "buffers")
    nonpersistent = _string_list(record, "nonpersistent_buffers")
    attributes = _string_list(record, "attributes")
    tied = record.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise LoadError(f"{GRAPH}: malformed tensors.tied")

    def tensor(name: str) -> torch.Tensor:
        canonical = tied.get(name, name)
        if canonical not in tensors:
            raise LoadError(f"{WEIGHTS} has no tensor {canonical!r} (needed for {name!r})")
        return tensors[canonical]

    def owner(name: str) -> tuple[nn.Module, str]:
        _check_path(name, "tensor name")
        try:
            return _owner(gm, name)
        except AttributeError as error:
            raise LoadError(f"{GRAPH}: tensor {name!r} belongs to no module") from error

    state: dict[str, torch.Tensor] = {}
    for name in parameters:
        module, attr = owner(name)
        if module._parameters.get(attr) is None:
            if hasattr(module, attr) and attr not in module._parameters:
                raise LoadError(f"{GRAPH}: parameter {name!r} collides with an attribute")
            module.register_parameter(attr, nn.Parameter(tensor(name)))
        state[name] = tensor(name)
    for name in buffers + nonpersistent:
        module, attr = owner(name)
        persistent = name in buffers
        if attr not in module._buffers or module._buffers[attr] is None or not persistent:
            if hasattr(module, attr) and attr not in module._buffers:
                raise LoadError(f"{GRAPH}: buffer {name!r} collides with an attribute")
            module.register_buffer(attr, tensor(name), persistent=persistent)
        if persistent:
            state[name] = tensor(name)
    for name in attributes:
        module, attr = owner(name)
        if hasattr(module, attr):
            raise LoadError(f"{GRAPH}: tensor attribute {name!r} collides with an existing attribute")
        setattr(module, attr, tensor(name))
    unused = set(tensors) - set(state) - set(nonpersistent) - set(attributes)
    if unused:
        raise LoadError(f"{WEIGHTS} has tensors the graph does not name: {sorted(unused)[:5]}")
    return state


def _build_graph(gm: GraphModule, nodes: Any, tensor_names: set[str]) -> Graph:
    if not isinstance(nodes, list):
        raise LoadError(f"{GRAPH}: malformed 'nodes'")
    modules = {name for name, _ in gm.named_modules(remove_duplicate=False)} - {""}
    graph = Graph()
    env: dict[str, Node] = {}
    for index, record in enumerate(nodes):
        if not isinstance(record, dict):
            raise LoadError(f"{GRAPH}: node {index} is malformed")
        name, op, target = record.get("name"), record.get("op"), record.get("target")
        if not _is_identifier(name) or name in env:
            raise LoadError(f"{GRAPH}: node {index} has a bad or repeated name {name!r}")
        where = f"{GRAPH}: node {name!r}"
        if op == "call_function":
            fn = _function(target) if isinstance(target, str) else None
            if fn is None and isinstance(target, str) and target.startswith("torch.ops."):
                raise LoadError(
                    f"{where}: call_function target {target!r} is not allowed: "
                    f"{_operator_problem(target) or 'not an ATen operator overload'}"
                )
            if fn is None:
                raise LoadError(
                    f"{where}: call_function target {target!r} is not allowed (only torch, torch.nn.functional, "
                    "operator, math, builtins.getattr, torchvision's ops and fx-wrapped functions and ATen "
                    "operators torch.ops.aten.*)"
                )
            target = fn
        elif op == "call_module":
            if target not in modules:
                raise LoadError(f"{where}: call_module target {target!r} is not a module of the tree")
        elif op == "get_attr":
            if target not in tensor_names and target not in modules:
                raise LoadError(f"{where}: get_attr target {target!r} is not a saved tensor or module")
        elif op == "placeholder":
            if not isinstance(target, str) or not _is_identifier(target.removeprefix("**").removeprefix("*")):
                raise LoadError(f"{where}: malformed placeholder target {target!r}")
        elif op == "output":
            if target != "output" or index != len(nodes) - 1:
                raise LoadError(f"{where}: the output node must be last")
        elif op != "call_method":
            raise LoadError(f"{where}: unknown op {op!r}")
        raw_args, raw_kwargs = record.get("args", []), record.get("kwargs", {})
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
            raise LoadError(f"{where}: malformed args/kwargs")
        args = tuple(_decode(a, env, where) for a in raw_args)
        if not all(_is_identifier(k) for k in raw_kwargs):
            raise LoadError(f"{where}: keyword argument names must be identifiers")
        kwargs = {k: _decode(v, env, where) for k, v in raw_kwargs.items()}
        _check_call(op, target, args, kwargs, where, LoadError)
        node = graph.create_node(op, target, args, kwargs, name=name)
        if record.get("tensor_meta") is not None:
            try:
                node.meta["tensor_meta"] = _decode_meta(record["tensor_meta"], where)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise LoadError(f"{where}: malformed tensor_meta") from error
        env[name] = node
    if not nodes or nodes[-1].get("op") != "output":
        raise LoadError(f"{GRAPH}: the graph has no output node")
    return graph


def load_module(directory: str | os.PathLike, *, modules: Sequence[type[nn.Module]] = ()) -> GraphModule:
    """Load a GraphModule written by :func:`save_module`, in eval mode.

    The whole folder is verified first (format, version, presence and sha256 of every file the
    manifest lists, no unlisted model-like file: see the module docstring); the module tree is
    rebuilt from allowlisted classes only (on the meta device, then the weights are assigned with
    ``load_state_dict(strict=True, assign=True)``), and every call_function target must be an
    allowlisted function: nothing from the folder is evaluated, executed, imported or unpickled.

    A module saved from ``torch.export`` comes back as a plain GraphModule with the same pytree
    signature and outputs; its ``_guards_fn`` is an :class:`InputGuards` (sizes, ranges, equal sizes;
    tracer guards written as expressions are not kept). Import the library whose output types it
    returns (``import transformers``) before loading.

    ``modules``: module classes outside torch.nn that the caller trusts (e.g. timm's
    ``BatchNormAct2d`` kept as a leaf, a user's RMSNorm): a saved module of one of these classes
    (stored as ``module.qualname``; a unique qualname match is accepted too) is rebuilt by calling
    the class with its saved, data-only constructor arguments. Classes are never looked up or
    imported by name. Raises LoadError naming the file, module or node at fault (and, for a class
    not passed here, the fix).
    """
    trusted = _trusted_classes(modules)
    directory = Path(directory)
    _, contents = _verified_folder(directory)
    graph_bytes, weights_bytes = _listed(directory, contents, GRAPH), _listed(directory, contents, WEIGHTS)
    data = _parse_json(graph_bytes, GRAPH)
    if not isinstance(data, dict):
        raise LoadError(f"{GRAPH}: malformed")
    try:
        tensors = safetensors.torch.load(weights_bytes)  # the verified bytes, not a second read
    except Exception as error:  # noqa: BLE001 - SafetensorError and friends
        raise LoadError(f"{directory / WEIGHTS}: unreadable: {error}") from error
    try:
        return _build(data, tensors, trusted)
    except FxMergeError:
        raise
    except Exception as error:  # noqa: BLE001 - a malformed file must not escape as a random error
        raise LoadError(f"{directory / GRAPH}: malformed: {type(error).__name__}: {error}") from error


def _build(data: Mapping[str, Any], tensors: dict[str, torch.Tensor], trusted: Mapping[str, type[nn.Module]]) -> GraphModule:
    class_name = data.get("class_name", "GraphModule")
    if not _is_identifier(class_name):
        raise LoadError(f"{GRAPH}: malformed class_name {class_name!r}")
    gm = GraphModule(nn.Module(), Graph(), class_name)
    _build_modules(gm, data.get("modules", []), trusted)
    record = data.get("tensors", {})
    if not isinstance(record, dict):
        raise LoadError(f"{GRAPH}: malformed 'tensors'")
    state = _place_tensors(gm, record, tensors)
    try:
        gm.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise LoadError(f"{WEIGHTS} does not fit the module tree of {GRAPH}: {error}") from error
    for alias, canonical in record.get("tied", {}).items():
        module, attr = _owner(gm, alias)
        source, source_attr = _owner(gm, canonical)
        if attr in module._parameters and source_attr in source._parameters:
            module._parameters[attr] = source._parameters[source_attr]
        elif attr in module._buffers and source_attr in source._buffers:
            module._buffers[attr] = source._buffers[source_attr]
    frozen = set(_string_list(record, "frozen"))
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        parameter.requires_grad_(name not in frozen)
    left = [
        f"{path}.{key}".lstrip(".")
        for path, module in gm.named_modules()
        for key, value in vars(module).items() if isinstance(value, torch.Tensor) and value.is_meta
    ] + [name for name, t in (*gm.named_parameters(), *gm.named_buffers()) if t.is_meta]
    if left:
        raise LoadError(f"{WEIGHTS} lacks values for {left[:5]}")
    tensor_names = set().union(*(set(_string_list(record, k)) for k in ("parameters", "buffers", "nonpersistent_buffers", "attributes")))
    graph = _build_graph(gm, data.get("nodes"), tensor_names | set(record.get("tied", {})))
    graph._codegen = _build_codegen(data.get("codegen"), graph)
    gm.graph = graph  # sets the owning module and recompiles
    try:
        graph.lint()
    except Exception as error:  # noqa: BLE001
        raise LoadError(f"{GRAPH}: the graph is inconsistent: {error}") from error
    gm.recompile()
    return gm.eval()


# ------------------------------------------------------------------------------------- reports

def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy scalars/arrays as Python values, non-finite floats as None."""
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return _jsonable(value.tolist())
    if isinstance(value, (int,)):
        return int(value)
    return str(value)


def inserted_units(alignment: Any) -> list[dict[str, Any]]:
    """The identity units the depth pass inserted into one shallower model, in deep-graph order:
    ``{"unit": deep unit name, "index": its deep unit index, "after": the unit before it (the
    model's input: None), "modules": the modules / tensors it uses}`` (segments' non-first units)."""
    deep, modules = list(alignment.deep_units), list(getattr(alignment, "deep_modules", ()) or ())
    return [
        {"unit": deep[j], "index": int(j), "after": deep[j - 1] if j > 0 else None,
         "modules": list(modules[j]) if j < len(modules) else []}
        for segment in alignment.segments for j in segment[1:]
    ]


def result_to_dict(result: Any) -> dict[str, Any]:
    """The JSON report of a ``MergeResult``: config, groups, timings, the thread count it ran with
    (``MergeResult.threads``) and depth alignment (with the identity units inserted per shallower
    model)."""
    from fxmerge import __version__

    alignment = None
    if result.alignment is not None:
        alignment = []
        for item in result.alignment:
            segmentation = item.segmentation
            alignment.append({
                "model": item.model,
                "deep_units": list(item.deep_units),
                "shallow_units": list(item.shallow_units),
                "cka": _jsonable(item.cka),
                "segments": [list(s) for s in item.segments],
                "first_units": list(getattr(segmentation, "first_units", ())),
                "objective": getattr(segmentation, "objective", None),
                "objective_value": _jsonable(float(item.objective_value)),
                "inserted": inserted_units(item),
            })
    return _jsonable({
        "fxmerge_version": __version__,
        "config": result.config.as_dict(),
        "groups": [asdict(group) for group in result.groups],
        "timings": dict(result.timings),
        "threads": result.threads,
        "alignment": alignment,
    })
