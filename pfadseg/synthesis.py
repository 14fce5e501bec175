"""Synthetic defects for training (DRAEM-style Perlin masks + texture blending).

Everything works on whole batches in torch and draws its randomness from an explicit
``torch.Generator`` so that a run is reproducible. See docs/paper-to-code.md (Eq. 1).

Choices worth knowing:
- Perlin noise follows DRAEM: lattice resolution ``2**randint(0, 6)`` per axis and per
  sample, unit gradients at random angles, quintic fade, scaled by sqrt(2) so values
  lie in [-1, 1].
- The noise is rotated by U(-90, 90) degrees with bilinear ``grid_sample`` and
  **zeros** padding (like imgaug's default constant mode in DRAEM); padded corners
  are 0 < 0.5, so they never become defect.
- A sample whose thresholded mask is empty stays a valid normal sample with an
  all-zero mask (DRAEM does the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Rotation augmentation of the clean image in the official DeSTSeg code.
ROTATION_POLICY: dict[str, str] = {
    **{c: "none" for c in ("capsule", "metal_nut", "pill", "toothbrush", "transistor")},
    **{c: "small" for c in ("wood", "zipper", "cable")},
    **{
        c: "right_angle"
        for c in ("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw")
    },
}

_MAX_LOG2_RES = 5  # resolutions 2**0 .. 2**5 per axis
_MAX_RES = 2**_MAX_LOG2_RES
_LATTICE = _MAX_RES + 1  # gradient lattice points per axis at the finest resolution
_OFFICIAL_FILL = 114.0 / 255.0  # grey the official code fills rotated corners with
ROTATION_POLICIES = ("none", "small", "right_angle")  # rotate_images' augmentations


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3 (C2-continuous interpolation)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    batch: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return DRAEM-style 2D Perlin noise of shape (B, H, W), values in [-1, 1].

    Each sample draws its own lattice resolution (2**sx, 2**sy), sx, sy in 0..5.
    The noise is defined as if generated on a grid padded up to a multiple of 32
    and cropped to ``size``, so any H, W works. Random numbers come from
    ``generator`` (on its device); the computation runs on ``device`` (default:
    the generator's device).
    """
    height, width = size
    gen_device = generator.device
    device = gen_device if device is None else torch.device(device)
    log2_res = torch.randint(
        0, _MAX_LOG2_RES + 1, (batch, 2), generator=generator, device=gen_device
    )
    angles = torch.rand(batch, _LATTICE * _LATTICE, generator=generator, device=gen_device)
    res = (2**log2_res).to(device=device, dtype=torch.float32)  # (B, 2)
    angles = angles.to(device) * (2.0 * math.pi)
    grad_y, grad_x = torch.cos(angles), torch.sin(angles)  # (B, L*L) unit gradients

    padded_h = math.ceil(height / _MAX_RES) * _MAX_RES
    padded_w = math.ceil(width / _MAX_RES) * _MAX_RES
    # Lattice coordinate of every row / column, per sample: (B, H) and (B, W).
    coord_y = torch.arange(height, device=device, dtype=torch.float32) * (res[:, :1] / padded_h)
    coord_x = torch.arange(width, device=device, dtype=torch.float32) * (res[:, 1:] / padded_w)
    cell_y, cell_x = coord_y.floor(), coord_x.floor()
    frac_y = (coord_y - cell_y)[:, :, None]  # (B, H, 1)
    frac_x = (coord_x - cell_x)[:, None, :]  # (B, 1, W)
    base = (cell_y.long() * _LATTICE)[:, :, None] + cell_x.long()[:, None, :]  # (B, H, W)
    base = base.reshape(batch, -1)

    def corner(dy: int, dx: int) -> torch.Tensor:
        """Dot product of the corner gradient with the offset from that corner."""
        index = base + (dy * _LATTICE + dx)
        gy = torch.gather(grad_y, 1, index).view(batch, height, width)
        gx = torch.gather(grad_x, 1, index).view(batch, height, width)
        return gy * (frac_y - dy) + gx * (frac_x - dx)

    t_y, t_x = _fade(frac_y), _fade(frac_x)
    top = torch.lerp(corner(0, 0), corner(0, 1), t_x)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), t_x)
    return math.sqrt(2.0) * torch.lerp(top, bottom, t_y)


def _rotation_grid(
    angles_deg: torch.Tensor, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Sampling grid that rotates (B, C, H, W) images by ``angles_deg`` about the centre.

    The normalised affine matrix is corrected for the aspect ratio so the rotation
    is rigid in pixel space for non-square images too.
    """
    height, width = size
    rad = angles_deg.to(device=device, dtype=torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        (
            torch.stack((cos, sin * (height / width), zero), dim=-1),
            torch.stack((-sin * (width / height), cos, zero), dim=-1),
        ),
        dim=1,
    )  # (B, 2, 3)
    return F.affine_grid(theta, [angles_deg.shape[0], 1, height, width], align_corners=False)


def perlin_mask(
    batch: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return binary defect masks (B, 1, H, W) float: rotated Perlin noise > 0.5 (DRAEM).

    Rotation is by U(-90, 90) degrees per sample (bilinear, zeros padding).
    """
    gen_device = generator.device
    device = gen_device if device is None else torch.device(device)
    noise = perlin_noise(batch, size, generator, device)[:, None]
    angles = (torch.rand(batch, generator=generator, device=gen_device) * 180.0 - 90.0).to(device)
    grid = _rotation_grid(angles, size, device)
    rotated = F.grid_sample(noise, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (rotated > 0.5).float()


class DefectSynthesizer:
    """Pastes Perlin-shaped patches of random textures into clean images (DRAEM recipe).

    ``I_aug = I*(1-M) + (1-b)*A*M + b*I*M`` with texture A drawn uniformly from the
    bank and b = 0.8*U(0,1) per sample, so the texture opacity 1-b lies in (0.2, 1].
    Every sample is drawn a defect, as in the official code (whose Perlin mask comes out
    empty for about one in twenty at 256 px).
    """

    def __init__(self, textures: torch.Tensor) -> None:
        """``textures``: (K, 3, H, W) in [0, 1] at the input size."""
        if textures.ndim != 4 or textures.shape[1] != 3 or textures.shape[0] == 0:
            raise ValueError(f"textures must be (K>0, 3, H, W), got {tuple(textures.shape)}")
        self.textures = textures

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (augmented (B, 3, H, W), mask (B, 1, H, W) float in {0, 1})."""
        batch, _, height, width = images.shape
        if self.textures.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"texture size {tuple(self.textures.shape[-2:])} != image size {(height, width)}"
            )
        device, gen_device = images.device, generator.device
        mask = perlin_mask(batch, (height, width), generator, device)
        picks = torch.randint(
            0, self.textures.shape[0], (batch,), generator=generator, device=gen_device
        )
        beta = 0.8 * torch.rand(batch, generator=generator, device=gen_device)
        texture = self.textures[picks.to(self.textures.device)]
        texture = texture.to(device=device, dtype=images.dtype)
        beta = beta.to(device=device, dtype=images.dtype).view(batch, 1, 1, 1)
        mask = mask.to(images.dtype)
        # I*(1-M) + (1-b)*A*M + b*I*M == I + (1-b)*M*(A - I): one fused lerp, and
        # exactly I wherever M = 0.
        augmented = torch.lerp(images, texture, (1.0 - beta) * mask)
        return augmented, mask


def rotation_policy_for(category: str) -> str:
    """Return the official rotation policy of an MVTec category ("none" if unknown)."""
    return ROTATION_POLICY.get(category, "none")


def rotate_images(
    images: torch.Tensor,
    policy: str,
    generator: torch.Generator,
    max_angle: float = 5.0,
) -> torch.Tensor:
    """Randomly rotate clean images (B, C, H, W) per the category's policy.

    - "none": returns ``images`` itself, untouched.
    - "small": U(-max_angle, max_angle) degrees per sample.
    - "right_angle": a random multiple of 90 degrees (exact, ``torch.rot90``; needs
      square images), then U(-max_angle, max_angle) degrees.

    The small rotation is bilinear and fills the uncovered corners with grey
    (114/255, as the official code does with PIL). ``max_angle=0`` skips the
    resampling, keeping the output exact.
    """
    if policy not in ROTATION_POLICIES:
        raise ValueError(f"unknown rotation policy {policy!r}")
    if policy == "none":
        return images
    batch, _, height, width = images.shape
    gen_device = generator.device
    out = images
    if policy == "right_angle":
        if height != width:
            raise ValueError(f"right_angle rotation needs square images, got {(height, width)}")
        quarter_turns = torch.randint(0, 4, (batch,), generator=generator, device=gen_device).cpu()
        out = images.clone()
        for k in range(1, 4):
            idx = (quarter_turns == k).nonzero().flatten().to(images.device)
            if idx.numel():
                out[idx] = torch.rot90(images[idx], k, dims=(2, 3))
    angles = (torch.rand(batch, generator=generator, device=gen_device) * 2.0 - 1.0) * max_angle
    if max_angle == 0:
        return out
    grid = _rotation_grid(angles, (height, width), images.device).to(images.dtype)
    shifted = F.grid_sample(out - _OFFICIAL_FILL, grid, padding_mode="zeros", align_corners=False)
    return shifted + _OFFICIAL_FILL


def procedural_textures(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) colourful Perlin textures in [0, 1].

    The offline stand-in for DTD when no texture folder is given: each texture
    mixes three noise fields of random scales through a random colour matrix.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = perlin_noise(3 * count, (size, size), generator).view(count, 3, size, size)
    colours = torch.rand(count, 3, 3, generator=generator)
    mixed = torch.einsum("kij,kjhw->kihw", colours, (noise + 1) / 2) / colours.sum(2, keepdim=True).unsqueeze(-1)
    lo = mixed.amin(dim=(1, 2, 3), keepdim=True)
    hi = mixed.amax(dim=(1, 2, 3), keepdim=True)
    return (mixed - lo) / (hi - lo).clamp_min(1e-6)
