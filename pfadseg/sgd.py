"""SGD with momentum whose fused CPU step updates channels-last weights where they lie.

torch's fused SGD kernel takes contiguous tensors only. Handed a channels-last
weight, gradient and momentum buffer, it copies each out and the results back:
for PFADSeg's student at 256x256 that made the step 33.5 ms against 14.8 ms
without the copies. A channels-last tensor is a contiguous NHWC tensor seen
through a permutation, and SGD is element-wise, so this class hands the kernel
those NHWC views instead: the same update, in place.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd


def dense_order(t: torch.Tensor) -> list[int]:
    """The dimension order in which a dense tensor is contiguous: (0, 2, 3, 1) for
    a channels-last 4-D tensor, the identity for a contiguous one."""
    return sorted(range(t.dim()), key=t.stride, reverse=True)


def _inverse(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)


def _view(t: torch.Tensor, order: list[int], like: torch.Tensor) -> torch.Tensor:
    """t permuted by `order`; first copied into `like`'s layout if that view would
    not be contiguous (a gradient or a loaded buffer in another layout)."""
    view = t.permute(order)
    return view if view.is_contiguous() else torch.empty_like(like).copy_(t).permute(order)


class SGD(torch.optim.SGD):
    """torch.optim.SGD(fused=True) that runs on every parameter in its own memory
    layout (channels-last or contiguous) without copies. No closure."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, momentum: float,
                 weight_decay: float) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("pfadseg.sgd.SGD takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            orders = [dense_order(p) for p in params]
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            buf_views = [None if b is None else _view(b, o, p) for p, o, b in zip(params, orders, bufs)]
            sgd([p.permute(o) for p, o in zip(params, orders)],
                [_view(p.grad, o, p) for p, o in zip(params, orders)],
                buf_views, fused=True, weight_decay=group["weight_decay"], momentum=group["momentum"],
                lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                maximize=group["maximize"])
            if group["momentum"] != 0:  # buffers made or copied in this step are kept
                for p, o, b in zip(params, orders, buf_views):
                    self.state[p]["momentum_buffer"] = b.permute(_inverse(o))
