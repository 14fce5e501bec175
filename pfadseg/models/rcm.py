"""RCM: rectangular self-calibration module (CGRSeg, Ni et al., 2024), which
replaces ASPP in PFADSeg's segmentation network (Sec. 3.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RectangularAttention(nn.Module):
    """Rectangular self-calibration attention: a depthwise 3x3 conv L, gated by an
    attention built from horizontal and vertical strip pooling."""

    def __init__(self, channels: int, band: int = 11) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.excite = nn.Sequential(
            nn.Conv2d(channels, channels, (1, band), padding=(0, band // 2), groups=channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, (band, 1), padding=(band // 2, 0), groups=channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)  # L
        # average pool over the width (B,C,H,1) plus over the height (B,C,1,W),
        # broadcast: a rectangle of context at every pixel
        context = F.adaptive_avg_pool2d(x, (None, 1)) + F.adaptive_avg_pool2d(x, (1, None))
        attention = self.excite(context)  # 1 x band conv, BN, ReLU, band x 1 conv, sigmoid
        return attention * local


class RCM(nn.Module):
    """out = x + gamma * MLP(BN(attention(x) * L(x))), gamma a per-channel layer scale."""

    def __init__(self, channels: int, band: int = 11, mlp_ratio: int = 2,
                 layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.attention = RectangularAttention(channels, band)
        self.norm = nn.BatchNorm2d(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, mlp_ratio * channels, 1),
            nn.GELU(),
            nn.Conv2d(mlp_ratio * channels, channels, 1),
        )
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.attention(x)))
        return x + self.gamma.view(1, -1, 1, 1) * y
