"""AFF: attentional feature fusion (Dai et al., WACV 2021), PFADSeg Sec. 3.1.

In PFADSeg's PA residual block it replaces the residual sum (Fig. 3).
"""
from __future__ import annotations

import torch
from torch import nn


def _context(channels: int, inner: int, pooled: bool) -> nn.Sequential:
    """1x1 conv C->C/r, BN, ReLU, 1x1 conv C/r->C, BN; after a global average pool if `pooled`."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    layers += [
        nn.Conv2d(channels, inner, 1),
        nn.BatchNorm2d(inner),
        nn.ReLU(inplace=True),
        nn.Conv2d(inner, channels, 1),
        nn.BatchNorm2d(channels),
    ]
    return nn.Sequential(*layers)


class AFF(nn.Module):
    """Fuse a branch X with an identity Y by a learned soft selection:

        U = X + Y,   M = sigmoid(L(U) + G(U)),   out = M * X + (1 - M) * Y

    with L the local (per-pixel) context and G the global (pooled) one. This is
    the paper's convex combination; the reference code's extra factor 2 on both
    terms is left out.
    """

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        inner = max(channels // r, 1)
        self.local = _context(channels, inner, pooled=False)
        self.glob = _context(channels, inner, pooled=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = x + y
        m = torch.sigmoid(self.local(u) + self.glob(u))
        return m * x + (1 - m) * y
