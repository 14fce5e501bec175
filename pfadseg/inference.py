"""Batched inference on any device: anomaly maps and image scores of uint8 images."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .models import AnomalyModel, image_scores
from .predict import MapFn
from .runtime import autocast, compiled, device_of, place, step_begin

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # input -> (seg, dest)


def to_input(images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] on `device` (the uint8 batch is what
    crosses to a GPU: a quarter of the bytes)."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def forward_fn(model: AnomalyModel, bf16: bool = True, compile: bool = False) -> Forward:
    """The model's inference forward on its own device, set up once: eval mode,
    that device's memory layout, bf16 autocast where it pays, and with `compile`
    torch.compile (the first batch then takes a minute or two to compile)."""
    device = device_of(model)
    place(model.eval(), device)
    fn = compiled(model, device, frozen=True) if compile else model

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step_begin(device)
        with autocast(device, bf16):
            return fn(x)
    return run


@torch.no_grad()
def run_batches(forward: Forward, images: torch.Tensor, batch_size: int, device: torch.device,
                pad: bool = False, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation maps, DeST maps (both float32 (N, H, W)) and image scores (N,)
    of uint8 images, `batch_size` at a time. `pad` fills a short last batch up to
    `batch_size` (with zeros, dropped again) so a compiled forward sees one shape."""
    segs, dests, scores = [], [], []
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc="inference", unit="batch", disable=not progress, leave=False):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if pad and n < batch_size:
            chunk = F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, batch_size - n))
        seg, dest = forward(to_input(chunk, device))
        seg, dest = seg[:n].float(), dest[:n].float()
        segs.append(seg[:, 0].cpu())
        dests.append(dest[:, 0].cpu())
        scores.append(image_scores(seg).cpu())
    return torch.cat(segs).numpy(), torch.cat(dests).numpy(), torch.cat(scores).numpy()


def infer(model: AnomalyModel, images: torch.Tensor, batch_size: int = 16, bf16: bool = True,
          compile: bool = False, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation maps, DeST maps (both float32 (N, H, W)) and image scores (N,)
    of uint8 images (N, 3, S, S), on the device the model is on."""
    size = model.config.image_size
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and tuple(images.shape[1:]) == (3, size, size)):
        got = (f"{images.dtype} {tuple(images.shape)}" if hasattr(images, "shape")
               else type(images).__name__)
        raise ValueError(f"images must be a uint8 tensor (N, 3, {size}, {size}) for this model, got "
                         f"{got}. Fix: load them with pfadseg.data.load_image_folder(folder, {size}), "
                         "or use Detector.predict, which takes images of any size.")
    forward = forward_fn(model, bf16, compile)
    return run_batches(forward, images, batch_size, device_of(model), pad=compile, progress=progress)


def torch_map_fn(model: AnomalyModel, bf16: bool = True, compile: bool = False,
                 batch_size: int = 8) -> MapFn:
    """A `predict` backend: uint8 batch -> (segmentation maps (B, S, S), image scores (B,)).
    The forward is set up (and compiled) once, for batches of `batch_size`."""
    forward = forward_fn(model, bf16, compile)

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        seg, _, scores = run_batches(forward, images, batch_size, device_of(model), pad=compile)
        return seg, scores
    return run
