"""SPR: spatial pyramid recalibration (Yu et al., 2024), PCAR's channel weighting."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import cell_means, global_avg_pool


def pyramid_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of x over 1x1 and 2x2 grids: (B, C, 1, 1) and (B, C, 2, 2).

    When the map splits into four equal cells (even sides) the 1x1 mean is the
    mean of the four cell means, so x is read once; that also halves the
    full-size gradients the backward writes, which made SPR a fifth of a bf16
    training step. Other sizes pool twice, as AdaptiveAvgPool2d does.
    """
    h, w = x.shape[-2:]
    if h % 2 == 0 and w % 2 == 0:
        cells = cell_means(x, 2, 2)
        return cells.mean(dim=(2, 3), keepdim=True), cells
    return global_avg_pool(x), F.adaptive_avg_pool2d(x, 2)


class SPR(nn.Module):
    """Channel weights in (0, 1) from a two-level spatial pyramid of averages.

    Pool the input to 1x1 and to 2x2, flatten and concatenate (5C values), then
    1x1 conv 5C->C/16, ReLU, 1x1 conv C/16->C, sigmoid. Returns (B, C, 1, 1).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.fc = nn.Sequential(
            nn.Conv2d(5 * channels, inner, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole, cells = pyramid_means(x)
        pyramid = torch.cat([whole.flatten(1), cells.flatten(1)], dim=1)
        return self.fc(pyramid.view(x.shape[0], -1, 1, 1))
