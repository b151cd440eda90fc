"""Loading what the command line names: model factories with weights, and calibration data.

Weights are read without unpickling code: ``.safetensors`` files, or state dicts saved with
``torch.save`` loaded through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxmerge.errors import CalibrationError, ConfigError


def resolve_callable(spec: str) -> Any:
    """'package.module:callable' (or 'package.module.callable') -> the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{spec!r} is not 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {error}") from error
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
        target = getattr(target, part)
    return target


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A dict of tensors from a .safetensors file or a torch.save'd dict/tensor (weights only)."""
    if not os.path.exists(path):
        raise ConfigError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{path}: not a tensor file loadable with torch.load(weights_only=True): {error}") from error
    if isinstance(loaded, torch.Tensor):
        return {"": loaded}
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a tensor or a dict of tensors, got {type(loaded).__name__}")
    return dict(loaded)


def load_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build ``spec['factory'](**spec['kwargs'])`` and load ``spec['weights']`` into it (eval mode)."""
    if "factory" not in spec:
        raise ConfigError(f"model entry {dict(spec)} has no 'factory'")
    factory = resolve_callable(str(spec["factory"]))
    kwargs = dict(spec.get("kwargs") or {})
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec['factory']} returned {type(model).__name__}, not an nn.Module")
    weights = spec.get("weights")
    if weights:
        state = load_tensors(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{weights} does not fit {spec['factory']}({kwargs}): missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
    return model.eval()


def load_calibration(spec: Mapping[str, Any]) -> list[torch.Tensor]:
    """Calibration batches from a tensor file, an image folder, or a factory.

    ``spec``: ``path`` (or ``tensor`` / ``image_folder`` / ``factory``), optional ``batch_size``
    (default 64), ``key`` (tensor name in a .safetensors file), ``image_size`` (image folders).
    """
    batch_size = int(spec.get("batch_size", 64))
    path = spec.get("tensor") or spec.get("image_folder") or spec.get("path")
    factory = spec.get("factory")
    if factory is None and isinstance(path, str) and ":" in path and not os.path.exists(path):
        factory = path
    if factory is not None:
        data = resolve_callable(str(factory))()
        batches = [item[0] if isinstance(item, (tuple, list)) else item for item in data]
        if not batches:
            raise CalibrationError(f"{factory} returned no calibration batches")
        return batches
    if path is None:
        raise ConfigError("calibration needs 'tensor', 'image_folder', 'path' or 'factory'")
    path = str(path)
    if os.path.isdir(path):
        return _image_folder(path, batch_size, int(spec.get("image_size", 32)))
    tensors = load_tensors(path)
    key = spec.get("key")
    if key is None:
        if len(tensors) != 1:
            raise ConfigError(f"{path} holds {sorted(tensors)}: say which with 'key'")
        key = next(iter(tensors))
    inputs = tensors[key]
    return list(inputs.split(batch_size))


def _image_folder(path: str, batch_size: int, image_size: int) -> list[torch.Tensor]:
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(
        path, transform=transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    )
    if len(dataset) == 0:
        raise CalibrationError(f"no images under {path}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return [images for images, _ in loader]
