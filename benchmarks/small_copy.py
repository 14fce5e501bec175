"""A small copy of one MVTec AD category and of the textures a run reads, for a
machine the full data cannot travel to (a lent GPU takes 64 MiB in all).

Images are resized once as pfadseg's loader resizes them (bilinear, masks
thresholded at 0.5) and stored as PNG, and the textures are the very files that
`--texture-limit N` picks, unchanged; so a run on the copy at `--image-size` S
reads the same pixels as a run on the full data at S.

    python benchmarks/small_copy.py --data ../shared/data/mvtec_ad --category bottle \\
        --textures ../shared/data/dtd/images --texture-limit 300 --out .gpu/data
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pfadseg.data import list_images, load_mask, load_rgb, texture_paths


def copy_category(root: Path, category: str, size: int, out: Path) -> int:
    """Resized copies of <category>/{train,test,ground_truth}; returns the file count."""
    source = root / category
    paths = [p for part in ("train", "test", "ground_truth") for p in list_images(source / part, recursive=True)]
    if not paths:
        raise SystemExit(f"{source}: no MVTec-layout images (train/, test/, ground_truth/)")
    for path in tqdm(paths, desc=category, unit="image"):
        target = (out / category / path.relative_to(source)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.relative_to(source).parts[0] == "ground_truth":
            pixels = load_mask(path, size).astype(np.uint8) * 255
        else:
            pixels = load_rgb(path, size)
        Image.fromarray(pixels).save(target)
    return len(paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="MVTec AD root")
    p.add_argument("--category", default="bottle", help="category folder (default: %(default)s)")
    p.add_argument("--textures", type=Path, help="texture folder (DTD images/) to take a subset of")
    p.add_argument("--texture-limit", type=int, help="the textures `--texture-limit N` picks (default: all)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="folder for mvtec/<category> and textures/")
    args = p.parse_args(argv)
    count = copy_category(args.data, args.category, args.size, args.out / "mvtec")
    if args.textures:
        for path in texture_paths(args.textures, args.texture_limit):
            target = args.out / "textures" / path.relative_to(args.textures)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    print(f"{count} images of {args.category} at {args.size} px in {args.out / 'mvtec'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
