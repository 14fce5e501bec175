"""The scripts behind the GPU figures run end to end here first (a GPU session has
minutes): benchmarks/speed.py and benchmarks/small_copy.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from pfadseg.data import load_test_set, load_textures, load_train_images
from pfadseg.demo import demo_root

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_script_prints_its_figures_and_profile(one_thread: None, capsys: pytest.CaptureFixture) -> None:
    speed = _script("speed")
    # PFADSeg: its AFF made --quick's former batch of 2 fail (exploding gradients, a NaN loss)
    assert speed.main(["--device", "cpu", "--quick", "--models", "pfadseg", "--precisions", "fp32",
                       "--no-compile", "--profile", "3"]) == 0
    out, err = capsys.readouterr()
    figures = json.loads(out)["models"]["pfadseg"]["fp32"]
    assert set(figures) == {"stage1_images_per_s", "stage2_images_per_s", "inference_images_per_s",
                            "peak_memory_mib", "paper_schedule_minutes"}
    assert all(value > 0 for value in figures.values())
    for what in ("stage 1", "stage 2", "inference"):
        assert f"--- pfadseg fp32 {what}:" in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"model"')]
    assert [(line["model"], line["stage"]) for line in lines] == [("pfadseg", "stage 1"), ("pfadseg", "stage 2"),
                                                                  ("pfadseg", "inference")]
    assert [line["images_per_s"] for line in lines] == [figures[key] for key in
                                                        ("stage1_images_per_s", "stage2_images_per_s",
                                                         "inference_images_per_s")]


def test_small_copy_reads_as_the_full_data(tmp_path: Path) -> None:
    """At the copy's size, pfadseg loads the very pixels, masks and textures it loads
    from the originals (the bundled sample stands in for MVTec AD and DTD)."""
    root, size = demo_root(), 64
    textures = root / "bottle" / "train" / "good"  # any folder of images will do
    assert _script("small_copy").main(["--data", str(root), "--category", "bottle", "--size", str(size),
                                       "--textures", str(textures), "--texture-limit", "5",
                                       "--out", str(tmp_path)]) == 0
    copy = tmp_path / "mvtec"
    assert torch.equal(load_train_images(copy / "bottle" / "train" / "good", size)[0],
                       load_train_images(root / "bottle" / "train" / "good", size)[0])
    full, small = load_test_set(root, "bottle", size), load_test_set(copy, "bottle", size)
    assert torch.equal(small.images, full.images) and np.array_equal(small.masks, full.masks)
    assert small.masks.any() and small.defects == full.defects
    assert torch.equal(load_textures(tmp_path / "textures", size), load_textures(textures, size, 5))
