"""PCAR: parallel convolutional attention recalibration (PFADSeg, Sec. 3.2)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dilated import DilatedConv2d, weight_grad_is_unsafe
from .spr import SPR


class PCAR(nn.Module):
    """Drop-in replacement for a residual block's second 3x3 convolution.

    Three parallel 3x3 convolutions (dilations 1, 2, 3 by default: the paper's
    kernel sizes were lost in its text) give F_1..F_3; SPR turns each into
    channel weights, a softmax across the branches gives W_1..W_3, and the
    output is sum_i W_i * F_i. A dilated branch whose bf16 weight gradient
    oneDNN can get wrong trains through `DilatedConv2d` (the same conv).
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            DilatedConv2d(channels, channels, d) if weight_grad_is_unsafe(channels, d)
            else nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False) for d in dilations
        )
        self.spr = nn.ModuleList(SPR(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [conv(x) for conv in self.convs]  # F_1..F_K
        logits = torch.stack([spr(f) for spr, f in zip(self.spr, feats)], dim=1)  # (B, K, C, 1, 1)
        weights = torch.softmax(logits, dim=1).unbind(1)  # W_1..W_K, softmax across branches
        out = weights[0] * feats[0]
        for w, f in zip(weights[1:], feats[1:]):
            out = out + w * f
        return out
