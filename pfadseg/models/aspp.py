"""ASPP head of DeSTSeg's segmentation network (atrous spatial pyramid pooling), which
PFADSeg replaces by RCM (Sec. 3.3)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU with 'same' padding."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """A global-pooling branch plus dilated 3x3 branches, fused by a 3x3 conv
    (the layout of the official DeSTSeg code: rates 6, 12, 18)."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout, 1))
        self.branches = nn.ModuleList(conv_bn_relu(cin, cout, 3, r) for r in rates)
        self.fuse = conv_bn_relu((1 + len(rates)) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the official code upsamples the 1x1 pooled branch bilinearly: a constant map
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        features = torch.cat([pooled] + [b(x) for b in self.branches], dim=1)
        # in the input's memory layout (the broadcast branch would make the concat NCHW)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return self.fuse(features.contiguous(memory_format=layout))
