"""VGG-style plain convolutional networks whose classifier reads the flattened C x s x s map.

There is deliberately no adaptive pooling before the classifier: the first Linear layer sees
``C * s * s`` inputs, the case where a channel permutation must be expanded over ``s * s``
positions when merging.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["vgg", "vgg_cfg", "VggCfg"]

# Entries are conv output channel counts (int) or "M" for a 2x2 max pool, as in torchvision.
VggCfg = tuple[int | str, ...]

_POOL = "M"


def vgg_cfg(convs_per_stage: Sequence[int] = (1, 1, 1), widths: Sequence[int] = (16, 32, 64)) -> VggCfg:
    """Config with ``convs_per_stage[i]`` convolutions of ``widths[i]`` channels, then "M", per stage.

    ``vgg_cfg((2, 2, 2))`` -> ``(16, 16, "M", 32, 32, "M", 64, 64, "M")``; used to build
    depth-heterogeneous pairs that share their stage structure.
    """
    if len(convs_per_stage) != len(widths):
        raise ValueError(
            f"vgg_cfg: convs_per_stage has {len(convs_per_stage)} stages but widths has {len(widths)}"
        )
    cfg: list[int | str] = []
    for num_convs, stage_width in zip(convs_per_stage, widths):
        if num_convs < 1 or stage_width < 1:
            raise ValueError(f"vgg_cfg: every stage needs >= 1 conv of >= 1 channels, got {num_convs}x{stage_width}")
        cfg.extend([int(stage_width)] * int(num_convs))
        cfg.append(_POOL)
    return tuple(cfg)


class _VGG(nn.Module):
    """features -> flatten -> classifier; see :func:`vgg`."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.flatten = nn.Flatten()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_outputs)."""
        return self.classifier(self.flatten(self.features(x)))


def vgg(
    cfg: Sequence[int | str] = (16, "M", 32, "M", 64, "M"),
    batch_norm: bool = True,
    width_multiplier: float = 1.0,
    hidden: int = 64,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    num_outputs: int = 10,
) -> nn.Module:
    """VGG: input (N, in_channels, image_size, image_size) -> (N, num_outputs).

    ``features`` is ``Sequential(Conv3x3[, BatchNorm2d], ReLU, ..., MaxPool2d(2), ...)`` with conv
    widths ``round(c * width_multiplier)``; ``flatten`` yields (N, C * s * s) with
    ``s = image_size // 2**num_pools``; ``classifier`` is
    ``Sequential(Linear(C*s*s, round(hidden*width_multiplier)), ReLU, Linear(.., num_outputs))``.
    Unlike resnet, the input size is baked into the first Linear layer.
    """
    spatial = image_size
    channels = in_channels
    layers: list[nn.Module] = []
    for entry in cfg:
        if entry == _POOL:
            if spatial < 2:
                raise ValueError(f"vgg: cfg {tuple(cfg)!r} pools image_size {image_size} below 1x1")
            layers.append(nn.MaxPool2d(2))
            spatial //= 2
            continue
        if isinstance(entry, bool) or not isinstance(entry, int) or entry < 1:
            raise ValueError(f"vgg: cfg entries must be positive ints or 'M', got {entry!r}")
        out_channels = max(1, round(entry * width_multiplier))
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        channels = out_channels
    if not any(isinstance(layer, nn.Conv2d) for layer in layers):
        raise ValueError(f"vgg: cfg {tuple(cfg)!r} has no convolution")
    hidden_width = max(1, round(hidden * width_multiplier))
    classifier = nn.Sequential(
        nn.Linear(channels * spatial * spatial, hidden_width),
        nn.ReLU(),
        nn.Linear(hidden_width, num_outputs),
    )
    return _VGG(nn.Sequential(*layers), classifier)
