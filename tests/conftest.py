"""Shared fixtures: a tiny MVTec-layout dataset and a texture folder, written with PIL."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# child processes (torchrun workers, scripts under tests/, the CLI) import this checkout,
# not whichever pfadseg the environment has installed
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")]))
# the servers under test listen on localhost: never through an HTTP(S)_PROXY (httpx, selenium)
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, ["127.0.0.1,localhost,::1", os.environ.get(_var)]))

# pytest-xdist workers share the cores: each, and the processes it starts, use its share
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _SHARE = max(1, _CORES // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
    torch.set_num_threads(_SHARE)

CATEGORY = "widget"
IMG = 80  # source images are 80x80; models run at 64x64


def _smooth_image(rng: np.random.Generator, size: int = IMG) -> np.ndarray:
    """A smooth random RGB image (uint8 H, W, 3): gradients plus a little noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(x * rng.uniform(2, 6) + rng.uniform(0, 6)),
                     np.cos(y * rng.uniform(2, 6) + rng.uniform(0, 6)),
                     np.sin((x + y) * rng.uniform(2, 6))], axis=-1)
    img = 127.5 + 100 * base + rng.normal(0, 8, base.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root: Path, category: str = CATEGORY, n_train: int = 4, seed: int = 0) -> Path:
    """<root>/<category>/{train/good, test/good, test/crack, ground_truth/crack}; returns root."""
    rng = np.random.default_rng(seed)
    base = root / category
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_smooth_image(rng)).save(base / "train/good" / f"{i:03d}.png")
    for i in range(2):
        Image.fromarray(_smooth_image(rng)).save(base / "test/good" / f"{i:03d}.png")
    for i in range(2):
        img = _smooth_image(rng)
        mask = np.zeros((IMG, IMG), dtype=np.uint8)
        mask[20 + 10 * i:40 + 10 * i, 30:50] = 255
        img[mask > 0] = (255, 0, 0)
        Image.fromarray(img).save(base / "test/crack" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/crack" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Root of a fresh tiny MVTec-layout dataset (category CATEGORY)."""
    return write_dataset(tmp_path / "mvtec")


@pytest.fixture
def textures(tmp_path: Path) -> Path:
    """A folder of two texture images (one in a sub-folder, DTD-style)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "textures"
    (folder / "banded").mkdir(parents=True)
    Image.fromarray(_smooth_image(rng, 48)).save(folder / "banded" / "banded_0001.jpg")
    Image.fromarray(_smooth_image(rng, 96)).save(folder / "noise.png")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is faster, above all while other jobs load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
