"""RCM: rectangular self-calibration module (CGRSeg, Ni et al., 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import BatchNorm2d
from .depthwise import DepthwiseConv2d
from .layout import like


def band_conv_of_profiles(conv: nn.Conv2d, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """conv(rows + cols) for a depthwise 1 x k conv with zero padding, computed
    on the profiles rows (B, C, H, 1) and cols (B, C, 1, W) instead of the full map.

    The conv is linear, and along a row `rows` is a constant, whose response is
    the sum of the kernel taps that fall inside the map. Same values as the conv
    of the broadcast sum; its backward on the full map (oneDNN's depthwise
    kernel) took about a tenth of a bf16 stage-2 step for PFADSeg at 256x256.
    """
    ones = torch.ones_like(cols[:1])
    tap_sums = F.conv2d(ones, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return rows * tap_sums + conv(cols)


class RectangularAttention(nn.Module):
    """Rectangular self-calibration attention: a depthwise 3x3 conv L, gated by
    an attention built from horizontal and vertical strip pooling."""

    def __init__(self, channels: int, band: int = 11) -> None:
        super().__init__()
        self.local = DepthwiseConv2d(channels, 3, padding=1)
        self.excite = nn.Sequential(
            nn.Conv2d(channels, channels, (1, band), padding=(0, band // 2), groups=channels),
            BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            DepthwiseConv2d(channels, (band, 1), padding=(band // 2, 0)),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooling over width (B,C,H,1) plus over height (B,C,1,W) broadcasts to a
        # rectangle of context; its 1 x band conv is taken on the two profiles
        rows, cols = x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True)
        band_row, *rest = self.excite  # rest: BN, ReLU, band x 1 conv, sigmoid
        attention = like(band_conv_of_profiles(band_row, rows, cols), x)
        for layer in rest:
            attention = layer(attention)
        return attention * self.local(x)


class RCM(nn.Module):
    """x + gamma * MLP(BN(attention(x))), with a per-channel layer scale gamma."""

    def __init__(self, channels: int, band: int = 11, mlp_ratio: int = 2,
                 layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.attention = RectangularAttention(channels, band)
        self.norm = BatchNorm2d(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, mlp_ratio * channels, 1),
            nn.GELU(),
            nn.Conv2d(mlp_ratio * channels, channels, 1),
        )
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.attention(x)))
        return x + self.gamma.view(1, -1, 1, 1) * y
