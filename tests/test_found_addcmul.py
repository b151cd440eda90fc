"""Found by benchmarks/timm_models.py (resmlp_12_224): ``torch.addcmul`` has no rule, so ResMLP's
``Affine`` norm (``torch.addcmul(beta, alpha, x)``: per-channel scale and shift) fixes the whole
residual stream (coverage 42%). An elementwise op whose operands share the channel axis keeps
the group, like ``beta + alpha * x`` does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_invariant
from torch import nn

import fxmerge


class Affine(nn.Module):
    """timm's ``resmlp.Affine``: ``alpha * x + beta`` over the last dim, as ``torch.addcmul``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, 1, dim))
        self.beta = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, dim) -> (N, L, dim)
        return torch.addcmul(self.beta, self.alpha, x)


@pytest.mark.xfail(strict=True, reason="no rule for torch.addcmul yet: its channels are kept fixed")
def test_addcmul_keeps_the_channel_group_free() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Affine(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 5, 8)
    analysis = fxmerge.analyze(model, x)
    hidden = [g for g in analysis.groups if g.size == 16]
    assert hidden and not any(g.fixed for g in hidden), [(g.name, g.reason) for g in hidden]
    assert_invariant(model, x, analysis, min_changed_fraction=0.5)
