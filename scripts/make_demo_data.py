"""Build pfadseg/demo_data from the full MVTec AD bottle category (run once by maintainers).

A small, downscaled, deterministic sample: every k-th training image and a few
test images of each defect type, as 256x256 JPEG (masks as PNG), with the
dataset's licence and attribution.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

SIZE = 256


def _save(src: Path, dst: Path, mask: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    img = Image.open(src)
    if mask:
        img.convert("L").resize((SIZE, SIZE), Image.BILINEAR).point(lambda v: 255 if v >= 128 else 0).save(dst)
    else:
        img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).save(dst, quality=92)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, default=Path("../shared/data/mvtec_ad/bottle"))
    parser.add_argument("--out", type=Path, default=Path("pfadseg/demo_data/bottle"))
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--per-defect", type=int, default=4)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    train = sorted((args.source / "train" / "good").glob("*.png"))
    step = max(1, len(train) // args.train)
    for src in train[::step][: args.train]:
        _save(src, args.out / "train" / "good" / f"{src.stem}.jpg")
    for defect_dir in sorted((args.source / "test").iterdir()):
        files = sorted(defect_dir.glob("*.png"))
        step = max(1, len(files) // args.per_defect)
        for src in files[::step][: args.per_defect]:
            _save(src, args.out / "test" / defect_dir.name / f"{src.stem}.jpg")
            if defect_dir.name != "good":
                gt = args.source / "ground_truth" / defect_dir.name / f"{src.stem}_mask.png"
                _save(gt, args.out / "ground_truth" / defect_dir.name / f"{src.stem}_mask.png", mask=True)
    shutil.copy(args.source / "license.txt", args.out / "license.txt")
    (args.out / "ATTRIBUTION.md").write_text(
        "# Source and licence\n\n"
        "These images are a downscaled (256x256) sample of the 'bottle' category of the\n"
        "MVTec Anomaly Detection dataset (MVTec AD), (c) MVTec Software GmbH, licensed\n"
        "CC BY-NC-SA 4.0 (see license.txt): non-commercial use only.\n\n"
        "Paul Bergmann, Michael Fauser, David Sattlegger, Carsten Steger. MVTec AD - A\n"
        "Comprehensive Real-World Dataset for Unsupervised Anomaly Detection. CVPR 2019.\n\n"
        "Built with scripts/make_demo_data.py (every k-th image, masks re-thresholded).\n")


if __name__ == "__main__":
    main()
