"""Fully connected networks on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["mlp"]


class _MLP(nn.Module):
    """flatten -> layers; see :func:`mlp`."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_outputs)."""
        return self.layers(self.flatten(x))


def mlp(
    hidden: Sequence[int] = (64, 64),
    layernorm: bool = False,
    width_multiplier: float = 1.0,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    num_outputs: int = 10,
) -> nn.Module:
    """MLP: input (N, in_channels, image_size, image_size) -> (N, num_outputs).

    ``layers = Sequential(Linear(in_channels*image_size**2, h1)[, LayerNorm(h1)], ReLU, ...,
    Linear(h_last, num_outputs))`` with ``h_i = round(hidden[i] * width_multiplier)``.
    """
    in_features = in_channels * image_size * image_size
    if in_features < 1:
        raise ValueError(f"mlp: in_channels={in_channels}, image_size={image_size} give no input features")
    layers: list[nn.Module] = []
    features = in_features
    for width in hidden:
        out_features = max(1, round(width * width_multiplier))
        layers.append(nn.Linear(features, out_features))
        if layernorm:
            layers.append(nn.LayerNorm(out_features))
        layers.append(nn.ReLU())
        features = out_features
    layers.append(nn.Linear(features, num_outputs))
    return _MLP(nn.Sequential(*layers))
