"""fxmerge: merge independently trained PyTorch networks into one torch.fx GraphModule."""

from fxmerge import errors, evaluation, metrics, ops, testing, zoo
from fxmerge.api import GroupReport, MergeResult, merge
from fxmerge.config import MergeConfig
from fxmerge.groups import AxisRef, ChannelSpace, ShapeLiteral, Tap
from fxmerge.io import load_module as load
from fxmerge.passes.dependency import Analysis, analyze
from fxmerge.trace import trace

__all__ = [
    "GroupReport",
    "MergeConfig",
    "MergeResult",
    "merge",
    "evaluation",
    "metrics",
    "ops",
    "zoo",
    "Analysis",
    "AxisRef",
    "ChannelSpace",
    "ShapeLiteral",
    "Tap",
    "analyze",
    "load",
    "errors",
    "testing",
    "trace",
]
__version__ = "0.1.0"
