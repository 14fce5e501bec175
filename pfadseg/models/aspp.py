"""ASPP head of DeSTSeg's segmentation network (atrous spatial pyramid pooling)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .batchnorm import BatchNorm2d
from .layout import like
from .pooling import GlobalAvgPool


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU with 'same' padding."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """A global-pooling branch plus dilated 3x3 branches, fused by a 3x3 conv
    (the layout of the official DeSTSeg code: rates 6, 12, 18)."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.pool = nn.Sequential(GlobalAvgPool(), conv_bn_relu(cin, cout, 1))
        self.branches = nn.ModuleList(conv_bn_relu(cin, cout, 3, r) for r in rates)
        self.fuse = conv_bn_relu((1 + len(rates)) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the official code upsamples the 1x1 pooled branch bilinearly: a constant map
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.fuse(like(torch.cat([pooled] + [b(x) for b in self.branches], dim=1), x))
