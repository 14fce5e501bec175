"""The training losses of both stages (PFADSeg Sec. 3.1 Eqs. 2-4, Sec. 3.3 Eqs. 10-11)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit length over the channel axis: x / max(|x|, eps).

    The official x / (sqrt(sum x^2) + eps) has a NaN gradient at an all-zero
    feature vector (which a ReLU output can be); this form's is finite there.
    """
    norm = torch.linalg.vector_norm(x.float(), dim=1, keepdim=True).clamp_min(eps)
    return x / norm.to(x.dtype)


def cosine_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eqs. 2-3: 1 - cos(T, S) over channels at every pixel, (B, C, H, W) -> (B, 1, H, W)."""
    return 1 - (l2_normalize(t.float()) * l2_normalize(s.float())).sum(dim=1, keepdim=True)


def student_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 4, stage 1: the cosine distance of each level averaged over its pixels,
    summed over the three levels and over the batch (the official reduction,
    which the learning rates of the presets assume)."""
    return sum(cosine_distance(t, s).mean(dim=(2, 3)).sum() for t, s in zip(teacher, student))


def mask_target(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The synthetic mask downsampled bilinearly to the output size and thresholded at 0.5."""
    small = F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False)
    return (small >= 0.5).float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """Eq. 10: mean of BCE * (1 - p_t)^gamma (Lin et al.), from logits for stability;
    torchvision's focal loss without its class weight alpha."""
    return sigmoid_focal_loss(logits.float(), target, alpha=-1, gamma=gamma, reduction="mean")


def l1_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 11: mean |sigmoid(logits) - target|, which favours sparse, sharp masks."""
    return (torch.sigmoid(logits.float()) - target).abs().mean()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor,
                      gamma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: (focal, L1) of segmentation logits against a full-size synthetic mask."""
    target = mask_target(mask, logits.shape[-2:])
    return focal_loss(logits, target, gamma), l1_loss(logits, target)
