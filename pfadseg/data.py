"""Reading images and datasets, with clear errors for bad input.

Every image is decoded and resized once and kept in memory as uint8 (N, 3, S, S):
training and evaluation then never touch the disk again.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from . import distributed as dist


log = logging.getLogger(__name__)
MAX_PIXELS = 20_000 * 20_000  # decompression-bomb guard: 400 megapixels
if Image.MAX_IMAGE_PIXELS is not None:  # Pillow's own guard (89 MP) would refuse first: raised to ours
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, MAX_PIXELS)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                  ".pgm", ".ppm", ".pbm", ".pnm", ".tga")  # a multi-frame file: its first frame
# photo and raw formats Pillow cannot read: a folder of them is worth a warning, not a log line
UNREAD_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl", ".dng", ".raw", ".cr2",
                         ".cr3", ".nef", ".arw", ".orf", ".rw2", ".psd", ".svg", ".exr")
SKIP_HINT = ("Or add --skip-bad-images (Python: skip_bad=True) to go on without the unreadable "
             "images, each logged.")
PREDICT_OUTPUTS = ("_overlay.png", "_mask.png")  # per-image files `pfadseg predict` writes


class DataError(ValueError):
    """Bad input data; the message names the file or folder and the fix."""


_low_bits_warned = False  # the 12-bit warning, once per process: one camera made them all
_long_warned = False  # the long-image warning, likewise
LONG_SIDES = 4.0  # a side this many times the other: squashed square, details are lost


def warn_if_long(width: int, height: int, name: str | Path = "an image") -> None:
    """Warn, once per process, of an image far from square (a line-scan strip): the
    model sees every image squashed to its square input, which blurs such an image's
    details away along its long side."""
    global _long_warned
    if max(width, height) > LONG_SIDES * min(width, height) and not _long_warned:
        _long_warned = True
        log.warning("%s is %dx%d: every image is squashed to the model's square input, which "
                    "blurs a long image's details away. Fix: cut such images into squarish tiles "
                    "(said of the first such image only).", name, width, height)


def to_rgb(img: Image.Image, name: str | Path = "an image") -> Image.Image:
    """Convert any PIL image to upright 8-bit RGB: turned as its EXIF orientation
    says (as image viewers show a camera's JPEG), 16-bit grayscale rescaled from its
    full range (32-bit from the fewest bits holding its values, float from its own),
    palette and alpha images composited on black. `name` (its path) goes into warnings."""
    global _low_bits_warned
    img = ImageOps.exif_transpose(img)
    warn_if_long(*img.size, name)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr[~np.isfinite(arr)] = 0.0  # a float image's NaN/inf pixels: black, not an all-NaN scale
        peak = float(arr.max())  # once: a camera's 16-bit frame is tens of megapixels
        top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
        if img.mode == "I" and peak > 65535:  # 17 to 31 bits: the fewest bits holding it, not white
            top = 2.0 ** np.ceil(np.log2(peak + 1)) - 1
        if top == 65535.0 and 0 < peak < 4096 and not _low_bits_warned:
            _low_bits_warned = True
            warnings.warn(f"{name} uses 12 or fewer bits (a 10- or 12-bit camera?): read on "
                          "the 16-bit scale, it is nearly black with few grey levels. "
                          "Fix: scale the images to the full 16-bit range, or save them as 8-bit "
                          "(shown for the first such image only).", stacklevel=2)
        if img.mode == "F":
            top = max(peak, 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "La":  # premultiplied alpha: PIL converts it to LA only
        img = img.convert("LA")
    if img.mode in ("P", "PA", "RGBa"):
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
                if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":  # MPO: a phone's JPEG + extras
                    log.warning("%s: %d frames (an animation or a multi-page file); only the first "
                                "is read. Fix: save each frame as an image of its own.", path, img.n_frames)
                return img.copy()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: too many pixels to decode safely ({exc}). Fix: downscale the "
                        "file.") from exc
    except PermissionError as exc:
        raise DataError(f"{path}: permission denied. Fix: make it readable (chmod a+r), or "
                        "remove it from the folder.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes). Fix: copy it again, or remove it "
                            "from the folder.") from exc
        raise DataError(f"{path}: cannot read image ({exc}). Fix: re-export it as PNG or "
                        "JPEG, or remove it from the folder.") from exc


def load_rgb(path: Path, size: int | None) -> np.ndarray:
    """Image as uint8 (H, W, 3), resized bilinearly to size x size when size is given."""
    return _pixels(to_rgb(open_image(path), path), size)


def _pixels(img: Image.Image, size: int | None) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3), resized bilinearly to size x size when size is given."""
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays of one size as one uint8 (N, 3, H, W) tensor."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_mask(path: Path, size: int | None, expected: tuple[int, int] | None = None) -> np.ndarray:
    """Binary mask (H, W): resized bilinearly then thresholded at 0.5 (the official protocol).

    Black/white masks (0/255, soft or JPEG edges) mark a defect from 128 up.
    A mask whose values all lie below 128 is a label mask (0/1, or class ids):
    every non-zero pixel is a defect, where the 0.5 threshold read it as empty.
    """
    img = ImageOps.exif_transpose(open_image(path))
    if expected is not None and img.size != expected:
        turned = " upright (turned as its EXIF orientation says)" if img.size == expected[::-1] else ""
        raise DataError(f"{path}: mask is {img.size[0]}x{img.size[1]} but its image is "
                        f"{expected[0]}x{expected[1]}{turned}. Fix: give a mask of the image's "
                        f"size{', drawn on the upright image' if turned else ''}.")
    values = np.asarray(img.convert("L"))
    arr = (values > 0).astype(np.float32) if values.max() < 128 else values / np.float32(255.0)
    if size is not None:
        t = torch.from_numpy(arr)[None, None]
        arr = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=True)[0, 0].numpy()
    return arr >= 0.5


def _walk(folder: Path) -> Iterator[Path]:
    """Every path below `folder`, into linked folders too (Path.rglob skips them before
    Python 3.13: a test set of symlinked defect folders looked empty); each real folder
    once, hidden ones (.thumbnails/, .Trash-1000/, .ipynb_checkpoints/) never, nor a
    link to a folder above `folder` (good/up -> .. read the defect folders as good)."""
    top = os.path.realpath(folder)
    above = {os.path.realpath(p) for p in Path(folder).absolute().parents}  # also where folder is a link
    seen: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=_unlisted):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs.clear()
            continue
        if real != top and (Path(top).is_relative_to(real) or real in above):
            log.warning("%s: skipping this link to %s, a folder above %s (its images are not "
                        "this folder's). Fix: remove the link.", root, real, folder)
            dirs.clear()
            continue
        seen.add(real)
        # real folders before links to them: an image is listed under its own path
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")),
                         key=lambda d: os.path.islink(os.path.join(root, d)))
        yield from (Path(root) / name for name in dirs + names)


def _unlisted(exc: OSError) -> None:
    """A folder that cannot be listed fails loudly: skipped, a test set silently lost a defect type."""
    fix = " Fix: make it readable (chmod a+rx)." if isinstance(exc, PermissionError) else ""
    raise DataError(f"{exc.filename}: cannot list this folder ({exc.strerror}).{fix}") from exc


def not_a_folder(path: Path, noun: str = "folder") -> str:
    """Why `path`, which is no folder, cannot be used as one: it is a file, or missing."""
    return "a file, not a folder" if path.exists() else f"{noun} not found"


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted, each file once (a link to another of them is
    left out); other files (notes, thumbnails) are skipped with a log line.

    Hidden files are never images, even with an image suffix: macOS writes
    "._name.png" resource forks and ".DS_Store" files next to copied images. Nor are
    the overlays and masks `pfadseg predict` wrote (a summary.csv or their _map.npy
    beside them): a predict output inside a folder of good images would be trained or
    calibrated on, or scored by a rerun of predict.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {not_a_folder(folder)}. Fix: check the path (it must be a folder "
                        "of images).")
    try:
        entries = list(_walk(folder) if recursive else folder.iterdir())
    except OSError as exc:
        _unlisted(exc)
    files = sorted(p for p in entries if p.is_file())
    dangling = [p for p in entries if p.is_symlink() and not p.exists()]
    if dangling:
        log.warning("%s: skipping %d link(s) to nothing, e.g. %s. Fix: mend or remove them.",
                    folder, len(dangling), dangling[0].name)
    images, unread, predicted, seen = [], [], [], set()
    for p in sorted(files, key=lambda p: p.is_symlink()):  # a file before a link to it: its own name
        suffix = p.suffix.lower()
        if p.name.startswith("."):
            log.debug("skipping hidden file %s", p)
        elif suffix in UNREAD_IMAGE_SUFFIXES:
            unread.append(p)
        elif suffix not in IMAGE_SUFFIXES:
            log.info("skipping non-image file %s", p)
        elif _predicted(p):
            predicted.append(p)
        elif (real := os.path.realpath(p)) in seen:
            log.info("skipping %s: a link to an image already listed", p)
        else:
            seen.add(real)
            images.append(p)
    if unread:
        log.warning("%s: skipping %d image(s) in a format pfadseg cannot read, e.g. %s. Fix: "
                    "convert them to PNG or JPEG.", folder, len(unread), unread[0].name)
    if predicted:
        log.warning("%s: leaving out %d overlays and masks that pfadseg predict wrote (e.g. %s)",
                    folder, len(predicted), predicted[0].relative_to(folder))
    return sorted(images)


def _predicted(path: Path) -> bool:
    """An overlay or mask that `pfadseg predict` wrote: beside its summary.csv, or,
    where a hard kill left none, beside its own _map.npy (written before them)."""
    ends = [e for e in PREDICT_OUTPUTS if path.name.endswith(e)]
    return bool(ends) and ((path.parent / "summary.csv").is_file()
                           or path.with_name(path.name.removesuffix(ends[0]) + "_map.npy").is_file())


def _loading_bar(items: list, desc: str, progress: bool = True) -> tqdm:
    """`items` with a progress bar: none for a handful, and under torchrun rank 0's alone."""
    return tqdm(items, desc=desc, unit="img", leave=False,
                disable=not progress or len(items) < 8 or not dist.is_main())


def _upright_images(paths: list[Path], skip_bad: bool, desc: str, progress: bool = True,
                    hint: str = "") -> Iterator[tuple[Path, Image.Image]]:
    """Each file decoded and upright (see `to_rgb`), in order, under a loading bar.
    Unreadable files are logged and left out with `skip_bad`; else, once all are
    tried, one DataError lists them, then `hint` (a folder with three is fixed in
    one run, not three)."""
    bad = []
    for path in _loading_bar(paths, desc, progress):
        try:
            img = open_image(path)
        except DataError as exc:
            if skip_bad:
                log.warning("skipped: %s", exc)
            else:
                bad.append(exc)
            continue
        yield path, to_rgb(img, path)
    if bad:  # each with its own fix; the first ten
        listed = "\n  ".join(map(str, bad[:10])) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        message = str(bad[0]) if len(bad) == 1 else f"{len(bad)} of {len(paths)} images cannot be read:\n  {listed}"
        raise DataError(f"{message} {hint}".rstrip())


def load_images(paths: list[Path], size: int, skip_bad: bool = False, desc: str = "loading images",
                progress: bool = True, hint: str = "") -> tuple[torch.Tensor, list[Path]]:
    """Decode and resize once: uint8 (N, 3, size, size) and the paths kept.

    Unreadable files: see `_upright_images`.
    """
    arrays, kept = [], []
    for p, img in _upright_images(paths, skip_bad, desc, progress, hint):
        arrays.append(_pixels(img, size))
        kept.append(p)
    if not arrays:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), kept
    return _batch(arrays), kept


def train_image_paths(folder: Path) -> list[Path]:
    """The image files of a training folder (not its sub-folders), checked before
    any is decoded: a missing folder or one without images is an error."""
    folder = Path(folder)
    paths = list_images(folder)
    if not paths:
        nested = image_subfolders(folder)
        good = [g for g in (folder / "good", folder / "train" / "good") if g.is_dir()]
        hint = (f" Its sub-folders ({', '.join(f'{s.name}/' for s in nested[:4])}) hold images "
                f"but are not read: give the folder of good images, e.g. --train-dir "
                f"{(good or nested)[0]}." if nested else "")
        raise DataError(f"{folder}: no training images ({'/'.join(IMAGE_SUFFIXES)}).{hint} Fix: "
                        "point --data/--category (or --train-dir) at a folder of defect-free images.")
    return paths


def image_subfolders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` with image files anywhere below them."""
    return sorted(sub for sub in Path(folder).iterdir() if sub.is_dir() and not sub.name.startswith(".")
                  and any(f.suffix.lower() in IMAGE_SUFFIXES for f in _walk(sub)))


def category_of(train_dir: Path) -> str:
    """The category a folder of good images stands for: the folder's name, or the
    part's for <part>/good and an MVTec-layout <category>/train/good folder."""
    train_dir = Path(train_dir).resolve()
    if train_dir.name == "good":
        train_dir = train_dir.parent.parent if train_dir.parent.name == "train" else train_dir.parent
    return train_dir.name


def load_train_images(folder: Path, size: int, skip_bad: bool = False,
                      progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """All good training images of a folder and their file names; an empty folder is an error."""
    paths = train_image_paths(folder)
    if dist.is_main() and (nested := image_subfolders(folder)):  # torchrun: one walk, one line
        log.warning("%s: training on its %d images; its sub-folders (%s) are not read", folder,
                    len(paths), ", ".join(f"{s.name}/" for s in nested[:4]))
    images, kept = load_images(paths, size, skip_bad, "loading training images", progress, SKIP_HINT)
    if not kept:
        raise DataError(f"{folder}: none of the {len(paths)} images could be read. Fix: see "
                        "the 'skipped' warnings above for each file's problem.")
    return images, [p.name for p in kept]


def texture_paths(folder: Path, limit: int | None = None) -> list[Path]:
    """The texture files `load_textures` reads, checked before any is decoded.

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
    return paths


def load_textures(folder: Path, size: int, limit: int | None = None,
                  progress: bool = True) -> torch.Tensor:
    """Texture images for synthetic defects (the DTD `images/` folder or any folder,
    searched recursively) as float (K, 3, size, size) in [0, 1]; `limit` as in
    `texture_paths`."""
    paths = texture_paths(folder, limit)
    try:
        images, _ = load_images(paths, size, desc="loading textures", progress=progress)
    except DataError as exc:
        raise DataError(f"texture folder {folder}: {exc}") from exc
    return images.float().div_(255.0)


@dataclass
class TestSet:
    """A labelled test set in memory: good images and defect images by type."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    masks: np.ndarray | None  # bool (N, H, W); None when no masks were given
    labels: np.ndarray  # int (N,), 1 = anomalous
    defects: list[str]  # defect type per image ("good" for normal)
    paths: list[Path]


def category_name(text: str) -> str:
    """A category as typed ("bottle/" from shell completion, "./bottle") as its folder's
    name: the rotation, the record and the report's means go by that name."""
    name = os.path.normpath(text.strip())
    if name in (".", "..") or "/" in name or os.sep in name:
        raise DataError(f"{text!r} is not a category name. Fix: give one folder name under "
                        "--data, e.g. bottle")
    return name


def mvtec_category(root: Path, category: str) -> Path:
    """<root>/<category>, checked to exist."""
    path = Path(root) / category
    if not path.is_dir():
        raise DataError(f"{path}: category folder not found. Fix: --data is the dataset root "
                        "holding <category>/train/good and <category>/test.")
    return path


def _mask_key(relative: Path) -> str:
    """A mask's matching key: its path without suffix and without a trailing "_mask"."""
    stem = relative.stem[:-5] if relative.stem.endswith("_mask") else relative.stem
    return (relative.parent / stem).as_posix()


def _match_masks(entries: list[tuple[str, Path]], test_dir: Path,
                 mask_dir: Path, strict: bool = True) -> dict[Path, Path]:
    """Image path -> mask path, for the masks found recursively under `mask_dir`.

    A mask matches by its path relative to `mask_dir` (crack/000_mask.png or
    crack/000.png for the image test_dir/crack/000.png); a defect image left
    without one then takes the mask of the same stem among those still unmatched,
    when exactly one has it. A mask that matches no image is an error: a typo
    in a name would otherwise silently drop a defect from the pixel metrics.
    Not `strict` (MVTec's fixed names, a test set trimmed to a subset), a warning.
    """
    listed = list_images(mask_dir, recursive=True)
    images = {path.resolve() for _, path in entries}
    if shared := [m for m in listed if m.resolve() in images]:
        raise DataError(f"{mask_dir}: holds the images as well as their masks (e.g. {shared[0]}). "
                        "Fix: keep the masks in a folder of their own (e.g. ground_truth/, each "
                        "named <stem>_mask.png) and give that folder.")
    masks: dict[str, Path] = {}
    for mask in listed:
        key = _mask_key(mask.relative_to(mask_dir))
        if key in masks:
            raise DataError(f"{mask} and {masks[key]}: two masks for one image. Fix: keep one.")
        masks[key] = mask
    keys = {path: _mask_key(path.relative_to(test_dir)) for _, path in entries}
    found = {path: masks[key] for path, key in keys.items() if key in masks}
    taken = set(found.values())
    free: dict[str, list[Path]] = {}
    for key, mask in masks.items():
        if mask not in taken:
            free.setdefault(key.rsplit("/", 1)[-1], []).append(mask)
    for defect, path in entries:
        if path in found or defect == "good":
            continue
        candidates = free.get(keys[path].rsplit("/", 1)[-1], [])
        if len(candidates) > 1:
            names = ", ".join(map(str, candidates[:3]))
            raise DataError(f"{path}: {len(candidates)} masks share its name ({names}). Fix: "
                            "mirror the test folder's sub-folders under the mask folder, or "
                            "give the masks unique names.")
        if candidates:
            found[path] = candidates.pop()
    orphans = sorted(set(masks.values()) - set(found.values()))
    if orphans and not strict:
        log.warning("%s: %d mask(s) without an image (e.g. %s), not used", mask_dir, len(orphans),
                    orphans[0].relative_to(mask_dir))
    elif orphans:
        raise DataError(
            f"{orphans[0]}: mask without an image ({len(orphans)} such mask(s) under {mask_dir}). "
            "Fix: name each mask after its image (<stem>_mask.png or <stem>.png, in the same "
            "sub-folder as under the test folder), or remove masks of images not being tested.")
    return found


def list_test_images(test_dir: Path) -> list[tuple[str, Path]]:
    """(defect type, path) of every image, by top-level folder name (each searched
    recursively); a missing good/ or images loose in `test_dir` are an error."""
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: {not_a_folder(test_dir, 'test folder')}. Fix: give a folder "
                        "holding good/ and one folder per defect type.")
    if not (test_dir / "good").is_dir():
        if (test_dir / "test" / "good").is_dir():  # an MVTec category's root
            raise DataError(f"{test_dir}: no good/ folder, but {test_dir / 'test'} has one. Fix: "
                            f"--test-dir {test_dir / 'test'} (or --data {test_dir.parent} "
                            f"--category {test_dir.name} for the MVTec layout).")
        other = [d.name for d in test_dir.iterdir() if d.is_dir() and d.name.lower() == "good"]
        if other:
            raise DataError(f"{test_dir}: no good/ folder, but {other[0]}/. Fix: rename it to "
                            "good/ (lower case).")
        raise DataError(f"{test_dir}: no good/ folder. Fix: put the defect-free test images in "
                        f"{test_dir / 'good'} and each defect type in a folder of its own.")
    loose = list_images(test_dir)
    if loose:
        raise DataError(f"{loose[0]}: image directly in the test folder, so its label is "
                        f"unknown. Fix: move it into {test_dir / 'good'} or a defect-type folder.")
    folders = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = {name: list_images(test_dir / name, recursive=True) for name in folders}
    empty = [name for name in folders if not found[name]]
    if empty:
        log.warning("%s: no images in %s/, left out of the test set", test_dir, "/, ".join(empty))
    return [(name, path) for name in folders for path in found[name]]


def load_folder_test_set(test_dir: Path, size: int, mask_dir: Path | None = None,
                         skip_bad: bool = False, mask_size: int | None | str = "input",
                         strict_masks: bool = True) -> TestSet:
    """A test set from any folder: `test_dir`/good/ and `test_dir`/<defect type>/,
    nested folders and mixed image types allowed.

    Masks (optional) are searched recursively under `mask_dir` and matched by
    path or stem, with or without "_mask"; without `mask_dir` the set has no
    masks (image metrics only). Images are resized to `size`; masks to
    `mask_size` ("input": the same size, the official protocol; None: each
    image's original resolution, which must then be the same for all images).
    A mask without an image is an error, or a warning when not `strict_masks`.
    """
    test_dir = Path(test_dir)
    entries = list_test_images(test_dir)
    matched = _match_masks(entries, test_dir, Path(mask_dir), strict_masks) if mask_dir is not None else {}
    msize = size if mask_size == "input" else mask_size
    for defect, path in entries:
        if mask_dir is not None and path not in matched and defect != "good":
            rel = path.relative_to(test_dir)
            expected = Path(mask_dir) / rel.parent / f"{path.stem}_mask.png"
            raise DataError(f"{path}: its mask {expected} is missing. Fix: add the mask "
                            f"(<stem>_mask.png or <stem>.png, anywhere under {mask_dir}), or "
                            "move the image out of the test folder.")
    defect_of = {path: defect for defect, path in entries}
    images, masks, labels, defects, paths = [], [], [], [], []
    # upright images: a mask is drawn on the image as viewers show it
    for path, img in _upright_images(list(defect_of), skip_bad, "loading test images", hint=SKIP_HINT):
        defect, mask_path = defect_of[path], matched.get(path)
        if mask_dir is not None:
            if mask_path is None:
                shape = (img.height, img.width) if msize is None else (msize, msize)
                mask = np.zeros(shape, dtype=bool)
            else:
                mask = load_mask(mask_path, msize, expected=img.size)
                if defect == "good" and mask.any():
                    raise DataError(f"{mask_path}: marks a defect on {path}, which is in "
                                    "good/. Fix: move the image to its defect type's folder.")
            masks.append(mask)
        images.append(_pixels(img, size))
        labels.append(int(defect != "good"))
        defects.append(defect)
        paths.append(path)
    if not images:
        raise DataError(f"{test_dir}: no test images found ({'/'.join(IMAGE_SUFFIXES)})")
    if masks and len({m.shape for m in masks}) > 1:
        raise DataError(f"{test_dir}: test images differ in size; evaluate at a fixed size "
                        "(--eval-size 256) instead of the original resolution")
    return TestSet(_batch(images), np.stack(masks) if masks else None, np.asarray(labels), defects, paths)


def load_test_set(root: Path, category: str, size: int, skip_bad: bool = False,
                  mask_size: int | None | str = "input") -> TestSet:
    """The MVTec layout: test/<defect>/*.png with masks ground_truth/<defect>/<stem>_mask.png
    (see `load_folder_test_set` for the sizes)."""
    base = mvtec_category(root, category)
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: no test folder (MVTec layout test/<defect>/*.png)")
    truth = base / "ground_truth"
    if not truth.is_dir():
        log.warning("%s: no ground_truth/ folder beside test/, so image metrics only. Fix: put "
                    "the masks in ground_truth/<defect>/<stem>_mask.png.", base)
    return load_folder_test_set(test_dir, size, truth if truth.is_dir() else None, skip_bad,
                                mask_size, strict_masks=False)


def load_image_folder(folder: Path, size: int, skip_bad: bool = False) -> torch.Tensor:
    """Every image under a folder (recursively) as uint8 (N, 3, size, size); none is an error."""
    paths = list_images(folder, recursive=True)
    if not paths:
        raise DataError(f"{folder}: no images ({'/'.join(IMAGE_SUFFIXES)}). Fix: point at a "
                        "folder of images.")
    images, kept = load_images(paths, size, skip_bad, hint=SKIP_HINT)
    if not kept:
        raise DataError(f"{folder}: none of the {len(paths)} images could be read (see the "
                        "'skipped' warnings above).")
    return images


def load_defect_set(defect_dir: Path, mask_dir: Path, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Defect images under `defect_dir` (recursively) and their masks under `mask_dir`,
    matched as in `load_folder_test_set`: uint8 (N, 3, size, size) and bool (N, size, size)."""
    defect_dir, mask_dir = Path(defect_dir), Path(mask_dir)
    paths = list_images(defect_dir, recursive=True)
    if (defect_dir / "good").is_dir():  # a test folder (good/ + defect types) given whole
        log.warning("%s: left out, its images are defect-free (the good images come from --good)",
                    defect_dir / "good")
        paths = [p for p in paths if not p.is_relative_to(defect_dir / "good")]
    if not paths:
        raise DataError(f"{defect_dir}: no defect images. Fix: point --defects at a folder of "
                        "images that show defects.")
    matched = _match_masks([("defect", p) for p in paths], defect_dir, mask_dir)
    missing = [p for p in paths if p not in matched]
    if missing:
        raise DataError(f"{missing[0]}: no mask under {mask_dir} ({len(missing)} image(s) without "
                        "one). Fix: add <stem>_mask.png (or <stem>.png) for each defect image.")
    images, masks = [], []
    for path, img in _upright_images(paths, False, "loading defect images"):
        masks.append(load_mask(matched[path], size, expected=img.size))
        images.append(_pixels(img, size))
    return _batch(images), np.stack(masks)
