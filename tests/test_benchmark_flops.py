"""The speed benchmark's FLOP count: torch's counter with grouped conv backwards fixed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

spec = importlib.util.spec_from_file_location("speed", Path(__file__).parents[1] / "benchmarks" / "speed.py")
speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed)


def _forward_backward_flops(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    x = x.requires_grad_(True)
    forward = speed.count_flops(lambda: conv(x))
    return forward, speed.count_flops(lambda: conv(x).sum().backward())


def test_dense_conv_backward_is_twice_its_forward() -> None:
    forward, total = _forward_backward_flops(nn.Conv2d(8, 16, 3, padding=1), torch.rand(2, 8, 10, 10))
    assert forward == 2 * 2 * 16 * 10 * 10 * 8 * 9
    assert total == 3 * forward


def test_depthwise_conv_backward_is_counted_per_group() -> None:
    conv = nn.Conv2d(16, 16, (11, 1), padding=(5, 0), groups=16)
    forward, total = _forward_backward_flops(conv, torch.rand(2, 16, 12, 12))
    assert forward == 2 * 2 * 16 * 12 * 12 * 11
    assert total == 3 * forward  # torch's own formula gives forward * (2 + 16)
