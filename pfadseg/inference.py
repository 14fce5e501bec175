"""Batched inference on CPU: bf16 autocast, channels_last and (optionally) Inductor."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .models import AnomalyModel, image_scores
from .predict import MapFn

log = logging.getLogger(__name__)
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # input -> (seg, dest)
Fn = TypeVar("Fn", bound=Callable)
# images per segmentation-net call within a batch: its 64x64 maps then stay in cache
# (PFADSeg at batch 16, 256x256, eager: 932 against 973 ms per batch; compiled, within
# the noise of one-process A/Bs: chunks of 2, 4, 8 and 16 within 3% of each other)
SEG_CHUNK = 4


def bf16_supported() -> bool:
    """True where this CPU runs bf16 matrix kernels natively (AVX512-BF16/AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compiler_available() -> bool:
    """Inductor (torch.compile's CPU backend) builds C++ kernels: is a compiler found?"""
    default = "cl" if sys.platform == "win32" else "clang++" if sys.platform == "darwin" else "g++"
    return shutil.which(os.environ.get("CXX", default)) is not None


def compiled(fn: Fn, frozen: bool = False, cpp_wrapper: bool = False) -> Fn:
    """`fn` compiled by Inductor for fixed input shapes.

    `frozen` treats the weights as constants: BatchNorm is folded into the
    convolutions and the oneDNN weights are pre-packed once. Use it only for
    weights that no longer change (inference, or the frozen networks of stage 2).
    `cpp_wrapper` (with `frozen`) calls the kernels from C++ instead of Python:
    2-3% faster inference at batch 16 (two A/Bs), for about 20 s more compiling.
    Without a C++ compiler `fn` is returned as it is, with a warning; a failed
    compilation falls back to eager PyTorch, also with a warning.
    """
    if not compiler_available():
        log.warning("no C++ compiler found (set CXX): running without torch.compile")
        return fn
    torch._dynamo.config.suppress_errors = True
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" noise
    from torch._inductor import config as inductor_config

    compiled_fn = torch.compile(fn, dynamic=False)
    if not frozen:
        return compiled_fn  # type: ignore[return-value]

    # Inductor compiles at the first call: freezing must be on then. (Passing it as
    # torch.compile(options=...) froze less here: 16.7 instead of 20 images/s.)
    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper):
            return compiled_fn(*args, **kwargs)
    return run  # type: ignore[return-value]


@contextlib.contextmanager
def autocast(enabled: bool) -> Iterator[None]:
    """bf16 autocast on the CPU when enabled and supported, else a no-op."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and bf16_supported()):
        yield


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1], NCHW.

    NCHW even for a channels_last model: its first convolution's output is
    channels_last all the same, and Inductor's kernel that normalises and pads
    a 3-channel input ran 7x slower from channels_last (24 vs 3.4 ms per batch
    of 16 at 256x256 for the EfficientNet-Lite0 teacher).
    """
    return images.float().div_(255.0)


def prepare(model: AnomalyModel, channels_last: bool = True) -> AnomalyModel:
    """Eval mode, and channels_last weights when asked for."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def forward_fn(model: AnomalyModel, bf16: bool = True, channels_last: bool = True,
               compile: bool = False) -> Forward:
    """The model's inference forward, set up once: eval mode, memory layout, bf16
    autocast, and with `compile` Inductor with frozen weights (the first batch
    then takes a minute or two to compile; later batches run about 2.5x faster)."""
    prepare(model, channels_last)
    fn = _compiled_forward(model) if compile else functools.partial(model, seg_chunk=SEG_CHUNK)

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(bf16):
            return fn(x)
    return run


def _compiled_forward(model: AnomalyModel) -> Forward:
    """`model(x, seg_chunk=SEG_CHUNK)` as three frozen graphs: teacher, student and
    their products; the segmentation net, compiled once and called per chunk;
    the maps at full size.

    In one graph the chunks unroll into copies of the segmentation net that share
    its weights, and Inductor folds batch norm into a convolution only when its
    weight has one user: PFADSeg at batch 16 took 557 instead of 603 ms per batch
    that way (one process, alternating), and compiled in 96 instead of 135 s.
    """
    features = compiled(model.segmentation_input, frozen=True, cpp_wrapper=True)
    segment = compiled(model.segmentation, frozen=True, cpp_wrapper=True)
    maps = compiled(model.anomaly_maps, frozen=True, cpp_wrapper=True)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, dists = features(x)
        chunk = math.gcd(len(x), SEG_CHUNK)  # equal chunks: one compiled shape
        logits = torch.cat([segment(part) for part in feats.split(chunk)])
        return maps(logits, dists, x.shape[-2:])
    return forward


@torch.no_grad()
def run_batches(forward: Forward, images: torch.Tensor, batch_size: int, pad: bool = False,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        seg, dest = forward(to_input(chunk))
        seg, dest = seg[:n].float(), dest[:n].float()
        segs.append(seg[:, 0])
        dests.append(dest[:, 0])
        scores.append(image_scores(seg))
    return (torch.cat(segs).numpy(), torch.cat(dests).numpy(), torch.cat(scores).numpy())


def infer(model: AnomalyModel, images: torch.Tensor, batch_size: int = 16,
          bf16: bool = True, channels_last: bool = True, compile: bool = False,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation maps, DeST maps (both float32 (N, H, W)) and image scores (N,).

    Each image goes through the teacher and the student once.
    """
    forward = forward_fn(model, bf16, channels_last, compile)
    return run_batches(forward, images, batch_size, pad=compile, progress=progress)


def torch_map_fn(model: AnomalyModel, bf16: bool = True, compile: bool = False,
                 batch_size: int = 8) -> MapFn:
    """A `predict` backend: uint8 batch -> (segmentation maps (B, S, S), image scores (B,)).

    The forward is set up (and compiled) once, for batches of `batch_size`.
    """
    forward = forward_fn(model, bf16, compile=compile)

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        seg, _, scores = run_batches(forward, images, batch_size, pad=compile)
        return seg, scores
    return run
