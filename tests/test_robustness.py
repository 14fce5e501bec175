"""Issue 5, "nothing lost, nothing trusted blindly": bad images, bad checkpoints,
training health and the CLI's errors. Every test is small (64x64, tiny preset)."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import CATEGORY, write_dataset
from pfadseg import checkpoint as ckpt
from pfadseg import cli, data
from pfadseg.checkpoint import CheckpointError, load_checkpoint
from pfadseg.config import preset
from pfadseg.data import (DataError, list_images, load_folder_test_set, load_rgb, load_test_set,
                          load_textures, load_train_images, to_rgb)
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.models.teacher import RANDOM
from pfadseg.synthesis import DefectSynthesizer, procedural_textures
from pfadseg.trainer import (CHECKPOINT_NAME, STATE_FORMAT, STATE_NAME, TrainData, Trainer,
                             TrainingError)

SIZE = 64


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes (a half-copied download)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


# --- images: unreadable, foreign, missing, odd sizes ------------------------------------
def test_truncated_training_image_is_named_or_skipped(dataset: Path, caplog) -> None:
    good = dataset / CATEGORY / "train" / "good"
    bad = good / "001.png"
    truncate(bad)
    with pytest.raises(DataError) as err:
        load_train_images(good, SIZE)
    msg = str(err.value)
    assert str(bad) in msg and "cannot read image" in msg and "Fix:" in msg
    assert "--skip-bad-images" in msg and "skip_bad=True" in msg
    with caplog.at_level(logging.WARNING, logger="pfadseg.data"):
        images, names = load_train_images(good, SIZE, skip_bad=True)
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert names == ["000.png", "002.png", "003.png"]  # the kept ones, in order
    assert any("skipped" in r.message and str(bad) in r.message for r in caplog.records)


def test_every_unreadable_file_is_listed_in_one_error(dataset: Path) -> None:
    """Three bad files cost one run to find, not three: the error lists all of them."""
    good = dataset / CATEGORY / "train" / "good"
    bad = [good / "000.png", good / "002.png", good / "003.png"]
    truncate(bad[0])
    bad[1].write_bytes(b"")
    bad[2].write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        load_train_images(good, SIZE)
    msg = str(err.value)
    assert msg.startswith("3 of 4 images cannot be read") and "--skip-bad-images" in msg
    assert all(str(p) in msg for p in bad) and str(good / "001.png") not in msg
    assert "empty file (0 bytes)" in msg
    test_dir = dataset / CATEGORY / "test"
    broken = sorted((test_dir / "good").iterdir())[:2]
    for p in broken:
        truncate(p)
    with pytest.raises(DataError) as err:
        load_folder_test_set(test_dir, SIZE)
    assert all(str(p) in str(err.value) for p in broken) and "--skip-bad-images" in str(err.value)


def test_all_training_images_bad_with_skip(dataset: Path) -> None:
    good = dataset / CATEGORY / "train" / "good"
    for p in good.iterdir():
        p.write_bytes(b"")  # zero-byte files
    with pytest.raises(DataError, match="none of the 4 images could be read"):
        load_train_images(good, SIZE, skip_bad=True)


def test_non_image_and_hidden_files_are_skipped(dataset: Path) -> None:
    good = dataset / CATEGORY / "train" / "good"
    (good / "notes.txt").write_text("shot on Tuesday")
    (good / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (good / "._000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS resource fork
    (good / "Thumbs.db").write_bytes(bytes(50))
    (good / "sub.png").mkdir()  # a folder with an image suffix
    assert [p.name for p in list_images(good)] == ["000.png", "001.png", "002.png", "003.png"]
    assert load_train_images(good, SIZE)[0].shape == (4, 3, SIZE, SIZE)
    (good / ".thumbnails").mkdir()  # a hidden folder's images are no inputs of a recursive listing
    Image.new("RGB", (8, 8)).save(good / ".thumbnails" / "000.png")
    assert [p.name for p in list_images(good, recursive=True)] == ["000.png", "001.png", "002.png", "003.png"]


def test_loading_bar_only_when_asked(tmp_path: Path, capsys) -> None:
    """progress=False (Detector.train's) draws no loading bar; 8 or more images get one."""
    for i in range(8):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    load_train_images(tmp_path, SIZE, progress=False)
    assert "loading" not in capsys.readouterr().err
    load_train_images(tmp_path, SIZE)
    assert "loading training images" in capsys.readouterr().err


def test_text_file_with_image_suffix_is_refused(dataset: Path) -> None:
    fake = dataset / CATEGORY / "train" / "good" / "fake.png"
    fake.write_text("not a picture")
    with pytest.raises(DataError, match="fake.png: cannot read image"):
        load_train_images(fake.parent, SIZE)


def test_empty_and_missing_training_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        load_train_images(empty, SIZE)
    assert str(empty) in str(err.value) and "no training images" in str(err.value)
    assert "Fix:" in str(err.value)
    # the category folder given instead of its train/good: the error points at it
    good = tmp_path / "cat" / "train" / "good"
    good.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(good / "000.png")
    with pytest.raises(DataError, match=f"sub-folders \\(train/\\) hold images.*--train-dir {good}"):
        load_train_images(tmp_path / "cat", SIZE)


def test_sub_folders_beside_training_images_are_named(tmp_path: Path, caplog) -> None:
    for name in ("a.png", "more/b.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with caplog.at_level("WARNING", logger="pfadseg.data"):
        assert load_train_images(tmp_path, SIZE, progress=False)[1] == ["a.png"]
    assert "its sub-folders (more/) are not read" in caplog.text
    with pytest.raises(DataError, match="missing: folder not found"):
        load_train_images(tmp_path / "missing", SIZE)
    with pytest.raises(DataError, match="a.png: a file, not a folder"):
        load_train_images(tmp_path / "a.png", SIZE)


def test_missing_mask_is_named(dataset: Path) -> None:
    mask = dataset / CATEGORY / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DataError) as err:
        load_test_set(dataset, CATEGORY, SIZE)
    msg = str(err.value)
    assert str(mask) in msg and "missing" in msg and "Fix:" in msg


def test_a_trimmed_mvtec_test_set_leaves_its_spare_masks(dataset: Path, caplog) -> None:
    """MVTec's mask names are fixed: masks of removed test images were refused."""
    image = dataset / CATEGORY / "test" / "crack" / "001.png"
    image.unlink()
    with caplog.at_level("WARNING", logger="pfadseg.data"):
        ts = load_test_set(dataset, CATEGORY, SIZE)
    assert image not in ts.paths and "1 mask(s) without an image (e.g. crack/001_mask.png)" in caplog.text


def test_mask_of_another_size_is_refused(dataset: Path) -> None:
    mask = dataset / CATEGORY / "ground_truth" / "crack" / "000_mask.png"
    Image.new("L", (40, 40), 255).save(mask)
    with pytest.raises(DataError) as err:
        load_test_set(dataset, CATEGORY, SIZE)
    msg = str(err.value)
    assert str(mask) in msg and "40x40" in msg and "80x80" in msg and "Fix:" in msg


def test_test_set_loads_and_skips_bad_images(dataset: Path, caplog) -> None:
    ts = load_test_set(dataset, CATEGORY, SIZE)
    assert ts.images.shape == (4, 3, SIZE, SIZE) and ts.masks.shape == (4, SIZE, SIZE)
    assert list(ts.labels) == [1, 1, 0, 0] and ts.masks[:2].any() and not ts.masks[2:].any()
    bad = dataset / CATEGORY / "test" / "good" / "000.png"
    truncate(bad)
    with pytest.raises(DataError, match="000.png: cannot read image.*Or add --skip-bad-images"):
        load_test_set(dataset, CATEGORY, SIZE)
    with caplog.at_level(logging.WARNING, logger="pfadseg.data"):
        ts = load_test_set(dataset, CATEGORY, SIZE, skip_bad=True)
    assert len(ts.paths) == 3 and bad not in ts.paths
    assert any(str(bad) in r.message for r in caplog.records)


def test_small_images_are_upscaled(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(folder / "a.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "b.png")
    images, _ = load_train_images(folder, SIZE)
    assert images.shape == (2, 3, SIZE, SIZE)
    assert (images[:, :, SIZE // 2, SIZE // 2] == torch.tensor([10, 200, 30], dtype=torch.uint8)).all()


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (80, 80)).save(path)
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    with pytest.raises(DataError) as err:
        load_rgb(path, SIZE)
    msg = str(err.value)
    assert str(path) in msg and "80x80" in msg and "decompression-bomb" in msg and "Fix:" in msg


def test_images_up_to_the_stated_limit_load(tmp_path: Path) -> None:
    """A 98-megapixel line-scan image is under MAX_PIXELS (400 MP): Pillow's own
    89-megapixel guard refused it first."""
    path = tmp_path / "line_scan.png"
    Image.new("L", (16384, 6000), 128).save(path)
    assert load_rgb(path, SIZE).shape == (SIZE, SIZE, 3)


def test_texture_folder_without_images(tmp_path: Path, textures: Path) -> None:
    empty = tmp_path / "no_textures"
    empty.mkdir()
    (empty / "README.txt").write_text("textures go here")
    with pytest.raises(ValueError, match=f"texture folder {empty} holds no images"):
        load_textures(empty, SIZE)
    with pytest.raises(ValueError, match="does not exist"):
        load_textures(tmp_path / "nowhere", SIZE)
    assert load_textures(textures, SIZE).shape == (2, 3, SIZE, SIZE)
    truncate(textures / "noise.png")
    with pytest.raises(ValueError, match=f"texture folder {textures}: .*noise.png: cannot read image"):
        load_textures(textures, SIZE)


# --- image modes become correct RGB uint8 -------------------------------------------------
def _load(tmp_path: Path, img: Image.Image, name: str = "x.png") -> np.ndarray:
    path = tmp_path / name
    img.save(path)
    out = load_rgb(path, None)
    assert out.dtype == np.uint8 and out.shape == (img.height, img.width, 3)
    return out


def test_grayscale_and_16bit(tmp_path: Path) -> None:
    gray = _load(tmp_path, Image.fromarray(np.array([[0, 200]], dtype=np.uint8), "L"))
    assert gray.tolist() == [[[0, 0, 0], [200, 200, 200]]]
    arr16 = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    img16 = Image.fromarray(arr16)
    assert img16.mode == "I;16"
    out = _load(tmp_path, img16, "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    assert out[0, :, 0].tolist() == [255, 128, 0, 1]
    assert (out == out[..., :1]).all()  # grey stays grey
    img32 = Image.fromarray(np.array([[100000, 65536, 1000, 0]], dtype=np.int32), "I")
    out = _load(tmp_path, img32, "x32.tif")  # was clipped on the 16-bit scale: white from 65535 up
    assert out[0, :, 0].tolist() == [195, 128, 2, 0]  # 17 bits: / 131071


def test_palette_and_alpha(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 128, 255, 12, 34, 56] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    assert _load(tmp_path, pal, "p.png").tolist() == [[[255, 0, 0], [0, 128, 255], [12, 34, 56]]]
    pal.info["transparency"] = 2  # index 2 transparent -> black
    assert _load(tmp_path, pal, "pt.png")[0, 2].tolist() == [0, 0, 0]
    rgba = Image.fromarray(np.array([[[255, 255, 255, 0], [10, 20, 30, 255],
                                      [200, 100, 50, 128]]], dtype=np.uint8), "RGBA")
    out = _load(tmp_path, rgba, "a.png")
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [10, 20, 30]
    assert np.abs(out[0, 2].astype(int) - [100, 50, 25]).max() <= 1
    la = Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), "LA")
    assert _load(tmp_path, la, "la.png").tolist() == [[[0, 0, 0], [90, 90, 90]]]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK",
                                  "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F"])
def test_every_pil_mode_becomes_rgb(mode: str) -> None:
    """An image in memory may come in any PIL mode (premultiplied "La" had no way to RGB)."""
    assert to_rgb(Image.new(mode, (4, 2))).mode == "RGB"


def test_float_image_with_nan_pixels_keeps_its_scale() -> None:
    """A NaN pixel made the whole scale NaN (a garbage image, scored NaN)."""
    arr = np.array([[0.0, 2.0, np.nan, 4.0, np.inf]], dtype=np.float32)
    assert to_rgb(Image.fromarray(arr, "F")).getchannel(0).tobytes() == bytes([0, 128, 0, 255, 0])


def test_exif_orientation_and_webp(tmp_path: Path) -> None:
    """A camera's JPEG comes upright, as viewers show it; WebP files count as images."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "cam.jpg", None)
    assert upright.shape == (20, 10, 3)
    assert upright[:10].mean() > 200 and upright[10:].mean() < 50  # the white half is now on top
    Image.fromarray(arr).save(tmp_path / "b.webp", lossless=True)
    assert list_images(tmp_path) == [tmp_path / "b.webp", tmp_path / "cam.jpg"]
    assert load_rgb(tmp_path / "b.webp", None).tolist() == arr.tolist()


# --- checkpoints: safetensors only, refused with a reason --------------------------------
@pytest.fixture(scope="module")
def destseg_ckpt(tmp_path_factory) -> Path:
    """An untrained destseg checkpoint (efficientnet_lite0 teacher, 64x64)."""
    torch.manual_seed(0)
    model = AnomalyModel.build(ModelConfig.named("destseg", teacher="efficientnet_lite0",
                                                 image_size=SIZE), RANDOM)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    ckpt.save_checkpoint(model, path, preset("tiny").to_dict(), threshold=0.5)
    return path


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_old_one(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """safetensors' own error ("I/O error: No space left on device") named no file and
    no fix, and came out of the CLI as a traceback."""
    from safetensors import SafetensorError

    path = tmp_path / STATE_NAME
    meta = {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION}
    ckpt.atomic_save({"x": torch.zeros(2)}, {**meta, "step": 1}, path)

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError, match=f"cannot write {path} .*No space left.*Fix: make room on its disk"):
        ckpt.atomic_save({"x": torch.ones(2)}, {**meta, "step": 2}, path)
    assert ckpt.read_meta(path, kind=STATE_FORMAT)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == [STATE_NAME]


def test_sigterm_stops_predict_as_ctrl_c_does(destseg_ckpt: Path, tmp_path: Path) -> None:
    """`kill`, `timeout` and `docker stop` send SIGTERM, which ended predict at once:
    the images already scored got no summary.csv and no report.html."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    child = ("import os, signal, sys\nimport numpy as np\nfrom pfadseg import cli\n"
             "save, calls = np.save, []\n"
             "def save_then_kill(*args, **kwargs):  # SIGTERM once the second map is saved\n"
             "    save(*args, **kwargs)\n"
             "    calls.append(1)\n"
             "    if len(calls) == 2:\n"
             "        os.kill(os.getpid(), signal.SIGTERM)\n"
             "np.save = save_then_kill\n"
             "sys.exit(cli.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", child, "--threads", "1", "predict", str(folder),
                           "--checkpoint", str(destseg_ckpt), "--out", str(out), "--batch-size", "1",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143 and "pfadseg predict: interrupted" in done.stderr, done.stderr[-2000:]
    with open(out / "summary.csv", newline="") as fh:
        assert [row["name"] for row in csv.DictReader(fh)] == ["0"]  # the image finished before it
    assert (out / "report.html").is_file() and not list(out.glob("*.tmp"))


def test_an_interrupted_train_says_resume_only_when_there_is_a_state_to_resume(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["train", "--train-dir", str(tmp_path), "--out", str(tmp_path)])
    assert cli._again(args) == ""  # stopped before its first state file: --resume would be refused
    (tmp_path / STATE_NAME).write_bytes(b"")
    assert cli._again(args) == "; continue with --resume"


def rewrite_meta(src: Path, dst: Path, edit) -> None:
    """Copy a checkpoint with its pfadseg metadata passed through edit(meta) -> meta."""
    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["pfadseg"])
    raw = edit(meta)
    save_file(load_file(str(src)), str(dst),
              metadata={"pfadseg": raw if isinstance(raw, str) else json.dumps(raw)})


def test_good_checkpoint_loads(destseg_ckpt: Path) -> None:
    model, meta = load_checkpoint(destseg_ckpt)
    assert meta["variant"] == "destseg" and meta["threshold"] == 0.5 and not model.training


def test_checkpoint_with_the_old_teacher_stages_loads(destseg_ckpt: Path, tmp_path: Path) -> None:
    """Files from before the Lite0 teacher was cut to its needed stages still load;
    any other tensor the model lacks is still refused."""
    with safe_open(str(destseg_ckpt), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(destseg_ckpt))
    old = tmp_path / "old.safetensors"
    save_file({**tensors, "teacher.body.blocks.5.0.conv_pw.weight": torch.zeros(672, 112, 1, 1)},
              str(old), metadata=metadata)
    model, _ = load_checkpoint(old)
    assert "teacher.body.blocks.5.0.conv_pw.weight" not in model.state_dict()
    odd = tmp_path / "odd.safetensors"
    save_file({**tensors, "segmentation.extra": torch.zeros(1)}, str(odd), metadata=metadata)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(odd)
    nan = tmp_path / "nan.safetensors"  # loaded before, then scored every image NaN: "normal"
    save_file({**tensors, "segmentation.head.2.weight": torch.full_like(
        tensors["segmentation.head.2.weight"], float("nan"))}, str(nan), metadata=metadata)
    with pytest.raises(CheckpointError, match="1 weight tensor.*NaN or infinite.*segmentation.head"):
        load_checkpoint(nan)


def test_truncated_and_random_files(destseg_ckpt: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(destseg_ckpt.read_bytes()[: destseg_ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable checkpoint"):
        load_checkpoint(cut)
    head = tmp_path / "head.safetensors"  # cut inside the JSON header
    head.write_bytes(destseg_ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(head)
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"noise.safetensors: not a readable checkpoint .*\)\. "
                                              "Fix: give the checkpoint.safetensors that `pfadseg train`"):
        load_checkpoint(noise)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere.safetensors")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run: a folder\. Fix: --checkpoint .*run/checkpoint.safetensors"):
        load_checkpoint(tmp_path / "run")  # --checkpoint RUN_FOLDER


def test_foreign_safetensors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(CheckpointError, match="not a pfadseg checkpoint"):
        load_checkpoint(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a pfadseg checkpoint"):
        load_checkpoint(other)


def test_damaged_or_foreign_metadata(destseg_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    rewrite_meta(destseg_ckpt, bad, lambda m: "{not json")
    with pytest.raises(CheckpointError, match="damaged pfadseg metadata"):
        load_checkpoint(bad)
    rewrite_meta(destseg_ckpt, bad, lambda m: "[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(bad)
    rewrite_meta(destseg_ckpt, bad, lambda m: {**m, "format_version": 99, "pfadseg_version": "9.0"})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "format 99" in str(err.value) and "reads format 1" in str(err.value)
    rewrite_meta(destseg_ckpt, bad, lambda m: {**m, "format": "pfadseg-something"})
    with pytest.raises(CheckpointError, match="holds 'pfadseg-something', expected"):
        load_checkpoint(bad)
    rewrite_meta(destseg_ckpt, bad, lambda m: {k: v for k, v in m.items() if k != "model"})
    with pytest.raises(CheckpointError, match="metadata does not describe a model"):
        load_checkpoint(bad)
    rewrite_meta(destseg_ckpt, bad, lambda m: {**m, "model": {**m["model"], "teacher": "vgg"}})
    with pytest.raises(CheckpointError, match="metadata does not describe a model"):
        load_checkpoint(bad)


def test_train_state_given_as_checkpoint_names_the_checkpoint(destseg_ckpt: Path,
                                                               tmp_path: Path) -> None:
    """train_state.safetensors is not a checkpoint: the error names the run's
    checkpoint.safetensors, or says how to finish the run that has none yet."""
    run = tmp_path / "run"
    run.mkdir()
    state = run / STATE_NAME
    rewrite_meta(destseg_ckpt, state, lambda m: {**m, "format": STATE_FORMAT})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(state)
    msg = str(err.value)
    assert str(state) in msg and "not a checkpoint" in msg and "has not finished" in msg
    assert "--resume" in msg and str(run / CHECKPOINT_NAME) in msg
    (run / CHECKPOINT_NAME).write_bytes(destseg_ckpt.read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(state)
    assert f"Fix: use {run / CHECKPOINT_NAME}" in str(err.value)
    assert ckpt.read_meta(state, kind=STATE_FORMAT)["format"] == STATE_FORMAT  # resume reads it


def test_weights_that_do_not_fit(destseg_ckpt: Path, tmp_path: Path) -> None:
    liar = tmp_path / "liar.safetensors"
    rewrite_meta(destseg_ckpt, liar, lambda m: {
        **m, "variant": "pfadseg", "model": {**m["model"], "aff": True, "pcar": True, "rcm": True}})
    with pytest.raises(CheckpointError, match="weights do not fit variant pfadseg"):
        load_checkpoint(liar)


class _Bait:
    """Unpickling this creates a file: proof that a loader ran pickle code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pickle_checkpoint_is_refused_unopened(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.zeros(2), "x": _Bait(sentinel)}, evil)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(evil)
    renamed = tmp_path / "checkpoint.safetensors"
    renamed.write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(renamed)
    assert not sentinel.exists()
    pickle.loads(pickle.dumps(_Bait(sentinel)))  # the bait is live: unpickling does run it
    assert sentinel.exists()


# --- training health -------------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = AnomalyModel.build(ModelConfig.named("destseg", teacher="efficientnet_lite0",
                                                 image_size=SIZE), RANDOM)
    cfg = preset("tiny", stage1_steps=3, stage2_steps=1, bf16=False, save_every=1)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    train_data = TrainData(images, DefectSynthesizer(procedural_textures(2, SIZE)))
    out = tmp_path / "run"
    calls = {"n": 0}
    real_loss = Trainer._student_loss

    def loss_nan_at_step_2(self, clean, augmented, targets):
        calls["n"] += 1
        loss = real_loss(self, clean, augmented, targets)
        return loss * math.nan if calls["n"] == 2 else loss

    monkeypatch.setattr(Trainer, "_student_loss", loss_nan_at_step_2)
    trainer = Trainer(model, cfg, train_data, out)
    with pytest.raises(TrainingError) as err:
        trainer.run(progress=False)
    msg = str(err.value)
    assert "non-finite loss (nan) at step 2" in msg and "step 1" in msg and str(out / STATE_NAME) in msg
    assert "--no-bf16" not in msg  # bf16 is off: no point suggesting it
    trainer.use_bf16 = True
    assert "--no-bf16" in trainer._bf16_hint()
    trainer.use_bf16 = False
    tensors, meta = ckpt.read(out / STATE_NAME, kind=STATE_FORMAT)
    assert meta["step"] == 1 and all(torch.isfinite(t).all() for t in tensors.values()
                                     if t.is_floating_point())
    # weights gone non-finite are never written over the last good state
    with torch.no_grad():
        next(model.student.parameters()).fill_(math.inf)
    with pytest.raises(TrainingError, match="non-finite weights after step 1"):
        trainer.save_state()
    assert ckpt.read_meta(out / STATE_NAME, kind=STATE_FORMAT)["step"] == 1
    assert not list(out.glob("*.tmp"))
    # and the kept state still resumes
    fresh = Trainer(AnomalyModel.build(model.config, RANDOM), cfg, train_data, out)
    fresh.load_state(out / STATE_NAME)
    assert fresh.step == 1
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())


# --- the CLI: exit code 2 and a message that names the folder ---------------------------
def _train_argv(tmp_path: Path, *args: str) -> list[str]:
    return ["train", *args, "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--image-size", str(SIZE), "--teacher", "efficientnet_lite0", "--no-bf16"]


def test_cli_train_on_empty_or_missing_folder(tmp_path: Path, capsys) -> None:
    root = tmp_path / "mvtec"
    (root / "empty_cat" / "train" / "good").mkdir(parents=True)
    (root / "empty_cat" / "train" / "good" / ".DS_Store").write_bytes(bytes(10))
    cases = [
        (["--data", str(root), "--category", "empty_cat"],
         str(root / "empty_cat" / "train" / "good"), "no training images"),
        (["--data", str(root), "--category", "nope"], str(root / "nope"), "category folder not found"),
        (["--train-dir", str(tmp_path / "nowhere")], str(tmp_path / "nowhere"), "folder not found"),
        ([], "", "give --data ROOT --category NAME"),
        (["--data", str(root), "--train-dir", str(root / "empty_cat" / "train" / "good")], "",
         "--data ROOT and --train-dir DIR both name the training images. Fix: give one of them"),
    ]
    for args, folder, words in cases:
        assert cli.main(_train_argv(tmp_path, *args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("pfadseg train: error: ") and folder in err and words in err
    assert not (tmp_path / "run" / STATE_NAME).exists()


def test_cli_bad_images_and_textures(tmp_path: Path, capsys) -> None:
    root = write_dataset(tmp_path / "mvtec", n_train=2)
    bad = root / CATEGORY / "train" / "good" / "000.png"
    truncate(bad)
    assert cli.main(_train_argv(tmp_path, "--data", str(root), "--category", CATEGORY)) == 2
    err = capsys.readouterr().err
    assert f"pfadseg train: error: {bad}: cannot read image" in err and "Fix:" in err
    assert "--skip-bad-images" in err
    empty = tmp_path / "textures"
    empty.mkdir()
    argv = _train_argv(tmp_path, "--data", str(root), "--category", CATEGORY,
                       "--skip-bad-images", "--textures", str(empty))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"texture folder {empty} holds no images" in err


def test_cli_refuses_bad_checkpoint(tmp_path: Path, capsys) -> None:
    noise = tmp_path / "model.safetensors"
    noise.write_bytes(np.random.default_rng(1).bytes(1000))
    root = write_dataset(tmp_path / "mvtec", n_train=1)
    code = cli.main(["test", "--checkpoint", str(noise), "--data", str(root),
                     "--category", CATEGORY, "--out", str(tmp_path / "eval")])
    assert code == 2
    assert f"pfadseg test: error: {noise}: not a readable checkpoint" in capsys.readouterr().err


def test_cli_train_checks_every_path_before_loading_images(tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    """A wrong --textures, --teacher-weights or --out fails before any image is decoded."""
    root = write_dataset(tmp_path / "mvtec", n_train=2)

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("images were loaded before every path was checked")

    monkeypatch.setattr("pfadseg.trainer.load_train_images", no_loading)  # TrainData.from_folder loads
    monkeypatch.setattr("pfadseg.trainer.load_textures", no_loading)
    empty = tmp_path / "empty_textures"
    empty.mkdir()
    out_file = tmp_path / "run_file"
    out_file.write_text("not a folder")
    unfinished, finished = tmp_path / "unfinished", tmp_path / "finished"
    unfinished.mkdir()
    finished.mkdir()
    (finished / CHECKPOINT_NAME).write_bytes(b"a model a user keeps")
    calibrated_only = tmp_path / "calibrated_only"  # a copy made from a checkpoint moved away
    calibrated_only.mkdir()
    (calibrated_only / "checkpoint.calibrated.safetensors").write_bytes(b"thresholds a user set")
    ckpt.atomic_save({"rng": torch.zeros(4, dtype=torch.uint8)},
                     {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION, "step": 1,
                      "train": preset("tiny").to_dict()}, unfinished / STATE_NAME)
    data_args = ("--data", str(root), "--category", CATEGORY)
    cases = [
        (("--textures", str(tmp_path / "nowhere")), f"texture folder {tmp_path / 'nowhere'} does not exist"),
        (("--textures", str(empty)), f"texture folder {empty} holds no images"),
        (("--teacher-weights", str(tmp_path / "w.pth")), f"--teacher-weights {tmp_path / 'w.pth'}: file not found"),
        (("--resume",), f"no state file {tmp_path / 'run' / STATE_NAME}"),
        (("--out", str(out_file)), f"--out {out_file} is a file, not a folder"),
        (("--out", str(unfinished)), f"{unfinished} holds an unfinished run"),
        (("--out", str(finished)), f"{finished} holds a finished run"),
        (("--out", str(calibrated_only)), f"{calibrated_only} holds files made from an earlier "
                                          "run's checkpoint (checkpoint.calibrated.safetensors)"),
    ]
    for extra, words in cases:
        assert cli.main([*_train_argv(tmp_path, *data_args), *extra]) == 2, extra  # last --out wins
        err = capsys.readouterr().err
        assert err.startswith("pfadseg train: error: ") and words in err, (extra, err)


def test_cli_out_paths_are_checked_before_any_work(destseg_ckpt: Path, tmp_path: Path, capsys,
                                                  monkeypatch) -> None:
    """An --out that cannot be written fails before the model is loaded (test used to
    lose its metrics, calibrate and export left a 200 MB .tmp file), with no traceback."""
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work began before --out was checked")

    monkeypatch.setattr("pfadseg.cli.load_checkpoint", no_work)
    monkeypatch.setattr("pfadseg.detector.load_checkpoint", no_work)
    monkeypatch.setattr("pfadseg.demo.run_demo", no_work)  # it trained, then failed to write
    a_file, a_folder = tmp_path / "afile.txt", tmp_path / "folder"
    a_file.write_text("not a folder")
    a_folder.mkdir()
    ck = str(destseg_ckpt)
    cases = [
        (["test", "--checkpoint", ck, "--test-dir", str(a_folder), "--out", str(a_file)],
         f"--out {a_file} is a file, not a folder"),
        (["predict", "--checkpoint", ck, "--out", str(a_file), str(a_folder)],
         f"--out {a_file} is a file, not a folder"),
        (["predict", "--checkpoint", ck, "--out", str(a_file / "sub"), str(a_folder)],
         f"--out {a_file / 'sub'}: cannot create it"),
        (["calibrate", "--checkpoint", ck, "--good", str(a_folder), "--out", str(a_folder)],
         f"--out {a_folder} is a folder. Fix: give a file name, e.g. "
         f"{a_folder / 'checkpoint.calibrated.safetensors'}"),
        (["export", "--checkpoint", ck, "--out", str(a_folder)], f"--out {a_folder} is a folder"),
        (["calibrate", "--checkpoint", ck, "--good", str(a_folder), "--out", ck],
         f"{ck}: is the checkpoint being calibrated"),  # was refused after the inference
        (["demo", "--quick", "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"pfadseg {argv[0]}: error: ") and words in err, (argv, err)
    # a read-only mount (root ignores chmod, so the file system's refusal is simulated)
    ro = tmp_path / "ro"
    ro.mkdir()

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("pfadseg.cli.tempfile.TemporaryFile", read_only)
    for argv in (["test", "--checkpoint", ck, "--test-dir", str(a_folder), "--out", str(ro)],
                 ["predict", "--checkpoint", ck, "--out", str(ro), str(a_folder)],
                 ["train", "--train-dir", str(a_folder), "--out", str(ro)],
                 ["report", str(a_file), "--out", str(ro)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--out {ro}: cannot write there (Read-only file system). Fix:" in err, (argv, err)
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError):  # the library's own writer leaves no copy either
        ckpt.atomic_save({"x": torch.zeros(1)}, {}, a_folder)
    ckpt.atomic_save({"x": torch.zeros(1)}, {}, a_folder / "ok.safetensors")
    assert (a_folder / "ok.safetensors").stat().st_mode & 0o777 == ckpt.FILE_MODE  # not 0o600
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(SystemExit):
        cli.main(["predict", "--checkpoint", ck, "--batch-size", "0", "--out", str(a_folder), ck])
    assert "--batch-size: '0' is not a whole number of 1 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict", "--checkpoint", ck, "--threshold", "1.5", "--out", str(a_folder), ck])
    assert "--threshold: '1.5' is not a number between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["test", "--checkpoint", ck, "--eval-size", "0", "--test-dir", ck, "--out", ck])
    assert "--eval-size: '0': use input, original or a number of pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an allocation traceback naming no option
        cli.main(["test", "--checkpoint", ck, "--eval-size", "100000", "--test-dir", ck, "--out", ck])
    assert "--eval-size: '100000': use input, original or a number of pixels up to 8192" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):  # blamed the checkpoint: "unable to mmap ... Cannot allocate memory"
        cli.main(["--threads", "99999", "predict", "--checkpoint", ck, "--out", str(a_folder), ck])
    assert f"--threads: '99999' is over {os.cpu_count()} (this machine's CPUs)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--train-dir", ck, "--stage1-steps", "-1", "--out", ck])
    assert "--stage1-steps: '-1' is not a whole number of 0 or more" in capsys.readouterr().err
    for size, words in (("0", "'0' is not a whole number of 32 or more"),
                        ("100", "'100' is not a multiple of 32 (the networks downsample by 32); e.g. 96")):
        with pytest.raises(SystemExit):
            cli.main(["train", "--train-dir", ck, "--image-size", size, "--out", ck])
        assert f"--image-size: {words}" in capsys.readouterr().err


def _error_line_starts_a_line(err: str, command: str) -> bool:
    """Whether the CLI's error message begins a line of its own on a terminal."""
    before = err.split(f"pfadseg {command}: error: ", 1)[0]
    return before == "" or before.endswith(("\n", "\r"))


def test_cli_error_is_not_printed_on_the_progress_bar(tmp_path: Path, capsys) -> None:
    """A bad image among enough training images for a progress bar: the error
    starts its own line instead of running on from the bar."""
    root = write_dataset(tmp_path / "mvtec", n_train=10)
    truncate(root / CATEGORY / "train" / "good" / "006.png")
    assert cli.main(_train_argv(tmp_path, "--data", str(root), "--category", CATEGORY)) == 2
    err = capsys.readouterr().err
    assert "loading training images" in err  # the bar was drawn
    assert _error_line_starts_a_line(err, "train"), err[-400:]


def test_cli_error_closes_a_bar_left_open(capsys, monkeypatch) -> None:
    """The error printer itself clears a bar an exception left open (a training loop's)."""
    from tqdm import tqdm

    def bar_then_error(args: object) -> int:
        bar = tqdm(total=10, desc="training", file=sys.stderr)
        bar.update(3)
        raise TrainingError("non-finite loss (nan) at step 4")

    monkeypatch.setattr(cli, "cmd_export", bar_then_error)
    assert cli.main(["export", "--checkpoint", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "training:  30%" in err and "non-finite loss" in err
    assert _error_line_starts_a_line(err, "export"), err[-400:]


def test_unreadable_folders_and_files_are_named_with_the_fix(tmp_path: Path, monkeypatch, caplog) -> None:
    """A sub-folder that cannot be listed stops the search (os.walk skipped it: a test set
    lost a defect type without a word); a file that cannot be opened says so, not "re-export
    it"; a link to nothing is named. (Simulated: the tests may run as root, whom chmod
    does not stop.)"""
    folder = tmp_path / "test"
    (folder / "crack").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "crack" / "000.png")
    (folder / "gone.png").symlink_to(tmp_path / "nothing.png")
    walk = data.os.walk

    def walk_denied(top, **kwargs):
        for root, dirs, names in walk(top, **kwargs):
            if root.endswith("crack"):
                kwargs["onerror"](PermissionError(13, "Permission denied", root))
            yield root, dirs, names
    monkeypatch.setattr(data.os, "walk", walk_denied)
    with pytest.raises(DataError, match=r"crack: cannot list this folder \(Permission denied\)\. Fix: make it readable"):
        list_images(folder, recursive=True)
    monkeypatch.setattr(data.os, "walk", walk)
    with caplog.at_level(logging.WARNING, logger="pfadseg.data"):
        assert list_images(folder, recursive=True) == [folder / "crack" / "000.png"]
    assert "1 link(s) to nothing, e.g. gone.png" in caplog.text

    def open_denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data.Image, "open", open_denied)
    with pytest.raises(DataError, match=r"000.png: permission denied\. Fix: make it readable"):
        load_rgb(folder / "crack" / "000.png", None)


def test_a_long_image_is_warned_of_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A 5x4000 line-scan strip was squashed to the square input and scored with no word."""
    monkeypatch.setattr(data, "_long_warned", False)
    path = tmp_path / "strip.png"
    Image.fromarray(np.zeros((4000, 5, 3), np.uint8)).save(path)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((40, 160, 3), np.uint8)).save(wide)
    load_rgb(wide, None)  # 4:1 is not long yet
    assert "squashed" not in caplog.text
    load_rgb(path, None)
    load_rgb(path, None)
    assert caplog.text.count("strip.png is 5x4000: every image is squashed") == 1
    from pfadseg.detector import _rgb  # an RGB array, which skips to_rgb, is checked too

    monkeypatch.setattr(data, "_long_warned", False)
    _rgb(np.zeros((5, 4000, 3), np.uint8), 3)
    assert "image 3 is 4000x5: every image is squashed" in caplog.text


def test_twelve_bit_data_in_a_sixteen_bit_file_is_warned_of(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12-bit camera's values (0..4095) in a 16-bit PNG read as 0..16 of 255: said, not silent,
    naming the first such file, once (a folder of them would repeat it per image)."""
    monkeypatch.setattr(data, "_low_bits_warned", False)
    path = tmp_path / "mono12.png"
    Image.fromarray(np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)).save(path)
    with pytest.warns(UserWarning, match=r"mono12\.png uses 12 or fewer bits"):
        assert load_rgb(path, None).max() <= 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_rgb(path, None)
