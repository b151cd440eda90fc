"""A small ConvNeXt-style residual network that works channels-last inside its blocks.

Each block is ``x + permute_back(fc2(GELU(fc1(LayerNorm(permute(dwconv(x)))))))``: a depthwise
convolution on (N, C, H, W), then a permute to (N, H, W, C) so that LayerNorm and the Linear MLP
act on the last dim, then a permute back. Between stages a channels-last LayerNorm and a strided
2x2 convolution downsample, as in ConvNeXt. The channel count can equal the spatial size
(``width=8`` on 8x8 inputs: C == H == W), the case where a tensor's shape alone cannot tell the
channel dim; the merging passes must read it from the analysis.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ConvNeXtBlock", "convnext"]


def _channels_last_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm over the channels of (N, C, H, W): permute to (N, H, W, C) and back."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """(N, C, H, W) -> (N, C, H, W): depthwise conv, channels-last LayerNorm + MLP, residual add."""

    def __init__(self, channels: int, mlp_ratio: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, mlp_ratio * channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class _Downsample(nn.Module):
    """(N, C, H, W) -> (N, C_out, H // 2, W // 2): channels-last LayerNorm, then a 2x2 stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_channels_last_norm(self.norm, x))


class _ConvNeXt(nn.Module):
    """stem -> stage1 [-> downsample -> stage2 ...] -> pool -> flatten -> LayerNorm -> head."""

    def __init__(self, blocks_per_stage: Sequence[int], base_width: int, mlp_ratio: int, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, base_width, 3, padding=1)
        self.stem_norm = nn.LayerNorm(base_width)
        self.stage_names: tuple[str, ...] = tuple(f"stage{i + 1}" for i in range(len(blocks_per_stage)))
        channels = base_width
        for index, num_blocks in enumerate(blocks_per_stage):
            width = base_width * 2**index
            layers: list[nn.Module] = [] if index == 0 else [_Downsample(channels, width)]
            layers += [ConvNeXtBlock(width, mlp_ratio) for _ in range(num_blocks)]
            setattr(self, self.stage_names[index], nn.Sequential(*layers))
            channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_outputs)."""
        x = _channels_last_norm(self.stem_norm, self.stem(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.head(self.norm(self.flatten(self.pool(x))))


def convnext(
    blocks_per_stage: Sequence[int] = (1, 1),
    width: int = 8,
    width_multiplier: float = 1.0,
    mlp_ratio: int = 2,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    num_outputs: int = 10,
) -> nn.Module:
    """ConvNeXt-style net: input (N, in_channels, image_size, image_size) -> (N, num_outputs).

    Stage ``i`` (1-based) has ``round(width * width_multiplier) * 2**(i-1)`` channels and
    ``blocks_per_stage[i-1]`` ``ConvNeXtBlock``s (MLP hidden width ``mlp_ratio`` times the
    channels); every stage after the first starts by halving the spatial size. The stem is a
    3x3 conv (stride 1) with a channels-last LayerNorm, so stage 1 runs at the input size.
    Returned in train mode.
    """
    if len(blocks_per_stage) == 0 or any(int(n) < 1 for n in blocks_per_stage):
        raise ValueError(f"convnext: blocks_per_stage must be non-empty positive ints, got {blocks_per_stage!r}")
    base_width = round(width * width_multiplier)
    if base_width < 1 or mlp_ratio < 1:
        raise ValueError(f"convnext: width {width} * width_multiplier {width_multiplier} = {base_width} and mlp_ratio {mlp_ratio} must be >= 1")
    if in_channels < 1 or num_outputs < 1 or image_size < 2 ** (len(blocks_per_stage) - 1):
        raise ValueError(
            f"convnext: in_channels={in_channels}, num_outputs={num_outputs} must be >= 1 and image_size={image_size} "
            f"at least {2 ** (len(blocks_per_stage) - 1)} for {len(blocks_per_stage)} stages"
        )
    return _ConvNeXt(tuple(int(n) for n in blocks_per_stage), base_width, mlp_ratio, in_channels, num_outputs)
