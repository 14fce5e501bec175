"""Tests of pfadseg.report: table layout, means, variants, runs and file output."""
import csv
import io
import json
from pathlib import Path

import pytest

from pfadseg.report import CATEGORIES, build_tables, run_labels, write_report
from pfadseg.variants import ABLATION, modules_of


def result(category, variant="PFADSeg", **metrics):
    return {"category": category, "variant": variant, "metrics": metrics}


def csv_rows(text):
    return {row["category"]: row for row in csv.DictReader(io.StringIO(text))}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_single_variant_layout_and_means():
    results = [
        result("carpet", image_auroc=0.99, pixel_ap=0.8, image_threshold=3.2),
        result("grid", image_auroc=0.97, pixel_ap=0.6),
        result("bottle", image_auroc=1.0, pixel_ap=0.9),
    ]
    files = build_tables(results)
    markdown, rows = files["results.md"], csv_rows(files["results.csv"])
    # Paper order (textures first), percentages with one decimal, no thresholds.
    assert list(rows)[:3] == ["carpet", "grid", "bottle"]
    assert rows["carpet"] == {"category": "carpet", "I-AUROC": "99.0", "P-AP": "80.0"}
    # Means only over the categories present, only for groups of two or more.
    assert rows["Texture mean (2/5)"]["I-AUROC"] == "98.0"
    assert rows["Mean (3/15)"]["P-AP"] == "76.7"
    assert not any(name.startswith("Object mean") for name in rows)
    # The missing categories are listed once.
    assert markdown.count("leather") == 1
    assert "missing 12 of 15 MVTec AD categories: leather, tile, wood, cable" in markdown
    assert "| Category | I-AUROC | P-AP |" in markdown
    assert "variants.csv" not in files and "Table 4" not in markdown


def test_one_category_has_no_mean_rows_or_missing_list():
    files = build_tables([result("bottle", iap=0.5)])
    assert list(csv_rows(files["results.csv"])) == ["bottle"]
    assert "mean" not in files["results.md"].lower()
    assert "missing" not in files["results.md"]


def test_own_categories_stay_out_of_the_mvtec_means():
    """`report bottle/metrics.json parts/metrics.json` read "Mean (2/16)": a user's own
    category averaged into MVTec's and counted as a 16th."""
    files = build_tables([result("bottle", iap=0.5), result("carpet", iap=0.7),
                          result("my_parts", iap=0.1), result("screws", iap=0.3)])
    rows = csv_rows(files["results.csv"])
    assert list(rows) == ["carpet", "bottle", "my_parts", "screws", "Mean (2/15)"]
    assert rows["Mean (2/15)"]["IAP"] == "60.0"
    assert "not MVTec AD categories, so in no mean: my_parts, screws" in files["results.md"]
    own = csv_rows(build_tables([result("my_parts", iap=0.1), result("screws", iap=0.3)])["results.csv"])
    assert own["Mean"]["IAP"] == "20.0"  # own categories alone: their own mean
    # Table 4 averages what Table 1's Mean does (it took my_parts and screws in: 40.0, 5 categories)
    files = build_tables([result(c, v, iap=x) for v in ("base", "full")
                          for c, x in (("bottle", 0.5), ("carpet", 0.7), ("my_parts", 0.1))])
    assert "## Table 4: variants (mean over 2 categories)" in files["results.md"]
    assert list(csv.reader(io.StringIO(files["variants.csv"])))[1:] == [["base", "60.0"], ["full", "60.0"]]


def test_mean_rows_that_repeat_a_group_are_left_out():
    rows = csv_rows(build_tables([result("carpet", iap=0.5), result("grid", iap=0.7)])["results.csv"])
    assert list(rows) == ["carpet", "grid", "Texture mean (2/5)"]  # "Mean (2/15)" would repeat it
    assert rows["Texture mean (2/5)"]["IAP"] == "60.0"


def test_custom_categories_mean_without_mvtec_missing_list():
    files = build_tables([result("widget", iap=0.2), result("gadget", iap=0.4)])
    rows = csv_rows(files["results.csv"])
    assert list(rows) == ["gadget", "widget", "Mean"]
    assert rows["Mean"]["IAP"] == "30.0"
    assert "missing" not in files["results.md"]


def test_full_mvtec_has_no_missing_note():
    files = build_tables([result(c, aupro=0.9) for c in CATEGORIES])
    assert "missing" not in files["results.md"]
    rows = csv_rows(files["results.csv"])
    assert rows["Mean"]["AUPRO"] == rows["Texture mean"]["AUPRO"] == rows["Object mean"]["AUPRO"] == "90.0"


def test_variants_side_by_side_with_table4():
    results = [
        result("carpet", "base", iap=0.5),
        result("carpet", "full", iap=0.7),
        result("bottle", "base", iap=0.6),
    ]
    files = build_tables(results)
    markdown, rows = files["results.md"], csv_rows(files["results.csv"])
    assert rows["carpet"]["base: IAP"] == "50.0"
    assert rows["carpet"]["full: IAP"] == "70.0"
    assert rows["bottle"]["full: IAP"] == "-"
    assert "full: no result for bottle" in markdown
    assert "## Table 4: variants (mean over 2 categories)" in markdown
    assert "| base | 55.0 |" in markdown and "| full | 70.0 |" in markdown
    assert list(csv.reader(io.StringIO(files["variants.csv"]))) == [
        ["Variant", "IAP"], ["base", "55.0"], ["full", "70.0"]]


def test_several_variants_get_one_table_per_metric_and_the_settings_line():
    """Eight variants x eight metrics made one Table 1 of 65 columns: now a table per
    metric with a column per variant; and a line says what the results ran with."""
    results = [{**result(c, v, image_auroc=a, iap=a / 2), "teacher": "resnet18", "preset": p,
                "image_size": 256, "eval_size": [256, 256]}
               for c, v, a, p in (("carpet", "base", 0.8, "paper"), ("carpet", "full", 0.9, "paper"),
                                  ("bottle", "base", 0.6, "tiny"), ("bottle", "full", 1.0, "paper"))]
    markdown = build_tables(results)["results.md"]
    assert markdown.startswith("Teacher resnet18; preset paper, tiny; input size 256; evaluated at 256x256 "
                               "(mixed: rows run with different settings are not comparable)\n")
    original = [{**r, "preset": "paper", "eval_size": [900 + 100 * i, 900 + 100 * i]} for i, r in enumerate(results)]
    assert "mixed" not in build_tables(original)["results.md"]  # each category at its own resolution
    table1 = markdown.split("## Table 4")[0]
    assert "### I-AUROC\n\n| Category | base | full |" in table1
    assert "### IAP\n\n| Category | base | full |" in table1
    assert "| carpet | 80.0 | 90.0 |" in table1 and "| carpet | 40.0 | 45.0 |" in table1
    assert max(line.count("|") for line in markdown.splitlines()) == 4  # 3 columns at most here


def test_module_names():
    # the paper's Table 4 rows (none, RCM, AFF, PCAR, RCM+PCAR, AFF+PCAR, all), and AFF+RCM
    assert ABLATION == ("destseg", "destseg+rcm", "destseg+aff", "destseg+pcar", "destseg+pcar+rcm",
                        "destseg+aff+pcar", "destseg+aff+rcm", "pfadseg")
    assert len({modules_of(v) for v in ABLATION}) == 8
    assert modules_of("+rcm+aff") == ("aff", "rcm")
    assert modules_of("PFADSeg") == ("aff", "pcar", "rcm")
    assert modules_of("destseg") == ()
    assert modules_of("destseg+aff+aff") is None and modules_of("patchcore") is None


def test_ablation_layout_marks_modules_in_paper_order():
    # Given in reverse, with a value per variant that identifies it.
    results = [result(c, v, image_auroc=0.5 + 0.05 * i + (0.01 if c == "bottle" else 0.0))
               for i, v in reversed(list(enumerate(ABLATION))) for c in ("bottle", "carpet")]
    files = build_tables(results)
    table4 = list(csv.reader(io.StringIO(files["variants.csv"])))
    assert table4[0] == ["Variant", "RCM", "AFF", "PCAR", "I-AUROC"]
    assert [row[0] for row in table4[1:]] == list(ABLATION)
    assert table4[1] == ["destseg", "", "", "", "50.5"]
    assert table4[5] == ["destseg+pcar+rcm", "✓", "", "✓", "70.5"]
    assert table4[8] == ["pfadseg", "✓", "✓", "✓", "85.5"]
    assert "| destseg+rcm | ✓ |  |  | 55.5 |" in files["results.md"]
    assert "|---|---|---|---|---:|" in files["results.md"]


def test_per_defect_breakdown():
    entry = result("bottle", pixel_ap=0.8)
    entry["per_defect"] = {"broken_large": {"pixel_ap": 0.85}, "contamination": {"pixel_ap": 0.7}}
    files = build_tables([entry])
    rows = csv_rows(files["results.csv"])
    assert rows["bottle/broken_large"]["P-AP"] == "85.0"
    assert rows["bottle/contamination"]["P-AP"] == "70.0"
    assert "## Results per defect type" in files["results.md"]


def test_bad_results_raise():
    with pytest.raises(ValueError, match="no results"):
        build_tables([])
    with pytest.raises(ValueError, match="label each run"):
        build_tables([result("carpet", iap=0.5), result("carpet", iap=0.6)])


def test_write_report(tmp_path):
    paths = [write_json(tmp_path / f"{c}.json", {"category": c, "model": "m", "metrics": {"iap": 0.1 * i}})
             for i, c in enumerate(["tile", "screw"])]
    md_path, csv_path = write_report(paths, tmp_path / "out")
    assert "| tile | 0.0 |" in md_path.read_text()
    assert csv_rows(csv_path.read_text())["screw"]["IAP"] == "10.0"


def test_run_labels_are_the_differing_path_parts(tmp_path):
    assert run_labels([tmp_path / "a/metrics.json", tmp_path / "b/metrics.json"]) == ["a", "b"]
    assert run_labels([tmp_path / "r/s0/bottle/test/metrics.json",
                       tmp_path / "r/s1/bottle/test/metrics.json"]) == ["s0", "s1"]
    assert run_labels([tmp_path / "r/metrics.json", tmp_path / "r/metrics_seed1.json"]) == [
        "metrics", "metrics_seed1"]


def test_two_runs_of_one_pair_are_labelled_by_folder(tmp_path):
    """Same category and variant from two runs: one series per run, named by its folder."""
    test_json = {"category": "bottle", "variant": "pfadseg", "iap": 0.5, "n_images": 16}
    a = write_json(tmp_path / "seed0/metrics.json", test_json)
    b = write_json(tmp_path / "seed1/metrics.json", {**test_json, "iap": 0.7})
    md_path, csv_path, variants_path = write_report([a, b], tmp_path / "out")
    row = csv_rows(csv_path.read_text())["bottle"]
    assert row == {"category": "bottle", "pfadseg (seed0): IAP": "50.0", "pfadseg (seed1): IAP": "70.0"}
    assert "| pfadseg (seed1) | 70.0 |" in md_path.read_text()
    assert variants_path.name == "variants.csv"


def test_benchmark_folders_label_each_run_once(tmp_path):
    """<run>/<category>/<variant>/test/metrics.json: the label is the run, not the category."""
    def metrics(run, category, variant, iap):
        return write_json(tmp_path / run / category / variant / "test/metrics.json",
                          {"category": category, "variant": variant, "iap": iap})
    paths = [metrics("r1", "bottle", "pfadseg", 0.5), metrics("r1", "carpet", "pfadseg", 0.7),
             metrics("r1", "bottle", "destseg", 0.3), metrics("r2", "bottle", "pfadseg", 0.9)]
    _, csv_path, variants_path = write_report(paths, tmp_path / "out")
    rows = csv_rows(csv_path.read_text())
    assert rows["bottle"]["pfadseg (r1): IAP"] == "50.0"
    assert rows["carpet"]["pfadseg (r1): IAP"] == "70.0"
    assert rows["bottle"]["pfadseg (r2): IAP"] == "90.0"
    series = [row[0] for row in csv.reader(io.StringIO(variants_path.read_text()))][1:]
    assert series == ["destseg (r1)", "pfadseg (r1)", "pfadseg (r2)"]


def test_explicit_labels(tmp_path):
    a = write_json(tmp_path / "x/metrics.json", result("bottle", "pfadseg", iap=0.5))
    b = write_json(tmp_path / "y/metrics.json", result("bottle", "pfadseg", iap=0.6))
    _, csv_path, _ = write_report([a, b], tmp_path / "out", labels=["main", "patched"])
    assert set(csv_rows(csv_path.read_text())["bottle"]) == {
        "category", "pfadseg (main): IAP", "pfadseg (patched): IAP"}
    with pytest.raises(ValueError, match="2 result files but 1 --label"):
        write_report([a, b], tmp_path / "out", labels=["main"])
    with pytest.raises(ValueError, match=r"x[/\\]metrics.json and .*y[/\\]metrics.json both hold"):
        write_report([a, b], tmp_path / "out", labels=["same", "same"])


def test_single_run_report_drops_a_stale_variants_table(tmp_path):
    a = write_json(tmp_path / "a.json", [result("bottle", "destseg", iap=0.5),
                                         result("bottle", "pfadseg", iap=0.6)])
    assert len(write_report([a], tmp_path / "out")) == 3
    b = write_json(tmp_path / "b.json", result("bottle", iap=0.5))
    assert [p.name for p in write_report([b], tmp_path / "out")] == ["results.md", "results.csv"]
    assert not (tmp_path / "out/variants.csv").exists()


def test_bad_files_are_named(tmp_path):
    good = write_json(tmp_path / "good.json", result("bottle", iap=0.5))
    with pytest.raises(ValueError, match="good.json: given twice"):
        write_report([good, tmp_path / "." / "good.json"], tmp_path / "out")
    with pytest.raises(ValueError, match="nope.json: cannot read it"):
        write_report([tmp_path / "nope.json"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"cannot read it .* wrote \(e\.g\. .*metrics\.json\)"):
        write_report([tmp_path], tmp_path / "out")  # the run's folder, not its file
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="image.png: not a text file. Fix: give the metrics.json"):
        write_report([tmp_path / "image.png"], tmp_path / "out")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        write_report([tmp_path / "bad.json"], tmp_path / "out")
    with pytest.raises(ValueError, match="odd.json: a result without a \"category\""):
        write_report([write_json(tmp_path / "odd.json", {"iap": 0.5})], tmp_path / "out")
    for i, bad in enumerate(({"metrics": [1, 2]}, {"metrics": {"iap": "abc"}}, {"per_defect": [1]},
                             {"per_defect": {"crack": {"iap": True}}},
                             {"pixel_ap": "0.5"})):  # metrics.json's top-level layout
        path = write_json(tmp_path / f"shape{i}.json", {"category": "bottle", **bad})
        with pytest.raises(ValueError, match=f"shape{i}.json: the metrics .* must map names to numbers"):
            write_report([path], tmp_path / "out")
    unmeasured = write_json(tmp_path / "none.json", result("bottle", iap=None, pixel_ap=0.5))
    assert "| bottle | 50.0 |" in (write_report([unmeasured], tmp_path / "out")[0]).read_text()
    # another tool's file: percentages printed 8810.0, no metric gave an empty table (and
    # counted a benchmark pair finished), a whole-number metric vanished at the top level
    percent = write_json(tmp_path / "percent.json", {"category": "bottle", "pixel_ap": 88.1})
    with pytest.raises(ValueError, match=r"percent.json: pixel_ap is 88.1, not a fraction .* Fix: divide"):
        write_report([percent], tmp_path / "out")
    empty = write_json(tmp_path / "empty.json", {"category": "bottle", "image_threshold": 0.3})
    with pytest.raises(ValueError, match="empty.json: no metrics in the result for bottle"):
        write_report([empty], tmp_path / "out")
    whole = write_json(tmp_path / "whole.json", {"category": "bottle", "image_auroc": 1,
                                                 "pixel_ap": 0.5, "n_images": 83})
    assert "| bottle | 100.0 | 50.0 |" in (write_report([whole], tmp_path / "out")[0]).read_text()


def test_report_command_labels_runs(tmp_path, capsys):
    from pfadseg.cli import main

    a = write_json(tmp_path / "a/metrics.json", result("bottle", "pfadseg", iap=0.5))
    b = write_json(tmp_path / "b/metrics.json", result("bottle", "pfadseg", iap=0.6))
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--label", "main", "--label", "fix", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| pfadseg (fix) | 60.0 |" in printed and str(out / "variants.csv") in printed
    assert main(["report", str(a), str(b), "--label", "main", "--out", str(out)]) == 2
    assert "one --label per file" in capsys.readouterr().err
