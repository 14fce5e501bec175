"""The denoising student (PFADSeg Sec. 3.1): a ResNet18-shaped encoder and its mirrored decoder.

DeSTSeg's student is a plain ResNet18 encoder; PFADSeg's ("PA_ResNet18") builds
the same network from PA residual blocks. The decoder uses only the deepest
encoder feature (no skips) and upsamples bilinearly instead of striding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .residual import BlockOptions, init_weights, make_stage

ENCODER_WIDTHS = (64, 128, 256, 512)


class StudentEncoder(nn.Module):
    """ResNet18 layout: 7x7 stem, max-pool, four stages of two blocks (stride 32, 512 ch)."""

    def __init__(self, opts: BlockOptions = BlockOptions()) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        w = ENCODER_WIDTHS
        self.stages = nn.Sequential(
            make_stage(w[0], w[0], 2, 1, opts),
            make_stage(w[0], w[1], 2, 2, opts),
            make_stage(w[1], w[2], 2, 2, opts),
            make_stage(w[2], w[3], 2, 2, opts),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class StudentDecoder(nn.Module):
    """Mirror of the encoder: 512->512 at 1/32, then upsample x2 before each of
    512->C3, C3->C2, C2->C1, emitting S3 (1/16), S2 (1/8), S1 (1/4)."""

    def __init__(self, out_channels: tuple[int, int, int], opts: BlockOptions = BlockOptions()) -> None:
        super().__init__()
        c1, c2, c3 = out_channels
        self.stage4 = make_stage(512, 512, 2, 1, opts)
        self.stage3 = make_stage(512, c3, 2, 1, opts)
        self.stage2 = make_stage(c3, c2, 2, 1, opts)
        self.stage1 = make_stage(c2, c1, 2, 1, opts)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        """x2 bilinear upsampling (the decoder's replacement for striding)."""
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s3 = self.stage3(self._up(self.stage4(x)))
        s2 = self.stage2(self._up(s3))
        s1 = self.stage1(self._up(s2))
        return [s1, s2, s3]


class Student(nn.Module):
    """Encoder-decoder whose three outputs take the teacher's channel counts."""

    def __init__(self, out_channels: tuple[int, int, int], opts: BlockOptions = BlockOptions()) -> None:
        super().__init__()
        self.encoder = StudentEncoder(opts)
        self.decoder = StudentDecoder(out_channels, opts)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x))
