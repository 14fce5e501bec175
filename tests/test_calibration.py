"""Thresholds without test labels: normalisation, the rules, the held-out split,
training's calibrated checkpoint and `pfadseg calibrate`."""
from __future__ import annotations

import json
from dataclasses import replace
from statistics import NormalDist
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfadseg.calibration import (CalibrationError, Thresholds, calibrate, calibrate_outputs,
                                 f1_threshold, false_alarm_threshold, held_out_split,
                                 pixel_false_alarm_threshold, synthetic_defects,
                                 write_calibrated_checkpoint)
from pfadseg.checkpoint import load_checkpoint, read_meta
from pfadseg.cli import main
from pfadseg.synthesis import DefectSynthesizer, procedural_textures

from conftest import CATEGORY, write_dataset

SIZE = 64


def test_normalisation_is_half_at_the_threshold_monotonic_and_bounded() -> None:
    t = Thresholds(image=0.2, pixel=0.7, method="test")
    raw = np.linspace(0.0, 1.0, 101)
    for norm, at in ((t.normalize_image, 0.2), (t.normalize_map, 0.7)):
        assert norm(at) == pytest.approx(0.5)
        values = norm(raw)
        assert np.all(np.diff(values) > 0) and values.min() >= 0.0 and values.max() <= 1.0
        assert np.array_equal(values >= 0.5, raw >= at)  # same verdict as the raw threshold
    maps = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    assert t.normalize_map(maps).dtype == np.float32 and t.normalize_map(maps).shape == (2, 8, 8)
    assert isinstance(t.normalize_image(0.3), float)


def test_meta_round_trip_and_old_checkpoints() -> None:
    t = Thresholds(0.31, 0.42, "false_alarm", false_alarm_rate=0.01, pixel_false_alarm_rate=1e-3,
                   n_good=21, n_defects=40, source="held-out good images", defect_recall=0.9,
                   defect_pixel_f1=0.7)
    meta = json.loads(json.dumps(t.to_meta()))  # what a checkpoint stores
    assert meta["threshold"] == 0.31 and Thresholds.from_meta(meta) == t
    older = {**meta["thresholds"], "synthetic_recall": 0.9, "synthetic_pixel_f1": 0.7}  # earlier names
    del older["defect_recall"], older["defect_pixel_f1"]
    assert Thresholds.from_meta({"thresholds": older}) == t
    legacy = Thresholds.from_meta({"threshold": 0.6})
    assert (legacy.image, legacy.pixel, legacy.method) == (0.6, 0.6, "legacy")
    with pytest.raises(CalibrationError, match="pfadseg calibrate"):
        Thresholds.from_meta({"threshold": None})
    with pytest.raises(CalibrationError):
        Thresholds(float("nan"), 0.5, "broken")


def test_false_alarm_threshold_flags_the_asked_fraction_of_good_images() -> None:
    rng = np.random.default_rng(0)
    scores = 1 / (1 + np.exp(-rng.normal(-2.0, 0.5, 20_000)))  # logit-normal good scores
    for rate in (0.01, 0.05, 0.2):
        t = false_alarm_threshold(scores, rate)
        assert np.mean(scores >= t) == pytest.approx(rate, abs=0.005)
    assert false_alarm_threshold(scores[:1], 0.01) >= scores[0]  # one image: just above it
    with pytest.raises(CalibrationError):
        false_alarm_threshold(scores, 1.5)
    maps = rng.random((4, 50, 50))
    assert np.mean(maps >= pixel_false_alarm_threshold(maps, 0.1)) == pytest.approx(0.1, abs=0.002)


def test_few_good_images_flag_the_asked_fraction_of_new_ones() -> None:
    """With the 4 held-out images of a small run the threshold was the normal quantile
    of estimates: it flagged about 6% of new good images for a rate of 1%. Averaged
    over many draws, the rate it gives new images is the one asked for, at every n."""
    rng = np.random.default_rng(0)
    for n in (4, 8, 30):
        rates = []
        for _ in range(4000):
            z = rng.normal(-2.0, 0.5, n)
            t = false_alarm_threshold(1 / (1 + np.exp(-z)), 0.01)
            rates.append(1 - NormalDist(-2.0, 0.5).cdf(np.log(t / (1 - t))))
        assert np.mean(rates) == pytest.approx(0.01, abs=0.002), n


def test_f1_threshold_is_the_best_one_with_a_margin_when_classes_are_apart() -> None:
    scores, labels = np.array([0.1, 0.2, 0.6, 0.8]), np.array([0, 0, 1, 1])
    t = f1_threshold(scores, labels)
    assert 0.2 < t < 0.6  # between the classes, not touching the lowest defect
    rng = np.random.default_rng(1)
    scores = np.r_[rng.beta(2, 5, 300), rng.beta(5, 2, 100)]
    labels = np.r_[np.zeros(300), np.ones(100)].astype(bool)
    t = f1_threshold(scores, labels)

    def f1(thr: float) -> float:
        p = scores >= thr
        return 2 * (p & labels).sum() / (p.sum() + labels.sum())
    assert f1(t) == pytest.approx(max(f1(s) for s in scores))


def test_calibrate_outputs_rates_on_good_images_and_f1_on_real_defects() -> None:
    rng = np.random.default_rng(2)
    good = rng.uniform(0.0, 0.2, (6, 32, 32))
    defect = rng.uniform(0.0, 0.2, (6, 32, 32))
    masks = np.zeros((6, 32, 32), dtype=bool)
    masks[:, 8:16, 8:16] = True
    defect[masks] = rng.uniform(0.6, 0.9, masks.sum())
    scores = good.max(axis=(1, 2)), defect.max(axis=(1, 2))
    t = calibrate_outputs(scores[0], good, scores[1], defect, masks)
    assert t.method == "false_alarm" and (t.n_good, t.n_defects) == (6, 6)
    assert np.mean(good >= t.pixel) == pytest.approx(1e-3, abs=5e-4)  # 0.1% of good pixels
    assert t.defect_recall == 1.0 and t.defect_pixel_f1 > 0.95  # the planted squares
    real = calibrate_outputs(scores[0], good, scores[1], defect, masks, synthetic=False)
    assert real.method == "f1" and 0.2 < real.image < 0.6 and 0.2 < real.pixel < 0.6
    assert real.defect_recall == 1.0 and real.defect_pixel_f1 > 0.95  # what it does on them, said
    none = calibrate_outputs(scores[0], good, pixel_false_alarm_rate=0.01)
    assert none.method == "false_alarm" and none.n_defects == 0 and none.defect_recall is None
    assert np.mean(good >= none.pixel) == pytest.approx(0.01, abs=2e-3)
    with pytest.raises(CalibrationError, match="masks are all empty.*Fix: give the masks"):
        calibrate_outputs(scores[0], good, scores[1], defect, np.zeros_like(masks), synthetic=False)


def test_held_out_split_is_seeded_disjoint_and_bounded() -> None:
    train, held = held_out_split(209, seed=0)  # MVTec bottle
    assert len(held) == 21 and len(train) == 188
    assert not set(train.tolist()) & set(held.tolist())
    assert torch.equal(held, held_out_split(209, seed=0)[1])
    assert not torch.equal(held, held_out_split(209, seed=1)[1])
    assert len(held_out_split(1000, 0)[1]) == 30 and len(held_out_split(40, 0)[1]) == 4
    assert len(held_out_split(7, 0)[1]) == 0 and len(held_out_split(7, 0)[0]) == 7


def test_synthetic_defects_are_seeded_and_never_empty() -> None:
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    synth = DefectSynthesizer(procedural_textures(4, SIZE))
    a_img, a_mask = synthetic_defects(images, synth, seed=3)
    b_img, b_mask = synthetic_defects(images, synth, seed=3)
    assert torch.equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert a_img.dtype == torch.uint8 and len(a_img) == len(a_mask) > 0
    assert all(m.any() for m in a_mask)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A tiny run on 8 good images: 4 trained on, 4 held out for calibration."""
    base = tmp_path_factory.mktemp("calib")
    root = write_dataset(base / "mvtec", n_train=8)
    assert main(["train", "--data", str(root), "--category", CATEGORY, "--preset", "tiny",
                 "--image-size", str(SIZE), "--teacher", "efficientnet_lite0",
                 "--out", str(base / "run"), "--device", "cpu"]) == 0
    return base


def test_training_calibrates_on_held_out_images(trained: Path) -> None:
    meta = read_meta(trained / "run" / "checkpoint.safetensors")
    t = Thresholds.from_meta(meta)
    assert meta["threshold"] == t.image and t.method == "false_alarm"
    assert t.n_good == 4 and t.n_defects > 0 and t.source == "held-out good images"
    assert 0.0 <= t.defect_recall <= 1.0
    assert 0.0 < t.image < 1.0 and 0.0 < t.pixel < 1.0


def test_calibrate_runs_the_model_and_writes_a_new_checkpoint(trained: Path) -> None:
    src = trained / "run" / "checkpoint.safetensors"
    model, before = load_checkpoint(src)
    good = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    t = calibrate(model, good, DefectSynthesizer(procedural_textures(4, SIZE)), seed=0,
                  bf16=False, source="unit test")
    assert t.n_good == 3 and t.source == "unit test"
    out = write_calibrated_checkpoint(src, trained / "new.safetensors", t)
    assert Thresholds.from_meta(read_meta(out)) == t
    assert read_meta(src) == before  # the source checkpoint is never rewritten
    with pytest.raises(CalibrationError, match="another --out"):
        write_calibrated_checkpoint(src, src, t)
    # a second calibration replaces the first; any other file is left as it is
    again = replace(t, source="again")
    assert Thresholds.from_meta(read_meta(write_calibrated_checkpoint(src, out, again))) == again
    other = trained / "run" / "config.json"
    before_other = other.read_bytes()
    with pytest.raises(CalibrationError, match=f"{other} exists and is not a calibrated copy of {src}"):
        write_calibrated_checkpoint(src, other, t)
    assert other.read_bytes() == before_other


def test_cli_calibrate_with_real_defects_uses_f1(trained: Path, tmp_path: Path, caplog, capsys) -> None:
    base = trained / "mvtec" / CATEGORY
    # masks named like their images, in a nested folder: matched by stem
    masks = tmp_path / "masks" / "deep"
    masks.mkdir(parents=True)
    for mask in (base / "ground_truth" / "crack").iterdir():
        Image.open(mask).save(masks / mask.name.replace("_mask", ""))
    out = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", "--checkpoint", str(trained / "run" / "checkpoint.safetensors"),
                 "--good", str(base / "test" / "good"), "--defects", str(base / "test" / "crack"),
                 "--masks", str(tmp_path / "masks"), "--out", str(out), "--device", "cpu",
                 "--no-bf16"]) == 0
    t = Thresholds.from_meta(read_meta(out))
    assert t.method == "f1" and (t.n_good, t.n_defects) == (2, 2)
    assert "your defects: " in capsys.readouterr().out  # what the new thresholds do on them
    assert "pfadseg calibrate on" in t.source
    assert "only 2 good image(s)" in caplog.text  # thresholds from 2 images are rough: said so


def test_cli_calibrate_warns_of_training_images_and_predict_outputs(trained: Path, tmp_path: Path,
                                                                    caplog) -> None:
    """Thresholds set on the images the model trained on flag good parts, and the
    overlays and masks of a `pfadseg predict` into the --good folder were counted as
    good images: both said (a warning, and the outputs left out)."""
    checkpoint = trained / "run" / "checkpoint.safetensors"
    good = trained / "mvtec" / CATEGORY / "train"  # holds train/good, the training folder
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--good", str(good),
                 "--out", str(tmp_path / "c.safetensors"), "--device", "cpu", "--no-bf16"]) == 0
    assert "holds the images the model trained on" in caplog.text
    caplog.clear()
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted((trained / "mvtec" / CATEGORY / "test" / "good").iterdir()):
        Image.open(path).save(other / path.name)
    assert main(["predict", str(other), "--checkpoint", str(checkpoint), "--out", str(other / "p"),
                 "--device", "cpu", "--no-bf16"]) == 0
    first = tmp_path / "c.calibrated.safetensors"
    assert main(["calibrate", "--checkpoint", str(tmp_path / "c.safetensors"), "--good", str(other),
                 "--device", "cpu", "--no-bf16"]) == 0
    assert "trained on" not in caplog.text and "leaving out 4 overlays and masks" in caplog.text
    assert Thresholds.from_meta(read_meta(first)).n_good == 2  # not 6
    # a calibrated copy is recalibrated in place (was: c.calibrated.calibrated.safetensors)
    assert main(["calibrate", "--checkpoint", str(first), "--good", str(good / "good"),
                 "--device", "cpu", "--no-bf16"]) == 0
    assert Thresholds.from_meta(read_meta(first)).n_good == 8 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cli_calibrate_names_an_unreadable_good_image_and_the_skip_option(trained: Path, tmp_path: Path,
                                                                         capsys) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for path in sorted((trained / "mvtec" / CATEGORY / "test" / "good").iterdir()):
        Image.open(path).save(good / path.name)
    (good / "broken.png").write_bytes((good / path.name).read_bytes()[:100])
    argv = ["calibrate", "--checkpoint", str(trained / "run" / "checkpoint.safetensors"), "--good",
            str(good), "--out", str(tmp_path / "c.safetensors"), "--device", "cpu", "--no-bf16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{good / 'broken.png'}: cannot read image" in err and "Or add --skip-bad-images" in err
    assert main([*argv, "--skip-bad-images"]) == 0
    assert Thresholds.from_meta(read_meta(tmp_path / "c.safetensors")).n_good == 2
    capsys.readouterr()
    assert main(argv) == 2  # stops on broken.png: the earlier calibration is kept, and not said gone
    assert "replace" not in capsys.readouterr().out and (tmp_path / "c.safetensors").is_file()
    assert main([*argv, "--skip-bad-images"]) == 0
    assert "(replaced the earlier calibration of this model)" in capsys.readouterr().out


def test_cli_calibrate_refuses_half_of_the_defect_options(trained: Path, capsys) -> None:
    base = trained / "mvtec" / CATEGORY
    code = main(["calibrate", "--checkpoint", str(trained / "run" / "checkpoint.safetensors"),
                 "--good", str(base / "test" / "good"), "--defects", str(base / "test" / "crack"),
                 "--device", "cpu"])
    assert code == 2 and "--defects and --masks go together" in capsys.readouterr().err
    # rates set thresholds from good images alone: with real defects they would be ignored
    code = main(["calibrate", "--checkpoint", "missing.safetensors", "--good", str(base / "test" / "good"),
                 "--defects", str(base / "test" / "crack"), "--masks", str(base / "ground_truth"),
                 "--false-alarm-rate", "0.05"])
    err = capsys.readouterr().err
    assert code == 2 and "with --defects both maximise F1" in err and "missing" not in err
    with pytest.raises(SystemExit):  # a rate is checked by the parser, before any inference
        main(["calibrate", "--checkpoint", "missing.safetensors", "--good", ".", "--pixel-false-alarm-rate", "1"])
    assert "--pixel-false-alarm-rate: '1' is not a number between 0 and 1" in capsys.readouterr().err
