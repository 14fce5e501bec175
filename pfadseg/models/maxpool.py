"""Max pooling that trains through ATen's own kernels under torch.compile."""
from __future__ import annotations

import torch
from torch import nn

from .layout import layout_of


def _pool(x: torch.Tensor, kernel: int, stride: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square max pooling of x: (pooled map, argmax indices), both in x's layout.
    On fake tensors ATen's shape rules give the fake outputs."""
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, [kernel] * 2, [stride] * 2, [padding] * 2)
    layout = layout_of(x)
    return out.contiguous(memory_format=layout), indices.contiguous(memory_format=layout)


max_pool2d = torch.library.custom_op("pfadseg::max_pool2d", _pool, mutates_args=())
max_pool2d.register_fake(_pool)


@torch.library.custom_op("pfadseg::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                        kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Gradient of `max_pool2d` for x: each pooled gradient goes to its argmax."""
    gx = torch.ops.aten.max_pool2d_with_indices_backward(
        grad.contiguous(memory_format=layout_of(indices)), x, [kernel] * 2, [stride] * 2, [padding] * 2,
        [1, 1], False, indices)
    return gx.contiguous(memory_format=layout_of(x))


@max_pool2d_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
      kernel: int, stride: int, padding: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x))


def _save(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, *ctx.window = inputs
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _: torch.Tensor) -> tuple:
    x, indices = ctx.saved_tensors
    return max_pool2d_backward(grad, x, indices, *ctx.window), None, None, None


max_pool2d.register_autograd(_backward, setup_context=_save)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with a square window (same values) that trains through `max_pool2d`.

    Compiled, Inductor wrote the student stem's pooling (3x3, stride 2, on a
    bf16 16x64x128x128 map) and its backward as its own kernels: the forward
    again in the backward to find the argmax, then a scatter. With ATen's two
    kernels (about 11 ms together) a compiled PFADSeg stage-1 step at batch 16
    took 1.066 instead of 1.103 s (one process, steps alternating, AMD EPYC).
    Without gradients it is nn.MaxPool2d's forward.
    """

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__(kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)[0]  # type: ignore[arg-type]
