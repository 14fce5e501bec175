"""The segmentation network on teacher-student feature differences (PFADSeg Sec. 3.3)."""
from __future__ import annotations

import torch
from torch import nn

from .aspp import ASPP, conv_bn_relu
from .rcm import RCM
from .residual import BlockOptions, init_weights, make_stage


class SegmentationNet(nn.Module):
    """Two residual blocks (C_in -> 256), then the context module (DeSTSeg's
    ASPP, or PFADSeg's RCM), a 3x3 conv-BN-ReLU and a 1x1 conv to one logit."""

    def __init__(self, in_channels: int, rcm: bool = False,
                 opts: BlockOptions = BlockOptions(), width: int = 256) -> None:
        super().__init__()
        self.res = make_stage(in_channels, width, 2, 1, opts)
        init_weights(self.res)
        self.head = nn.Sequential(
            RCM(width) if rcm else ASPP(width, width),
            conv_bn_relu(width, width, 3),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H, W); the anomaly probability is their sigmoid."""
        return self.head(self.res(x))
