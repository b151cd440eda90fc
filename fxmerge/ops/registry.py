"""The op registry: the one place that knows what each layer and op is.

An ``OpEntry`` declares, once per op, everything the passes need to know about it:

* ``rule`` — how it couples the layouts of its inputs, outputs and parameters (the dependency
  analysis calls it; see ``Rule``);
* ``layer`` — whether it is a "layer" for units along the spine (conv, linear, attention);
* ``consumes`` — whether a statistics tap placed at its input is "consumed" (the features the
  next layer reads, where ZipIt! observes them);
* ``resize`` — how a module's size attributes follow a width change of its parameters;
* ``resized_shape`` / ``identity`` / ``zero_params`` — how it becomes an identity map (or a
  zero residual branch) when the depth pass inserts it into a shallower model;
* ``running_stats`` — the running-statistics buffers it holds (batch norm as a module,
  ``F.batch_norm`` or ATen): the repair pass finds every one of them through ``running_stats``.

Targets are module classes (looked up along the MRO, so subclasses such as timm's
``BatchNormAct2d`` match their base), functions (ATen ``OpOverload``s match the entry of their
``OpOverloadPacket``), Tensor method names (strings), or dotted names of functions in optional
packages (``"torchvision.ops.stochastic_depth.stochastic_depth"``), resolved to the function object
once that package is imported. User entries (``register``) take precedence over built-ins.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Node

# rule(ctx, node, args, kwargs) -> value: what an op does to layouts.
#
# ``args``/``kwargs`` are the node's arguments with every tensor replaced by its layouts: a value
# ``v`` with ``v.shape`` and ``v.dims`` (one ``fxmerge.groups.Layout`` per dim). The rule returns
# the layouts of the node's value (a tuple of them for a tuple output, None for a non-tensor).
# ``ctx`` is the analysis (``fxmerge.passes.dependency._Analyzer``); what rules call on it:
# * values: ``ctx.meta_shape(node)`` (the recorded output shape), ``ctx.tensor(shape, dims)``,
#   ``ctx.opaque(shape)`` (no channels), ``ctx.is_tensor(v)``, ``ctx.value(node_arg)``;
# * parameters: ``ctx.param(qualified_name)`` / ``ctx.module_param(module_path, attr)`` (their
#   layouts, fresh spaces on first use), ``ctx.attr_name(node_arg)`` (the name behind a get_attr),
#   ``ctx.module_of(node)``, ``ctx.set_role(name, axis, "in")`` (an axis that reads channels),
#   ``ctx.make_opaque(v, axis, why)`` (an axis that is never a channel axis);
# * coupling: ``ctx.unify(layout_a, layout_b, node)``, ``ctx.layer_axis(layout)`` (a layer's
#   channel axis, for coverage), ``ctx.fix_tensor(v, why)``, ``ctx.fail_closed(node, why)``,
#   ``ctx.carries_channels(value)`` (whether a tensor in it has a free channel space);
# * generic rules: ``preserve``, ``broadcast``, ``getitem``, ``cat``, ``stack``, ``reshape``,
#   ``permute_dims``, ``split``, ``reduce``, ``max_min``, ``spatial``, ``pad``, ``roll``,
#   ``expand``, ``matmul``, ``head_spaces`` / ``tie_heads`` (attention heads).
Rule = Callable[[Any, Node, tuple, dict], Any]


@dataclass(frozen=True)
class BatchNormSchema:
    """How a functional batch norm takes its arguments, for the repair pass that recomputes its
    running statistics: argument names in positional order; ``returns_tuple`` for the ATen forms
    that return ``(out, save_mean, save_invstd)``; ``has_training_flag`` False for the forms that
    are always in inference mode."""

    arguments: tuple[str, ...]
    returns_tuple: bool = False
    has_training_flag: bool = True

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        bound.update(zip(self.arguments, args))
        bound.update(kwargs)
        if not self.has_training_flag:
            bound["training"] = False
        return bound

    @staticmethod
    def normalise(
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the op computes in train mode: ``x`` (N, C, ...) normalised with its own batch
        statistics per channel, then the affine map; with those statistics, (mean, unbiased
        variance) (C,), as the batch-norm kernel computes them for a module's running
        statistics (momentum 1), so that both forms are reset to the same bits."""
        like = weight if weight is not None else x
        mean = torch.zeros(x.shape[1], dtype=like.dtype, device=x.device)
        var = torch.ones(x.shape[1], dtype=like.dtype, device=x.device)
        out = torch.nn.functional.batch_norm(x, mean, var, weight, bias, training=True, momentum=1.0, eps=eps)
        return out, mean, var


@dataclass(frozen=True, repr=False)
class OpEntry:
    """What fxmerge knows about one op kind (see the module docstring for every field).

    ``running_stats`` names (mean, var): module attribute names for a module, (position, keyword)
    arguments for a function; ``batch_norm``: a functional batch norm's argument schema. ``identity(module, name, shape, like)`` returns the value of parameter
    ``name`` that makes the layer an identity (None: zeros); ``resized_shape(module, shape,
    resize)`` the shape of a parameter of an inserted unit at the shallow model's widths (None:
    unchanged); ``zero_params`` the parameter name prefixes to zero so that the layer outputs zero
    (None: every floating parameter except running statistics); ``affine`` a normalisation's
    (position, keyword) arguments of its elementwise weight and bias (weight 1 and bias 0 give the
    normalised input), for the depth pass's identity post-norm units. ``rescale`` a module's
    (scaled..., shift) attribute names for the REPAIR pass: multiplying their entries of output
    channel c by a scales the layer's output channel c by a, and adding b to the last one's entry c
    adds b to it (a linear layer's or a norm's ``("weight", "bias")``). ``views``: the op's value
    may share storage with its first input (a view: reshape, permute, getitem, split).
    """

    name: str
    targets: tuple[Any, ...] = ()
    rule: Rule | None = None
    family: str = "user"
    layer: bool = False
    consumes: bool = False
    running_stats: tuple[Any, Any] | None = None
    batch_norm: BatchNormSchema | None = None
    resize: Callable[[nn.Module], None] | None = None
    identity: Callable[..., torch.Tensor | None] | None = None
    resized_shape: Callable[..., torch.Size] | None = None
    zero_params: tuple[str, ...] | None = None
    affine: tuple[tuple[int, str], ...] | None = None
    rescale: tuple[str, ...] | None = None
    user: bool = False
    views: bool = False

    def __repr__(self) -> str:
        flags = "".join(
            f", {flag}" for flag in ("layer", "consumes", "user") if getattr(self, flag)
        )
        return f"OpEntry({self.name!r}, family={self.family!r}, {len(self.targets)} targets{flags})"

    def zeroes(self, local: str) -> bool:
        """Whether parameter ``local`` is zeroed to make this layer's output zero."""
        if self.zero_params is not None:
            return any(local.startswith(prefix) for prefix in self.zero_params)
        return local not in _running_names(self)


def _running_names(entry: OpEntry | None) -> tuple[Any, ...]:
    # batch norm's buffer names also for modules without an entry (a conservative default)
    return entry.running_stats if entry is not None and entry.running_stats else ("running_mean", "running_var")


def arg(args: tuple | list, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """An argument by keyword ``name`` or by ``position``, else ``default``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return default


def bind(node: Node) -> dict[str, Any]:
    """Arguments of a call_function node by parameter name (its Python-level signature)."""
    signature = inspect.signature(node.target)  # type: ignore[arg-type]
    bound = signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def first_input(args: tuple, kwargs: dict) -> Any:
    """The first argument (a module's input), positional or keyword."""
    return args[0] if args else next(iter(kwargs.values()), None)


class _Table:
    """Entries indexed by module class, function object and method name."""

    def __init__(self) -> None:
        self.entries: list[OpEntry] = []
        self.modules: dict[type, OpEntry] = {}
        self.functions: dict[Any, OpEntry] = {}
        self.methods: dict[str, OpEntry] = {}
        self.lazy: dict[str, OpEntry] = {}  # dotted name -> entry, until its module is imported

    def add(self, entry: OpEntry) -> None:
        self.entries.append(entry)
        for target in entry.targets:
            if isinstance(target, type):
                self.modules[target] = entry
            elif isinstance(target, str) and "." in target:
                self.lazy[target] = entry
            elif isinstance(target, str):
                self.methods[target] = entry
            else:
                self.functions[target] = entry

    def remove(self, entry: OpEntry) -> None:
        self.entries = [e for e in self.entries if e is not entry]
        for index in (self.modules, self.functions, self.methods, self.lazy):
            for key in [k for k, v in index.items() if v is entry]:
                del index[key]

    def resolve_lazy(self) -> None:
        for dotted in list(self.lazy):
            module_name, _, attr = dotted.rpartition(".")
            module = sys.modules.get(module_name)
            function = getattr(module, attr, None) if module is not None else None
            if function is not None:
                self.functions.setdefault(function, self.lazy.pop(dotted))

    def function(self, target: Any) -> OpEntry | None:
        try:
            entry = self.functions.get(target)
            if entry is None and isinstance(target, torch._ops.OpOverload):
                entry = self.functions.get(target.overloadpacket)
        except TypeError:  # an unhashable target
            return None
        return entry


_USER = _Table()
_BUILTIN = _Table()


def _builtins() -> _Table:
    """The built-in table (filled when ``fxmerge.ops`` imports its family modules)."""
    return _BUILTIN


def builtin(*targets: Any, **fields: Any) -> OpEntry:
    """Register a built-in entry (used by the family modules); a target is known once only."""
    entry = OpEntry(targets=tuple(targets), **fields)
    for target in entry.targets:
        known = (
            _BUILTIN.modules if isinstance(target, type)
            else _BUILTIN.lazy if isinstance(target, str) and "." in target
            else _BUILTIN.methods if isinstance(target, str)
            else _BUILTIN.functions
        )
        if target in known:
            raise ValueError(f"{target!r} is registered twice ({known[target]!r} and {entry!r})")
    _BUILTIN.add(entry)
    return entry


# ------------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------------


def module_entry(module: nn.Module | type | None) -> OpEntry | None:
    """The entry of a module (or module class), walking its MRO: user entries first per class."""
    if module is None:
        return None
    cls = module if isinstance(module, type) else type(module)
    builtin_table = _builtins()
    for base in cls.__mro__:
        for table in (_USER, builtin_table):
            entry = table.modules.get(base)
            if entry is not None:
                return entry
    return None


def function_entry(target: Any) -> OpEntry | None:
    """The entry of a function, an ATen OpOverload (via its packet) or an OpOverloadPacket."""
    builtin_table = _builtins()
    for table in (_USER, builtin_table):
        table.resolve_lazy()
        entry = table.function(target)
        if entry is not None:
            return entry
    return None


def method_entry(name: str) -> OpEntry | None:
    """The entry of a Tensor method by name (``"view"``)."""
    builtin_table = _builtins()
    return _USER.methods.get(name) or builtin_table.methods.get(name)


def lookup(target: Any) -> OpEntry | None:
    """The entry of any target: a module or module class, a function or a method name."""
    if isinstance(target, (nn.Module, type)):
        return module_entry(target)
    if isinstance(target, str):
        return method_entry(target)
    return function_entry(target)


def node_entry(node: Node, modules: dict[str, nn.Module]) -> OpEntry | None:
    """The entry of a graph node (``modules``: ``dict(gm.named_modules())``); None if unknown."""
    if node.op == "call_module":
        return module_entry(modules.get(str(node.target)))
    if node.op == "call_method":
        return method_entry(str(node.target))
    if node.op == "call_function":
        return function_entry(node.target)
    return None


def is_layer(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node is a layer for units (conv, linear, attention)."""
    entry = node_entry(node, modules)
    return entry is not None and entry.layer


def consumes(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a statistics tap at this node's input is a layer's input (a consumed tap)."""
    entry = node_entry(node, modules)
    return entry is not None and entry.consumes


_SUMS: set[Any] = set()  # functions, method names and ATen packets whose node adds its tensor operands


def sums(*targets: Any) -> None:
    """Declare ops that add their operands (``x + f(x)``: a residual join for the depth pass)."""
    _SUMS.update(targets)


def is_sum(node: Node) -> bool:
    """Whether a node adds its operands (``operator.add``, ``Tensor.add``, ``aten.add.Tensor``)."""
    return node.op != "call_module" and _in(node, _SUMS)


_EVAL_IDENTITIES: set[Any] = set()  # ops that return their input in eval mode (dropout, clone)


def eval_identities(*targets: Any) -> None:
    """Declare ops that return their first input unchanged in eval mode (dropout, clone, alias)."""
    _EVAL_IDENTITIES.update(targets)


def _in(node: Node, table: set[Any], modules: dict[str, nn.Module] | None = None) -> bool:
    if node.op == "call_method":
        return str(node.target) in table
    if node.op == "call_module":
        module = (modules or {}).get(str(node.target))
        return module is not None and any(base in table for base in type(module).__mro__)
    if node.op != "call_function":
        return False
    try:
        if node.target in table:
            return True
    except TypeError:  # an unhashable target
        return False
    return getattr(node.target, "overloadpacket", None) in table


def is_eval_identity(node: Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether a node returns its first input unchanged in eval mode (``aten.dropout``, ``nn.Dropout``)."""
    return _in(node, _EVAL_IDENTITIES, modules)


# ``x += y`` on a traced tensor and ``x[i] = v``
_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem,
})


def _in_place_name(name: str) -> bool:
    """PyTorch's naming of in-place forms: ``relu_``, ``add_`` (not a dunder)."""
    return name.endswith("_") and not name.endswith("__")


def writes_in_place(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node may write into a tensor it takes: an in-place method or function (a name
    ending in one underscore), ``inplace=True``, an ``out=`` argument, a module whose ``inplace``
    is set (``nn.ReLU(inplace=True)``), ``x += y`` / ``x[i] = v``, an ATen op whose schema
    mutates. What PyTorch names as in-place; an op that writes without saying so (a leaf module
    that adds into its input) is caught at run time by the tensors' version counters
    (``fxmerge.passes.features.TapExtractor``)."""
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        return _in_place_name(str(node.target))
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS:
        return True
    schema = getattr(node.target, "_schema", None)  # an ATen OpOverload
    if schema is not None:
        return bool(schema.is_mutable)
    return _in_place_name(getattr(node.target, "__name__", ""))


def returns_view(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node's value may share storage with its first input: a view op (``views``
    entries: reshape, permute, getitem, split), an op that returns its input in eval mode
    (dropout, contiguous), an in-place op (it returns what it wrote into), an ATen op whose schema
    returns an alias."""
    if writes_in_place(node, modules) or is_eval_identity(node, modules):
        return True
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:
        return any(value.alias_info is not None for value in schema.returns)
    entry = node_entry(node, modules)
    return entry is not None and entry.views


def affine_arguments(node: Node, modules: dict[str, nn.Module] | None = None) -> tuple[Any, ...] | None:
    """A normalisation node's (weight, bias) arguments (get_attr nodes, or None where absent), or
    None when the node is not a normalisation with an elementwise affine map."""
    entry = node_entry(node, modules or {})
    if entry is None or entry.affine is None or node.op == "call_module":
        return None
    return tuple(arg(node.args, node.kwargs, position, name) for position, name in entry.affine)


def rescale_params(node: Node, modules: dict[str, nn.Module]) -> tuple[tuple[str, ...], bool] | None:
    """The qualified names of the parameters that scale a node's output per channel (the last one
    also shifts it; see ``OpEntry.rescale``) and whether the node is a normalisation (not a
    layer), or None: a node whose output the registry cannot rescale through its parameters.

    Modules of a class an entry with ``rescale`` names (not a subclass: timm's ``BatchNormAct2d``
    applies an activation after its affine map), and functional normalisations (``affine``, or a
    batch norm's schema) whose weight and bias are both ``get_attr`` tensors."""
    entry = node_entry(node, modules)
    if entry is None:
        return None
    if node.op == "call_module":
        if not entry.rescale or type(modules.get(str(node.target))) not in entry.targets:
            return None
        prefix = f"{node.target}." if node.target else ""
        return tuple(prefix + name for name in entry.rescale), not entry.layer
    found = affine_arguments(node, modules)
    if found is None and entry.batch_norm is not None and node.op == "call_function":
        bound = entry.batch_norm.bind(node.args, node.kwargs)
        found = (bound["weight"], bound["bias"])
    if found and all(isinstance(v, Node) and v.op == "get_attr" for v in found):
        return tuple(str(v.target) for v in found), True
    return None


def normalises(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node is a normalisation (batch, layer, group norm; subclasses included)."""
    entry = node_entry(node, modules)
    return entry is not None and not entry.layer and bool(
        entry.rescale or entry.affine or entry.running_stats or entry.batch_norm
    )


def is_user_module(module: nn.Module) -> bool:
    """Whether a user entry describes this module class (the tracer keeps it as a leaf)."""
    for base in type(module).__mro__:
        if base in _USER.modules:
            return True
    return False


def update_attributes(module: nn.Module) -> None:
    """Keep a layer's size attributes consistent with its (possibly resized) parameters."""
    entry = module_entry(module)
    if entry is not None and entry.resize is not None:
        entry.resize(module)


def identity_parameter(module: nn.Module, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """The value of ``module``'s parameter ``name`` that makes the layer an identity map
    (for a square layer); zeros where the entry says nothing."""
    if name.endswith("num_batches_tracked"):
        return like.clone()
    entry = module_entry(module)
    if entry is not None and entry.identity is not None:
        value = entry.identity(module, name, shape, like)
        if value is not None:
            return value
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def resized_shape(module: nn.Module, shape: torch.Size, resize: Callable[[int], int]) -> torch.Size:
    """The shape of a parameter of ``module`` once its channel extents go through ``resize``."""
    entry = module_entry(module)
    if entry is None or entry.resized_shape is None:
        return shape
    return entry.resized_shape(module, shape, resize)


def zeroes_output(module: nn.Module | None, local: str) -> bool:
    """Whether ``module``'s parameter ``local`` is zeroed to make the layer output zero."""
    entry = module_entry(module)
    if entry is None:
        return local not in _running_names(None)
    return entry.zeroes(local)


@dataclass(frozen=True)
class RunningStats:
    """One batch norm with running statistics in a graph: the node, its module (None for a
    functional or ATen batch norm) and the qualified names of its mean and variance buffers."""

    node: str
    module: str | None
    mean: str
    var: str


def batch_norm_schema(target: Any) -> BatchNormSchema | None:
    """The argument schema of a functional batch norm (``F.batch_norm``, the ATen forms), or None."""
    try:
        entry = function_entry(target)
    except TypeError:  # an unhashable target
        return None
    return entry.batch_norm if entry is not None else None


def running_stats(gm: torch.fx.GraphModule) -> list[RunningStats]:
    """Every op with running statistics in ``gm``: batch norm modules, ``F.batch_norm`` and ATen
    batch norms reading ``get_attr`` buffers (so a repair can recompute every one of them)."""
    modules = dict(gm.named_modules())
    found: list[RunningStats] = []
    for node in gm.graph.nodes:
        entry = node_entry(node, modules)
        if entry is None or entry.running_stats is None:
            continue
        mean_key, var_key = entry.running_stats
        if node.op == "call_module":
            module = modules[str(node.target)]
            if getattr(module, str(mean_key), None) is None:
                continue
            prefix = f"{node.target}." if node.target else ""
            found.append(RunningStats(node.name, str(node.target), prefix + str(mean_key), prefix + str(var_key)))
            continue
        names = []
        for position, keyword in (mean_key, var_key):  # type: ignore[misc]
            value = arg(node.args, node.kwargs, position, keyword, None)
            names.append(str(value.target) if isinstance(value, Node) and value.op == "get_attr" else None)
        if all(names):
            found.append(RunningStats(node.name, None, names[0], names[1]))  # type: ignore[arg-type]
    return found


# ------------------------------------------------------------------------------------------------
# Public registration
# ------------------------------------------------------------------------------------------------


def register(*targets: Any, rule: Rule | None = None, **fields: Any) -> Any:
    """Teach fxmerge an op. User entries take precedence over built-ins.

    Forms::

        fxmerge.ops.register(MyRMSNorm, fxmerge.ops.norm(dims=-1, params=("weight",)))
        fxmerge.ops.register(my_function, rule=my_rule, layer=True)

        @fxmerge.ops.register(MyLayer, layer=True)
        def my_rule(ctx, node, args, kwargs): ...

    ``targets``: module classes (subclasses match too; a registered module class is kept as a
    leaf by ``fxmerge.trace``), functions, ATen ops, Tensor method names. The last positional
    argument may be a template (``norm``, ``elementwise``, ``linear``) or a whole ``OpEntry``;
    keyword ``fields`` set ``OpEntry`` fields (``layer``, ``consumes``, ``name``, ...). Returns the
    registered entry (or, used as a decorator, the rule function). ``unregister`` undoes it.
    """
    spec: OpEntry | None = None
    items = list(targets)
    if items and isinstance(items[-1], OpEntry):
        spec = items.pop()
    if rule is None and spec is None:
        if not items:
            raise TypeError("fxmerge.ops.register: give the targets, and a template or rule=")

        def decorator(function: Rule) -> Rule:
            register(*items, rule=function, **fields)
            return function

        return decorator
    base = spec if spec is not None else OpEntry(name="")
    all_targets = tuple(items) + base.targets
    if not all_targets:
        raise TypeError("fxmerge.ops.register: no target given")
    changes: dict[str, Any] = {"targets": all_targets, "user": True, **fields}
    if rule is not None:
        changes["rule"] = rule
    if not (fields.get("name") or base.name):
        changes["name"] = _target_label(all_targets[0])
    if "family" not in fields and base.family in ("", "user", "template"):
        changes["family"] = "user"
    entry = dataclasses.replace(base, **changes)
    _USER.add(entry)
    return entry


def unregister(*items: Any) -> None:
    """Remove user entries, given as entries or as their targets."""
    for item in items:
        for entry in list(_USER.entries):
            if entry is item or item in entry.targets:
                _USER.remove(entry)


def rules() -> tuple[OpEntry, ...]:
    """Every known entry: user entries first, then the built-ins by family."""
    return tuple(_USER.entries) + tuple(_builtins().entries)


def _target_label(target: Any) -> str:
    if isinstance(target, type):
        return target.__name__
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or str(target)


def targets_label(targets: Iterable[Any]) -> str:
    return ", ".join(_target_label(t) for t in targets)
