"""Exception types raised by fxmerge. Every message names the model, module or graph node at fault."""

from __future__ import annotations


class FxMergeError(Exception):
    """Base class of every error fxmerge raises on purpose."""


class TraceError(FxMergeError):
    """A model could not be traced into a torch.fx graph."""


class UnsupportedOpError(FxMergeError):
    """strict=True and the dependency analysis met an op it has no rule for."""


class IncompatibleModelsError(FxMergeError):
    """The models cannot be merged: different families, stage structures or input shapes."""


class CalibrationError(FxMergeError):
    """Calibration data is empty, of the wrong shape, or not finite."""


class ConfigError(FxMergeError, ValueError):
    """An option passed to merge() or the CLI is invalid."""


class InvarianceError(FxMergeError):
    """A function-preserving rewrite changed the model's outputs (an internal bug: please report)."""


class SaveError(FxMergeError):
    """A GraphModule cannot be stored as data: a module class outside the allowlist, a function or
    argument value that has no safe encoding, hooks that would be lost."""


class LoadError(FxMergeError):
    """A saved model folder was refused: a file is missing, corrupted or tampered with, the format is
    unknown or newer, or the graph names a function or module class outside the allowlist."""


class MissingDependencyError(FxMergeError, ImportError):
    """An optional feature needs a package that is not installed; the message gives the install command."""
