"""Heatmap overlays and mask images for people to look at."""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

# anchors of a perceptually ordered blue -> cyan -> yellow -> red colour map
_ANCHORS = np.array([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [0.0, 0.9, 0.9],
                     [1.0, 0.9, 0.0], [1.0, 0.3, 0.0], [0.6, 0.0, 0.0]])


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> uint8 RGB (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """The anomaly map (in [0, 1], image size) blended over the RGB image, more
    opaque where the score is high so normal regions stay visible, with the
    outline of the binary mask drawn in white when given."""
    heat = colorize(amap).astype(np.float32)
    a = alpha * (0.3 + 0.7 * np.clip(amap, 0.0, 1.0))[..., None]
    out = image.astype(np.float32) * (1 - a) + heat * a
    if mask is not None and mask.any():
        out[outline(mask)] = 255.0
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The border of a boolean mask, `width` pixels wide, inside it; where the mask
    meets the image's edge there is no border (the region goes on out of view)."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)


def mask_image(mask: np.ndarray) -> Image.Image:
    """Binary mask as a black/white PNG-ready image."""
    return Image.fromarray((mask.astype(np.uint8) * 255), mode="L")
