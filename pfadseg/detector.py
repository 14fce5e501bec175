"""`Detector`: a trained model and its thresholds behind one object.

    detector = Detector.load("run/checkpoint.safetensors", device="auto")
    for p in detector.predict(["a.png", "b.png"]):
        print(p.name, p.score, p.normalized_score, p.anomalous)
        p.overlay().save(f"overlay_{p.name}")  # p.name: the file's name, a.png

`pfadseg predict`, `pfadseg demo` and `pfadseg serve` all score images through
`Detector.predict`, so the command line, the demo and the web server give the
same numbers for the same image.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .calibration import CalibrationError, Thresholds
from .checkpoint import load_checkpoint, weights_fingerprint
from .config import check_whole
from .data import IMAGE_SUFFIXES, DataError, load_rgb, to_rgb, warn_if_long
from .models import AnomalyModel, ModelConfig
from .predict import MapFn, output_names
from .runtime import device_name, place, resolve_device
from .trainer import check_out_dir, resumed_settings, train_folder
from .variants import MODULES
from .visualize import mask_image, overlay

ImageInput = Union[str, Path, Image.Image, np.ndarray]
MAX_OUTPUT_SIDE = 1024  # overlays and masks of huge images come out downscaled to this side
BACKENDS = ("torch", "onnx")


@dataclass
class Prediction:
    """What the model says about one image.

    `anomaly_map` is the raw segmentation map (float32, the model's input size);
    `mask` is where it reaches the pixel threshold; `anomalous` is whether
    `score` (the image score) reaches the image threshold.
    """

    name: str
    score: float
    normalized_score: float  # in [0, 1]; 0.5 at the image threshold
    anomalous: bool
    anomaly_map: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    image: np.ndarray = field(repr=False)  # the input, uint8 RGB (H, W, 3) at its own size
    thresholds: Thresholds = field(repr=False)

    def output_size(self, max_side: int = MAX_OUTPUT_SIDE) -> tuple[int, int]:
        """(height, width) of the input, scaled down to fit `max_side`."""
        h, w = self.image.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def map_at(self, size: tuple[int, int]) -> np.ndarray:
        """The raw anomaly map resized bilinearly to (height, width)."""
        if tuple(self.anomaly_map.shape) == tuple(size):
            return self.anomaly_map
        t = torch.from_numpy(self.anomaly_map)[None, None]
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()

    def mask_at(self, size: tuple[int, int]) -> np.ndarray:
        """The defect mask at (height, width): the resized map against the pixel threshold."""
        return self.map_at(size) >= self.thresholds.pixel

    def overlay(self, max_side: int = MAX_OUTPUT_SIDE, outline: bool = True) -> Image.Image:
        """The normalised anomaly map as a heat map over the input image (at its own
        size, at most `max_side`), with the mask's outline in white when `outline`."""
        size = self.output_size(max_side)
        shown = self.image
        if shown.shape[:2] != size:
            shown = np.asarray(Image.fromarray(shown).resize(size[::-1], Image.BILINEAR))
        big = self.map_at(size)
        mask = big >= self.thresholds.pixel if outline else None
        return overlay(shown, self.thresholds.normalize_map(big), mask)

    def mask_image(self, max_side: int = MAX_OUTPUT_SIDE) -> Image.Image:
        """The mask as a black/white image at the overlay's size."""
        return mask_image(self.mask_at(self.output_size(max_side)))

    def map_image(self) -> Image.Image:
        """The normalised anomaly map as an 8-bit grayscale image (the model's input
        size): 128 and up is in the mask at the calibrated threshold."""
        norm = self.thresholds.normalize_map(self.anomaly_map)
        return Image.fromarray((np.clip(norm, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")


def _rgb(item: ImageInput, index: int) -> np.ndarray:
    """One input as uint8 RGB (H, W, 3); a clear error for anything else."""
    if isinstance(item, (str, Path)) and Path(item).is_dir():
        raise DataError(f"{item}: a folder, not an image. Fix: pass its images, e.g. "
                        "pfadseg.predict.collect_inputs([folder]).")
    if isinstance(item, (str, Path)):
        rgb = load_rgb(Path(item), None)
    elif isinstance(item, Image.Image):  # opened lazily: a bad file fails here, as it is decoded
        try:
            rgb = np.asarray(to_rgb(item), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, AssertionError) as exc:  # closed: AssertionError
            source = getattr(item, "filename", "") or "in memory"
            raise DataError(f"image {index} ({source}): cannot read it ({exc!r}). Fix: pass it open "
                            "(not closed by a with block), or its path; re-export a damaged file as "
                            "PNG or JPEG.") from exc
    elif isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))):
            raise DataError(f"image {index}: an array must be uint8 (H, W, 3) RGB, (H, W, 4) RGBA "
                            f"or (H, W) / (H, W, 1) grey, got {item.dtype} {item.shape}. Fix: convert it, "
                            "e.g. (a >> 8).astype(np.uint8) for 16 bits, (a * 255).round().astype(np.uint8) "
                            "for floats in [0, 1]; or pass the file's path, which is read at any depth.")
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[..., 0]
        if item.ndim == 3 and item.shape[2] == 3:
            rgb = item.copy()  # the Prediction keeps its own: the caller may reuse the buffer
        else:  # grey and RGBA as their PIL images are read (alpha composited on black)
            rgb = np.asarray(to_rgb(Image.fromarray(item)), dtype=np.uint8)
    else:
        raise DataError(f"image {index}: {type(item).__name__} is not an image. Fix: pass a path, "
                        "a PIL image or a uint8 array (H, W, 3), (H, W, 4) or (H, W).")
    if not rgb.shape[0] or not rgb.shape[1]:
        raise DataError(f"image {index}: empty ({rgb.shape[1]}x{rgb.shape[0]} pixels). Fix: leave it out.")
    warn_if_long(rgb.shape[1], rgb.shape[0], f"image {index}")  # also for arrays, which skip to_rgb
    return rgb


def _names(items: Sequence[ImageInput]) -> list[str]:
    """Each input's file name (".png" added to one without an image suffix), or
    image_<index>.png for an image in memory: a file name, so that f"overlay_{name}" saves. Names that occur more than once
    get their folder in front, as predict's output files (good/005.png, crack/005.png:
    good_005.png, crack_005.png), so that files saved by name do not overwrite each other."""
    paths = [Path(item) if isinstance(item, (str, Path))
             else Path(getattr(item, "filename", "") or f"image_{i}.png")  # PIL knows its file
             for i, item in enumerate(items)]
    paths = [p if p.suffix.lower() in IMAGE_SUFFIXES else p.with_name(p.name + ".png") for p in paths]
    return [stem + path.suffix for stem, path in zip(output_names(paths), paths)]


class Detector:
    """A model with its thresholds, on a device, ready to score images."""

    def __init__(self, checkpoint: Path, model: AnomalyModel, meta: dict, thresholds: Thresholds,
                 map_fn: MapFn, device: torch.device, backend: str = "torch") -> None:
        self.checkpoint, self.model, self.meta, self.thresholds = checkpoint, model, meta, thresholds
        self.device, self.backend = device, backend
        self._map_fn = map_fn

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", threshold: float | None = None,
             bf16: bool = True, compile: bool = False, backend: str = "torch",
             onnx: str | Path | None = None, batch_size: int = 8) -> "Detector":
        """A checkpoint on `device`. `threshold` replaces its image threshold;
        `backend="onnx"` runs the exported model `onnx` (default: the checkpoint's
        path with .onnx) in onnxruntime on the CPU instead; `batch_size` is what a
        compiled forward is built for."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        if onnx is not None and backend != "onnx":
            raise ValueError("onnx= is the model of backend='onnx': give both, or neither")
        if backend == "onnx" and (device_name(device).split(":")[0] not in ("auto", "cpu") or compile):
            raise ValueError(f"backend='onnx' runs its export on the CPU as it is (device={device!r}, "
                             f"compile={compile}). Fix: leave out device and compile, or backend='torch'")
        check_whole("batch_size", batch_size)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold!r} is not between 0 and 1 (image scores are "
                             "probabilities)")
        path = Path(path)
        model, meta = load_checkpoint(path)
        if threshold is not None and meta.get("threshold") is None and "thresholds" not in meta:
            thresholds = Thresholds(image=threshold, pixel=threshold, method="given")
        else:
            try:
                thresholds = Thresholds.from_meta(meta)
            except CalibrationError as exc:
                raise CalibrationError(f"{path}: {exc}") from exc
            if threshold is not None:
                thresholds = dataclasses.replace(thresholds, image=float(threshold), method="given")
        if backend == "onnx":
            from .export import onnx_map_fn

            if onnx is None:  # beside the checkpoint; a calibrated copy shares its original's
                onnx = path.with_suffix(".onnx")
                original = path.with_name(path.name.replace(".calibrated", "")).with_suffix(".onnx")
                onnx = original if not onnx.is_file() and original.is_file() else onnx
            map_fn = onnx_map_fn(Path(onnx), fingerprint=weights_fingerprint(model))
            return cls(path, model, meta, thresholds, map_fn, torch.device("cpu"), backend)
        from .inference import torch_map_fn

        target = resolve_device(device)
        place(model, target)
        map_fn = torch_map_fn(model, bf16=bf16, compile=compile, batch_size=batch_size)
        return cls(path, model, meta, thresholds, map_fn, target)

    @property
    def image_size(self) -> int:
        """Side of the square the model sees; inputs are resized to it."""
        return self.model.config.image_size

    def info(self) -> dict:
        """What the model is: variant, teacher, input size, thresholds, versions."""
        from . import __version__

        return {"variant": self.model.config.variant, "teacher": self.model.config.teacher,
                "image_size": self.image_size, "category": self.meta.get("category"),
                "threshold": self.thresholds.image, "pixel_threshold": self.thresholds.pixel,
                "threshold_method": self.thresholds.method, "backend": self.backend,
                "device": str(self.device), "version": __version__,
                "checkpoint_version": self.meta.get("pfadseg_version")}

    def predict(self, images: Sequence[ImageInput], batch_size: int = 8,
                names: Sequence[str] | None = None) -> list[Prediction]:
        """Score images given as paths, PIL images or uint8 arrays ((H, W, 3) RGB,
        (H, W, 4) RGBA, (H, W) or (H, W, 1) grey; or one (N, H, W, 3) batch), in order;
        `batch_size` of them are decoded and run at a time. An unreadable file
        raises DataError naming it."""
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray)
                                                            and images.ndim != 4):
            raise TypeError(f"predict takes a list of images, got one {type(images).__name__}. "
                            "Fix: predict([image]).")
        images = list(images)
        names = _names(images) if names is None else list(names)
        check_whole("batch_size", batch_size)
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        size = self.image_size
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            rgb = [_rgb(item, start + i) for i, item in enumerate(chunk)]
            small = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
                              for a in rgb])
            maps, scores = self._map_fn(torch.from_numpy(small).permute(0, 3, 1, 2).contiguous())
            for i, (item, image, amap, score) in enumerate(zip(chunk, rgb, maps, scores)):
                index = start + i
                score = float(score)
                amap = np.asarray(amap, dtype=np.float32)
                out.append(Prediction(
                    name=names[index], score=score,
                    normalized_score=float(self.thresholds.normalize_image(score)),
                    anomalous=score >= self.thresholds.image, anomaly_map=amap,
                    mask=amap >= self.thresholds.pixel, image=image, thresholds=self.thresholds))
        return out

    @classmethod
    def train(cls, train_dir: str | Path, out_dir: str | Path, *, model: str | ModelConfig = "pfadseg",
              teacher: str = "resnet18", image_size: int = 256, preset_name: str = "cpu",
              textures: str | Path | None = None, texture_limit: int | None = None,
              rotation: str = "auto", category: str | None = None, teacher_weights: str | None = None,
              device: str | torch.device = "auto", resume: bool = False, progress: bool = True,
              skip_bad: bool = False, **schedule: object) -> "Detector":
        """Train on a folder of defect-free images and load the result.

        `model` is "pfadseg", "destseg", an ablation row such as "destseg+aff+rcm",
        or a ModelConfig (which holds its own `teacher` and `image_size`); `schedule`
        overrides fields of the preset's
        TrainConfig (batch_size, stage1_steps, ...). Without `textures` (a folder
        of texture images such as DTD's) synthetic defects use built-in
        procedural textures; `skip_bad` logs and skips unreadable images. With
        `resume`, settings left at their defaults come from the run in `out_dir`
        and others must match it (see trainer.resumed_settings). Writes
        out_dir/checkpoint.safetensors.
        """
        train_dir = Path(train_dir)
        if texture_limit is not None:
            check_whole("texture_limit", texture_limit)
        if isinstance(model, ModelConfig) and (teacher, image_size) not in (
                (ModelConfig.teacher, ModelConfig.image_size), (model.teacher, model.image_size)):
            raise ValueError(f"teacher={teacher!r}, image_size={image_size} differ from the "
                             f"ModelConfig's ({model.teacher!r}, {model.image_size}). Fix: set "
                             "them in the ModelConfig, or pass the model by name.")
        model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.named(
            model, teacher=teacher, image_size=image_size)
        if resume:
            check_out_dir(Path(out_dir), resume=True)
            explicit = isinstance(model, ModelConfig) or model != "pfadseg"
            given = {"train_dir": train_dir, "category": category, "preset": preset_name, "rotation": rotation, "textures": textures,
                     "texture_limit": texture_limit, **schedule,
                     **({m: getattr(model_cfg, m) for m in MODULES} if explicit else {}),
                     "teacher": model_cfg.teacher if explicit else teacher,
                     "image_size": model_cfg.image_size if explicit else image_size}
            defaults = {name: inspect.signature(cls.train).parameters[param].default
                        for name, param in (("preset", "preset_name"), ("rotation", "rotation"),
                                            ("teacher", "teacher"), ("image_size", "image_size"))}
            kept = resumed_settings(Path(out_dir), given, defaults)
            model_cfg = dataclasses.replace(model_cfg, **{k: kept[k] for k in (*MODULES, "teacher",
                                                                              "image_size")})
            # (a run from before config.json recorded these keeps what was given)
            train_dir, category, preset_name, rotation, textures, texture_limit = (
                kept.get("train_dir", train_dir), kept.get("category", category),
                kept.get("preset", preset_name), kept.get("rotation", rotation),
                kept.get("textures", textures), kept.get("texture_limit", texture_limit))
        path = train_folder(model_cfg, preset_name, train_dir, Path(out_dir), schedule=schedule,
                            textures=textures, texture_limit=texture_limit, rotation=rotation,
                            category=category, skip_bad=skip_bad, teacher_weights=teacher_weights,
                            resume=resume, progress=progress, device=device)
        return cls.load(path, device=device)
