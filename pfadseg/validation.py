"""Validation during training: how well the model finds synthetic defects on good
images it never trained on, and a warning when a run looks bad by that signal.

The validation set is the held-out good images (the ones calibration uses) plus
synthetic defects drawn on them from a fixed seed, so every point of a run, and
every run of the same data and seed, is scored on the same images. Three figures:

- `seg_pixel_ap`: pixel AP of the segmentation map (what the model outputs);
- `seg_image_auroc`: image AUROC of the image score, good vs defective;
- `dest_pixel_ap`: pixel AP of the un-learned DeST map (teacher-student cosine
  distance), which measures the student alone. At the end of stage 1 it is the
  only meaningful figure (the segmentation net has not trained yet).

Synthetic defects are not the product's real ones: the figures compare runs on the
same data and points of one run, and need not match a test set's (six bottle runs at
128 px: validation pixel AP 0.70-0.80, test pixel AP 0.74-0.87, not in the same order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import metrics
from .calibration import synthetic_defects
from .config import TrainConfig
from .inference import infer
from .models import AnomalyModel
from .synthesis import DefectSynthesizer

FIGURES = ("seg_pixel_ap", "seg_image_auroc", "dest_pixel_ap")
# Warning bars, provisional: set from six bottle runs at 128 px (docs/results.md), where
# final seg_pixel_ap was 0.70-0.80 and the student's dest_pixel_ap at the end of stage 1
# split the runs: 0.40-0.46 went with test pixel AP 0.83-0.87, 0.19-0.31 with 0.74-0.80.
# A segmentation net no better than the DeST map it reads has learned nothing.
MIN_SEG_PIXEL_AP = 0.5
MIN_STUDENT_DEST_AP = 0.35
MAX_DROP = 0.1  # seg_pixel_ap lost between the best stage-2 point and the end
FIX = ("Fix: train again with another --seed or a longer schedule (--stage1-steps, "
       "--stage2-steps), and compare the runs' validation.csv; check that the training "
       "images are all defect-free and alike.")


@dataclass
class ValidationSet:
    """Held-out good images and synthetic defects on them: uint8 images (N, 3, S, S),
    bool masks (N, S, S) and image labels (N,), 1 for a defect."""

    images: torch.Tensor
    masks: np.ndarray
    labels: np.ndarray

    @classmethod
    def build(cls, good: torch.Tensor, synthesizer: DefectSynthesizer, seed: int) -> "ValidationSet":
        defects, defect_masks = synthetic_defects(good.cpu(), synthesizer, seed)
        size = tuple(good.shape[-2:])
        masks = np.concatenate([np.zeros((len(good), *size), dtype=bool), defect_masks])
        labels = np.concatenate([np.zeros(len(good), dtype=np.int64), np.ones(len(defects), dtype=np.int64)])
        return cls(torch.cat([good.cpu(), defects]), masks, labels)

    def score(self, model: AnomalyModel, bf16: bool, batch_size: int = 16) -> dict[str, float]:
        """The FIGURES of `model` on this set (the model is left in eval mode)."""
        seg, dest, scores = infer(model, self.images, batch_size, bf16=bf16)
        return {"seg_pixel_ap": metrics.pixel_ap(seg, self.masks),
                "seg_image_auroc": metrics.image_auroc(scores, self.labels),
                "dest_pixel_ap": metrics.pixel_ap(dest, self.masks)}


def validation_steps(config: TrainConfig) -> list[int]:
    """Steps after which a run validates: the end of stage 1 and `config.validations`
    evenly spaced points of stage 2, the last at its end."""
    if config.validations <= 0:
        return []
    n = config.stage2_steps
    count = min(config.validations, n)
    points = {config.stage1_steps + round(k * n / count) for k in range(1, count + 1)}
    if config.stage1_steps:
        points.add(config.stage1_steps)
    return sorted(points)

def assess(rows: list[dict[str, float]], stage1_steps: int) -> list[str]:
    """Warnings (with what to do) for a finished run's validation rows; empty when it looks fine."""
    stage2 = [r for r in rows if r["step"] > stage1_steps]
    if not stage2:
        return []
    final, best = stage2[-1], max(r["seg_pixel_ap"] for r in stage2)
    found = []
    if final["dest_pixel_ap"] < MIN_STUDENT_DEST_AP:
        found.append(f"the student left stage 1 weak: its raw teacher-student map reaches pixel AP "
                     f"{final['dest_pixel_ap']:.3f} on synthetic defects (below {MIN_STUDENT_DEST_AP}); "
                     "on bottle such runs ended 3-13 points of test pixel AP below the others")
    if final["seg_pixel_ap"] < MIN_SEG_PIXEL_AP:
        found.append(f"the model finds synthetic defects on held-out good images poorly "
                     f"(pixel AP {final['seg_pixel_ap']:.3f}; runs that work reach about 0.7 or more)")
    if final["seg_pixel_ap"] <= final["dest_pixel_ap"]:
        found.append(f"the segmentation net is no better than the raw teacher-student map it "
                     f"reads (pixel AP {final['seg_pixel_ap']:.3f} vs {final['dest_pixel_ap']:.3f})")
    if best - final["seg_pixel_ap"] > MAX_DROP:
        found.append(f"validation pixel AP fell from {best:.3f} to {final['seg_pixel_ap']:.3f} "
                     "during stage 2: training was unstable")
    return [f"this run looks bad: {w}. {FIX}" for w in found]
