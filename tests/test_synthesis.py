"""Tests for pfadseg.synthesis: Perlin masks, texture blending, rotations, texture loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfadseg.data import load_textures
from pfadseg.synthesis import (
    ROTATION_POLICY,
    DefectSynthesizer,
    perlin_mask,
    perlin_noise,
    rotate_images,
    rotation_policy_for,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draem_reference(
    angles: torch.Tensor, res: tuple[int, int], shape: tuple[int, int]
) -> torch.Tensor:
    """Straightforward DRAEM-style Perlin (tile gradients per cell) for one sample."""
    lattice = int(math.isqrt(angles.numel()))
    grad = torch.stack(
        (torch.cos(2 * math.pi * angles), torch.sin(2 * math.pi * angles)), -1
    ).view(lattice, lattice, 2)[: res[0] + 1, : res[1] + 1]
    d = (shape[0] // res[0], shape[1] // res[1])
    ys = torch.arange(shape[0], dtype=torch.float64) * res[0] / shape[0]
    xs = torch.arange(shape[1], dtype=torch.float64) * res[1] / shape[1]
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1) % 1

    def tile(sy: slice, sx: slice) -> torch.Tensor:
        return grad[sy, sx].double().repeat_interleave(d[0], 0).repeat_interleave(d[1], 1)

    def dot(g: torch.Tensor, oy: int, ox: int) -> torch.Tensor:
        return (grid[..., 0] - oy) * g[..., 0] + (grid[..., 1] - ox) * g[..., 1]

    n00 = dot(tile(slice(0, -1), slice(0, -1)), 0, 0)
    n10 = dot(tile(slice(1, None), slice(0, -1)), 1, 0)
    n01 = dot(tile(slice(0, -1), slice(1, None)), 0, 1)
    n11 = dot(tile(slice(1, None), slice(1, None)), 1, 1)
    t = 6 * grid**5 - 15 * grid**4 + 10 * grid**3
    top = torch.lerp(n00, n01, t[..., 1])
    bottom = torch.lerp(n10, n11, t[..., 1])
    return math.sqrt(2) * torch.lerp(top, bottom, t[..., 0])


# ---------------------------------------------------------------- Perlin noise


def test_perlin_matches_straightforward_reference_including_crop() -> None:
    # White-box: replay the generator's draws (resolution exponents, then angles).
    batch, size = 6, (70, 45)  # not multiples of 32: generated on 96x64, then cropped
    noise = perlin_noise(batch, size, gen(3))
    g = gen(3)
    log2_res = torch.randint(0, 6, (batch, 2), generator=g)
    angles = torch.rand(batch, 33 * 33, generator=g)
    for i in range(batch):
        res = (2 ** int(log2_res[i, 0]), 2 ** int(log2_res[i, 1]))
        ref = draem_reference(angles[i], res, (96, 64))[: size[0], : size[1]]
        torch.testing.assert_close(noise[i].double(), ref, atol=1e-5, rtol=0)


def test_perlin_range_and_shape() -> None:
    noise = perlin_noise(32, (256, 256), gen(0))
    assert noise.shape == (32, 256, 256)
    assert noise.abs().max() <= 1.0 + 1e-5
    assert noise.abs().max() > 0.6  # actually uses most of [-1, 1]
    assert abs(noise.mean().item()) < 0.1


def test_perlin_scales_vary_per_sample_and_axis() -> None:
    noise = perlin_noise(64, (128, 128), gen(1))
    rough_y = (noise[:, 1:] - noise[:, :-1]).abs().mean((1, 2))
    rough_x = (noise[:, :, 1:] - noise[:, :, :-1]).abs().mean((1, 2))
    rough = rough_x + rough_y
    assert rough.max() / rough.min() > 8  # coarse (res 1) and fine (res 32) both occur
    anisotropy = rough_x / rough_y
    assert anisotropy.max() > 4 and anisotropy.min() < 0.25  # axes drawn independently


def test_perlin_deterministic() -> None:
    a = perlin_noise(4, (64, 64), gen(7))
    b = perlin_noise(4, (64, 64), gen(7))
    c = perlin_noise(4, (64, 64), gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- masks


def test_mask_properties() -> None:
    masks = torch.cat([perlin_mask(32, (128, 128), gen(seed)) for seed in range(4)])
    assert masks.shape == (128, 1, 128, 128)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    coverage = masks.mean((1, 2, 3))
    assert (coverage > 0).float().mean() > 0.8  # most samples get a defect
    assert coverage.max() > 0.05 and coverage.max() > 5 * coverage[coverage > 0].min()
    assert coverage.max() < 0.5


def test_mask_rotation_is_applied() -> None:
    # Masks are rotated noise, so they differ from the unrotated threshold.
    batch, size = 8, (64, 64)
    unrotated = (perlin_noise(batch, size, gen(5)) > 0.5).float()[:, None]
    rotated = perlin_mask(batch, size, gen(5))
    assert not torch.equal(unrotated, rotated)


# ---------------------------------------------------------------- blending


def test_blend_formula_exact() -> None:
    torch.manual_seed(0)
    images = torch.rand(16, 3, 64, 64)
    texture = torch.rand(1, 3, 64, 64) * 0.5 + 0.5  # differs from images almost everywhere
    out, mask = DefectSynthesizer(texture)(images, gen(11))
    assert out.shape == images.shape and mask.shape == (16, 1, 64, 64)
    m = mask.bool().expand_as(images)
    assert torch.equal(out[~m], images[~m])  # untouched outside the mask, bit-exact
    checked = 0
    for i in range(16):
        if not mask[i].any():
            continue
        # Recover b from the pixel with the largest |I - A| and check every masked pixel.
        diff = (images[i] - texture[0]).abs() * mask[i]
        c, y, x = np.unravel_index(int(diff.argmax()), diff.shape)
        a_px, i_px = texture[0, c, y, x], images[i, c, y, x]
        b = ((out[i, c, y, x] - a_px) / (i_px - a_px)).item()
        assert 0.0 < b <= 0.8 + 1e-5
        m_i, a, img = mask[i], texture[0], images[i]
        expected = img * (1 - m_i) + (1 - b) * a * m_i + b * img * m_i
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)
        checked += 1
    assert checked >= 12


def test_blend_with_known_constants() -> None:
    # I = 0 and A = 1 make I_aug = (1 - b) on the mask: one opacity per sample in [0.2, 1).
    images = torch.zeros(32, 3, 32, 32)
    out, mask = DefectSynthesizer(torch.ones(1, 3, 32, 32))(images, gen(2))
    opacities = []
    for i in range(32):
        inside = mask[i].bool().expand(3, -1, -1)
        assert not out[i][~inside].any()
        values = out[i][inside]
        if values.numel():
            assert values.max() - values.min() < 1e-6
            opacities.append(values[0].item())
    assert all(0.2 - 1e-6 <= o < 1.0 for o in opacities)
    assert max(opacities) - min(opacities) > 0.2  # b is random per sample


def test_synthesizer_uses_several_textures() -> None:
    textures = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16) / 4 + 0.1
    images = torch.zeros(64, 3, 16, 16)
    out, mask = DefectSynthesizer(textures.contiguous())(images, gen(4))
    # With I = 0, out / (1 - b) = A on the mask; ratios between samples reveal distinct textures.
    seen = {round(float(out[i].max()), 4) for i in range(64) if mask[i].any()}
    assert len(seen) > 10


def test_synthesizer_deterministic() -> None:
    images = torch.rand(8, 3, 32, 32, generator=gen(0))
    syn = DefectSynthesizer(torch.rand(3, 3, 32, 32, generator=gen(1)))
    a, ma = syn(images, gen(9))
    b, mb = syn(images, gen(9))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert sum(bool(m.any()) for m in ma) >= 6  # a defect drawn on each; a Perlin mask can be empty


def test_synthesizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        DefectSynthesizer(torch.rand(0, 3, 8, 8))
    with pytest.raises(ValueError, match="texture size"):
        DefectSynthesizer(torch.rand(2, 3, 8, 8))(torch.rand(1, 3, 16, 16), gen(0))


# ---------------------------------------------------------------- rotation augmentation


def test_rotation_policy_table() -> None:
    assert rotation_policy_for("bottle") == "right_angle"
    assert rotation_policy_for("wood") == "small"
    assert rotation_policy_for("pill") == "none"
    assert rotation_policy_for("not_a_category") == "none"
    assert len(ROTATION_POLICY) == 15
    assert sorted(set(ROTATION_POLICY.values())) == ["none", "right_angle", "small"]


def test_none_policy_returns_input() -> None:
    images = torch.rand(4, 3, 16, 16)
    assert rotate_images(images, "none", gen(0)) is images


def test_right_angle_policy_exact_quarter_turns() -> None:
    base = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8)  # no symmetry
    images = base.repeat(32, 1, 1, 1)
    out = rotate_images(images, "right_angle", gen(0), max_angle=0.0)
    candidates = [torch.rot90(base[0], k, dims=(1, 2)) for k in range(4)]
    turns = []
    for i in range(32):
        matches = [k for k, c in enumerate(candidates) if torch.equal(out[i], c)]
        assert len(matches) == 1
        turns.append(matches[0])
    assert set(turns) == {0, 1, 2, 3}
    assert torch.equal(images, base.repeat(32, 1, 1, 1))  # input not modified


def test_small_policy_rotates_slightly() -> None:
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=64, mode="bilinear")
    out = rotate_images(smooth, "small", gen(0))
    assert out.shape == smooth.shape
    change = (out - smooth).abs().mean((1, 2, 3))
    assert (change > 0).all() and (change < 0.1).all()
    flat = torch.full((2, 3, 32, 32), 114 / 255)  # the official fill: a flat grey image stays flat
    torch.testing.assert_close(rotate_images(flat, "small", gen(1), max_angle=30.0), flat)
    grey = rotate_images(torch.zeros(2, 3, 32, 32), "small", gen(1), max_angle=30.0)
    assert abs(grey[0, 0, 0, 0].item() - 114 / 255) < 0.05  # corner filled with official grey


def test_rotation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        rotate_images(torch.rand(1, 3, 8, 8), "diagonal", gen(0))
    with pytest.raises(ValueError, match="square"):
        rotate_images(torch.rand(1, 3, 8, 12), "right_angle", gen(0))


# ---------------------------------------------------------------- texture loading


def _write(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def test_load_textures_dtd_layout(tmp_path: Path) -> None:
    root = tmp_path / "dtd"
    _write(root / "images" / "banded" / "banded_0001.jpg", (40, 30))
    _write(root / "images" / "banded" / "banded_0002.PNG", (30, 40))
    _write(root / "images" / "dotted" / "dotted_0001.bmp", (20, 20), mode="L")
    (root / "images" / "readme.txt").write_text("not an image")
    textures = load_textures(root, 24)
    assert textures.shape == (3, 3, 24, 24)
    assert textures.dtype == torch.float32
    assert 0.0 <= textures.min() and textures.max() <= 1.0
    assert load_textures(root / "images", 16, limit=2).shape == (2, 3, 16, 16)


def test_load_textures_errors_name_folder_and_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty_textures"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty_textures"):
        load_textures(empty, 16)
    with pytest.raises(ValueError, match="missing_dir"):
        load_textures(tmp_path / "missing_dir", 16)
    bad_dir = tmp_path / "mixed"
    _write(bad_dir / "good.png", (8, 8))
    (bad_dir / "broken_texture.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="broken_texture.jpg"):
        load_textures(bad_dir, 16)
