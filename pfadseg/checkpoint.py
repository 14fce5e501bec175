"""Checkpoints as safetensors: no pickle, so loading one can never run code.

A checkpoint is one file: the weights as tensors and, in its metadata, JSON with
the model and training configs, the package version, the input normalisation
and the calibrated threshold. Resumable training state uses the same format.
Writes are atomic (write a temporary file, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .files import replacing
from .models import AnomalyModel, ModelConfig
from .models.teacher import RANDOM

if TYPE_CHECKING:
    from .calibration import Thresholds

FORMAT = "pfadseg-checkpoint"
STATE_FORMAT = "pfadseg-train-state"  # a run's resumable state (pfadseg.trainer)
CHECKPOINT_NAME = "checkpoint.safetensors"  # the checkpoint a training run writes
FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~_UMASK  # what open() gives; safetensors' own writer gives 0o600


class CheckpointError(ValueError):
    """A checkpoint that is unreadable or does not fit; the message says why."""


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """Write tensors + JSON metadata to `path` without ever leaving a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with replacing(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"pfadseg": json.dumps(meta)})
        except SafetensorError as exc:  # a full disk: an OSError naming the file, as other writes give
            raise OSError(f"cannot write {path} ({exc}). Fix: make room on its disk or let it be "
                          "written (the previous file is kept), or write to another folder") from exc
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # readable by a team's shared folder, as other files are
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_meta(path: Path, raw: str | None, kind: str) -> dict:
    """Parse and check our JSON metadata, refusing anything else with a reason."""
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file but not a pfadseg checkpoint "
                              f"(no pfadseg metadata).{_fix(kind)}")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: damaged pfadseg metadata (not JSON: {exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged pfadseg metadata (not a JSON object)")
    if kind == FORMAT and meta.get("format") == STATE_FORMAT:
        raise CheckpointError(_state_not_checkpoint(path))
    if meta.get("format") != kind:
        raise CheckpointError(f"{path}: holds {meta.get('format')!r}, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')} written by pfadseg "
            f"{meta.get('pfadseg_version')}; this pfadseg {__version__} reads format "
            f"{FORMAT_VERSION}. Fix: retrain, or use the pfadseg version that wrote it.")
    return meta


def _state_not_checkpoint(path: Path) -> str:
    """What to do instead of loading a training-state file as a checkpoint."""
    checkpoint = path.with_name(CHECKPOINT_NAME)
    if checkpoint.is_file():
        return (f"{path}: a run's resumable training state, not a checkpoint. Fix: use "
                f"{checkpoint}, the checkpoint that run wrote.")
    return (f"{path}: a run's resumable training state, not a checkpoint; its run has not "
            f"finished (no {checkpoint}). Fix: finish it with `pfadseg train ... --out "
            f"{path.parent} --resume`, then use {checkpoint}.")


def _fix(kind: str) -> str:
    """The fix for a file that is not a checkpoint (state files say their own)."""
    return " Fix: give the checkpoint.safetensors that `pfadseg train` wrote (copied whole)." \
        if kind == FORMAT else ""


def _unreadable(path: Path, exc: Exception, kind: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable checkpoint (truncated or not "
                           f"safetensors: {exc}).{_fix(kind)}")


def read_meta(path: Path, kind: str = FORMAT) -> dict:
    """Only the checked metadata of a file we wrote (no tensors are loaded)."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
        raise CheckpointError(f"{path}: a folder. Fix: --checkpoint {path / CHECKPOINT_NAME}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("pfadseg")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc, kind) from exc
    return _check_meta(path, raw, kind)


def read(path: Path, kind: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a file we wrote, refusing anything else with a reason."""
    meta = read_meta(path, kind)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(Path(path), exc, kind) from exc
    return tensors, meta


def save_checkpoint(model: AnomalyModel, path: Path, train_config: dict,
                    threshold: Thresholds | float | None, extra: dict | None = None) -> None:
    """The deployable checkpoint: weights, configs, version, normalisation and the
    thresholds ("threshold" is the image one, as older pfadseg versions read it)."""
    from .calibration import Thresholds  # not at the top: calibration imports the inference stack

    thresholds = threshold.to_meta() if isinstance(threshold, Thresholds) else {"threshold": threshold}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pfadseg_version": __version__,
        "model": model.config.to_dict(),
        "variant": model.config.variant,
        "train": train_config,
        "normalization": {"mean": list(model.config.mean), "std": list(model.config.std)},
        **thresholds,
        **(extra or {}),
    }
    atomic_save(model.state_dict(), meta, path)


def weights_fingerprint(model: AnomalyModel) -> str:
    """SHA-256 of the model's weights (names, shapes and fp32 values): the same for
    a checkpoint and its calibrated copy, on any device or memory layout. An ONNX
    export records it, so that a stale export is never run with another model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().float().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def model_tensors(model: AnomalyModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` less the teacher tensors that `model` does not have.

    Files written before the EfficientNet-Lite0 teacher was cut to the stages
    its three levels come from also hold its two last (unused) stages.
    """
    known = model.state_dict().keys()
    return {k: v for k, v in tensors.items() if k in known or not k.startswith("teacher.")}


def load_checkpoint(path: Path) -> tuple[AnomalyModel, dict]:
    """Rebuild the model from a checkpoint alone (no download: the teacher's
    weights are in the file) and return it in eval mode with its metadata."""
    tensors, meta = read(path)
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:  # a NaN model scores every image NaN, which no threshold calls anomalous
        raise CheckpointError(f"{path}: {len(broken)} weight tensor(s) hold NaN or infinite values "
                              f"(e.g. {broken[0]}): the file is damaged or the training diverged. "
                              "Fix: use an earlier copy of the checkpoint, or train again.")
    try:
        cfg_dict = dict(meta["model"])
        cfg_dict["pcar_dilations"] = tuple(cfg_dict.get("pcar_dilations", (1, 2, 3)))
        cfg_dict["mean"], cfg_dict["std"] = tuple(cfg_dict["mean"]), tuple(cfg_dict["std"])
        config = ModelConfig(**cfg_dict)
        model = AnomalyModel.build(config, teacher_weights=RANDOM)  # filled from the file below
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its metadata does not describe a model "
                              f"({type(exc).__name__}: {exc})") from exc
    try:
        model.load_state_dict(model_tensors(model, tensors), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit variant {config.variant} with "
                              f"teacher {config.teacher}: {str(exc)[:300]}") from exc
    model.eval()
    return model, meta
