"""End to end through the command line on the bundled sample: train, test, predict, report."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from pfadseg.cli import main
from pfadseg.detector import Detector
from pfadseg.demo import demo_root

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "iap", "iap90", "aupro")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--data", str(demo_root()), "--category", "bottle",
                 "--model", "pfadseg", "--teacher", "efficientnet_lite0", "--preset", "tiny",
                 "--image-size", "64", "--out", str(out)])
    assert code == 0
    return out


def test_train_writes_checkpoint_log_and_config(trained: Path) -> None:
    assert (trained / "checkpoint.safetensors").is_file()
    rows = list(csv.DictReader(open(trained / "losses.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows] == ["1", "1", "2", "2"]
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["teacher"] == "efficientnet_lite0"
    assert config["model"]["mean"] == [0.5, 0.5, 0.5]


def test_test_writes_all_metrics_as_fractions(trained: Path, tmp_path: Path) -> None:
    code = main(["test", "--checkpoint", str(trained / "checkpoint.safetensors"),
                 "--data", str(demo_root()), "--category", "bottle", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    for key in METRICS:
        assert 0.0 <= result[key] <= 1.0
        assert 0.0 <= result["dest"][key] <= 1.0
    assert set(result["per_defect"]) == {"broken_large", "broken_small", "contamination"}
    assert result["n_images"] == 16 and result["n_anomalous"] == 12
    assert "pixel_ap" in (tmp_path / "metrics.md").read_text()
    code = main(["report", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "tables")])
    assert code == 0
    table = (tmp_path / "tables" / "results.md").read_text()
    assert "bottle" in table and "P-AP" in table
    assert "n_images" not in table  # counts are not metrics


def test_predict_writes_maps_overlays_masks_and_summary(trained: Path, tmp_path: Path) -> None:
    folder = demo_root() / "bottle" / "test" / "broken_large"
    code = main(["predict", "--checkpoint", str(trained / "checkpoint.safetensors"),
                 "--out", str(tmp_path), "--threshold", "0.5", str(folder)])
    assert code == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 4
    for row in rows:
        assert 0.0 <= row["score"] <= 1.0 and 0.0 <= row["normalized_score"] <= 1.0
        assert row["anomalous"] == (row["score"] >= 0.5) == (row["normalized_score"] >= 0.5)
        assert row["threshold"] == 0.5  # --threshold replaces the image threshold
        overlay = Image.open(tmp_path / f"{row['name']}_overlay.png")
        mask = Image.open(tmp_path / f"{row['name']}_mask.png")
        assert overlay.size == mask.size == (256, 256)  # the original image's size
        assert (tmp_path / f"{row['name']}_map.npy").is_file()
    assert len(list(csv.DictReader(open(tmp_path / "summary.csv")))) == 4


def test_missing_optional_package_is_a_clear_error(trained: Path, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    """`predict --backend onnx` without onnxruntime says what to install, no traceback."""
    from pfadseg import export

    def no_onnxruntime():
        raise ImportError(f"ONNX support needs onnxruntime: {export.ONNX_HINT}")

    monkeypatch.setattr(export, "_ort", no_onnxruntime)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"stand-in: the session is never opened")
    code = main(["predict", "--checkpoint", str(trained / "checkpoint.safetensors"), "--backend",
                 "onnx", "--onnx", str(onnx), "--out", str(tmp_path / "out"),
                 str(demo_root() / "bottle" / "test" / "good")])
    assert code == 2
    err = capsys.readouterr().err
    assert "pfadseg predict: error: ONNX support needs onnxruntime" in err and "pip install" in err


def test_predict_skips_bad_images_when_asked(trained: Path, tmp_path: Path, capsys, caplog) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = demo_root() / "bottle" / "test" / "good" / "000.jpg"
    (folder / "good.jpg").write_bytes(good.read_bytes())
    (folder / "m_broken.png").write_bytes(b"not a png")  # between two good images of one batch
    (folder / "z_good.jpg").write_bytes(good.read_bytes())
    args = ["predict", "--checkpoint", str(trained / "checkpoint.safetensors"), "--batch-size", "3",
            "--out", str(tmp_path / "out"), str(folder)]
    assert main(args) == 2  # without --skip-bad-images the bad file stops the run ...
    assert "m_broken.png" in capsys.readouterr().err.splitlines()[-1].split("--skip-bad-images")[0]
    done = json.loads((tmp_path / "out" / "summary.json").read_text())  # ... keeping what was done
    assert [Path(r["image"]).name for r in done] == ["good.jpg"]  # read before it in its batch
    assert main(args + ["--skip-bad-images", "--overwrite"]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [Path(r["image"]).name for r in rows] == ["good.jpg", "m_broken.png", "z_good.jpg"]
    assert "m_broken.png" in rows[1]["error"] and "score" in rows[0] and "score" in rows[2]
    assert "skipped: " in caplog.text and "m_broken.png" in caplog.text  # logged, as train does
    assert (tmp_path / "out" / "good_overlay.png").is_file()
    page = (tmp_path / "out" / "report.html").read_text()  # the page says what it leaves out
    assert "2 images, " in page and "1 file(s) could not be read" in page and "m_broken.png" in page
    # an unreadable first image: nothing written, so the rerun the message names is not refused
    first = ["predict", "--checkpoint", str(trained / "checkpoint.safetensors"), "--out",
             str(tmp_path / "first"), str(folder / "m_broken.png"), str(folder / "good.jpg")]
    assert main(first) == 2
    assert "No image was scored; to go on past unreadable files, rerun with --skip-bad-images." \
        in capsys.readouterr().err
    assert not (tmp_path / "first").exists() and main(first + ["--skip-bad-images"]) == 0
    # nothing readable at all: not a success, and the summary says why for each file
    args[-1] = str(folder / "m_broken.png")
    assert main(args + ["--skip-bad-images", "--overwrite"]) == 2
    assert "no image could be read (1 given)" in capsys.readouterr().err
    assert "m_broken.png" in json.loads((tmp_path / "out" / "summary.json").read_text())[0]["error"]


@pytest.mark.parametrize("preset, batch, message", [
    ("tiny", "1", "needs two or more. Fix: a batch size of 2 or more (--batch-size), or AFF off (--no-aff)"),
    ("demo", "2", "makes the gradients of two explode (the model comes out garbage). "
                  "Fix: a batch size of 3 or more (--batch-size), or AFF off (--no-aff)")])
def test_too_small_a_batch_for_aff_is_a_clear_error(preset: str, batch: str, message: str,
                                                     tmp_path: Path, capsys) -> None:
    """AFF's batch norm on pooled features cannot train on one image (torch's own error
    names neither the cause nor the fix), and on two without `tiny`'s gradient clipping
    it trains a garbage model with no error at all; nothing is written."""
    code = main(["train", "--data", str(demo_root()), "--category", "bottle", "--teacher",
                 "efficientnet_lite0", "--preset", preset, "--batch-size", batch, "--image-size", "64",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # not even an empty folder


def test_test_and_predict_check_their_inputs_before_loading_the_checkpoint(tmp_path: Path, capsys) -> None:
    """A mistyped test folder or image was found only after the checkpoint loaded (seconds);
    here the checkpoint does not even exist, and the error is about the input."""
    missing = str(tmp_path / "nowhere.safetensors")
    image = demo_root() / "bottle" / "test" / "good" / "000.jpg"
    assert main(["test", "--checkpoint", missing, "--test-dir", str(image), "--out", str(tmp_path / "t")]) == 2
    assert f"{image}: a file, not a folder. Fix: give a folder holding good/" in capsys.readouterr().err
    assert main(["test", "--checkpoint", missing, "--test-dir", str(image.parents[1]), "--mask-dir",
                 str(tmp_path / "masks"), "--out", str(tmp_path / "t")]) == 2
    assert f"--mask-dir {tmp_path / 'masks'}: not a folder. Fix:" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", missing, "--out", str(tmp_path / "p"), str(tmp_path / "typo.png")]) == 2
    err = capsys.readouterr().err
    assert "typo.png" in err and "nowhere.safetensors" not in err


def test_test_and_predict_keep_an_earlier_runs_results(tmp_path: Path, capsys) -> None:
    """A rerun into the same --out replaced the summary, overlays, metrics and report.html
    (which test and predict both write) of the earlier run; now only with --overwrite."""
    missing = str(tmp_path / "nowhere.safetensors")  # refused before the checkpoint loads
    image = demo_root() / "bottle" / "test" / "good" / "000.jpg"
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "report.html").write_text("the earlier report")
    for argv in (["predict", "--checkpoint", missing, "--out", str(out), str(image)],
                 ["test", "--checkpoint", missing, "--test-dir", str(image.parents[1]), "--out", str(out)]):
        assert main(argv) == 2
        assert f"--out {out} holds the results of an earlier run (report.html). Fix: give a new " \
               "--out, or add --overwrite" in capsys.readouterr().err
        assert main(argv + ["--overwrite"]) == 2  # goes on, to the missing checkpoint
        assert "nowhere.safetensors" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "the earlier report"
    masks = tmp_path / "masks"  # an input folder as --out: its own *_mask.png would be written over
    masks.mkdir()
    (masks / "a_mask.png").write_bytes(b"a user's mask")
    assert main(["predict", "--checkpoint", missing, "--out", str(masks), str(image)]) == 2
    assert "holds the results of an earlier run (per-image files such as a_mask.png)" in capsys.readouterr().err


def test_option_pairs_that_cannot_both_hold_are_refused(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "nowhere.safetensors")
    image = demo_root() / "bottle" / "test" / "good" / "000.jpg"
    predict = ["predict", "--checkpoint", missing, "--out", str(tmp_path / "p"), str(image)]
    assert main(predict + ["--onnx", "m.onnx", "--backend", "torch"]) == 2  # --onnx went unread
    assert "--onnx is the model of --backend onnx" in capsys.readouterr().err
    assert main(predict + ["--backend", "onnx", "--device", "cuda"]) == 2  # not: "no CUDA GPU"
    assert "--device cuda: the onnx backend runs on the CPU" in capsys.readouterr().err
    assert main(predict + ["--onnx", str(tmp_path / "m.onnx")]) == 2  # --onnx alone: the onnx backend
    assert "nowhere.safetensors" in capsys.readouterr().err
    assert main(predict + ["--backend", "onnx", "--compile"]) == 2  # went unread
    assert "--compile compiles the torch model" in capsys.readouterr().err
    assert main(predict + ["--backend", "onnx", "--device", "CPU"]) == 2
    assert "nowhere.safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="onnx= is the model of backend='onnx'"):
        Detector.load(missing, onnx="m.onnx")
    test = ["test", "--checkpoint", missing, "--test-dir", str(image.parents[1]), "--out", str(tmp_path / "t")]
    for extra in (["--data", str(tmp_path)], ["--category", "bottle"]):  # went unread
        assert main(test + extra) == 2
        assert "--test-dir is the whole test set: leave out --data and --category" in capsys.readouterr().err
    # a failed command leaves none of the folders it made for --out behind, and only those
    assert main(["predict", "--checkpoint", missing, "--out", str(tmp_path / "a" / "b" / "c"), str(image)]) == 2
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    assert main(["predict", "--checkpoint", missing, "--out", str(tmp_path / "new" / ".." / "kept" / "x"),
                 str(image)]) == 2
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "x").exists()


def test_global_options_go_before_or_after_the_command(capsys) -> None:
    """`pfadseg predict --threads 2 ...` took the 2 for an input file."""
    from pfadseg.cli import build_parser

    for argv in (["--threads", "1", "-v", "predict", "x.png", "--checkpoint", "c", "--out", "o"],
                 ["predict", "x.png", "--threads", "1", "--checkpoint", "c", "--out", "o", "-v"]):
        args = build_parser().parse_args(argv)
        assert (args.threads, args.verbose, args.inputs) == (1, True, [Path("x.png")])
    args = build_parser().parse_args(["predict", "x.png", "--checkpoint", "c", "--out", "o"])
    assert (args.threads, args.verbose) == (None, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--image-size", "50", "--out", "o"])
    assert "e.g. 64" in capsys.readouterr().err  # the nearest multiple of 32


def test_predict_refuses_missing_input(trained: Path, tmp_path: Path, capsys) -> None:
    code = main(["predict", "--checkpoint", str(trained / "checkpoint.safetensors"),
                 "--out", str(tmp_path), str(tmp_path / "nope.png")])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


def test_test_at_original_resolution(trained: Path, tmp_path: Path) -> None:
    code = main(["test", "--checkpoint", str(trained / "checkpoint.safetensors"), "--data",
                 str(demo_root()), "--category", "bottle", "--out", str(tmp_path),
                 "--eval-size", "original"])
    assert code == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["eval_size"] == [256, 256]  # the bundled images' own size, not the 64 input
    assert all(0.0 <= result[k] <= 1.0 for k in METRICS)


def test_demo_quick_writes_metrics_and_overlays(tmp_path: Path, capsys) -> None:
    """All under quick/: a full demo in the same folder trains its own model, and a
    quick one after it leaves the full one's metrics and overlays alone."""
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    quick = tmp_path / "quick"
    assert json.loads((quick / "test" / "metrics.json").read_text())["n_images"] == 16
    assert len(list((quick / "predictions").glob("*_overlay.png"))) == 16
    assert str(quick.resolve()) in capsys.readouterr().out
    assert (quick / "run" / "checkpoint.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick"]


def test_test_table_says_when_the_threshold_misses_every_defect() -> None:
    from pfadseg.evaluation import format_table

    result = {"image_auroc": 0.9, "dest": {"image_auroc": 0.8}, "n_images": 12, "n_anomalous": 8,
              "calibrated": {"method": "false_alarm", "image_f1": 0.0, "good_flagged": 0, "defects_missed": 8}}
    assert "the image threshold misses every defect here. Fix: `pfadseg calibrate`" in format_table(result)
    assert "Fix:" not in format_table({**result, "image_auroc": 0.6})  # no threshold would help
    result["calibrated"].update(image_f1=0.5, defects_missed=3)
    assert "Fix:" not in format_table(result)


@pytest.mark.skipif(sys.platform != "linux", reason="names of raw bytes: Linux file systems only")
def test_file_names_that_are_not_utf8_are_scored_and_reported(trained: Path, tmp_path: Path) -> None:
    """A name with bytes that are not UTF-8 (an old Windows share) stopped predict before
    its first image, and test after its whole evaluation, while writing report.html."""
    name = os.fsdecode(b"bad_\xff\xfe.jpg")
    folder = tmp_path / "test"
    for kind in ("good", "broken_large"):
        (folder / kind).mkdir(parents=True)
        for src in sorted((demo_root() / "bottle" / "test" / kind).iterdir())[:2]:
            (folder / kind / src.name).write_bytes(src.read_bytes())
    (folder / "good" / name).write_bytes((folder / "good" / "000.jpg").read_bytes())
    checkpoint = str(trained / "checkpoint.safetensors")
    assert main(["predict", "--checkpoint", checkpoint, "--out", str(tmp_path / "p"),
                 str(folder / "good")]) == 0
    assert (tmp_path / "p" / "bad_\udcff\udcfe_overlay.png").is_file()
    assert b"bad_\xff\xfe.jpg" in (tmp_path / "p" / "summary.csv").read_bytes()  # the file's own bytes
    assert main(["test", "--checkpoint", checkpoint, "--test-dir", str(folder),
                 "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["n_images"] == 5
    assert "bad_\ufffd\ufffd.jpg" in (tmp_path / "t" / "report.html").read_text(encoding="utf-8")  # valid UTF-8
