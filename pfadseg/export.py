"""ONNX export of a trained model, and an onnxruntime (CPU) map function for `predict`.

The exported graph takes float32 images in [0, 1], shape (B, 3, S, S) with a
dynamic batch axis, and returns the segmentation map (B, 1, S, S), the DeST map
(B, 1, S, S) and the image scores (B,) (mean of the top-100 pixels of the
segmentation map), all float32.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import AnomalyModel, image_scores
from .predict import MapFn

INPUT_NAME = "images"
OUTPUT_NAMES = ("seg_map", "dest_map", "score")
ONNX_HINT = "pip install pfadseg[onnx]"


class _BlockMean(nn.Module):
    """`AdaptiveAvgPool2d(k)` as slices and means over the same bins (identical
    numbers), which the TorchScript exporter translates with a dynamic batch axis."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.size
        for dim in (2, 3):  # bin i spans [floor(i*n/k), ceil((i+1)*n/k)), as in PyTorch
            n = x.shape[dim]
            x = torch.cat([x.narrow(dim, i * n // k, -(-(i + 1) * n // k) - i * n // k)
                           .mean(dim=dim, keepdim=True) for i in range(k)], dim=dim)
        return x


def _exportable(model: AnomalyModel) -> nn.Module:
    """An fp32, eval-mode, contiguous-layout copy of `model` whose square
    adaptive average pools are rewritten as block means."""
    model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
                if isinstance(size, int):
                    setattr(module, name, _BlockMean(size))
    return model


class _ExportWrapper(nn.Module):
    """images in [0, 1] -> (segmentation map, DeST map, image scores)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seg, dest = self.model(images)
        return seg, dest, image_scores(seg)


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # optional dependency
        raise ImportError(f"ONNX support needs onnxruntime: {ONNX_HINT}") from exc
    return onnxruntime


def _session(path: Path, threads: int | None = None):
    ort = _ort()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(model: AnomalyModel, path: Path, opset: int = 17) -> Path:
    """Write `model` (fp32, eval mode) to `path` as ONNX; returns the path.

    Tries the TorchScript-based exporter first (`dynamo=False`) and falls back
    to the dynamo exporter; the result is checked by loading it in onnxruntime.
    The caller's model is left untouched (a copy is exported).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    wrapper = _ExportWrapper(_exportable(model))
    example = torch.rand(2, 3, size, size)
    errors: list[str] = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)})
        except Exception as exc:  # noqa: BLE001 - retry with the other exporter
            errors.append(f"dynamo=False: {exc}")
            try:
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(
                    wrapper, (example,), str(path), dynamo=True, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=({0: batch},), external_data=False)
            except Exception as exc2:  # noqa: BLE001
                errors.append(f"dynamo=True: {exc2}")
                raise RuntimeError(f"ONNX export to {path} failed:\n" + "\n".join(errors)) from exc2
    _session(path)  # fails loudly if onnxruntime cannot load the graph
    return path


def onnx_map_fn(path: Path, threads: int | None = None) -> MapFn:
    """A function mapping uint8 images (B, 3, S, S) to (segmentation maps
    float32 (B, S, S), image scores (B,)), run by onnxruntime on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX model not found: {path}. Create it with "
                         "`pfadseg export --checkpoint CHECKPOINT --out FILE`.")
    session = _session(path, threads)

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = images.detach().cpu().numpy().astype(np.float32) / np.float32(255.0)
        seg, _, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return seg[:, 0], scores

    return run
