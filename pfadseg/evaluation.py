"""`pfadseg test`: a checkpoint on an MVTec-layout test set, with the paper's metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .data import TestSet, load_test_set
from .inference import infer
from .models import AnomalyModel, image_scores

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "iap", "iap90", "aupro")


def _per_defect(maps: np.ndarray, scores: np.ndarray, test: TestSet) -> dict[str, dict[str, float]]:
    """Metrics on each defect type together with all good images."""
    defects = np.asarray(test.defects)
    out = {}
    for defect in sorted(set(test.defects) - {"good"}):
        keep = (defects == defect) | (defects == "good")
        out[defect] = metrics.evaluate(maps[keep], test.masks[keep], scores[keep], test.labels[keep])
    return out


def _to_mask_size(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Maps upsampled bilinearly to the masks' size (no-op when equal)."""
    if maps.shape[1:] == shape:
        return maps
    return np.concatenate([
        F.interpolate(torch.from_numpy(maps[i:i + 8])[:, None], size=shape, mode="bilinear",
                      align_corners=False)[:, 0].numpy() for i in range(0, len(maps), 8)])


def evaluate_model(model: AnomalyModel, test: TestSet, batch_size: int = 16, bf16: bool = True,
                   progress: bool = True, compile: bool = False) -> dict:
    """Metrics of the segmentation map (top level) and of the DeST map ("dest").

    Image scores always come from the map at the model's input size (top-100
    mean, as in the official code); pixel metrics use the masks' size.
    """
    seg, dest, scores = infer(model, test.images, batch_size, bf16=bf16, compile=compile,
                              progress=progress)
    dest_scores = image_scores(torch.from_numpy(dest)).numpy()
    seg, dest = _to_mask_size(seg, test.masks.shape[1:]), _to_mask_size(dest, test.masks.shape[1:])
    result: dict = metrics.evaluate(seg, test.masks, scores, test.labels)
    result["per_defect"] = _per_defect(seg, scores, test)
    result["dest"] = metrics.evaluate(dest, test.masks, dest_scores, test.labels)
    result["n_images"] = int(len(test.labels))
    result["n_anomalous"] = int(test.labels.sum())
    return result


def format_table(result: dict) -> str:
    """Readable two-column table: segmentation map and DeST map, in percent."""
    lines = [f"{'metric':<14}{'segmentation':>14}{'DeST map':>12}"]
    for key in METRIC_KEYS:
        lines.append(f"{key:<14}{100 * result[key]:>13.1f}%{100 * result['dest'][key]:>11.1f}%")
    return "\n".join(lines)


def run_test(model: AnomalyModel, root: Path, category: str, out_dir: Path, meta: dict,
             batch_size: int = 16, bf16: bool = True, skip_bad: bool = False,
             eval_size: int | None | str = "input", compile: bool = False) -> dict:
    """Load the test set, evaluate, write metrics.json and metrics.md; return the result.

    `eval_size`: "input" (the model's input size: 256, the official protocol),
    a number, or None for each image's original resolution.
    """
    test = load_test_set(root, category, model.config.image_size, skip_bad=skip_bad,
                         mask_size=eval_size)
    result = evaluate_model(model, test, batch_size, bf16, compile=compile)
    result = {"category": category, "variant": meta.get("variant"), "teacher": model.config.teacher,
              "eval_size": list(test.masks.shape[1:]), **result}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    (out_dir / "metrics.md").write_text(
        f"# {category}: {result['variant']} ({result['teacher']} teacher)\n\n```\n{format_table(result)}\n```\n")
    return result
