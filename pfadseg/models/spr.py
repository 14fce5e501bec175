"""SPR: spatial pyramid recalibration (Yu et al., 2024), the channel attention
inside PCAR (PFADSeg Sec. 3.2, Eq. 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pyramid_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pools of x to 1x1 and to 2x2: (B, C, 1, 1) and (B, C, 2, 2).

    For even sides the 2x2 cells are taken as a plain reduction over a view of
    x and the 1x1 mean as the mean of the cells (one pass over x); a pooling
    kernel that reduces a whole map to a few cells parallelises poorly on GPUs.
    """
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        return F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, 2)
    cells = x.unflatten(3, (2, w // 2)).unflatten(2, (2, h // 2)).mean(dim=(3, 5))
    return cells.mean(dim=(2, 3), keepdim=True), cells


class SPR(nn.Module):
    """Channel weights in (0, 1) from a two-level spatial pyramid of averages:
    pool to 1x1 and 2x2, flatten and concatenate (5C values), then
    1x1 conv 5C->C/16, ReLU, 1x1 conv C/16->C, sigmoid. Returns (B, C, 1, 1)."""

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
        return self.fc(pyramid[:, :, None, None])
