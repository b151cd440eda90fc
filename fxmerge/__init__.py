"""fxmerge: merge independently trained PyTorch networks into one torch.fx GraphModule."""

from fxmerge import errors, testing
from fxmerge.groups import AxisRef, ChannelSpace, ShapeLiteral, Tap
from fxmerge.passes.dependency import Analysis, analyze
from fxmerge.trace import trace

__all__ = [
    "Analysis",
    "AxisRef",
    "ChannelSpace",
    "ShapeLiteral",
    "Tap",
    "analyze",
    "errors",
    "testing",
    "trace",
]
__version__ = "0.1.0"
