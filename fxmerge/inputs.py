"""Validation of ``fxmerge.merge``'s inputs: the models, the calibration batches, their dtypes and
devices, and a trial run of every model on the data — before anything is traced.

Every check raises an ``fxmerge.errors`` type whose message names the model index or batch index
and the fix; nothing here modifies a model (training flags are restored after the trial run).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxmerge.errors import CalibrationError, ConfigError, IncompatibleModelsError


def checked_inputs(
    models: Any, calibration: Iterable[Any], limit: int
) -> tuple[list[nn.Module], list[str], list[torch.Tensor]]:
    """(models as a list, their names for messages, the first ``limit`` calibration batches).

    Runs every check of this module in order: at least two nn.Modules; batches that are tensors
    or (tensor, label) tuples of one shape, dtype and device, finite; one dtype and device for
    all models (floating batches cast to the models' dtype with a warning); every model runs on
    batch 0. Names are ``"models[k] (ClassName)"``.
    """
    models = _model_list(models)
    names = [f"models[{k}] ({type(m).__name__})" for k, m in enumerate(models)]
    batches = calibration_inputs(calibration, limit)
    batches = _check_dtypes_and_devices(models, names, batches)
    _check_runs_on(models, names, batches[0])
    return models, names, batches


def _input_of(item: Any, index: int) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise CalibrationError(
        f"calibration batch {index} is of type {type(item).__name__}: calibration items must be tensors or "
        "(tensor, label) tuples"
    )


def calibration_inputs(calibration: Iterable[Any], limit: int) -> list[torch.Tensor]:
    """The first ``limit`` input batches of ``calibration``, checked to be finite and consistent.

    Raises ``CalibrationError`` naming the batch index for: a single tensor or a non-iterable
    instead of an iterable of batches, an item that is not a tensor / (tensor, label) tuple, a
    0-d or empty batch, a batch whose per-sample shape or dtype differs from batch 0's, NaN/Inf.
    No more than ``limit`` items are drawn from ``calibration``.
    """
    if isinstance(calibration, torch.Tensor):
        raise CalibrationError(
            "calibration must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            "not a single tensor: wrap it as [tensor]"
        )
    try:
        items = iter(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            f"got an object of type {type(calibration).__name__}"
        ) from None
    batches: list[torch.Tensor] = []
    for index, item in enumerate(items):
        batch = _input_of(item, index)
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise CalibrationError(
                f"calibration batch {index} has shape {tuple(batch.shape)}: a batch needs a leading "
                "batch dimension with at least one sample"
            )
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf")
        if batches and batch.shape[1:] != batches[0].shape[1:]:
            raise CalibrationError(
                f"calibration batch {index} has shape {tuple(batch.shape)}, batch 0 has {tuple(batches[0].shape)}"
            )
        if batches and (batch.dtype != batches[0].dtype or batch.device != batches[0].device):
            raise CalibrationError(
                f"calibration batch {index} is {batch.dtype} on {batch.device}, batch 0 is "
                f"{batches[0].dtype} on {batches[0].device}"
            )
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
    models: Sequence[nn.Module], names: Sequence[str], batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The models must share one floating dtype and one device; returns the batches in that dtype.

    Models of different dtypes or devices: IncompatibleModelsError naming each model's dtype /
    device. Batches on another device than the models: CalibrationError. Floating batches of
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
    devices = next((kind[1] for kind in kinds if kind[1]), ())
    if devices and batches[0].device != devices[0]:
        raise CalibrationError(
            f"calibration batch 0 is on {batches[0].device}, the models are on {devices[0]}: "
            "move the batches to the models' device"
        )
    if len(dtypes) == 1 and batches[0].is_floating_point() and batches[0].dtype != dtypes[0]:
        warnings.warn(
            f"fxmerge.merge: calibration batches are {_describe([batches[0].dtype])}, the models "
            f"{_describe(dtypes)}: casting the batches to {_describe(dtypes)}",
            stacklevel=4,  # warn at the caller of merge(): _check_dtypes_and_devices < checked_inputs < merge
        )
        batches = [batch.to(dtypes[0]) for batch in batches]
    return batches


def _check_runs_on(models: Sequence[nn.Module], names: Sequence[str], batch: torch.Tensor) -> None:
    """Run every model (in eval mode, no gradients) on calibration batch 0, before tracing.

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
                model(batch)
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
    data = f"calibration batch 0 (shape {tuple(batch.shape)}, {_describe([batch.dtype])})"
    if len(failures) == len(models):
        raise CalibrationError(f"no model accepts {data}; {name} fails with {why}") from error
    failing = ", ".join(n for n, _ in failures)
    accepting = ", ".join(n for n in names if n not in {f for f, _ in failures})
    raise IncompatibleModelsError(
        f"{failing} fail{'s' if len(failures) == 1 else ''} on {data}, which {accepting} "
        f"accept{'s' if len(names) - len(failures) == 1 else ''}: the models must take the same input "
        f"({name}: {why})"
    ) from error
