"""Tests of pfadseg.metrics: agreement with scikit-learn, hand-worked cases,
brute-force cross-checks and degenerate inputs."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from pfadseg import metrics as M


def tied_pixels(seed: int, dtype=np.float64):
    """Small test set with heavy ties (scores on a 1/8 grid) and blob masks."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.standard_normal((12, 24, 24)), sigma=(0, 2, 2)) > 0.15
    masks[0] = False  # one fully normal image
    maps = (rng.integers(0, 8, masks.shape) + 3 * masks) / 8
    return maps.astype(dtype), masks


def brute_aupro(maps, masks, fpr_limit):
    """Reference: evaluate PRO and FPR at every distinct threshold directly."""
    regions = []
    for score_map, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score_map[labelled == i] for i in range(1, count + 1)]
    neg = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(np.mean(neg >= t))
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x1 >= fpr_limit:
            y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            return (area + (fpr_limit - x0) * (y0 + y_cut) / 2) / fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    raise AssertionError("FPR never reached the limit")


def brute_iap(maps, masks):
    """Reference: the DeSTSeg IAP definition written as plain loops."""
    inst = []
    for score_map, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for i in range(1, count + 1):
            pixels = np.sort(score_map[labelled == i])[::-1]
            inst.append(pixels[int(0.5 * pixels.size)])
    inst = np.sort(inst)[::-1]
    recall = np.array([np.mean(inst >= s) for s in inst])
    precision = np.array([masks[maps >= s].mean() for s in inst])
    precision = np.array([precision[recall >= r].max() for r in recall])
    return precision.mean(), precision[np.argmax(recall >= 0.9)]


# --- agreement with scikit-learn ------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn(seed, dtype):
    maps, masks = tied_pixels(seed, dtype)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert M.pixel_ap(maps, masks) == pytest.approx(average_precision_score(y, s), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.6
    scores = rng.integers(0, 6, 200) + labels  # integers: many ties
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert M.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-9)  # the image AP of report.html


# --- hand-worked cases ------------------------------------------------------

# Two 1x4 images.  Image 0: scores .9 .6 .6 .2, mask 1 1 0 0 -> region A = {.9, .6}.
# Image 1: scores .7 .6 .3 .1, mask 1 0 0 0 -> region B = {.7}.
# Normal pixels: .6 .2 .6 .3 .1 (5 of them).
HAND_MAPS = np.array([[[0.9, 0.6, 0.6, 0.2]], [[0.7, 0.6, 0.3, 0.1]]])
HAND_MASKS = np.array([[[1, 1, 0, 0]], [[1, 0, 0, 0]]], dtype=bool)


def test_aupro_hand_worked():
    # Thresholds from the top, as (FPR, PRO) with PRO = mean of region fractions:
    #   start            (0, 0)
    #   t=.9  A 1/2 B 0  (0, .25)
    #   t=.7  A 1/2 B 1  (0, .75)
    #   t=.6  A 1   B 1  (2/5, 1)   the tie of A's .6 with two normal .6 is one
    #                               straight step from (0, .75) to (.4, 1)
    #   t=.3, .2, .1     (.6, 1), (.8, 1), (1, 1)
    # Up to FPR .3: PRO(.3) = .75 + .25 * .3/.4 = .9375,
    #   area = .3 * (.75 + .9375) / 2 = .253125, AUPRO = .253125 / .3 = .84375.
    assert M.aupro(HAND_MAPS, HAND_MASKS) == pytest.approx(0.84375, abs=1e-12)
    # Up to FPR 1: .4 * (.75 + 1) / 2 + .6 * 1 = .95.
    assert M.aupro(HAND_MAPS, HAND_MASKS, fpr_limit=1.0) == pytest.approx(0.95, abs=1e-12)


def test_iap_hand_worked():
    # Instance scores: A sorted desc (.9, .6), index int(.5*2)=1 -> .6;
    #                  B (.7,), index 0 -> .7.
    # s=.7: recall 1/2; pixels >= .7 are .9(A) .7(B): precision 2/2 = 1.
    # s=.6: recall 1; pixels >= .6 add .6(A) and two normal .6: precision 3/5.
    # Monotone precision (1, .6): IAP = .8; first recall >= .9 is 1 -> IAP@90 = .6.
    assert M.iap(HAND_MAPS, HAND_MASKS) == pytest.approx((0.8, 0.6), abs=1e-12)


def test_iap_precision_is_made_monotone():
    # One 1x6 image: scores .8 .85 .2 .5 .5 .5, mask 1 0 0 1 1 1.
    # Regions: A = {.8} (score .8), B = {.5, .5, .5} (score .5).
    # s=.8: recall 1/2, pixels >= .8 are .8(A) .85(normal): precision 1/2.
    # s=.5: recall 1, pixels >= .5: 4 anomalous + 1 normal: precision 4/5.
    # Precision at recall 1/2 becomes max(1/2, 4/5) = 4/5, so IAP = IAP@90 = .8.
    maps = np.array([[[0.8, 0.85, 0.2, 0.5, 0.5, 0.5]]])
    masks = np.array([[[1, 0, 0, 1, 1, 1]]], dtype=bool)
    assert M.iap(maps, masks) == pytest.approx((0.8, 0.8), abs=1e-12)


def test_regions_are_8_connected():
    # A diagonal line is one instance with 8-connectivity: pixels (.9, .8, .1),
    # index int(1.5)=1 -> score .8; pixels >= .8 are both anomalous -> IAP 1.
    # With 4-connectivity the .1 pixel would be its own instance and lower IAP.
    masks = np.eye(3, dtype=bool)[None]
    maps = np.full((1, 3, 3), 0.5)
    maps[0][masks[0]] = [0.9, 0.8, 0.1]
    assert M.iap(maps, masks) == (1.0, 1.0)


def test_f1_max_small_case():
    # F1 = 2tp / (2tp + fp + fn), 3 positives.  Thresholds at positive scores:
    # .9 -> tp1 fp0 fn2: 2/4; .7 -> tp2 fp1 fn1: 4/6; .6 -> tp3 fp1 fn0: 6/7 (best);
    # lower thresholds only add false positives.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 1, 0])
    assert M.f1_max(scores, labels) == pytest.approx((6 / 7, 0.6))


# --- brute-force cross-checks and bounds -----------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    maps, masks = tied_pixels(seed)
    assert M.aupro(maps, masks, fpr_limit) == pytest.approx(brute_aupro(maps, masks, fpr_limit), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iap_matches_brute_force(seed):
    maps, masks = tied_pixels(seed)
    assert M.iap(maps, masks) == pytest.approx(brute_iap(maps, masks), abs=1e-12)


def test_aupro_never_exceeds_one_on_adversarial_inputs():
    masks = np.zeros((4, 40, 40), dtype=bool)
    masks[:, ::2, ::2] = True  # 1600 isolated one-pixel regions
    perfect = masks.astype(np.float32)
    assert 1.0 - 1e-12 <= M.aupro(perfect, masks) <= 1.0
    rng = np.random.default_rng(0)
    for _ in range(5):  # anomalous pixels tied with some normal ones at the top
        maps = np.where(masks, 1.0, rng.integers(0, 2, masks.shape)).astype(np.float32)
        assert 0.0 <= M.aupro(maps, masks) <= 1.0
        assert 0.0 <= M.aupro(maps, masks, fpr_limit=1e-4) <= 1.0


def test_evaluate_returns_all_metrics():
    maps, masks = tied_pixels(3)
    labels = masks.any(axis=(1, 2))
    result = M.evaluate(maps, masks, maps.max(axis=(1, 2)), labels)
    assert set(result) == {
        "image_auroc", "pixel_auroc", "pixel_ap", "iap", "iap90", "aupro",
        "image_f1_max", "image_threshold", "pixel_f1_max", "pixel_threshold",
    }
    assert all(type(v) is float for v in result.values())
    assert result["pixel_ap"] == M.pixel_ap(maps, masks)
    assert result["aupro"] == M.aupro(maps, masks)


# --- degenerate inputs ------------------------------------------------------


def test_all_equal_scores_give_defined_values():
    maps, masks = tied_pixels(0)
    flat = np.zeros_like(maps)
    assert M.pixel_auroc(flat, masks) == 0.5
    assert M.image_auroc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5
    assert M.pixel_ap(flat, masks) == pytest.approx(masks.mean())
    assert M.iap(flat, masks) == pytest.approx((masks.mean(), masks.mean()))
    # PRO = FPR along one straight step, area .3 * .3 / 2, divided by .3.
    assert M.aupro(flat, masks) == pytest.approx(0.15)


def test_missing_class_raises():
    with pytest.raises(ValueError, match="no anomalous images"):
        M.image_auroc(np.arange(4.0), np.zeros(4))
    with pytest.raises(ValueError, match="no normal images"):
        M.image_auroc(np.arange(4.0), np.ones(4))
    maps = np.random.default_rng(0).random((2, 5, 5))
    empty = np.zeros(maps.shape, dtype=bool)
    for metric in (M.pixel_auroc, M.pixel_ap, M.iap, M.aupro, M.f1_max):
        with pytest.raises(ValueError, match="no anomalous"):
            metric(maps, empty)
    with pytest.raises(ValueError, match="no normal pixels"):
        M.pixel_auroc(maps, ~empty)


def test_bad_inputs_raise():
    maps, masks = tied_pixels(0)
    nan_maps = maps.copy()
    nan_maps[1, 2, 3] = np.nan
    for metric in (M.pixel_auroc, M.pixel_ap, M.iap, M.aupro):
        with pytest.raises(ValueError, match="NaN"):
            metric(nan_maps, masks)
    with pytest.raises(ValueError, match="shape"):
        M.pixel_auroc(maps, masks[:, :-1])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(maps, masks, fpr_limit=0.0)
    # infinity ranked above all and wrote "Infinity" thresholds into metrics.json
    with pytest.raises(ValueError, match="image scores contains NaN or infinity"):
        M.image_auroc(np.array([0.1, 0.5, np.inf]), np.array([0, 1, 1]))
    # -1/1 labels and 0/255 masks read as all positive: "no normal images", or wrong numbers
    with pytest.raises(ValueError, match="image labels must be bool or 0/1"):
        M.image_auroc(np.array([0.1, 0.5, 0.7]), np.array([-1, 1, 1]))
    with pytest.raises(ValueError, match="pixel labels must be bool or 0/1.*mask > 0"):
        M.pixel_ap(maps, masks.astype(np.uint8) * 255)
    assert M.pixel_ap(maps, masks.astype(np.uint8)) == M.pixel_ap(maps, masks)
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
    with pytest.raises(ValueError, match="image scores for .* maps: give one per map"):
        M.evaluate(maps, masks, scores[:-1], labels[:-1])


def test_a_defect_type_whose_masks_vanish_gets_image_metrics_only(caplog):
    """Small defects can vanish when masks are resized to the evaluation size: that type
    gets image-level metrics (with a warning), the others all six; no mask pixel at all
    is refused before inference, with the fix."""
    from pfadseg.data import TestSet
    from pfadseg.evaluation import _per_defect, check_masks

    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[2:4, 4:9, 4:9] = True  # crack: two images with marked pixels; hole (4, 5): none left
    test = TestSet(None, masks, np.array([0, 0, 1, 1, 1, 1]), ["good", "good", "crack", "crack", "hole", "hole"],
                   [])
    check_masks(test)
    assert "hole: its masks hold no defect pixel at 16x16" in caplog.text and "crack" not in caplog.text
    per_defect = _per_defect(rng.random((6, 16, 16)), rng.random(6), test)
    assert "pixel_ap" in per_defect["crack"] and "aupro" in per_defect["crack"]
    assert set(per_defect["hole"]) == {"image_auroc", "image_f1_max", "image_threshold"}
    with pytest.raises(ValueError, match="no defect pixel at 16x16.*Fix:"):
        check_masks(TestSet(None, np.zeros_like(masks), test.labels, test.defects, []))
