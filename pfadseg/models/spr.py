"""SPR: spatial pyramid recalibration (Yu et al., 2024), PCAR's channel weighting."""
from __future__ import annotations

import torch
from torch import nn


class SPR(nn.Module):
    """Channel weights in (0, 1) from a two-level spatial pyramid of averages.

    Pool the input to 1x1 and to 2x2, flatten and concatenate (5C values), then
    1x1 conv 5C->C/16, ReLU, 1x1 conv C/16->C, sigmoid. Returns (B, C, 1, 1).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Sequential(
            nn.Conv2d(5 * channels, inner, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pyramid = torch.cat([self.pool1(x).flatten(1), self.pool2(x).flatten(1)], dim=1)
        return self.fc(pyramid.view(b, -1, 1, 1))
