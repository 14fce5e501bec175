"""report.html: self-contained, with the metrics, curves, histogram and a gallery
sorted worst error first; the predict gallery without ground truth."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfadseg import metrics
from pfadseg.calibration import Thresholds
from pfadseg.data import load_test_set
from pfadseg.evaluation import model_outputs, summarize, write_results
from pfadseg.html_report import MAX_CURVE_POINTS, THUMB, Gallery, curve_points, write_gallery_page
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.models.teacher import RANDOM

from conftest import CATEGORY

SIZE = 64


@pytest.fixture(scope="module")
def model() -> AnomalyModel:
    """Untrained: the report only needs outputs, not good ones."""
    torch.manual_seed(0)
    return AnomalyModel.build(ModelConfig.named("pfadseg", teacher="efficientnet_lite0",
                                                image_size=SIZE), teacher_weights=RANDOM)


def _rows(page: str) -> list[str]:
    """Image names of the gallery's rows, top to bottom."""
    return re.findall(r'<td class="cap"><b>([^<]+)</b>', page)


def test_test_report_is_complete_and_self_contained(model: AnomalyModel, dataset: Path,
                                                    tmp_path: Path, one_thread: None) -> None:
    test = load_test_set(dataset, CATEGORY, SIZE)
    outputs = model_outputs(model, test, bf16=False, progress=False)
    # a threshold between the scores, so the gallery has right and wrong verdicts
    thresholds = Thresholds(float(np.median(outputs.scores)), float(np.median(outputs.seg)), "test")
    meta = {"variant": "pfadseg", **thresholds.to_meta()}
    result = write_results(model, test, CATEGORY, tmp_path, meta, bf16=False, progress=False)
    page = (tmp_path / "report.html").read_text()
    for name in ("image AUROC", "pixel AUROC", "pixel AP", "IAP", "IAP@90", "AUPRO"):
        assert f">{name}<" in page
    assert "<th>crack</th>" in page and "DeST" in page  # per defect type, both maps
    assert "Thresholds of the checkpoint" in page and "pixel F1 at the checkpoint's threshold" in page
    assert "name='viewport'" in page and "<html lang='en'>" in page  # readable on a phone
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert "url(data:image/png;base64," in page  # the colour bar, embedded once
    assert len(re.findall(r'alt="curves: image ROC area', page)) == 1 and 'alt="histogram of' in page
    # every image, four panels each, worst error first
    names = _rows(page)
    assert sorted(names) == sorted(p.relative_to(dataset / CATEGORY / "test").as_posix()
                                   for p in test.paths)
    assert page.count(': ground truth"') == page.count(': predicted mask"') == len(names)
    assert f'alt="{names[0]}: anomaly map"' in page
    norm = thresholds.normalize_image(outputs.scores)
    error = np.where(test.labels == 1, 1 - norm, norm)
    by_name = {p.relative_to(dataset / CATEGORY / "test").as_posix(): e
               for p, e in zip(test.paths, error)}
    assert [by_name[n] for n in names] == sorted(by_name.values(), reverse=True)
    assert result["calibrated"]["image_threshold"] == thresholds.image


def test_report_without_masks_says_so(model: AnomalyModel, dataset: Path, tmp_path: Path,
                                      one_thread: None) -> None:
    test = load_test_set(dataset, CATEGORY, SIZE)
    test.masks = None
    write_results(model, test, CATEGORY, tmp_path, {"threshold": 0.5}, bf16=False, progress=False)
    page = (tmp_path / "report.html").read_text()
    assert "No ground-truth masks were given" in page and ': ground truth"' not in page
    assert ">pixel AP<" not in page and len(_rows(page)) == 4 and "Worst errors first" in page


def test_report_without_thresholds_uses_the_test_sets_best(model: AnomalyModel, dataset: Path,
                                                           tmp_path: Path, one_thread: None) -> None:
    test = load_test_set(dataset, CATEGORY, SIZE)
    write_results(model, test, CATEGORY, tmp_path, {}, bf16=False, progress=False)
    assert "stores no threshold" in (tmp_path / "report.html").read_text()


def test_a_test_stopped_half_way_leaves_no_earlier_metrics_beside_its_own(
        model: AnomalyModel, dataset: Path, tmp_path: Path, one_thread: None, monkeypatch) -> None:
    """A second `pfadseg test` into the same folder, killed while writing report.html,
    left its metrics.md beside the first test's metrics.json, which benchmark and report
    then read as this folder's results."""
    import pfadseg.html_report

    test = load_test_set(dataset, CATEGORY, SIZE)
    write_results(model, test, CATEGORY, tmp_path, {"threshold": 0.5}, bf16=False, progress=False)
    assert (tmp_path / "metrics.json").is_file()

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pfadseg.html_report, "write_test_report", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_results(model, test, CATEGORY, tmp_path, {"threshold": 0.5}, bf16=False, progress=False)
    assert not (tmp_path / "metrics.json").exists()


def test_predict_gallery_is_sorted_most_anomalous_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8) for _ in range(3)]
    maps = [rng.random((64, 64), dtype=np.float32) for _ in range(3)]
    scores = [0.2, 0.9, 0.5]
    gallery = Gallery(Thresholds(0.6, 0.5, "test"))
    for name, image, amap, score in zip(["a.png", "b.png", "c.png"], images, maps, scores, strict=True):
        gallery.add(name, image, amap, score)
    path = write_gallery_page(tmp_path / "report.html", gallery)
    page = path.read_text()
    assert _rows(page) == ["b.png", "c.png", "a.png"]
    assert "1 anomalous at the image threshold 0.6000" in page and ': ground truth"' not in page
    assert "Most anomalous first" in page
    assert page.count(': predicted mask"') == 3
    assert page.count('class="verdict bad"') == 1 and page.count('class="verdict good"') == 2
    # thumbnails are downscaled: the 300-pixel side becomes THUMB
    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page).group(1)
    assert max(Image.open(io.BytesIO(base64.b64decode(first))).size) == THUMB


def test_a_score_by_its_threshold_is_shown_with_the_digits_that_tell_them_apart(tmp_path: Path) -> None:
    """A score just over the threshold printed as the threshold ("score 0.4949", threshold
    0.4949, verdict anomalous); a skipped file was named twice."""
    gallery = Gallery(Thresholds(0.49491, 0.5, "test"))
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    gallery.add("over.png", image, np.zeros((8, 8), np.float32), 0.494912)
    gallery.add("under.png", image, np.zeros((8, 8), np.float32), 0.494905)
    page = write_gallery_page(tmp_path / "report.html", gallery,
                              ["/x/bad.png: cannot read image"]).read_text()
    assert "score 0.494912<br>" in page and "score 0.49490<br>" in page  # not both 0.4949
    assert "<li>/x/bad.png: cannot read image</li>" in page


def test_threshold_notes_say_what_holds_for_the_threshold_in_use(tmp_path: Path) -> None:
    """The test report lacked the command line's warning; predict's page said what
    calibration measured at another image threshold after --threshold."""
    from pfadseg.html_report import _calibrated_html

    result = {"image_auroc": 0.9, "n_images": 12, "n_anomalous": 8, "image_f1_max": 0.9,
              "calibrated": {"method": "false_alarm", "image_threshold": 0.7, "pixel_threshold": 0.6,
                             "image_f1": 0.0, "good_flagged": 0, "defects_missed": 8}}
    calibrated = Thresholds(0.7, 0.6, "false_alarm", 0.01, 0.001, 20, 40, "held-out good images",
                            defect_recall=0.95)
    assert "class='note'>The image threshold misses every defect here. Fix: `pfadseg calibrate`" \
        in _calibrated_html(result, calibrated)
    assert "it flags 95.0% of the images" in _calibrated_html(result, calibrated)
    given = Gallery(Thresholds(**{**calibrated.__dict__, "image": 0.9, "method": "given"}))
    page = write_gallery_page(tmp_path / "report.html", given).read_text()
    assert "given by hand (--threshold)" in page and "95.0%" not in page


def test_curve_points_match_the_metrics() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.3
    scores = rng.normal(labels.astype(float), 1.0)
    pts = curve_points(scores, labels)
    assert len(pts["fpr"]) <= MAX_CURVE_POINTS + 1
    assert np.all(np.diff(pts["fpr"]) >= 0) and pts["fpr"][-1] == pts["tpr"][-1] == 1.0
    area = np.sum(np.diff(pts["fpr"]) * (pts["tpr"][1:] + pts["tpr"][:-1]) / 2)
    assert area == pytest.approx(metrics.image_auroc(scores, labels), abs=2e-3)
    small = curve_points(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert small["precision"].tolist() == [1.0, 0.5, 2 / 3, 0.5]
    assert small["recall"].tolist() == [0.5, 0.5, 1.0, 1.0]


def test_summarize_refuses_a_test_set_of_one_class(model: AnomalyModel, dataset: Path,
                                                   one_thread: None, tmp_path: Path) -> None:
    test = load_test_set(dataset, CATEGORY, SIZE)
    outputs = model_outputs(model, test, bf16=False, progress=False)
    test.labels = np.zeros_like(test.labels)
    with pytest.raises(ValueError, match="no defect images"):
        summarize(outputs, test, None)
    with pytest.raises(ValueError, match="no defect images"):  # before the model runs
        write_results(None, test, CATEGORY, tmp_path, {})  # type: ignore[arg-type]


def test_overlay_outlines_a_region_where_it_ends_not_across_the_image() -> None:
    """The white outline follows the mask's border inside the image; a region that
    runs off the image has no line along the image's edge (np.roll wrapped around and
    drew one on the left edge for a mask touching the right edge)."""
    from pfadseg.visualize import overlay
    mask = np.zeros((8, 8), bool)
    mask[:, 4:] = True  # the right half, touching three edges of the image
    shown = np.asarray(overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), mask))
    white = (shown == 255).all(axis=2)
    assert white[:, 4].all() and white.sum() == 8  # the one column where the region ends
