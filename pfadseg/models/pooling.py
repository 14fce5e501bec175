"""Average pooling over equal cells whose gradient keeps a channels-last input's layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import layout_of


class _CellMeans(torch.autograd.Function):
    """avg_pool2d with a kernel that tiles the map; the backward spreads each
    cell's gradient over the cell in one write, in the input's memory layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.layout, ctx.kernel = x.shape, layout_of(x), kernel
        return F.avg_pool2d(x, kernel_size=kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        b, c, rows, cols = grad.shape
        kh, kw = ctx.kernel
        dx = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        dx.view(b, c, rows, kh, cols, kw).copy_((grad / (kh * kw))[:, :, :, None, :, None])
        return dx, None


def cell_means(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, rows, cols) means over equal cells (rows divides H, cols W).

    The same values as avg_pool2d with the cell as its kernel. In training the
    gradient goes through `_CellMeans`: avg_pool2d's own backward of a bf16
    channels-last map made an NCHW copy and converted it back (about 4.8 ms for
    a 16x64x64x64 map here), and bf16 PFADSeg training steps at batch 16 ran
    3-6% faster without it (eager stages 1 and 2, the same losses; compiled
    steps, whose backward Inductor writes itself, within 1%).
    """
    kernel = (x.shape[-2] // rows, x.shape[-1] // cols)
    if torch.is_grad_enabled() and x.requires_grad:
        return _CellMeans.apply(x, kernel)
    return F.avg_pool2d(x, kernel_size=kernel)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1) mean over the map.

    Same values as nn.AdaptiveAvgPool2d(1), whose backward returns an NCHW
    gradient for a channels-last input; summing that with the channels-last
    gradients of the other branches (AFF, SPR) cost about a fifth of a bf16
    training step.
    """
    return cell_means(x, 1, 1)


class GlobalAvgPool(nn.Module):
    """`global_avg_pool` as a layer, for nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)
