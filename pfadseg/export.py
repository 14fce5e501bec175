"""ONNX export of a trained model, and an onnxruntime (CPU) map function for `predict`.

The exported graph takes float32 images in [0, 1], shape (B, 3, S, S) with a
dynamic batch axis, and returns the segmentation map (B, 1, S, S), the DeST map
(B, 1, S, S) and the image scores (B,) (mean of the top-100 pixels of the
segmentation map), all float32. The file's metadata_props say so (CONTRACT) and
hold the checkpoint's thresholds, so that it can be run without pfadseg.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .calibration import CalibrationError, Thresholds
from .checkpoint import weights_fingerprint
from .files import replacing
from .models import AnomalyModel, image_scores
from .predict import MapFn

INPUT_NAME = "images"
OUTPUT_NAMES = ("seg_map", "dest_map", "score")
ONNX_HINT = "pip install pfadseg[onnx]"
OPSET = 18  # the exporter's own opset: asking for an older one makes it convert down, which fails
TOLERANCE = 1e-3  # largest |onnxruntime - torch| accepted on the check batch (fp32 both)
WEIGHTS_KEY = "pfadseg_weights"  # ONNX metadata: checkpoint.weights_fingerprint of the model
CONTRACT = {  # ONNX metadata_props for a program that runs the file without pfadseg
    "input": "images: float32 (B, 3, S, S), RGB in [0, 1]; each image upright (EXIF applied), "
             "alpha composited on black, resized to S x S as 8-bit RGB by Pillow's BILINEAR "
             "(antialiased; aspect not kept), then divided by 255; the "
             "teacher's mean/std normalisation is inside the graph",
    "outputs": "seg_map (B, 1, S, S): anomaly map in [0, 1], a defect where >= pixel_threshold "
               "(resize it bilinearly to the image's size first); dest_map (B, 1, S, S): DeSTSeg's "
               "teacher-student map, for diagnosis, no threshold; score (B,): mean of the 100 "
               "highest seg_map values, a defective image where >= image_threshold",
}


class ExportError(ValueError):
    """The model could not be exported, or the file does not compute what the model
    does; the message says why in one line and names the exporter's log."""


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
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({type(exc).__name__}). "
                         "Fix: export it again with `pfadseg export --checkpoint CHECKPOINT`.") from exc


def _require_exporter() -> None:
    """The exporter's optional packages, checked before any work."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as exc:
            raise ExportError(f"ONNX export needs the {name} package: {ONNX_HINT}") from exc


@contextmanager
def _output_to(log_path: Path) -> Iterator[None]:
    """Everything printed meanwhile, by Python or by C++ (the exporter's progress
    lines, IR dumps, warnings and logged tracebacks), goes to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with redirect_stdout(log), redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _first_line(exc: BaseException) -> str:
    """An exception as one short line (exporter errors run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _largest_difference(path: Path, wrapper: nn.Module, images: torch.Tensor) -> float:
    """Largest |onnxruntime - torch| over the three outputs for `images`."""
    session = _session(path, threads=1)
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        want = wrapper(images)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def onnx_metadata(model: AnomalyModel, meta: dict) -> dict[str, str]:
    """The metadata_props of an export: the weights' fingerprint, the input and output
    contract, the input size, pfadseg's version and, when the checkpoint's metadata
    `meta` holds them, its image and pixel thresholds and how they were set."""
    props = {WEIGHTS_KEY: weights_fingerprint(model), **CONTRACT,
             "image_size": str(model.config.image_size), "pfadseg_version": __version__}
    try:
        t = Thresholds.from_meta(meta)
    except CalibrationError:  # a checkpoint without thresholds: the integrator must set one
        return props
    return {**props, "image_threshold": repr(t.image), "pixel_threshold": repr(t.pixel),
            "threshold_method": t.method}


def export_onnx(model: AnomalyModel, path: Path, props: dict[str, str] | None = None) -> Path:
    """Write `model` (an fp32, eval-mode CPU copy of it) to `path` as ONNX with the
    metadata_props `props` (default: `onnx_metadata` without thresholds); returns the path.

    Uses torch's torch.export-based exporter (the TorchScript one cannot turn RCM's
    pooling into ONNX with a dynamic batch axis). Its console output goes to
    `<path>.<process id>.log`, which is deleted when the export succeeds and named in the
    ExportError when it fails. The file is checked before it replaces `path`:
    onnxruntime must give the model's outputs (to within TOLERANCE) for a batch
    of a size other than the traced one.
    """
    _require_exporter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    wrapper = _ExportWrapper(cpu_model).eval()
    gen = torch.Generator().manual_seed(0)
    example, check = (torch.rand(n, 3, size, size, generator=gen) for n in (2, 3))
    log_path = path.with_name(f"{path.name}.{os.getpid()}.log")  # two exports: two logs
    try:
        with replacing(path) as tmp:  # any failure below leaves `path` as it was and no partial file
            try:
                with _output_to(log_path), warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        wrapper, (example,), str(tmp), dynamo=True, opset_version=OPSET,
                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                        external_data=False, verbose=False, report=False)
                    difference = _largest_difference(tmp, wrapper, check)
            except Exception as exc:  # noqa: BLE001 - any exporter failure, reported in one line
                raise ExportError(f"ONNX export to {path} failed: {_first_line(exc)} "
                                  f"(exporter log: {log_path})") from exc
            if not difference <= TOLERANCE:
                raise ExportError(f"ONNX export to {path} failed: onnxruntime's outputs differ from "
                                  f"the model's by up to {difference:.3g} (more than {TOLERANCE}); "
                                  f"exporter log: {log_path}")
            import onnx

            stamped = onnx.load(str(tmp))
            onnx.helper.set_model_props(stamped, props or onnx_metadata(model, {}))
            onnx.save(stamped, str(tmp))
    except ExportError:  # its message names the log
        raise
    except BaseException:  # Ctrl-C, or a failed write: nothing for the log to explain
        log_path.unlink(missing_ok=True)
        raise
    log_path.unlink()
    return path


def onnx_map_fn(path: Path, fingerprint: str | None = None) -> MapFn:
    """A function mapping uint8 images (B, 3, S, S) to (segmentation maps
    float32 (B, S, S), image scores (B,)), run by onnxruntime on the CPU.
    With `fingerprint` (the checkpoint's `weights_fingerprint`), a file exported
    from other weights is refused: its scores would meet the wrong thresholds."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX model not found: {path}. Create it with "
                         "`pfadseg export --checkpoint CHECKPOINT --out FILE`.")
    session = _session(path, threads=torch.get_num_threads())  # --threads holds for onnxruntime too
    if fingerprint is not None:
        recorded = session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)
        if recorded != fingerprint:
            raise ValueError(f"{path} was not exported from this checkpoint's weights "
                             f"({'another model' if recorded else 'no record of its weights'}). "
                             "Fix: export it again with `pfadseg export --checkpoint CHECKPOINT`.")

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = images.detach().cpu().numpy().astype(np.float32) / np.float32(255.0)
        seg, _, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return seg[:, 0], scores

    return run
