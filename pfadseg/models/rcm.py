"""RCM: rectangular self-calibration module (CGRSeg, Ni et al., 2024)."""
from __future__ import annotations

import torch
from torch import nn


class RectangularAttention(nn.Module):
    """Rectangular self-calibration attention: a depthwise 3x3 conv L, gated by
    an attention built from horizontal and vertical strip pooling."""

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
        # (B,C,H,1) + (B,C,1,W) broadcasts to a rectangle of context
        strips = x.mean(dim=3, keepdim=True) + x.mean(dim=2, keepdim=True)
        return self.excite(strips) * self.local(x)


class RCM(nn.Module):
    """x + gamma * MLP(BN(attention(x))), with a per-channel layer scale gamma."""

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
