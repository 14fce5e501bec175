"""Batched inference on CPU: bf16 autocast + channels_last where they help."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .models import AnomalyModel, image_scores
from .predict import MapFn


def bf16_supported() -> bool:
    """True where this CPU runs bf16 matrix kernels natively (AVX512-BF16/AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def autocast(enabled: bool) -> Iterator[None]:
    """bf16 autocast on the CPU when enabled and supported, else a no-op."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and bf16_supported()):
        yield


def to_input(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1], in the memory layout the model uses."""
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def prepare(model: AnomalyModel, channels_last: bool = True) -> AnomalyModel:
    """Eval mode, and channels_last weights when asked for."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def infer(model: AnomalyModel, images: torch.Tensor, batch_size: int = 16,
          bf16: bool = True, channels_last: bool = True,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation maps, DeST maps (both float32 (N, H, W)) and image scores (N,).

    Each image goes through the teacher and the student once.
    """
    prepare(model, channels_last)
    segs, dests, scores = [], [], []
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc="inference", unit="batch", disable=not progress, leave=False):
        x = to_input(images[start:start + batch_size], channels_last)
        with autocast(bf16):
            seg, dest = model(x)
        segs.append(seg[:, 0].float())
        dests.append(dest[:, 0].float())
        scores.append(image_scores(seg.float()))
    return (torch.cat(segs).numpy(), torch.cat(dests).numpy(), torch.cat(scores).numpy())


def torch_map_fn(model: AnomalyModel, bf16: bool = True) -> MapFn:
    """A `predict` backend: uint8 batch -> (segmentation maps (B, S, S), image scores (B,))."""
    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        seg, _, scores = infer(model, images, batch_size=len(images), bf16=bf16)
        return seg, scores
    return run
