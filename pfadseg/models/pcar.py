"""PCAR: parallel convolutional attention recalibration (PFADSeg Sec. 3.2, Eqs. 5-9)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .spr import SPR


class PCAR(nn.Module):
    """Drop-in replacement for a residual block's second 3x3 convolution.

    Eq. 5: parallel 3x3 convolutions (dilations 1, 2, 3 by default: the paper's
    kernel sizes were lost from its text) give F_1..F_K. Eq. 6: SPR turns each
    F_i into channel weights. Eq. 7: a softmax across the branches gives
    W_1..W_K. Eqs. 8-9: out = sum_i W_i * F_i.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False) for d in dilations)
        self.spr = nn.ModuleList(SPR(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [conv(x) for conv in self.convs]  # Eq. 5: F_1..F_K
        logits = torch.stack([spr(f) for spr, f in zip(self.spr, feats)], dim=1)  # Eq. 6: (B, K, C, 1, 1)
        weights = torch.softmax(logits, dim=1).unbind(1)  # Eq. 7: W_1..W_K, across the branches
        out = weights[0] * feats[0]  # Eqs. 8-9: sum_i W_i * F_i
        for w, f in zip(weights[1:], feats[1:]):
            out = out + w * f
        return out
