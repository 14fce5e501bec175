"""The dtype an op would run in under the current autocast state."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype on x's device where autocast is on, else x's own: what a
    custom op must cast its inputs to, since autocast does not reach inside it."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
