"""MergeConfig: every option of ``fxmerge.merge``, validated once.

This is the ONE list of options. Each field carries its help text, its choices and its default;
the command line's ``fxmerge merge`` flags, the keys a YAML config's ``merge:`` mapping accepts
(``MergeConfig.from_dict``) and the report (``as_dict``) are derived from these fields, so an
option added here appears everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fxmerge.errors import ConfigError

METHODS = ("average", "permute", "zip", "mudsc")
DEPTH_OBJECTIVES = ("lma", "sma")
INSERTED_UNITS = ("inert", "matched")
TAP_CHOICES = ("consumers", "last")  # fxmerge.passes.features.choose_taps
UNMERGES = ("copy", "regression")  # fxmerge.passes.width.regression_unmerge
OUTPUT_POLICIES = ("shared", "concat")
OUTPUT_BALANCES = ("none", "norm")  # fxmerge.passes.outputs
CAPTURES = ("auto", "fx", "export")
REPAIRS = ("bn", "none", "repair")

# Options that existed once: a config still naming them gets a ConfigError that says why.
REMOVED_OPTIONS = {
    "seed": "nothing in a merge is random (the same models, data and options always give bit-identical "
    "weights), so the option did nothing",
}


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


# ------------------------------------------------------------ text -> value (CLI flags, YAML strings)


def parse_width(text: Any) -> Any:
    """'max' | 'min' | '64' -> 64 | '0.5' -> 0.5; anything but a string is returned as it is."""
    if not isinstance(text, str) or text in ("max", "min"):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text  # MergeConfig names it in its error


def parse_stop(text: Any) -> Any:
    """'3' -> 3 (a unit index); any other string is a node name; non-strings are returned as they are."""
    if isinstance(text, str) and text.lstrip("-").isdigit():
        return int(text)
    return text


_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: Any) -> Any:
    """'4GB' -> 4 * 10**9 | '512MiB' -> 512 * 2**20 | '1e9' -> 10**9 | '4096' -> 4096 (KB/MB/GB/TB are
    powers of 1000, KiB/MiB/GiB/TiB of 1024, the 'B' may be left out); non-strings are returned as
    they are."""
    import re

    if not isinstance(text, str):
        return text
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT][iI]?)?[bB]?\s*", text)
    if found is None:
        raise ValueError(f"{text!r} is not a size in bytes, e.g. 4GB, 512MiB or 1000000")
    size = float(found.group(1)) * _BYTE_UNITS[(found.group(2) or "").lower()]
    return int(size) if math.isfinite(size) else text


def parse_threads(text: Any) -> Any:
    """'auto' -> 'auto' | '4' -> 4 | 'none' -> None; non-strings are returned as they are."""
    if isinstance(text, str) and text.strip().isdigit():
        return int(text)
    if isinstance(text, str) and text.strip().lower() == "none":
        return None
    return text


def parse_leaf(text: Any) -> Any:
    """'package.module:Class' -> the class; another string is a qualified module name ('layer1.0')."""
    if isinstance(text, str) and ":" in text:
        from fxmerge.loading import resolve_callable

        target = resolve_callable(text)
        if not isinstance(target, type):
            raise ConfigError(f"leaf_modules: {text!r} is not a class")
        return target
    return text


def _parsed(name: str, value: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` of option ``name`` with its strings parsed by the field's ``parse``."""
    parse = meta["parse"]
    if meta["repeat"] and value is None:
        return None
    if meta["repeat"]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list")
        return tuple(_parsed(name, item, {**meta, "repeat": False}) for item in items)
    if parse is None or not isinstance(value, str):
        return value
    try:
        return parse(value)
    except ValueError as error:  # float('wide'), int('x'): name the option, not the parser
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{name}={value!r} is not a valid value ({error})") from None


def _leaf_name(leaf: Any) -> Any:
    return f"{leaf.__module__}:{leaf.__qualname__}" if isinstance(leaf, type) else leaf


def _option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
            parse: Callable[[Any], Any] | None = None, metavar: str | None = None,
            repeat: bool = False) -> Any:
    """A MergeConfig field with what the CLI and the docs need to know about it.

    ``parse``: text (a flag's value or a YAML string) -> value. ``repeat``: the flag is given once
    per item and the value is a tuple of them.
    """
    return field(default=default, metadata={
        "help": help, "choices": choices, "parse": parse, "metavar": metavar, "repeat": repeat,
    })


@dataclass(frozen=True)
class MergeConfig:
    """The options of a merge (see ``fxmerge.merge`` for their meaning)."""

    method: str = _option(
        "zip", "'average' (plain weight averaging), 'permute' (Hungarian alignment to the first model), "
        "'zip' (ZipIt! greedy zipping within and across models) or 'mudsc' (zip on balance * weight "
        "similarity + (1 - balance) * activation similarity)", choices=METHODS,
    )
    depth: str = _option(
        "lma", "depth-alignment objective when depths differ: 'lma' (every position) or 'sma' "
        "(segment outputs)", choices=DEPTH_OBJECTIVES,
    )
    inserted: str = _option(
        "inert", "hidden channels of the zero-residual units inserted into a shallower model: 'inert' "
        "(they never reach its output, so those groups take the deeper models' weights) or 'matched' "
        "(matched and averaged like real units, as Xu et al.)", choices=INSERTED_UNITS,
    )
    taps: str = _option(
        "consumers", "where a group's channels are observed for matching: 'consumers' (up to 4 of the "
        "places layers read them, correlations averaged; a residual stream is read by every block) or "
        "'last' (the last such place only, as ZipIt!)", choices=TAP_CHOICES,
    )
    unmerge: str = _option(
        "copy", "what the layers reading a merged group see of each model's units: 'copy' (ZipIt!'s "
        "unmerge: every unit reads the merged unit it went to) or 'regression' (the least-squares "
        "reconstruction of each model's units from all merged units on the calibration data, shrunk "
        "toward 'copy'; permute and zip/mudsc on data)", choices=UNMERGES,
    )
    width: str | int | float | Mapping[str, int] = _option(
        "max", "merged width per group: max | min | an int | a float multiple of the largest width "
        "(a YAML config may also give a mapping from group name to int)", parse=parse_width,
    )
    alpha: float = _option(0.5, "zip: decay of an already merged feature's score (ZipIt! alpha)", parse=float)
    beta: float = _option(1.0, "zip: within-model merge budget per model (ZipIt! beta)", parse=float)
    balance: float = _option(0.5, "mudsc: weight-vs-activation similarity factor in [0, 1]", parse=float)
    output: str = _option(
        "shared", "'shared' (one label space: outputs averaged) or 'concat' (per-model heads, logits "
        "concatenated)", choices=OUTPUT_POLICIES,
    )
    output_balance: str = _option(
        "none", "how the models' output layers are averaged into a shared output: 'none' (as the "
        "other layers) or 'norm' (model k weighted by 1 / the rms norm of its outputs on the "
        "calibration data, so that a model with larger outputs does not dominate)", choices=OUTPUT_BALANCES,
    )
    stop_at: int | str | None = _option(
        None, "partial zipping: merge up to this unit index or node name, then one tail per model",
        parse=parse_stop, metavar="UNIT",
    )
    calibration_batches: int = _option(32, "calibration batches used for statistics and BatchNorm reset", parse=int)
    strict: bool = _option(False, "raise on ops the analysis does not understand instead of keeping their channels fixed")
    quiet: bool = _option(False, "no progress bars")
    leaf_modules: tuple = _option(
        (), "extra leaf modules for tracing: a qualified module name ('layer1.0') or a class "
        "'package.module:Class'", parse=parse_leaf, metavar="MODULE", repeat=True,
    )
    capture: str = _option(
        "auto", "how the models become graphs: 'fx' (torch.fx symbolic tracing), 'export' "
        "(torch.export, e.g. HuggingFace transformers) or 'auto' (fx, else export)", choices=CAPTURES,
    )
    model_weights: tuple | None = _option(
        None, "one weight per model (normalised to sum 1) for the merged weights: a weighted "
        "average instead of the plain one (given once per model)", parse=float, metavar="W", repeat=True,
    )
    max_memory: int | None = _option(
        None, "memory budget of the feature statistics, in bytes or e.g. 4GB / 512MiB: groups whose "
        "covariances do not fit together are observed over several passes over the calibration data "
        "(the same merge, bit for bit)", parse=parse_bytes, metavar="BYTES",
    )
    threads: int | str | None = _option(
        "auto", "torch intra-op CPU threads while merging: an int, 'auto' (torch's setting lowered "
        "to the CPUs not busy with other work: CPUs this process may use minus the 1-minute load "
        "average, at least 1) or 'none' (torch's setting as it is)",
        parse=parse_threads, metavar="N",
    )
    repair: str = _option(
        "bn", "after the rewrite: 'bn' (BatchNorm statistics recomputed on the calibration data; without "
        "calibration data it means 'none'), 'none' (the merged statistics of the source models kept) or "
        "'repair' (REPAIR: every merged unit rescaled to the interpolated mean and std of the models' "
        "units on the calibration data; also for LayerNorm and norm-free nets)", choices=REPAIRS,
    )

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("depth", self.depth, DEPTH_OBJECTIVES)
        _choice("inserted", self.inserted, INSERTED_UNITS)
        _choice("taps", self.taps, TAP_CHOICES)
        _choice("unmerge", self.unmerge, UNMERGES)
        _choice("output", self.output, OUTPUT_POLICIES)
        _choice("output_balance", self.output_balance, OUTPUT_BALANCES)
        _choice("capture", self.capture, CAPTURES)
        _choice("repair", self.repair, REPAIRS)
        if self.model_weights is not None:
            weights = tuple(self.model_weights) if isinstance(self.model_weights, Iterable) else None
            if (
                not weights or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights)
                or sum(weights) <= 0
            ):
                raise ConfigError(f"model_weights={self.model_weights!r} must be a list of numbers >= 0, one per model, not all 0")
            total = float(sum(weights))
            object.__setattr__(self, "model_weights", tuple(float(w) / total for w in weights))
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
        if not _is_number(self.balance) or not 0 <= self.balance <= 1:
            raise ConfigError(f"balance={self.balance!r} must be in [0, 1]")
        if not _is_int(self.calibration_batches) or self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches={self.calibration_batches!r} must be an int >= 1")
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
        for name in ("strict", "quiet"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        leaves = self.leaf_modules
        if not isinstance(leaves, (str, type)) and isinstance(leaves, Iterable):
            leaves = tuple(leaves)
        if not isinstance(leaves, tuple) or not all(isinstance(leaf, (str, type)) for leaf in leaves):
            raise ConfigError(
                f"leaf_modules={self.leaf_modules!r} must be a list of module classes or qualified module names"
            )
        object.__setattr__(self, "leaf_modules", leaves)  # frozen: store the normalised tuple
        if self.max_memory is not None:
            try:
                budget = parse_bytes(self.max_memory)
            except ValueError as error:
                raise ConfigError(f"max_memory={self.max_memory!r}: {error}") from None
            if not _is_number(budget) or not math.isfinite(budget) or budget < 1:
                raise ConfigError(f"max_memory={self.max_memory!r} must be a number of bytes >= 1 (an int, or e.g. '4GB'), or None")
            object.__setattr__(self, "max_memory", int(budget))
        if self.threads is not None and self.threads != "auto" and not (_is_int(self.threads) and self.threads >= 1):
            raise ConfigError(f"threads={self.threads!r} must be an int >= 1, 'auto' or None")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], where: str = "merge options") -> MergeConfig:
        """A MergeConfig from a mapping of option names (a YAML config's ``merge:``, a report).

        String values are parsed as on the command line (``width: '0.5'``, ``stop_at: '2'``,
        ``leaf_modules: ['pkg.mod:Class']``). Unknown or removed keys raise ``ConfigError``
        naming them.
        """
        names = option_names()
        for key in options:
            if key in REMOVED_OPTIONS:
                raise ConfigError(f"{where}: option {key!r} was removed: {REMOVED_OPTIONS[key]}; delete the key")
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"{where}: options {unknown} are unknown; allowed: {sorted(names)}")
        values = {}
        for spec in fields(cls):
            if spec.name in options:
                values[spec.name] = _parsed(spec.name, options[spec.name], spec.metadata)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every option by name, JSON-ready (classes in ``leaf_modules`` as 'package.module:Class')."""
        out: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Mapping):
                value = dict(value)
            elif spec.metadata["repeat"] and value is not None:
                value = [_leaf_name(item) for item in value]
            out[spec.name] = value
        return out


def option_names() -> tuple[str, ...]:
    """The names of every merge option, in MergeConfig order."""
    return tuple(spec.name for spec in fields(MergeConfig))
