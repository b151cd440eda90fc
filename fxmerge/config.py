"""MergeConfig: every option of ``fxmerge.merge``, validated once."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxmerge.errors import ConfigError

METHODS = ("average", "permute", "zip", "mudsc")
DEPTH_OBJECTIVES = ("lma", "sma")
OUTPUT_POLICIES = ("shared", "concat")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _is_int(value: Any) -> bool:
    """An integer (numpy's included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    """A real number (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class MergeConfig:
    """The options of a merge (see ``fxmerge.merge`` for their meaning)."""

    method: str = "zip"
    depth: str = "lma"
    width: str | int | float | Mapping[str, int] = "max"
    alpha: float = 0.5
    beta: float = 1.0
    balance: float = 0.5
    output: str = "shared"
    stop_at: int | str | None = None
    calibration_batches: int = 32
    seed: int = 0
    strict: bool = False
    quiet: bool = False
    leaf_modules: tuple = field(default=())

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("depth", self.depth, DEPTH_OBJECTIVES)
        _choice("output", self.output, OUTPUT_POLICIES)
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
        if not _is_number(self.balance) or not 0 <= self.balance <= 1:
            raise ConfigError(f"balance={self.balance!r} must be in [0, 1]")
        if not _is_int(self.calibration_batches) or self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches={self.calibration_batches!r} must be an int >= 1")
        if not _is_int(self.seed):
            raise ConfigError(f"seed={self.seed!r} must be an int")
        width = self.width
        if isinstance(width, bool) or not (
            width in ("max", "min")
            or (isinstance(width, int) and width >= 1)
            or (isinstance(width, float) and math.isfinite(width) and width > 0)
            or isinstance(width, Mapping)
        ):
            raise ConfigError(
                f"width={width!r}: expected 'max', 'min', an int >= 1, a float > 0 (multiple of the "
                "largest width) or a dict from group name to int"
            )
        if isinstance(width, Mapping):
            for key, value in width.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"width[{key!r}]={value!r} must be an int >= 1")
        if self.stop_at is not None and (isinstance(self.stop_at, bool) or not isinstance(self.stop_at, (int, str))):
            raise ConfigError(f"stop_at={self.stop_at!r} must be a unit index, a node name or None")

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "depth": self.depth,
            "width": dict(self.width) if isinstance(self.width, Mapping) else self.width,
            "alpha": self.alpha, "beta": self.beta, "balance": self.balance, "output": self.output,
            "stop_at": self.stop_at, "calibration_batches": self.calibration_batches, "seed": self.seed,
            "strict": self.strict,
        }
