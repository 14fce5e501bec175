"""Tests of pfadseg.report: table layout, means, variants and file output."""
import csv
import io
import json

import pytest

from pfadseg.report import build_tables, write_report


def result(category, variant="PFADSeg", **metrics):
    return {"category": category, "variant": variant, "metrics": metrics}


def csv_rows(text):
    return {row["category"]: row for row in csv.DictReader(io.StringIO(text))}


def test_single_variant_layout_and_means():
    results = [
        result("carpet", image_auroc=0.99, pixel_ap=0.8, image_threshold=3.2),
        result("grid", image_auroc=0.97, pixel_ap=0.6),
        result("bottle", image_auroc=1.0, pixel_ap=0.9),
    ]
    markdown, table = build_tables(results)
    rows = csv_rows(table)
    # Paper order (textures first), percentages with one decimal, no thresholds.
    assert list(rows)[:3] == ["carpet", "grid", "bottle"]
    assert rows["carpet"] == {"category": "carpet", "I-AUROC": "99.0", "P-AP": "80.0"}
    # Means only over the categories present, and the group says so.
    assert rows["Texture mean (2/5)"]["I-AUROC"] == "98.0"
    assert rows["Object mean (1/10)"]["P-AP"] == "90.0"
    assert rows["Mean (3/15)"]["P-AP"] == "76.7"
    assert "missing leather, tile, wood" in markdown
    assert "| Category | I-AUROC | P-AP |" in markdown


def test_variants_side_by_side_with_summary():
    results = [
        result("carpet", "base", iap=0.5),
        result("carpet", "full", iap=0.7),
        result("bottle", "base", iap=0.6),
    ]
    markdown, table = build_tables(results)
    rows = csv_rows(table)
    assert rows["carpet"]["base: IAP"] == "50.0"
    assert rows["carpet"]["full: IAP"] == "70.0"
    assert rows["bottle"]["full: IAP"] == "-"
    assert "full: no result for bottle" in markdown
    assert "## Variants (mean over categories)" in markdown
    assert "| base | 55.0 |" in markdown and "| full | 70.0 |" in markdown


def test_per_defect_breakdown():
    entry = result("bottle", pixel_ap=0.8)
    entry["per_defect"] = {"broken_large": {"pixel_ap": 0.85}, "contamination": {"pixel_ap": 0.7}}
    markdown, table = build_tables([entry])
    rows = csv_rows(table)
    assert rows["bottle/broken_large"]["P-AP"] == "85.0"
    assert rows["bottle/contamination"]["P-AP"] == "70.0"
    assert "## Results per defect type" in markdown


def test_full_mvtec_has_no_missing_note():
    categories = ["carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
                  "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"]
    markdown, table = build_tables([result(c, aupro=0.9) for c in categories])
    assert "missing" not in markdown
    assert csv_rows(table)["Mean"]["AUPRO"] == "90.0"


def test_bad_results_raise():
    with pytest.raises(ValueError, match="no results"):
        build_tables([])
    with pytest.raises(ValueError, match="duplicate"):
        build_tables([result("carpet", iap=0.5), result("carpet", iap=0.6)])


def test_write_report(tmp_path):
    paths = []
    for i, category in enumerate(["tile", "screw"]):
        path = tmp_path / f"{category}.json"
        path.write_text(json.dumps({"category": category, "model": "m", "metrics": {"iap": 0.1 * i}}))
        paths.append(path)
    md_path, csv_path = write_report(paths, tmp_path / "out")
    assert "| tile | 0.0 |" in md_path.read_text()
    assert csv_rows(csv_path.read_text())["screw"]["IAP"] == "10.0"
