"""Decision thresholds found without test labels, and scores normalised to them.

A model outputs probabilities: the segmentation map is a sigmoid and the image
score the mean of its top pixels, both in [0, 1]. `calibrate` picks an image
threshold (verdict: score >= image) and a pixel threshold (mask: map >= pixel)
from defect-free images the model never trained on and from synthetic defects
drawn on them with the run's own `DefectSynthesizer`:

- image threshold: a false-alarm rate on the held-out good images (default 1%).
  The real defects of a product are unknown at training time; synthetic ones
  are a different population (usually louder), so a threshold between them and
  the good images sits too high for subtle real defects. The good images are
  the one population the held-out split really samples.
- pixel threshold: the F1-maximising threshold on the synthetic defects' masks.
  A false-alarm rate on good pixels says nothing about how much of a defect the
  mask covers; the segmentation net was trained to output exactly these masks,
  so F1 on them measures what the mask is for.

With the user's own labelled defects (`defect_images`, `defect_masks`), both
thresholds maximise F1 on them instead (method "f1").

`Thresholds.normalize_*` map raw values to [0, 1] with the threshold at 0.5 by
comparing odds: n = sigmoid(logit(raw) - logit(threshold)). Raw values are
probabilities, so log-odds are their natural linear scale; no spread is fitted,
so a few held-out images cannot mis-scale it.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from . import metrics
from .inference import infer
from .models import AnomalyModel
from .synthesis import DefectSynthesizer

DEFAULT_FALSE_ALARM_RATE = 0.01
SYNTHETIC_COPIES = 2  # synthetic defects drawn per held-out good image
_EPS = 1e-6  # probabilities are clipped to [_EPS, 1 - _EPS] before taking log-odds


class CalibrationError(ValueError):
    """Calibration cannot run on what it was given; the message says what to fix."""


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _normalize(raw: np.ndarray | float, threshold: float) -> np.ndarray | float:
    """Odds of `raw` relative to the threshold's, as a probability: monotonic,
    in [0, 1], 0.5 exactly at the threshold. Keeps scalars scalar and float32 float32."""
    arr = np.asarray(raw)
    out = _sigmoid(_logit(arr) - _logit(threshold))
    if arr.ndim == 0:
        return float(out)
    return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64)


@dataclass(frozen=True)
class Thresholds:
    """An image and a pixel threshold on raw model outputs, and how they were found.

    `method` is "false_alarm+synthetic_f1" (training's default), "f1" (labelled
    defects), "false_alarm" (no defects at all: the pixel threshold then also
    comes from a false-alarm rate) or "legacy" (a checkpoint from before
    calibration, whose one threshold served for both).
    """

    image: float
    pixel: float
    method: str
    false_alarm_rate: float | None = None
    n_good: int = 0
    n_defects: int = 0

    def __post_init__(self) -> None:
        for name in ("image", "pixel"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise CalibrationError(f"{name} threshold {value} is not a finite number")

    def normalize_image(self, score: np.ndarray | float) -> np.ndarray | float:
        """Image score(s) -> [0, 1], 0.5 at the image threshold (>= 0.5: anomalous)."""
        return _normalize(score, self.image)

    def normalize_map(self, amap: np.ndarray | float) -> np.ndarray | float:
        """Anomaly map(s) -> [0, 1], 0.5 at the pixel threshold (>= 0.5: in the mask)."""
        return _normalize(amap, self.pixel)

    def to_meta(self) -> dict:
        """JSON-ready fields for a checkpoint's metadata ("threshold" stays the image one)."""
        return {"threshold": self.image, "thresholds": {
            "image": self.image, "pixel": self.pixel, "method": self.method,
            "false_alarm_rate": self.false_alarm_rate, "n_good": self.n_good,
            "n_defects": self.n_defects, "normalization": "odds"}}

    @classmethod
    def from_meta(cls, meta: dict) -> Thresholds:
        """From a checkpoint's metadata; a checkpoint from before calibration has only
        `threshold`, which then serves for pixels too (as `predict` used it)."""
        saved = meta.get("thresholds")
        if isinstance(saved, dict):
            try:
                return cls(image=float(saved["image"]), pixel=float(saved["pixel"]),
                           method=str(saved.get("method", "unknown")),
                           false_alarm_rate=saved.get("false_alarm_rate"),
                           n_good=int(saved.get("n_good", 0)),
                           n_defects=int(saved.get("n_defects", 0)))
            except (KeyError, TypeError, ValueError) as exc:
                raise CalibrationError(f"damaged thresholds in the checkpoint metadata ({exc}). "
                                       "Fix: run `pfadseg calibrate` on it.") from exc
        if meta.get("threshold") is None:
            raise CalibrationError("the checkpoint stores no threshold. Fix: run `pfadseg "
                                   "calibrate --checkpoint C --good DIR` on it, or pass a threshold.")
        value = float(meta["threshold"])
        return cls(image=value, pixel=value, method="legacy")


def false_alarm_threshold(good_scores: np.ndarray, rate: float) -> float:
    """Image threshold that flags a fraction `rate` of defect-free images.

    A normal distribution fitted to the log-odds of the good scores gives it:
    with the few held-out images there are (tens), an empirical 1% quantile
    would just be the highest one, the noise of a single image.
    """
    if not 0.0 < rate < 1.0:
        raise CalibrationError(f"false-alarm rate must be in (0, 1), got {rate}")
    z = _logit(np.asarray(good_scores, dtype=np.float64).ravel())
    if z.size < 2:
        raise CalibrationError(f"need at least 2 good images to calibrate, got {z.size}")
    spread = max(float(z.std(ddof=1)), 1e-3)
    return float(_sigmoid(np.asarray(z.mean() + NormalDist().inv_cdf(1.0 - rate) * spread)))


def pixel_false_alarm_threshold(good_maps: np.ndarray, rate: float) -> float:
    """Pixel threshold above which a fraction `rate` of defect-free pixels lie
    (empirical: good images give hundreds of thousands of pixels)."""
    if not 0.0 < rate < 1.0:
        raise CalibrationError(f"false-alarm rate must be in (0, 1), got {rate}")
    return float(np.quantile(np.asarray(good_maps, dtype=np.float64), 1.0 - rate))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The F1-maximising threshold of "score >= t". When a whole range of
    thresholds reaches the best F1 (classes apart), the log-odds midpoint of
    that range: a margin on both sides instead of touching the lowest positive."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _, top = metrics.f1_max(scores, labels)
    below = scores[scores < top]
    if below.size == 0:
        return top
    # Every threshold in (highest score under top, top] gives the same counts.
    return float(_sigmoid(0.5 * (_logit(top) + _logit(below.max()))))


def calibrate_outputs(good_scores: np.ndarray, good_maps: np.ndarray,
                      defect_scores: np.ndarray | None = None, defect_maps: np.ndarray | None = None,
                      defect_masks: np.ndarray | None = None, *, synthetic: bool = True,
                      false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> Thresholds:
    """Thresholds from model outputs already computed (see the module docstring).

    Synthetic defects (`synthetic=True`): image threshold at `false_alarm_rate`
    on the good images, pixel threshold at F1-max on the defects. Real labelled
    defects (`synthetic=False`): both at F1-max. No defects: both at
    `false_alarm_rate` (the pixel one over good pixels).
    """
    good_scores = np.asarray(good_scores, dtype=np.float64).ravel()
    n_good = int(good_scores.size)
    if defect_maps is None:
        return Thresholds(false_alarm_threshold(good_scores, false_alarm_rate),
                          pixel_false_alarm_threshold(good_maps, false_alarm_rate),
                          "false_alarm", false_alarm_rate, n_good)
    if defect_masks is None or defect_scores is None:
        raise CalibrationError("defect maps need their masks and scores")
    defect_masks = np.asarray(defect_masks).astype(bool)
    if not defect_masks.any():
        raise CalibrationError("the defect masks are all empty: no defect pixel to calibrate on")
    maps = np.concatenate([np.asarray(good_maps, dtype=np.float32),
                           np.asarray(defect_maps, dtype=np.float32)])
    masks = np.concatenate([np.zeros(np.shape(good_maps), dtype=bool), defect_masks])
    pixel = f1_threshold(maps, masks)
    n_defects = len(defect_masks)
    if synthetic:
        return Thresholds(false_alarm_threshold(good_scores, false_alarm_rate), pixel,
                          "false_alarm+synthetic_f1", false_alarm_rate, n_good, n_defects)
    scores = np.concatenate([good_scores, np.asarray(defect_scores, dtype=np.float64).ravel()])
    labels = np.concatenate([np.zeros(n_good, dtype=bool), np.ones(n_defects, dtype=bool)])
    return Thresholds(f1_threshold(scores, labels), pixel, "f1", None, n_good, n_defects)


def synthetic_defects(good_images: torch.Tensor, synthesizer: DefectSynthesizer, seed: int,
                      copies: int = SYNTHETIC_COPIES) -> tuple[torch.Tensor, np.ndarray]:
    """`copies` synthetic defects on each good image: uint8 images (M, 3, S, S) and
    bool masks (M, S, S). Draws without a defect (the synthesiser leaves some
    images clean) are left out; the draws depend only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    clean = good_images.float().div(255.0)
    images, masks = [], []
    for _ in range(copies):
        augmented, mask = synthesizer(clean, generator)
        keep = mask.flatten(1).amax(dim=1) > 0
        images.append(augmented[keep].mul(255.0).round_().clamp_(0, 255).to(torch.uint8))
        masks.append(mask[keep, 0] > 0.5)
    return torch.cat(images), torch.cat(masks).numpy()


def calibrate(model: AnomalyModel, good_images: torch.Tensor,
              synthesizer: DefectSynthesizer | None, seed: int, *,
              defect_images: torch.Tensor | None = None, defect_masks: np.ndarray | None = None,
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, copies: int = SYNTHETIC_COPIES,
              batch_size: int = 16, bf16: bool = True) -> Thresholds:
    """Thresholds for `model` from defect-free uint8 images (N, 3, S, S) it never trained on.

    Defects come from `defect_images` with bool `defect_masks` (N, S, S) when
    given (F1-max), else from `synthesizer` (seeded by `seed`); with neither,
    a false-alarm rate sets both thresholds. The model runs through
    `pfadseg.inference.infer`, on whatever device its parameters are on.
    """
    if len(good_images) < 2:
        raise CalibrationError(f"need at least 2 good images to calibrate, got {len(good_images)}")
    good_maps, _, good_scores = infer(model, good_images, batch_size, bf16=bf16)
    if defect_images is not None:
        if defect_masks is None or len(defect_masks) != len(defect_images):
            raise CalibrationError("every defect image needs its mask")
        maps, _, scores = infer(model, defect_images, batch_size, bf16=bf16)
        return calibrate_outputs(good_scores, good_maps, scores, maps, defect_masks,
                                 synthetic=False, false_alarm_rate=false_alarm_rate)
    if synthesizer is None:
        return calibrate_outputs(good_scores, good_maps, false_alarm_rate=false_alarm_rate)
    images, masks = synthetic_defects(good_images, synthesizer, seed, copies)
    if len(images) == 0:
        raise CalibrationError("the synthesiser drew no defect on the held-out images")
    maps, _, scores = infer(model, images, batch_size, bf16=bf16)
    return calibrate_outputs(good_scores, good_maps, scores, maps, masks,
                             false_alarm_rate=false_alarm_rate)
