"""Reading images and datasets, with clear errors for bad input.

Every image is decoded and resized once and kept in memory as uint8 (N, 3, S, S):
training and evaluation then never touch the disk again.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm


log = logging.getLogger(__name__)
MAX_PIXELS = 20_000 * 20_000  # decompression-bomb guard: 400 megapixels
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data; the message names the file or folder and the fix."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float grayscale are rescaled
    from their full range, palette and alpha images are composited on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1 else 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into a DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DataError(
                        f"{path}: {img.width}x{img.height} pixels is over the limit of "
                        f"{MAX_PIXELS} (decompression-bomb guard). Fix: downscale the file.")
                img.load()
                return img.copy()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}). Fix: re-export it as PNG or "
                        "JPEG, or remove it from the folder.") from exc


def load_rgb(path: Path, size: int | None) -> np.ndarray:
    """Image as uint8 (H, W, 3), resized bilinearly to size x size when size is given."""
    img = _to_rgb(open_image(path))
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_mask(path: Path, size: int | None, expected: tuple[int, int] | None = None) -> np.ndarray:
    """Binary mask (H, W): resized bilinearly then thresholded at 0.5 (the official protocol)."""
    img = open_image(path)
    if expected is not None and img.size != expected:
        raise DataError(f"{path}: mask is {img.size[0]}x{img.size[1]} but its image is "
                        f"{expected[0]}x{expected[1]}. Fix: give a mask of the image's size.")
    arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if size is not None:
        t = torch.from_numpy(arr)[None, None]
        arr = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=True)[0, 0].numpy()
    return arr >= 0.5


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted; other files (notes, thumbnails) are skipped with a log line.

    Hidden files are never images, even with an image suffix: macOS writes
    "._name.png" resource forks and ".DS_Store" files next to copied images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Fix: check the path (it must be a folder "
                        "of images).")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    for p in files:
        if p.name.startswith("."):
            log.debug("skipping hidden file %s", p)
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            log.info("skipping non-image file %s", p)
    return images


def load_images(paths: list[Path], size: int, skip_bad: bool = False,
                desc: str = "loading images") -> tuple[torch.Tensor, list[Path]]:
    """Decode and resize once: uint8 (N, 3, size, size) and the paths kept.

    An unreadable file stops with its name, unless `skip_bad`, when it is logged
    and left out.
    """
    arrays, kept = [], []
    for p in tqdm(paths, desc=desc, unit="img", leave=False, disable=len(paths) < 8):
        try:
            arrays.append(load_rgb(p, size))
            kept.append(p)
        except DataError as exc:
            if not skip_bad:
                raise
            log.warning("skipped: %s", exc)
    if not arrays:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), kept
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), kept


def load_train_images(folder: Path, size: int, skip_bad: bool = False) -> torch.Tensor:
    """All good training images of a folder; an empty folder is an error."""
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: no training images (.png/.jpg/.bmp/.tif). Fix: point "
                        "--data/--category (or --train-dir) at a folder of defect-free images.")
    images, kept = load_images(paths, size, skip_bad, desc="loading training images")
    if not kept:
        raise DataError(f"{folder}: none of the {len(paths)} images could be read. Fix: see "
                        "the 'skipped' warnings above for each file's problem.")
    return images


def load_textures(folder: Path, size: int, limit: int | None = None) -> torch.Tensor:
    """Texture images for synthetic defects (the DTD `images/` folder or any folder,
    searched recursively) as float (K, 3, size, size) in [0, 1].

    With `limit`, an evenly spaced subset of the sorted files is kept, so every
    DTD class stays represented.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"texture folder {folder} does not exist or is not a folder. Fix: "
                        "--textures is a folder of images, e.g. DTD's images/")
    paths = list_images(folder, recursive=True)
    if not paths:
        raise DataError(f"texture folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}). "
                        "Fix: point --textures at a folder of texture images, or leave it out "
                        "to use the built-in procedural textures.")
    if limit is not None and limit < len(paths):
        if limit < 1:
            raise ValueError(f"texture limit must be >= 1, got {limit}")
        picks = np.linspace(0, len(paths) - 1, limit).round().astype(int)
        paths = [paths[i] for i in picks]
    try:
        images, _ = load_images(paths, size, desc="loading textures")
    except DataError as exc:
        raise DataError(f"cannot read texture image {exc}") from exc
    return images.float().div_(255.0)


@dataclass
class TestSet:
    """An MVTec-layout test split in memory."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    masks: np.ndarray  # bool (N, S, S)
    labels: np.ndarray  # int (N,), 1 = anomalous
    defects: list[str]  # defect type per image ("good" for normal)
    paths: list[Path]


def mvtec_category(root: Path, category: str) -> Path:
    """<root>/<category>, checked to exist."""
    path = Path(root) / category
    if not path.is_dir():
        raise DataError(f"{path}: category folder not found. Fix: --data is the dataset root "
                        "holding <category>/train/good and <category>/test.")
    return path


def load_test_set(root: Path, category: str, size: int, skip_bad: bool = False,
                  mask_size: int | None | str = "input") -> TestSet:
    """test/<defect>/*.png with masks ground_truth/<defect>/<stem>_mask.png.

    Images are resized to `size`; masks to `mask_size` ("input": the same size,
    the official protocol; None: each image's original resolution, which must
    then be the same for all images).
    """
    base = mvtec_category(root, category)
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: no test folder (MVTec layout test/<defect>/*.png)")
    msize = size if mask_size == "input" else mask_size
    images, masks, labels, defects, paths = [], [], [], [], []
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        for path in list_images(defect_dir):
            try:
                img = open_image(path)
            except DataError as exc:
                if skip_bad:
                    log.warning("skipped: %s", exc)
                    continue
                raise
            if defect_dir.name == "good":
                shape = (img.height, img.width) if msize is None else (msize, msize)
                mask = np.zeros(shape, dtype=bool)
            else:
                mask_path = base / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise DataError(f"{path}: its mask {mask_path} is missing. Fix: add the "
                                    "mask, or move the image out of the test folder.")
                mask = load_mask(mask_path, msize, expected=img.size)
            rgb = _to_rgb(img).resize((size, size), Image.BILINEAR)
            images.append(np.asarray(rgb, dtype=np.uint8))
            masks.append(mask)
            labels.append(int(defect_dir.name != "good"))
            defects.append(defect_dir.name)
            paths.append(path)
    if not images:
        raise DataError(f"{test_dir}: no test images found")
    if len({m.shape for m in masks}) > 1:
        raise DataError(f"{test_dir}: test images differ in size; evaluate at a fixed size "
                        "(--eval-size 256) instead of the original resolution")
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return TestSet(tensor, np.stack(masks), np.asarray(labels), defects, paths)
