"""`pfadseg test`: a checkpoint on a labelled test set, with the paper's metrics,
the figures at the checkpoint's own thresholds, and an HTML report."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import metrics
from .calibration import CalibrationError, Thresholds
from .data import TestSet, load_folder_test_set, load_test_set
from .files import write_text
from .inference import infer
from .models import AnomalyModel, image_scores

log = logging.getLogger(__name__)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "iap", "iap90", "aupro")


@dataclass
class TestOutputs:
    """The model's outputs on a test set: maps at the masks' size (the input size
    when there are no masks) and image scores, for the segmentation and DeST maps."""

    seg: np.ndarray  # float32 (N, H, W)
    dest: np.ndarray
    scores: np.ndarray  # (N,)
    dest_scores: np.ndarray


def _to_mask_size(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Maps upsampled bilinearly to the masks' size (no-op when equal)."""
    if maps.shape[1:] == shape:
        return maps
    return np.concatenate([
        F.interpolate(torch.from_numpy(maps[i:i + 8])[:, None], size=shape, mode="bilinear",
                      align_corners=False)[:, 0].numpy() for i in range(0, len(maps), 8)])


def model_outputs(model: AnomalyModel, test: TestSet, batch_size: int = 16, bf16: bool = True,
                  progress: bool = True, compile: bool = False) -> TestOutputs:
    """Run the model (on whatever device it is) over the test images.

    Image scores always come from the map at the model's input size (top-100
    mean, as in the official code); maps are then brought to the masks' size.
    """
    seg, dest, scores = infer(model, test.images, batch_size, bf16=bf16, compile=compile,
                              progress=progress)
    dest_scores = image_scores(torch.from_numpy(dest)[:, None]).numpy()
    if test.masks is not None:
        shape = test.masks.shape[1:]
        seg, dest = _to_mask_size(seg, shape), _to_mask_size(dest, shape)
    return TestOutputs(seg, dest, scores, dest_scores)


def _metrics(maps: np.ndarray, masks: np.ndarray | None, scores: np.ndarray,
             labels: np.ndarray) -> dict[str, float]:
    """The paper's metrics, or only the image-level ones when there are no masks."""
    if masks is not None:
        return metrics.evaluate(maps, masks, scores, labels)
    f1, threshold = metrics.f1_max(scores, labels)
    return {"image_auroc": metrics.image_auroc(scores, labels), "image_f1_max": f1,
            "image_threshold": threshold}


def _per_defect(maps: np.ndarray, scores: np.ndarray, test: TestSet) -> dict[str, dict[str, float]]:
    """Metrics on each defect type together with all good images; only the
    image-level ones for a type whose masks hold no defect pixel (see check_masks)."""
    defects = np.asarray(test.defects)
    out = {}
    for defect in sorted(set(test.defects) - {"good"}):
        keep = (defects == defect) | (defects == "good")
        masks = test.masks[keep] if test.masks is not None else None
        out[defect] = _metrics(maps[keep], masks if masks is not None and masks.any() else None,
                               scores[keep], test.labels[keep])
    return out


def check_masks(test: TestSet) -> None:
    """Refuse masks without a single defect pixel (no pixel metric is defined), and
    warn about defect types whose masks are all empty (small defects can vanish when
    masks are resized to the evaluation size): they get image-level metrics only."""
    if test.masks is None:
        return
    size = "x".join(map(str, test.masks.shape[1:]))
    if not test.masks.any():
        raise ValueError(f"the masks hold no defect pixel at {size}, so no pixel metric is "
                         "defined. Fix: check that the masks mark defects as white (non-zero), "
                         "or evaluate at a larger --eval-size (e.g. original).")
    defects = np.asarray(test.defects)
    for defect in sorted(set(test.defects) - {"good"}):
        if not test.masks[defects == defect].any():
            log.warning("%s: its masks hold no defect pixel at %s: image metrics only for it. "
                        "Fix: a larger --eval-size (e.g. original), or check its masks.", defect, size)


def _f1(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of boolean predictions (0 where undefined)."""
    tp = int(np.count_nonzero(predicted & truth))
    fp = int(np.count_nonzero(predicted & ~truth))
    fn = int(np.count_nonzero(~predicted & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def at_thresholds(outputs: TestOutputs, test: TestSet, thresholds: Thresholds) -> dict:
    """What the checkpoint's own thresholds do on this test set: image F1,
    false alarms on good images, missed defects, and pixel F1 when masks exist."""
    labels = test.labels.astype(bool)
    flagged = outputs.scores >= thresholds.image
    image = _f1(flagged, labels)
    out = {"method": thresholds.method, "image_threshold": thresholds.image,
           "pixel_threshold": thresholds.pixel, "image_f1": image["f1"],
           "image_precision": image["precision"], "image_recall": image["recall"],
           "good_flagged": int(np.count_nonzero(flagged & ~labels)),
           "defects_missed": int(np.count_nonzero(~flagged & labels))}
    if test.masks is not None:
        pixel = _f1(outputs.seg >= thresholds.pixel, test.masks)
        out.update(pixel_f1=pixel["f1"], pixel_precision=pixel["precision"],
                   pixel_recall=pixel["recall"])
    return out


def require_both_classes(test: TestSet) -> None:
    """Refuse a test set of good images only, or of defects only: no metric is defined."""
    if not test.labels.any():
        raise ValueError("the test set holds no defect images, so no metric is defined. Fix: add a "
                         "folder of defect images beside good/; to count false alarms on good images "
                         "alone, run `pfadseg predict` on them (summary.csv has each verdict).")
    if test.labels.all():
        raise ValueError("the test set holds no good images, so no metric is defined. Fix: add "
                         "defect-free images in good/.")


def summarize(outputs: TestOutputs, test: TestSet, thresholds: Thresholds | None,
              progress: bool = False) -> dict:
    """Metrics of the segmentation map (top level), of the DeST map ("dest"), per
    defect type of both, and at the checkpoint's thresholds ("calibrated").
    `progress`: a bar over these parts (half a minute at MVTec's original sizes)."""
    require_both_classes(test)
    bar = tqdm(total=5, desc="metrics", unit="part", disable=not progress, leave=False)
    with bar:
        result: dict = _metrics(outputs.seg, test.masks, outputs.scores, test.labels)
        bar.update()
        result["per_defect"] = _per_defect(outputs.seg, outputs.scores, test)
        bar.update()
        result["dest"] = _metrics(outputs.dest, test.masks, outputs.dest_scores, test.labels)
        bar.update()
        result["per_defect_dest"] = _per_defect(outputs.dest, outputs.dest_scores, test)
        bar.update()
        if thresholds is not None:
            result["calibrated"] = at_thresholds(outputs, test, thresholds)
        bar.update()
    result["pixel_metrics"] = test.masks is not None
    result["n_images"] = int(len(test.labels))
    result["n_anomalous"] = int(test.labels.sum())
    return result


def format_table(result: dict) -> str:
    """Readable two-column table: segmentation map and DeST map, in percent."""
    lines = [f"{'metric':<14}{'segmentation':>14}{'DeST map':>12}"]
    for key in METRIC_KEYS:
        if key in result:
            lines.append(f"{key:<14}{100 * result[key]:>13.1f}%{100 * result['dest'][key]:>11.1f}%")
    if not result.get("pixel_metrics", True):
        lines.append("(no masks given: image-level metrics only)")
    cal = result.get("calibrated")
    if cal:
        line = (f"at the checkpoint's thresholds ({cal['method']}): image F1 "
                f"{100 * cal['image_f1']:.1f}% ({cal['good_flagged']} good flagged, "
                f"{cal['defects_missed']} defect{'s' * (cal['defects_missed'] != 1)} missed)")
        if "pixel_f1" in cal:
            line += f", pixel F1 {100 * cal['pixel_f1']:.1f}%"
        lines.append(line)
        warning = threshold_warning(result)
        if warning:
            lines.append(warning)
    return "\n".join(lines)


def threshold_warning(result: dict) -> str | None:
    """What to do when the checkpoint's image threshold misses every defect or flags
    every good image of a test set whose scores do tell them apart (else none would help)."""
    cal = result.get("calibrated")
    if not cal:
        return None
    n_good = result["n_images"] - result["n_anomalous"]
    wrong = [what for what, all_of in (("misses every defect", cal["defects_missed"] == result["n_anomalous"]),
                                       ("flags every good image", cal["good_flagged"] == n_good)) if all_of]
    if not wrong or min(n_good, result["n_anomalous"]) == 0 or result["image_auroc"] < 0.8:
        return None
    return (f"the image threshold {' and '.join(wrong)} here. Fix: `pfadseg calibrate` on "
            "your own good images (or with --defects and --masks, by best F1)")


def _thresholds_of(meta: dict) -> Thresholds | None:
    """The checkpoint's thresholds, or None (with a log line) when it has none."""
    try:
        return Thresholds.from_meta(meta)
    except CalibrationError as exc:
        log.warning("no thresholds: %s", exc)
        return None


def write_results(model: AnomalyModel, test: TestSet, name: str, out_dir: Path, meta: dict,
                  batch_size: int = 16, bf16: bool = True, compile: bool = False,
                  report: bool = True, progress: bool = True) -> dict:
    """Evaluate, write metrics.json, metrics.md and (with `report`) report.html to
    `out_dir`; return the result."""
    require_both_classes(test)  # before the model runs, not after
    check_masks(test)
    thresholds = _thresholds_of(meta)
    outputs = model_outputs(model, test, batch_size, bf16, progress, compile)
    result = summarize(outputs, test, thresholds, progress)
    eval_size = list(test.masks.shape[1:]) if test.masks is not None else None
    result = {"category": name, "variant": meta.get("variant"), "teacher": model.config.teacher,
              "preset": meta.get("preset"), "image_size": model.config.image_size,
              "eval_size": eval_size, **result}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # an earlier test's metrics.json goes first: stopped half-way, this one leaves none, never
    # this run's metrics.md and report.html beside the other's results
    (out_dir / "metrics.json").unlink(missing_ok=True)
    title = f"# {name}: {result['variant']} ({result['teacher']} teacher)"
    write_text(out_dir / "metrics.md", f"{title}\n\n```\n{format_table(result)}\n```\n")
    if report:
        from .html_report import write_test_report  # here: it imports this module, and matplotlib

        write_test_report(out_dir / "report.html", test, outputs, result, thresholds)
    else:  # an earlier run's (--overwrite) would pass for this one's
        (out_dir / "report.html").unlink(missing_ok=True)
    # last, and whole or not at all: `benchmark` counts a pair with it as done
    write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    return result


def run_test(model: AnomalyModel, root: Path, category: str, out_dir: Path, meta: dict,
             batch_size: int = 16, bf16: bool = True, skip_bad: bool = False,
             eval_size: int | None | str = "input", compile: bool = False,
             report: bool = True) -> dict:
    """An MVTec-layout test split (<root>/<category>/test, ground_truth): see `write_results`.

    `eval_size`: "input" (the model's input size: 256, the official protocol),
    a number, or None for each image's original resolution.
    """
    test = load_test_set(root, category, model.config.image_size, skip_bad=skip_bad,
                         mask_size=eval_size)
    return write_results(model, test, category, out_dir, meta, batch_size, bf16, compile, report)


def run_folder_test(model: AnomalyModel, test_dir: Path, out_dir: Path, meta: dict,
                    mask_dir: Path | None = None, batch_size: int = 16, bf16: bool = True,
                    skip_bad: bool = False, eval_size: int | None | str = "input",
                    compile: bool = False, report: bool = True) -> dict:
    """Any folder holding good/ and <defect type>/ (masks optional): see `write_results`.
    The results' category is the one the model was trained on, else the folder's
    name (its parent's for an MVTec-layout <category>/test folder)."""
    test = load_folder_test_set(test_dir, model.config.image_size, mask_dir, skip_bad=skip_bad,
                                mask_size=eval_size)
    folder = Path(test_dir).resolve()
    category = meta.get("category") or (folder.parent.name if folder.name == "test" else folder.name)
    return write_results(model, test, category, out_dir, meta, batch_size, bf16, compile, report)
