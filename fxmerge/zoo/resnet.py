"""CIFAR-style ResNet built from BasicBlocks, laid out so that torch.fx graphs stay regular.

Every Conv/BatchNorm/ReLU is its own module and is called exactly once, so a graph node maps
one-to-one onto a module; the merging passes rely on that to find units along the graph.
``dims`` = 1, 2 or 3 builds the same network from Conv1d/BatchNorm1d (signals (N, C, L)),
Conv2d/BatchNorm2d (images) or Conv3d/BatchNorm3d (volumes (N, C, D, H, W)).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BasicBlock", "resnet"]

# dims -> (conv, batch norm, adaptive average pooling) for (N, C, *spatial) inputs of len(spatial) == dims
_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d),
}


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims not in _LAYERS:
        raise ValueError(f"resnet: dims must be 1, 2 or 3 (spatial dims of the input), got {dims!r}")
    return _LAYERS[dims]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    Input (N, in_channels, H, W) -> output (N, out_channels, ceil(H/stride), ceil(W/stride))
    (``dims=2``; ``dims=1``: (N, C, L), ``dims=3``: (N, C, D, H, W), every spatial dim strided).
    The shortcut is an empty ``nn.Sequential`` (identity) when shapes already agree, otherwise a
    strided 1x1 convolution followed by BatchNorm (the usual projection shortcut). ``groups``:
    the groups of both 3x3 convolutions (ResNeXt-style grouped convs; the shortcut stays dense).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dims: int = 2, groups: int = 1) -> None:
        super().__init__()
        conv, norm, _ = _layers(dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, groups=groups)
        self.bn1 = norm(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False, groups=groups)
        self.bn2 = norm(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False),
                norm(out_channels),
            )
        # A separate module (rather than relu1 reused) keeps one module per call site.
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _ResNet(nn.Module):
    """stem -> stage1 .. stageK -> pool -> flatten -> head; see :func:`resnet`."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        base_width: int,
        in_channels: int,
        num_outputs: int,
        dims: int = 2,
        groups: int = 1,
    ) -> None:
        super().__init__()
        conv, norm, pool = _layers(dims)
        self.stem = nn.Sequential(
            conv(in_channels, base_width, 3, stride=1, padding=1, bias=False),
            norm(base_width),
            nn.ReLU(),
        )
        self.stage_names: tuple[str, ...] = tuple(f"stage{i + 1}" for i in range(len(blocks_per_stage)))
        channels = base_width
        for stage_index, num_blocks in enumerate(blocks_per_stage):
            stage_width = base_width * 2**stage_index
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if (stage_index > 0 and block_index == 0) else 1
                blocks.append(BasicBlock(channels, stage_width, stride, dims, groups))
                channels = stage_width
            setattr(self, self.stage_names[stage_index], nn.Sequential(*blocks))
        self.pool = pool(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, *spatial) -> (N, num_outputs), ``len(spatial) == dims``."""
        x = self.stem(x)
        # The loop runs over a fixed tuple of names, so symbolic tracing simply unrolls it.
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.head(self.flatten(self.pool(x)))


def resnet(
    blocks_per_stage: Sequence[int] = (1, 1, 1),
    width: int = 16,
    width_multiplier: float = 1.0,
    dims: int = 2,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    num_outputs: int = 10,
    groups: int = 1,
) -> nn.Module:
    """CIFAR-style ResNet: input (N, in_channels, image_size, image_size) -> (N, num_outputs).

    ``dims``: spatial dims of the input, 1 (N, in_channels, L: Conv1d), 2 (images: Conv2d) or 3
    (N, in_channels, D, H, W: Conv3d); every spatial extent is ``image_size``.

    Stage ``i`` (1-based) has ``round(width * width_multiplier) * 2**(i-1)`` channels and
    ``blocks_per_stage[i-1]`` BasicBlocks; the first block of every stage after the first halves
    the spatial size. ``image_size`` only validates the input size: global average pooling makes
    the network itself size-agnostic. ``groups``: groups of every block's 3x3 convolutions
    (must divide the base width). Returned in train mode, like torchvision's factories.
    """
    if len(blocks_per_stage) == 0 or any(int(n) < 1 for n in blocks_per_stage):
        raise ValueError(f"resnet: blocks_per_stage must be non-empty positive ints, got {blocks_per_stage!r}")
    base_width = round(width * width_multiplier)
    if base_width < 1:
        raise ValueError(f"resnet: width {width} * width_multiplier {width_multiplier} rounds to {base_width} < 1")
    if image_size < 1 or in_channels < 1 or num_outputs < 1:
        raise ValueError(
            f"resnet: in_channels={in_channels}, image_size={image_size}, num_outputs={num_outputs} must be >= 1"
        )
    if groups < 1 or base_width % groups:
        raise ValueError(f"resnet: groups={groups} must be >= 1 and divide the base width {base_width}")
    return _ResNet(tuple(int(n) for n in blocks_per_stage), base_width, in_channels, num_outputs, dims, groups)
