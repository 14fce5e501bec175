"""Evaluation metrics of the paper, computed exactly (no score binning).

All pixel-level metrics share one idea: split the scores into anomalous
("positive") and normal ("negative") pixels, sort each group once (keeping the
input dtype, so float32 maps stay float32), and read every count
"how many scores are >= t" with ``np.searchsorted``.  Tied scores are always
grouped so that a tie is one step of a curve, which makes the results agree
with scikit-learn (AUROC, AP) and with the exact piecewise-linear definitions
(AUPRO).

Conventions for degenerate inputs: a ``ValueError`` naming the problem is
raised for NaN scores, mismatched shapes, and when one class (anomalous or
normal) is absent.  All-equal scores are *not* an error: they give the
defined values of the formulas (AUROC 0.5, AP = IAP = prevalence, AUPRO 0.15
for ``fpr_limit=0.3``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "average_precision",
    "iap",
    "aupro",
    "f1_max",
    "evaluate",
]

# 8-connectivity, as the official DeSTSeg code finds ground-truth instances
# (anomalib's connected components: OpenCV's default connectivity of 8).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class _Split:
    """Scores of positives and negatives, each sorted ascending."""

    pos: np.ndarray
    neg: np.ndarray


@dataclass(frozen=True)
class _PosCurve:
    """Counts at each distinct positive score, highest score first.

    ``tp[j]``/``fp[j]`` are the numbers of positives/negatives scoring
    ``>= thresholds[j]``; ``new_tp[j]`` the positives scoring exactly it.
    """

    thresholds: np.ndarray
    new_tp: np.ndarray
    tp: np.ndarray
    fp: np.ndarray


@dataclass(frozen=True)
class _Regions:
    """Ground-truth connected components, seen from their pixels.

    ``scores``/``ids`` follow the order of ``maps[masks]``; ids run 0..n-1
    over the whole test set and ``sizes[i]`` is the pixel count of region i.
    """

    scores: np.ndarray
    ids: np.ndarray
    sizes: np.ndarray


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Floating view of ``scores`` (no copy when already floating); NaN or infinity
    (a broken model output, and no valid JSON threshold) is an error."""
    arr = np.asarray(scores)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _as_labels(labels: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Boolean labels of the given shape, from bool or 0/1 values (a 0/255 mask or
    -1/1 labels would all read as positive)."""
    arr = np.asarray(labels)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if arr.dtype != bool and not ((arr == 0) | (arr == 1)).all():
        raise ValueError(f"{name} must be bool or 0/1 (1: anomalous); convert first, e.g. "
                         "mask > 0 for a 0/255 mask")
    return arr.astype(bool, copy=False)


def _split(scores: np.ndarray, labels: np.ndarray, what: str) -> _Split:
    """Validate and split scores by label; ``what`` names the unit in errors."""
    values = _as_scores(scores, f"{what.removesuffix('s')} scores")
    is_pos = _as_labels(labels, values.shape, f"{what.removesuffix('s')} labels")
    pos = values[is_pos]
    if pos.size == 0:
        raise ValueError(f"no anomalous {what}: the metric is undefined")
    neg = values[~is_pos]
    if neg.size == 0:
        raise ValueError(f"no normal {what}: the metric is undefined")
    pos.sort()
    neg.sort()
    return _Split(pos, neg)


def _count_ge(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of ``sorted_values`` that are ``>= t`` for each threshold."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    changes = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate(([0], changes))


def _pos_curve(split: _Split) -> _PosCurve:
    """Counts at the distinct positive scores; enough for AP and best F1,
    because recall only changes there and, between them, lowering the
    threshold only adds false positives."""
    starts = _group_starts(split.pos)
    new_tp = np.diff(np.append(starts, split.pos.size))[::-1]
    thresholds = split.pos[starts][::-1]
    tp = np.cumsum(new_tp)
    fp = _count_ge(split.neg, thresholds)
    return _PosCurve(thresholds, new_tp, tp, fp)


def _auroc(split: _Split) -> float:
    """Mann-Whitney U with tie-averaged ranks, i.e. the trapezoidal ROC area."""
    starts = _group_starts(split.pos)
    counts = np.diff(np.append(starts, split.pos.size))
    values = split.pos[starts]
    below = np.searchsorted(split.neg, values, side="left")
    below_or_tied = np.searchsorted(split.neg, values, side="right")
    twice_u = int(np.dot(counts, below + below_or_tied))  # exact int64 sum
    return twice_u / (2.0 * split.pos.size * split.neg.size)


def _ap(split: _Split) -> float:
    """Step-wise AP: sum over thresholds of recall increase times precision."""
    curve = _pos_curve(split)
    precision = curve.tp / (curve.tp + curve.fp)
    return float(np.dot(curve.new_tp, precision) / split.pos.size)


def _f1_max(split: _Split) -> tuple[float, float]:
    """Best F1 over all thresholds and the (highest) threshold reaching it."""
    curve = _pos_curve(split)
    f1 = 2.0 * curve.tp / (curve.tp + curve.fp + split.pos.size)
    best = int(np.argmax(f1))
    return float(f1[best]), float(curve.thresholds[best])


def _pixel_inputs(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N, H, W) maps and boolean masks for region-based metrics."""
    values = _as_scores(maps, "maps")
    if values.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {values.shape}")
    return values, _as_labels(masks, values.shape, "masks")


def _regions(maps: np.ndarray, masks: np.ndarray) -> _Regions:
    """Label each image's ground truth with 8-connectivity; one image at a
    time so that no full-size label volume is held."""
    scores, ids, sizes = [], [], []
    offset = 0
    for score_map, mask in zip(maps, masks):
        if not mask.any():
            continue
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        local = labelled[mask].astype(np.int64) - 1
        scores.append(score_map[mask])
        ids.append(local + offset)
        sizes.append(np.bincount(local, minlength=count))
        offset += count
    if offset == 0:
        raise ValueError("no anomalous pixels: the metric is undefined")
    return _Regions(np.concatenate(scores), np.concatenate(ids), np.concatenate(sizes))


def _instance_scores(regions: _Regions) -> np.ndarray:
    """Per region, its pixel scores sorted descending, value at int(0.5*n):
    the region is "detected" at s when at least half its pixels score >= s."""
    order = np.lexsort((regions.scores, regions.ids))  # by region, score ascending
    ends = np.cumsum(regions.sizes)
    # Descending index int(0.5*n) is ascending index n - 1 - int(0.5*n).
    picks = ends - 1 - regions.sizes // 2
    return regions.scores[order[picks]]


def _iap(split: _Split, regions: _Regions) -> tuple[float, float]:
    """IAP and IAP@90 from instance scores and pixel precision."""
    inst = np.sort(_instance_scores(regions))[::-1]
    n = inst.size
    recall = _count_ge(inst[::-1], inst) / n
    tp = _count_ge(split.pos, inst)
    fp = _count_ge(split.neg, inst)
    precision = tp / (tp + fp)
    # Precision at recall r = best precision at any recall >= r.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at_90 = int(np.argmax(recall >= 0.9))  # recall reaches 1 at the last point
    return float(precision.mean()), float(precision[at_90])


def _aupro(split: _Split, regions: _Regions, fpr_limit: float) -> float:
    """Exact area under PRO(FPR) up to ``fpr_limit``, normalised by it.

    Walking thresholds downwards, PRO rises by 1/(R*|region|) per anomalous
    pixel and FPR by 1/N_neg per normal pixel.  Only thresholds at normal
    scores move FPR; the segment ending at normal score v goes from
    (FPR(>v), PRO(>v)) to (FPR(>=v), PRO(>=v)), straight, so ties between
    normal and anomalous pixels become diagonal steps.
    """
    neg = split.neg
    n_neg = neg.size
    # Only the top fpr_limit share of normal pixels (plus the crossing group)
    # matters; keeping one spare element guarantees the crossing is included.
    first = max(0, n_neg - int(np.ceil(fpr_limit * n_neg)) - 1)
    tail = neg[first:]
    starts = _group_starts(tail)
    values = tail[starts][::-1]
    at_or_above = n_neg - (first + starts)[::-1]
    # The lowest kept group may continue below `first`; count it exactly.
    at_or_above[-1] = _count_ge(neg, values[-1:])[0]
    fpr_hi = at_or_above / n_neg
    fpr_lo = np.concatenate(([0.0], fpr_hi[:-1]))

    weights = 1.0 / (regions.sizes[regions.ids] * regions.sizes.size)
    order = np.argsort(regions.scores, kind="stable")
    pos = regions.scores[order]
    # pro_from[i] = total weight of the positives pos[i:].
    pro_from = np.append(np.cumsum(weights[order][::-1])[::-1], 0.0)
    pro_hi = pro_from[np.searchsorted(pos, values, side="left")]
    pro_lo = pro_from[np.searchsorted(pos, values, side="right")]

    cross = int(np.argmax(fpr_hi >= fpr_limit))
    widths = fpr_hi[:cross] - fpr_lo[:cross]
    area = float(np.dot(widths, pro_lo[:cross] + pro_hi[:cross])) / 2.0
    # Part of the crossing segment up to fpr_limit, linearly interpolated.
    x0, x1 = fpr_lo[cross], fpr_hi[cross]
    y0, y1 = pro_lo[cross], pro_hi[cross]
    y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area += (fpr_limit - x0) * (y0 + y_cut) / 2.0
    return float(min(area / fpr_limit, 1.0))  # PRO <= 1; only rounding could pass it


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image-level AUROC (ties count one half, as in sklearn's roc_auc_score)."""
    return _auroc(_split(scores, labels, "images"))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images."""
    return _auroc(_split(maps, masks, "pixels"))


def pixel_ap(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level average precision, as sklearn's average_precision_score."""
    return _ap(_split(maps, masks, "pixels"))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of any scores against binary labels (e.g. image AP)."""
    return _ap(_split(scores, labels, "samples"))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds "score >= t" and the highest t reaching it.

    Works for image scores (N,) as well as pixel maps (N, H, W) with masks.
    """
    return _f1_max(_split(scores, labels, "samples"))


def iap(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Instance average precision (IAP, IAP@90) as defined by DeSTSeg.

    Instances are the 8-connected components of each ground-truth mask.  An
    instance's score is its pixel scores sorted descending, taken at index
    int(0.5 * n), so it is detected at threshold s when about half of it
    scores >= s.  Thresholds s sweep the instance scores, highest first;
    recall(s) is the fraction of instances scoring >= s and precision(s) the
    pixel precision over the whole test set (TP pixels / pixels >= s).
    Precision is made monotone (precision at recall r = the highest
    precision at any recall >= r).  IAP is its mean over the recall points,
    one per instance; IAP@90 its value at the first recall point >= 0.9.
    """
    values, labels = _pixel_inputs(maps, masks)
    return _iap(_split(values, labels, "pixels"), _regions(values, labels))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, / fpr_limit.

    PRO(t) is the mean over ground-truth regions (8-connected components) of
    the fraction of the region's pixels scoring >= t; FPR(t) the fraction of
    normal pixels scoring >= t.  The curve is piecewise linear between
    distinct thresholds and cut at ``fpr_limit`` by linear interpolation, so
    the result is exact and never exceeds 1.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    values, labels = _pixel_inputs(maps, masks)
    return _aupro(_split(values, labels, "pixels"), _regions(values, labels), fpr_limit)


def evaluate(
    maps: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """All metrics of the paper; pixels are split and sorted only once."""
    values, pixel_labels = _pixel_inputs(maps, masks)
    if np.shape(scores) != values.shape[:1]:
        raise ValueError(f"{np.shape(scores)} image scores for {values.shape[0]} maps: give one per map")
    pixels = _split(values, pixel_labels, "pixels")
    regions = _regions(values, pixel_labels)
    images = _split(scores, labels, "images")
    iap_all, iap_90 = _iap(pixels, regions)
    image_f1, image_threshold = _f1_max(images)
    pixel_f1, pixel_threshold = _f1_max(pixels)
    return {
        "image_auroc": _auroc(images),
        "pixel_auroc": _auroc(pixels),
        "pixel_ap": _ap(pixels),
        "iap": iap_all,
        "iap90": iap_90,
        "aupro": _aupro(pixels, regions, 0.3),
        "image_f1_max": image_f1,
        "image_threshold": image_threshold,
        "pixel_f1_max": pixel_f1,
        "pixel_threshold": pixel_threshold,
    }
