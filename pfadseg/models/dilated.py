"""Dilated convolution whose bf16 weight gradient does not hit a wrong oneDNN kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autocast import compute_dtype
from .layout import layout_of


def weight_grad_is_unsafe(in_channels: int, dilation: int) -> bool:
    """Whether oneDNN's bf16 channels-last weight gradient can be wrong for this conv.

    With torch 2.14.1 on an AVX512-BF16 CPU without AMX (AMD EPYC), the weight
    gradient of a dilated 3x3 conv under bf16 autocast, channels-last, came out
    as NaN, inf or 25-80% off, and once crashed the process, for every input
    channel count from 20 to 124 that is not a multiple of 16 (dilations 2 and
    3, maps of 30x30 and up). It was right for 3-16 channels and the multiples
    of 16, for maps up to 28x28, undilated, in NCHW and in fp32. Lite0's 24
    and 40 channels put such convs in PFADSeg's student decoder, whose stage-1
    loss turned NaN at the second step at 256x256.
    """
    return dilation > 1 and in_channels > 16 and in_channels % 16 != 0


@torch.library.custom_op("pfadseg::dilated_conv_backward", mutates_args=())
def dilated_conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for x and weight of a stride-1 'same' dilated conv without bias;
    the weight gradient from NCHW copies where `weight_grad_is_unsafe` says so."""
    conv = ([1, 1], [dilation] * 2, [dilation] * 2, False, [0, 0], 1)  # stride .. groups
    backward = torch.ops.aten.convolution_backward
    if x.dtype == torch.bfloat16 and weight_grad_is_unsafe(x.shape[1], dilation):
        gx = backward(grad, x, weight, None, *conv, [True, False, False])[0]
        gw = backward(grad.contiguous(), x.contiguous(), weight.contiguous(), None, *conv, [False, True, False])[1]
    else:
        gx, gw, _ = backward(grad, x, weight, None, *conv, [True, True, False])
    return gx.contiguous(memory_format=layout_of(x)), gw.contiguous(memory_format=layout_of(weight))


@dilated_conv_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
      dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x)),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device, memory_format=layout_of(weight)))


class _DilatedConv(torch.autograd.Function):
    """F.conv2d forward; `dilated_conv_backward` backward (an opaque op, so that
    Inductor cannot hand the weight gradient channels-last copies again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        return F.conv2d(x, weight, padding=dilation, dilation=dilation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx, gw = dilated_conv_backward(grad, x, weight, ctx.dilation)
        return gx, gw, None


class DilatedConv2d(nn.Conv2d):
    """A 3x3 'same' dilated nn.Conv2d without bias (same weights, same values)
    that trains through `dilated_conv_backward`. Eval mode, no-grad and export
    use nn.Conv2d's own forward."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        dtype = compute_dtype(x)
        return _DilatedConv.apply(x.to(dtype), self.weight.to(dtype), self.dilation[0])
