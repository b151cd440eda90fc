"""Small Vision Transformers (torchvision's implementation) sized for toy images."""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # torchvision is imported when a ViT is built, not with fxmerge
    from torchvision.models import VisionTransformer

__all__ = ["vit"]


def vit(
    patch_size: int = 2,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 32,
    mlp_dim: int = 64,
    width_multiplier: float = 1.0,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    num_outputs: int = 10,
) -> VisionTransformer:
    """torchvision ``VisionTransformer``: (N, in_channels, image_size, image_size) -> (N, num_outputs).

    ``hidden_dim * width_multiplier`` is rounded to a multiple of ``num_heads`` (at least one per
    head) so attention heads keep equal size; ``mlp_dim`` is scaled and rounded. Two deviations
    from torchvision, both to make the family usable here:

    * ``conv_proj`` is rebuilt for ``in_channels != 3`` (torchvision hard-codes RGB), with
      torchvision's own init scheme (truncated normal, std sqrt(1/fan_in), zero bias).
    * ``heads.head`` gets nn.Linear's default init instead of torchvision's all-zero init: a zero
      head makes every output exactly 0 at init, which defeats trace/eager equality checks and
      gives a degenerate gradient when outputs are L2-normalised (CLIP-style TextHead).
    """
    from torchvision.models import VisionTransformer

    if image_size % patch_size != 0:
        raise ValueError(f"vit: image_size {image_size} is not divisible by patch_size {patch_size}")
    if num_heads < 1 or num_layers < 1:
        raise ValueError(f"vit: num_heads={num_heads}, num_layers={num_layers} must be >= 1")
    heads_width = max(1, round(hidden_dim * width_multiplier / num_heads))
    scaled_hidden = heads_width * num_heads
    scaled_mlp = max(1, round(mlp_dim * width_multiplier))
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=scaled_hidden,
        mlp_dim=scaled_mlp,
        num_classes=num_outputs,
    )
    if in_channels != 3:
        conv_proj = nn.Conv2d(in_channels, scaled_hidden, kernel_size=patch_size, stride=patch_size)
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(conv_proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(conv_proj.bias)
        model.conv_proj = conv_proj
    model.heads.head.reset_parameters()
    return model
