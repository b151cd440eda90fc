"""Small model families for demos, tests and benchmarks.

Every factory takes the keyword arguments ``in_channels``, ``image_size`` and ``num_outputs``
(defaults 3, 32, 10: CIFAR-sized) plus family-specific options including ``width_multiplier``,
and returns a freshly initialised module in train mode that ``torch.fx.symbolic_trace`` traces
exactly. The digits task (see :mod:`fxmerge.data`) uses ``in_channels=1, image_size=8``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fxmerge.zoo.convnext import ConvNeXtBlock, convnext
from fxmerge.zoo.mlp import mlp
from fxmerge.zoo.resnet import BasicBlock, resnet
from fxmerge.zoo.vgg import vgg, vgg_cfg
from fxmerge.zoo.vit import vit

__all__ = ["BasicBlock", "ConvNeXtBlock", "FAMILIES", "convnext", "mlp", "resnet", "vgg", "vgg_cfg", "vit"]

FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet,
    "vgg": vgg,
    "mlp": mlp,
    "vit": vit,
    "convnext": convnext,
}
