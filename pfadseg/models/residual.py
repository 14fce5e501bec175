"""Residual blocks: ResNet's BasicBlock and PFADSeg's PA residual block (Sec. 3.1, Fig. 3).

One class covers both: `pcar` swaps the second 3x3 conv for PCAR and `aff`
swaps the residual sum for AFF. With both off it is exactly ResNet's BasicBlock.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .aff import AFF
from .pcar import PCAR


@dataclass(frozen=True)
class BlockOptions:
    """Which PFADSeg modules the residual blocks use."""

    aff: bool = False
    pcar: bool = False
    pcar_dilations: tuple[int, ...] = (1, 2, 3)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3 (or PCAR)-BN, fused with the shortcut by sum (or AFF), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, opts: BlockOptions = BlockOptions()) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = (PCAR(cout, opts.pcar_dilations) if opts.pcar
                      else nn.Conv2d(cout, cout, 3, padding=1, bias=False))
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.aff = AFF(cout) if opts.aff else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = self.shortcut(x)
        out = self.aff(out, identity) if self.aff is not None else out + identity
        return self.relu(out)


def make_stage(cin: int, cout: int, blocks: int = 2, stride: int = 1,
               opts: BlockOptions = BlockOptions()) -> nn.Sequential:
    """A ResNet stage: the first block changes shape, the rest keep it."""
    layers = [ResidualBlock(cin, cout, stride, opts)]
    layers += [ResidualBlock(cout, cout, 1, opts) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Kaiming (fan_out) convolutions and unit BN, as ResNet and DeSTSeg do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
