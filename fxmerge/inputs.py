"""Validation of ``fxmerge.merge``'s inputs: the models, the calibration batches, their dtypes and
devices, and a trial run of every model on the data — before anything is traced.

A model input is a ``Batch``: positional and keyword tensors. A calibration item may be a tensor,
an ``(input, label)`` tuple whose input is a tensor, a tuple of positional tensors or a dict, or
a dict of keyword tensors (an HF ``BatchEncoding``; its ``"labels"`` entry is the label, as in
HF's Trainer, and is not fed to the model). Integer tensors are token ids and are never cast.

Every check raises an ``fxmerge.errors`` type whose message names the model index or batch index
(and the key) and the fix; nothing here modifies a model (training flags are restored after the
trial run).
"""

from __future__ import annotations

import itertools

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxmerge.errors import CalibrationError, ConfigError, IncompatibleModelsError

LABEL_KEYS = ("labels", "label")


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer, or None when it has neither."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


@dataclass(frozen=True, repr=False)
class Batch:
    """One input of a model: ``module(*args, **kwargs)``.

    ``args``: positional tensors (an image batch ``(N, C, H, W)``); ``kwargs``: keyword tensors
    (``input_ids`` / ``attention_mask`` / ``token_type_ids`` of shape ``(N, L)``, int64).
    Every tensor has the batch dimension first.
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Batch({', '.join(f'{key}={_describe_tensor(t)}' for key, t in self.items())})"

    def items(self) -> list[tuple[str, Any]]:
        """(label, value) of every input: ``"args[i]"`` for positional ones, the key for keywords."""
        return [(f"args[{i}]", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())

    def tensors(self) -> list[torch.Tensor]:
        return [value for _, value in self.items() if isinstance(value, torch.Tensor)]

    @property
    def size(self) -> int:
        """The number of samples: the leading dimension of the first tensor."""
        return int(self.tensors()[0].shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """The batch with ``fn`` applied to every tensor."""
        convert = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Batch(tuple(convert(a) for a in self.args), {k: convert(v) for k, v in self.kwargs.items()})

    def on(self, device: torch.device | None) -> "Batch":
        """The batch with every tensor on ``device`` (None, or already there: this batch)."""
        if device is None or all(t.device == device for t in self.tensors()):
            return self
        return self.map(lambda t: t.to(device))

    def run(self, module: Callable[..., Any]) -> Any:
        """``module(*args, **kwargs)``, the tensors moved to the module's device first
        (``module_device``): calibration data on the CPU feeds models on a GPU batch by batch."""
        moved = self.on(module_device(module)) if isinstance(module, nn.Module) else self
        return module(*moved.args, **dict(moved.kwargs))

    def placeholders(self, gm: torch.fx.GraphModule) -> list[Any]:
        """The values of ``gm``'s placeholder nodes, in graph order, for graph-level interpreters
        (``ShapeProp``, ``fx.Interpreter``): a torch.export graph flattens the inputs with its
        ``in_spec``; a torch.fx graph binds positional inputs in order and keywords by name. The
        tensors are moved to ``gm``'s device."""
        moved = self.on(module_device(gm))
        if moved is not self:
            return moved.placeholders(gm)
        from torch.fx.graph import _PyTreeCodeGen

        codegen = gm.graph._codegen
        if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
            import torch.utils._pytree as pytree

            flat, spec = pytree.tree_flatten((tuple(self.args), dict(self.kwargs)))
            expected = codegen.pytree_info.in_spec
            if spec != expected:
                raise CalibrationError(
                    f"the inputs {self!r} do not have the structure the graph was captured with ({expected})"
                )
            return flat
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values: list[Any] = []
        for index, node in enumerate(nodes):
            name = str(node.target).lstrip("*")
            if index < len(self.args):
                values.append(self.args[index])
            elif name in self.kwargs:
                values.append(self.kwargs[name])
            elif node.args:
                values.append(node.args[0])  # the forward's default
            else:
                raise CalibrationError(f"the inputs {self!r} give no value for the graph's input {name!r}")
        return values


def tensor_leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple, a dict, an HF ``ModelOutput``), in
    pytree order."""
    import torch.utils._pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _describe_tensor(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


def as_batch(value: Any) -> Batch:
    """A model input as a ``Batch``: a tensor, a tuple/list of positional inputs, a dict of
    keyword inputs, or a ``Batch``."""
    if isinstance(value, Batch):
        return value
    if isinstance(value, torch.Tensor):
        return Batch((value,), {})
    if isinstance(value, Mapping):
        return Batch((), {str(k): v for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return Batch(tuple(value), {})
    raise CalibrationError(f"a model input must be a tensor, a tuple of tensors or a dict of tensors, got {type(value).__name__}")


def checked_inputs(models: Any, calibration: Iterable[Any], limit: int) -> tuple[list[nn.Module], list[str], list[Batch]]:
    """(models as a list, their names for messages, the first ``limit`` calibration batches).

    Runs every check of this module in order: at least two nn.Modules; batches (see the module
    docstring) of one structure, per-sample shapes, dtypes and device, finite; one dtype and
    device for all models (floating batches cast to the models' dtype with a warning). Whether
    every model runs on batch 0 is seen when tracing runs it (``check_runs_on`` explains a
    failure). Names are ``"models[k] (ClassName)"``.
    """
    models = _model_list(models)
    names = [f"models[{k}] ({type(m).__name__})" for k, m in enumerate(models)]
    batches = calibration_inputs(calibration, limit)
    batches = _check_dtypes_and_devices(models, names, batches)
    return models, names, batches


def checked_example(models: Any, example_input: Any) -> tuple[list[nn.Module], list[str], list[Batch]]:
    """``checked_inputs`` for a data-free merge: ``example_input`` (a tensor, a tuple of positional
    tensors, a dict of keyword tensors or a ``Batch``) is the one batch, used for its shapes.
    ``ConfigError`` when it is missing."""
    if example_input is None:
        raise ConfigError(
            "calibration=None (a data-free merge) needs example_input=: one model input whose shapes tracing "
            "records, e.g. example_input=torch.zeros(1, 3, 32, 32) (a tuple of tensors or a dict of keyword "
            "tensors for models with several inputs)"
        )
    batch = as_batch(example_input)
    item: Any = dict(batch.kwargs) if batch.kwargs and not batch.args else (tuple(batch.args),)
    if batch.kwargs and batch.args:
        raise ConfigError("example_input: give positional tensors (a tuple) or keyword tensors (a dict), not both")
    return checked_inputs(models, [item], 1)


def _input_of(item: Any, index: int) -> Batch:
    """The model input of calibration item ``index`` (its label, if any, dropped)."""
    if isinstance(item, torch.Tensor):
        return Batch((item,), {})
    if isinstance(item, Mapping):
        inputs = {str(k): v for k, v in item.items() if k not in LABEL_KEYS}
        if not inputs:
            raise CalibrationError(f"calibration batch {index} is a dict with no input key besides the labels")
        return Batch((), inputs)
    if isinstance(item, (tuple, list)) and item:
        first = item[0]
        if isinstance(first, (torch.Tensor, Mapping)):
            return _input_of(first, index)
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, torch.Tensor) for t in first):
            return Batch(tuple(first), {})
    raise CalibrationError(
        f"calibration batch {index} is of type {type(item).__name__}: calibration items must be tensors, dicts of "
        "tensors (input_ids=..., attention_mask=...), or (input, label) tuples whose input is a tensor, a tuple "
        "of tensors or a dict"
    )


def _check_batch(batch: Batch, index: int, first: Batch | None) -> None:
    """Every input of ``batch`` is a non-empty, finite tensor with a batch dimension, of the same
    structure, per-sample shape, dtype and device as in batch 0; raises naming batch and key."""
    single = len(batch.items()) == 1 and not batch.kwargs

    def where(key: str) -> str:
        return f"calibration batch {index}" if single else f"calibration batch {index}: input {key!r}"

    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise CalibrationError(f"{where(key)} is a {type(value).__name__}, not a tensor")
        if value.dim() == 0 or value.shape[0] == 0:
            raise CalibrationError(
                f"{where(key)} has shape {tuple(value.shape)}: a batch needs a leading batch dimension with at "
                "least one sample"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CalibrationError(f"{where(key)} contains NaN or Inf")
    sizes = {int(t.shape[0]) for t in batch.tensors()}
    if len(sizes) > 1:
        listing = ", ".join(f"{key} {tuple(v.shape)}" for key, v in batch.items())
        raise CalibrationError(f"calibration batch {index}: its inputs have different batch sizes ({listing})")
    if first is None:
        return
    keys, first_keys = [k for k, _ in batch.items()], [k for k, _ in first.items()]
    if keys != first_keys:
        missing = [k for k in first_keys if k not in keys]
        extra = [k for k in keys if k not in first_keys]
        what = "; ".join(p for p in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "") if p)
        raise CalibrationError(
            f"calibration batch {index} has inputs {keys}, batch 0 has {first_keys} ({what or 'another order'}): "
            "every batch must have the same inputs"
        )
    for (key, value), (_, reference) in zip(batch.items(), first.items()):
        if value.shape[1:] != reference.shape[1:]:
            raise CalibrationError(
                f"{where(key)} has shape {tuple(value.shape)}, batch 0 has {tuple(reference.shape)}"
                + ("" if single else " (pad every batch to one length)")
            )
        if value.dtype != reference.dtype or value.device != reference.device:
            raise CalibrationError(
                f"{where(key)} is {value.dtype} on {value.device}, batch 0 is {reference.dtype} on {reference.device}"
            )


def calibration_inputs(calibration: Iterable[Any], limit: int) -> list[Batch]:
    """The first ``limit`` input batches of ``calibration``, checked to be finite and consistent.

    Raises ``CalibrationError`` naming the batch index (and the input's key) for: a single
    tensor or a non-iterable instead of an iterable of batches, an item that is not one of the
    accepted forms (module docstring), a 0-d or empty input, inputs of one batch with different
    batch sizes, missing or extra keys, a per-sample shape or dtype that differs from batch 0's,
    NaN/Inf. No more than ``limit`` items are drawn from ``calibration``.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise CalibrationError(
            "calibration must be an iterable of batches (e.g. a DataLoader or a list of tensors or dicts), "
            f"not a single {'tensor' if isinstance(calibration, torch.Tensor) else 'dict'}: wrap it as [batch]"
        )
    try:
        items = iter(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            f"got an object of type {type(calibration).__name__}"
        ) from None
    batches: list[Batch] = []
    for index, item in enumerate(items):
        batch = _input_of(item, index)
        _check_batch(batch, index, batches[0] if batches else None)
        batches.append(batch)
        if len(batches) >= limit:
            break
    if not batches:
        raise CalibrationError("the calibration data is empty")
    return batches


def _model_list(models: Any) -> list[nn.Module]:
    """``models`` as a list of at least two nn.Modules, or ConfigError naming the offender."""
    if isinstance(models, nn.ModuleList):
        models = list(models)
    if isinstance(models, nn.Module):
        raise ConfigError(
            f"merge needs a list of at least 2 models, got a single {type(models).__name__}: pass [model_a, model_b]"
        )
    if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, Iterable):
        raise ConfigError(f"merge needs a list of at least 2 models, got an object of type {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"merge needs a list of at least 2 models, got {len(models)}")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"models[{index}] is a {type(model).__name__}, not an nn.Module")
    return models


def _tensor_kinds(model: nn.Module) -> tuple[tuple[torch.dtype, ...], tuple[torch.device, ...]]:
    """(floating dtypes of the parameters — of the buffers if it has none —, devices of both)."""
    params = [t for t in model.parameters() if t.is_floating_point()]
    buffers = [t for t in model.buffers() if t.is_floating_point()]
    dtypes = sorted({t.dtype for t in (params or buffers)}, key=str)
    devices = sorted({t.device for t in [*model.parameters(), *model.buffers()]}, key=str)
    return tuple(dtypes), tuple(devices)


def _describe(values: Sequence[Any]) -> str:
    return "/".join(str(v).replace("torch.", "") for v in values) if values else "no floating tensors"


def _check_dtypes_and_devices(
    models: Sequence[nn.Module], names: Sequence[str], batches: list[Batch]
) -> list[Batch]:
    """The models must share one floating dtype and one device; returns the batches in that dtype.

    Models of different dtypes or devices: IncompatibleModelsError naming each model's dtype /
    device. Batches on another device than the models (CPU data, CUDA models) are moved to the
    models' device one batch at a time when they are run (``Batch.run``). Floating batches of
    another dtype than the models (float64 data, float32 models) are cast to the models' dtype
    with a warning; integer batches (token ids) are passed as they are.
    """
    kinds = [_tensor_kinds(model) for model in models]
    for name, (_, devices) in zip(names, kinds):
        if len(devices) > 1:
            raise IncompatibleModelsError(
                f"{name} has tensors on several devices ({_describe(devices)}): move it to one device"
            )
    for label, index in (("dtype", 0), ("device", 1)):
        seen = [kind[index] for kind in kinds if kind[index]]
        if len(set(seen)) > 1:
            listing = ", ".join(f"{name} is {_describe(kind[index])}" for name, kind in zip(names, kinds))
            fix = "model.float() / .double()" if label == "dtype" else "model.to(device)"
            raise IncompatibleModelsError(
                f"the models must have one {label}: {listing}; convert them first (e.g. {fix})"
            )
    dtypes = next((kind[0] for kind in kinds if kind[0]), ())
    first = batches[0].tensors()
    floating = [t for t in first if t.is_floating_point()]
    if len(dtypes) == 1 and any(t.dtype != dtypes[0] for t in floating):
        other = next(t.dtype for t in floating if t.dtype != dtypes[0])
        warnings.warn(
            f"fxmerge.merge: calibration batches are {_describe([other])}, the models "
            f"{_describe(dtypes)}: casting the batches to {_describe(dtypes)} (integer inputs are token ids and stay)",
            stacklevel=4,  # warn at the caller of merge(): _check_dtypes_and_devices < checked_inputs < merge
        )
        cast = lambda t: t.to(dtypes[0]) if t.is_floating_point() else t  # noqa: E731
        batches = [batch.map(cast) for batch in batches]
    return batches


def check_runs_on(models: Sequence[nn.Module], names: Sequence[str], batch: Batch) -> None:
    """Run every model (in eval mode, no gradients) on calibration batch 0: called when tracing
    fails, to tell data that a model does not accept from a model that cannot be captured (a
    merge's trace runs every model on batch 0 anyway; checking first would cost that forward
    twice).

    Some models fail, others not (e.g. a first conv that expects 3 channels, data with 1):
    IncompatibleModelsError naming the failing models. Every model fails: CalibrationError (the
    data does not fit). Training flags are restored; nothing else is touched.
    """
    failures: list[tuple[str, Exception]] = []
    for name, model in zip(names, models):
        flags = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                batch.run(model)
        except Exception as error:  # whatever torch raises (RuntimeError, ValueError, IndexError…)
            failures.append((name, error))
        finally:
            for module, training in flags:
                module.training = training
    if not failures:
        return
    name, error = failures[0]
    lines = str(error).strip().splitlines()
    why = f"{type(error).__name__}: {lines[0] if lines else ''}"
    only = batch.tensors()[0] if len(batch.items()) == 1 else None
    data = (
        f"calibration batch 0 (shape {tuple(only.shape)}, {_describe([only.dtype])})" if only is not None
        else f"calibration batch 0 ({', '.join(f'{k} {_describe_tensor(v)}' for k, v in batch.items())})"
    )
    if len(failures) == len(models):
        raise CalibrationError(f"no model accepts {data}; {name} fails with {why}") from error
    failing = ", ".join(n for n, _ in failures)
    accepting = ", ".join(n for n in names if n not in {f for f, _ in failures})
    raise IncompatibleModelsError(
        f"{failing} fail{'s' if len(failures) == 1 else ''} on {data}, which {accepting} "
        f"accept{'s' if len(names) - len(failures) == 1 else ''}: the models must take the same input "
        f"({name}: {why})"
    ) from error
