"""`Detector`: train, load and predict through one object, and what a `Prediction` holds."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pfadseg
from pfadseg.calibration import Thresholds
from pfadseg.checkpoint import CheckpointError
from pfadseg.data import DataError
from pfadseg.demo import demo_root
from pfadseg.detector import Detector, Prediction
from pfadseg.models import ModelConfig
from pfadseg.trainer import TrainingError

BOTTLE = demo_root() / "bottle"
IMAGES = [BOTTLE / "test" / "good" / "000.jpg", BOTTLE / "test" / "broken_large" / "000.jpg"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Detector:
    out = tmp_path_factory.mktemp("detector")
    return Detector.train(BOTTLE / "train" / "good", out, teacher="efficientnet_lite0", image_size=64,
                          preset_name="tiny", category="bottle", device="cpu", progress=False)


def test_train_writes_a_checkpoint_and_returns_it_loaded(trained: Detector) -> None:
    assert trained.meta["category"] == "bottle" and trained.meta["preset"] == "tiny"
    info = trained.info()
    assert info["variant"] == "pfadseg" and info["teacher"] == "efficientnet_lite0"
    assert info["image_size"] == 64 and info["device"] == "cpu"
    assert np.isfinite(trained.thresholds.image) and np.isfinite(trained.thresholds.pixel)


def test_predict_holds_scores_verdicts_maps_and_masks(trained: Detector) -> None:
    t = trained.thresholds
    predictions = trained.predict(IMAGES)
    # two folders' 000.jpg: saving by name would overwrite one with the other
    assert [p.name for p in predictions] == [f"{path.parent.name}_000.jpg" for path in IMAGES]
    for p in predictions:
        assert 0.0 <= p.score <= 1.0
        assert p.normalized_score == pytest.approx(t.normalize_image(p.score))
        assert p.anomalous == (p.score >= t.image) == (p.normalized_score >= 0.5)
        assert p.anomaly_map.dtype == np.float32 and p.anomaly_map.shape == (64, 64)
        assert p.mask.dtype == bool and np.array_equal(p.mask, p.anomaly_map >= t.pixel)
        assert p.overlay().size == (256, 256)  # the input's own size


def test_paths_pil_images_and_arrays_score_alike(trained: Detector) -> None:
    path = IMAGES[1]
    pil = Image.open(path)
    array = np.array(Image.open(path).convert("RGB"))
    by_path, by_pil, by_array = trained.predict([path, pil, array])
    array[:] = 0  # a camera loop reuses its buffer: the prediction keeps the image it scored
    assert np.array_equal(by_array.image, by_path.image)
    assert by_pil.score == pytest.approx(by_path.score, abs=1e-4)
    assert by_array.score == pytest.approx(by_path.score, abs=1e-4)
    folder = path.parent.name  # the same file twice: numbered
    assert [p.name for p in (by_path, by_pil, by_array)] == [f"{folder}_000.jpg", f"{folder}_000_1.jpg",
                                                            "image_2.png"]
    assert trained.predict([pil])[0].name == "000.jpg"
    assert [p.name for p in trained.predict([array], names=["mine"])] == ["mine"]
    from pfadseg.detector import _names
    assert _names(["a/noext", "b/scan.dat", "c/x.TIF"]) == ["noext.png", "scan.dat.png", "x.TIF"]
    assert _names(["a/scan.dat", "b/scan.dat.png"]) == ["a_scan.dat.png", "b_scan.dat.png"]


def test_threshold_replaces_the_image_threshold_only(trained: Detector) -> None:
    ckpt = trained.checkpoint
    always = Detector.load(ckpt, device="cpu", threshold=0.0)
    never = Detector.load(ckpt, device="cpu", threshold=1.0)
    assert always.thresholds.pixel == never.thresholds.pixel == trained.thresholds.pixel
    assert all(p.anomalous and p.normalized_score >= 0.5 for p in always.predict(IMAGES))
    assert not any(p.anomalous or p.normalized_score >= 0.5 for p in never.predict(IMAGES))


def test_bad_inputs_are_named(trained: Detector, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png"):
        trained.predict([tmp_path / "nope.png"])
    with pytest.raises(DataError, match=r"image 1: an array must be uint8 \(H, W, 3\) RGB, \(H, W, 4\)"):
        trained.predict([IMAGES[0], np.zeros((8, 8), dtype=np.float32)])
    # grey and RGBA arrays are read as their PIL images are
    grey = np.asarray(Image.open(IMAGES[0]).convert("L"))
    rgba = np.asarray(Image.open(IMAGES[0]).convert("RGBA"))
    from_arrays = trained.predict([grey, grey[..., None], rgba])
    from_pil = trained.predict([Image.fromarray(grey), Image.fromarray(rgba)])
    for p, q in zip(from_arrays, [from_pil[0], from_pil[0], from_pil[1]]):
        assert np.array_equal(p.image, q.image)  # the same RGB pixels go into the model
    truncated = tmp_path / "cut.png"  # PIL opens lazily: the error comes when predict decodes it
    Image.open(IMAGES[0]).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(DataError, match=rf"image 1 \({re.escape(str(truncated))}\): cannot read it"):
        trained.predict([IMAGES[0], Image.open(truncated)])
    with Image.open(IMAGES[0]) as closed:
        pass
    with pytest.raises(DataError, match=r"image 0 \(.*000.jpg\): cannot read it.*pass it open"):
        trained.predict([closed])
    with pytest.raises(DataError, match="image 0: int is not an image"):
        trained.predict([3])  # type: ignore[list-item]
    with pytest.raises(DataError, match=r"image 0: empty \(0x0 pixels\)"):
        trained.predict([np.zeros((0, 0, 3), dtype=np.uint8)])
    bomb = tmp_path / "bomb.png"  # a PNG header claiming 30000 x 30000 pixels
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match="bomb.png: too many pixels to decode safely.*Fix: downscale"):
        trained.predict([bomb])
    with pytest.raises(DataError, match="a folder, not an image.*collect_inputs"):
        trained.predict([BOTTLE / "test" / "good"])
    for one in (IMAGES[0], str(IMAGES[0]), Image.open(IMAGES[0]), np.zeros((8, 8, 3), np.uint8)):
        with pytest.raises(TypeError, match=r"predict takes a list of images.*predict\(\[image\]\)"):
            trained.predict(one)  # type: ignore[arg-type]
    assert len(trained.predict(iter(IMAGES), names=iter("ab"))) == 2  # any iterable, read once
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be a whole number of 1 or more"):
            trained.predict(IMAGES, batch_size=size)
        with pytest.raises(ValueError, match="batch_size must be a whole number of 1 or more"):
            Detector.load(trained.checkpoint, device="cpu", batch_size=size)
    with pytest.raises(ValueError, match="threshold 5 is not between 0 and 1"):
        Detector.load(trained.checkpoint, device="cpu", threshold=5)
    assert "anomaly_map" not in repr(trained.predict(IMAGES[:1])[0])  # no array dump in a notebook


def test_low_level_inference_refuses_images_it_would_misread(trained: Detector) -> None:
    """infer and calibrate take uint8 at the model's size: float images in [0, 1] were
    divided by 255 again, silently."""
    import torch

    from pfadseg.calibration import calibrate
    from pfadseg.inference import infer

    good = torch.zeros((2, 3, 64, 64), dtype=torch.uint8)
    for bad, got in ((good.float() / 255, "torch.float32"), (torch.zeros((2, 3, 128, 128), dtype=torch.uint8),
                                                             "(2, 3, 128, 128)"), (good.numpy(), "uint8")):
        with pytest.raises(ValueError, match=f"uint8 tensor \\(N, 3, 64, 64\\) for this model, got .*{re.escape(got)}"):
            infer(trained.model, bad)
    with pytest.raises(ValueError, match="uint8 tensor"):
        calibrate(trained.model, good.float(), None, 0)


def test_train_checks_python_arguments_before_any_work(tmp_path: Path) -> None:
    """The command line's checks, for Detector.train: nothing is written."""
    for schedule, words in (({"stage2_steps": -3}, "stage2_steps must be a whole number of 0"),
                            ({"batch_size": "4"}, "batch_size must be a whole number of 1"),
                            ({"lr_student": 0}, "lr_student must be a number above 0"),
                            ({"rotation": "big"}, "unknown rotation 'big'; choose from"),
                            ({"texture_limit": 0}, "texture_limit must be a whole number of 1"),
                            ({"aff": False}, "unknown training setting.s. aff; the schedule's are"),
                            ({"model": "destseg+spr"}, "choose destseg, pfadseg or destseg[+]<modules>"),
                            ({"model": ModelConfig(image_size=128)}, "image_size=64 differ from the ModelConfig")):
        with pytest.raises(ValueError, match=words):
            Detector.train(BOTTLE / "train" / "good", tmp_path / "run", teacher="efficientnet_lite0",
                           image_size=64, preset_name="tiny", device="cpu", **schedule)
    assert not (tmp_path / "run").exists()
    # these were found only after every training image was decoded (minutes, for a big folder)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for kwargs, words in (({"image_size": 100}, "image_size must be a multiple of 32"),
                          ({"teacher": "resnet50"}, "unknown teacher 'resnet50'"),
                          ({"out_dir": a_file}, "is a file")):
        with pytest.raises((ValueError, TrainingError), match=words):
            Detector.train(tmp_path / "no_images_here", **{"out_dir": tmp_path / "run", "teacher":
                           "efficientnet_lite0", "preset_name": "tiny", "device": "cpu", **kwargs})
    assert not (tmp_path / "run").exists()


def test_load_refuses_what_the_onnx_backend_would_ignore(tmp_path: Path) -> None:
    """The command line refused --device cuda and --compile with the onnx backend; the API ran
    on the CPU, uncompiled, without a word. Checked before the checkpoint is read."""
    for kwargs in ({"device": "cuda"}, {"device": "cuda:1"}, {"compile": True}):
        with pytest.raises(ValueError, match="backend='onnx' runs its export on the CPU as it is"):
            Detector.load(tmp_path / "missing.safetensors", backend="onnx", **kwargs)
    for device in (None, " CPU", torch.device("cpu")):  # what resolve_device takes as the CPU
        with pytest.raises(CheckpointError, match="checkpoint not found"):  # past the check
            Detector.load(tmp_path / "missing.safetensors", backend="onnx", device=device)


def test_a_file_also_inside_a_given_folder_is_scored_once(caplog) -> None:
    from pfadseg.predict import collect_inputs, output_names

    folder = BOTTLE / "test" / "good"
    with caplog.at_level(logging.INFO, logger="pfadseg.predict"):
        paths = collect_inputs([folder, folder / "000.jpg"])
    assert "1 input(s) given more than once" in caplog.text
    assert paths == collect_inputs([folder]) and len(set(output_names(paths))) == len(paths)


def test_predict_leaves_out_its_own_output_folder_and_long_names(trained: Detector, tmp_path: Path,
                                                                  caplog) -> None:
    """--out inside an input folder: a rerun scored its own overlays and masks before,
    and a run with another --out those of earlier runs (beside their summary.csv)."""
    from pfadseg.predict import collect_inputs, output_names, predict_files

    folder = tmp_path / "line"
    folder.mkdir()
    for path in IMAGES:
        (folder / f"{path.parent.name}.jpg").write_bytes(path.read_bytes())
    for out in (folder / "preds", folder, tmp_path):  # inside the input folder, it, above it
        for _ in range(2):
            rows = predict_files(trained, collect_inputs([folder], skip=out), out, progress=False)
            assert len(rows) == 2
    assert len(collect_inputs([folder], skip=tmp_path / "new")) == 2  # earlier runs' outputs too
    # a reused --out: the earlier run's other images are left, and the warning says so
    paths = sorted(folder.glob("*.jpg"))
    predict_files(trained, paths, tmp_path / "again", progress=False)
    with caplog.at_level("WARNING", logger="pfadseg.predict"):
        predict_files(trained, paths[:1], tmp_path / "again", progress=False)
    assert "holds 3 per-image files that its summary.csv does not list" in caplog.text
    long = output_names([tmp_path / ("検" * 83 + ".png")])[0]
    assert len(long.encode()) <= 200 and long.startswith("検")  # + "_overlay.png" fits 255 bytes


def test_a_given_threshold_is_named_and_a_calibrated_copy_finds_the_onnx_file(trained: Detector,
                                                                              tmp_path: Path) -> None:
    given = Detector.load(trained.checkpoint, device="cpu", threshold=0.3)
    assert given.info()["threshold_method"] == "given" and given.thresholds.pixel == trained.thresholds.pixel
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    calibrated = tmp_path / "checkpoint.calibrated.safetensors"
    calibrated.write_bytes(trained.checkpoint.read_bytes())
    (tmp_path / "checkpoint.onnx").write_bytes(b"junk")  # the original's export: same weights
    with pytest.raises(ValueError, match=r"checkpoint\.onnx: not an ONNX model"):
        Detector.load(calibrated, backend="onnx")


def test_resume_from_python_keeps_the_runs_settings(tmp_path: Path, monkeypatch, one_thread) -> None:
    """As `train --resume`: left-out settings come from the run (before, the Python API
    resumed a run with other rotation and textures, silently); a different one is refused."""
    from pfadseg.trainer import Trainer, TrainingError

    textures = tmp_path / "textures"
    textures.mkdir()
    for path in IMAGES:
        (textures / f"{path.parent.name}.jpg").write_bytes(path.read_bytes())
    real_step = Trainer.train_step

    def stop_at_2(self: Trainer) -> dict:
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Detector.train(BOTTLE / "train" / "good", out, model="destseg", teacher="efficientnet_lite0",
                       image_size=64, preset_name="tiny", rotation="none", textures=textures, device="cpu",
                       progress=False, stage1_steps=2, stage2_steps=1, bf16=False)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    with pytest.raises(TrainingError, match=r"--rotation small \(the run's: none\)"):
        Detector.train(BOTTLE / "train" / "good", out, rotation="small", device="cpu", resume=True)
    with pytest.raises(TrainingError, match=r"--train-dir .*textures \(the run's: .*good\)"):
        Detector.train(textures, out, device="cpu", resume=True)  # other images
    resumed = Detector.train(BOTTLE / "train" / "good", out, device="cpu", resume=True, progress=False)
    meta = resumed.meta
    assert (meta["preset"], meta["rotation"], meta["textures"]) == ("tiny", "none", str(textures.resolve()))
    assert resumed.info()["variant"] == "destseg" and resumed.info()["image_size"] == 64


def test_an_mvtec_train_good_folder_stands_for_its_category(tmp_path: Path) -> None:
    from pfadseg.data import category_of

    assert category_of(BOTTLE / "train" / "good") == "bottle"  # bottle's official rotation, as --category
    assert category_of(tmp_path / "my_parts" / "good") == "my_parts"  # was "good" in every report
    assert category_of(tmp_path / "parts") == "parts"


@pytest.mark.slow  # the ONNX export took 2.5 minutes on 2 busy cores
def test_onnx_backend_scores_like_torch(trained: Detector, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    from pfadseg.export import export_onnx

    onnx = export_onnx(trained.model, tmp_path / "model.onnx")
    by_onnx = Detector.load(trained.checkpoint, backend="onnx", onnx=onnx).predict(IMAGES)
    by_torch = Detector.load(trained.checkpoint, device="cpu", bf16=False).predict(IMAGES)
    for a, b in zip(by_onnx, by_torch):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-3


def _prediction(image_hw: tuple[int, int]) -> Prediction:
    """A prediction with a known 8x8 map: a bright 4x4 square in the middle."""
    amap = np.full((8, 8), 0.1, dtype=np.float32)
    amap[2:6, 2:6] = 0.9
    t = Thresholds(image=0.5, pixel=0.5, method="test")
    return Prediction(name="x", score=0.9, normalized_score=0.9, anomalous=True, anomaly_map=amap,
                      mask=amap >= 0.5, image=np.zeros((*image_hw, 3), dtype=np.uint8), thresholds=t)


def test_prediction_images_follow_the_input_size_up_to_a_limit() -> None:
    p = _prediction((200, 100))
    assert p.overlay().size == p.mask_image().size == (100, 200)
    mask = np.asarray(p.mask_image()) > 0
    assert mask[100, 50] and not mask[10, 10]  # the square, scaled up with the image
    huge = _prediction((3000, 1500))
    assert huge.overlay().size == (512, 1024)  # longest side cut to 1024


def test_map_image_is_the_normalised_map_with_the_pixel_threshold_at_128() -> None:
    p = _prediction((8, 8))
    values = np.asarray(p.map_image())
    assert p.map_image().size == (8, 8)
    assert np.array_equal(values >= 128, p.mask)


def test_the_package_names_its_api_without_importing_torch() -> None:
    """`import pfadseg` stays light (torch loads on first use of Detector), yet dir() and
    type checkers see Detector and Prediction (they saw a bare module attribute)."""
    code = ("import sys, pfadseg; assert {'Detector', 'Prediction'} <= set(dir(pfadseg)); "
            "assert 'torch' not in sys.modules; pfadseg.Detector; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (Path(pfadseg.__file__).parent / "py.typed").is_file()
