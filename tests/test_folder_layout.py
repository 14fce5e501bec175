"""`pfadseg test --test-dir`: any folder of good/ and defect-type folders, masks optional."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfadseg.calibration import Thresholds
from pfadseg.checkpoint import save_checkpoint
from pfadseg.cli import main
from pfadseg.data import (DataError, list_images, load_defect_set, load_folder_test_set, load_rgb,
                          load_test_set)
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.models.teacher import RANDOM

SIZE = 64
SRC = 48  # source images are 48x48


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SRC, SRC, 3), dtype=np.uint8)


def _mask(row: int) -> Image.Image:
    """A mask with a 12-pixel-high band starting at `row`: each image's mask is told apart."""
    mask = np.zeros((SRC, SRC), dtype=np.uint8)
    mask[row:row + 12] = 255
    return Image.fromarray(mask)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, Path]:
    """test/ with nested folders and mixed image types, masks/ with mixed naming:

    good/a.png, good/line2/b.jpg, scratch/x/001.bmp, scratch/002.tif, dent/001.jpeg;
    masks: scratch/x/001_mask.png, scratch/002.png, dent/001_mask.png (row 0, 12, 24)."""
    test, masks = tmp_path / "test", tmp_path / "masks"
    files = {"good/a.png": 0, "good/line2/b.jpg": 1, "scratch/x/001.bmp": 2,
             "scratch/002.tif": 3, "dent/001.jpeg": 4}
    for name, seed in files.items():
        (test / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(seed)).save(test / name)
    for name, row in {"scratch/x/001_mask.png": 0, "scratch/002.png": 12,
                      "dent/001_mask.png": 24}.items():
        (masks / name).parent.mkdir(parents=True, exist_ok=True)
        _mask(row).save(masks / name)
    return test, masks


def _band_start(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.any(axis=1))[0])


def test_nested_folders_mixed_types_and_mask_names(folder: tuple[Path, Path]) -> None:
    test, masks = folder
    ts = load_folder_test_set(test, SIZE, masks, mask_size=None)
    names = [p.relative_to(test).as_posix() for p in ts.paths]
    assert names == ["dent/001.jpeg", "good/a.png", "good/line2/b.jpg", "scratch/002.tif",
                     "scratch/x/001.bmp"]
    assert ts.defects == ["dent", "good", "good", "scratch", "scratch"]
    assert list(ts.labels) == [1, 0, 0, 1, 1] and ts.images.shape == (5, 3, SIZE, SIZE)
    assert ts.masks.shape == (5, SRC, SRC)  # original resolution
    # each defect got its own mask (dent/001 and scratch/x/001 share a stem)
    assert [_band_start(ts.masks[i]) for i in (0, 3, 4)] == [24, 12, 0]
    assert not ts.masks[1:3].any()


def test_without_masks_there_are_none(folder: tuple[Path, Path]) -> None:
    ts = load_folder_test_set(folder[0], SIZE)
    assert ts.masks is None and list(ts.labels) == [1, 0, 0, 1, 1]


def test_flat_mask_folder_is_matched_by_stem(tmp_path: Path, folder: tuple[Path, Path]) -> None:
    test, _ = folder
    flat = tmp_path / "flat"
    flat.mkdir()
    (test / "dent" / "001.jpeg").rename(test / "dent" / "007.jpeg")  # stems now unique
    _mask(24).save(flat / "007_mask.png")
    _mask(12).save(flat / "002.png")
    _mask(0).save(flat / "001_mask.png")
    ts = load_folder_test_set(test, SIZE, flat)
    assert ts.masks is not None and all(ts.masks[ts.labels == 1].any(axis=(1, 2)))


def test_missing_good_folder_is_a_clear_error(folder: tuple[Path, Path]) -> None:
    test, _ = folder
    with pytest.raises(DataError, match=r"but .*test has one\. Fix: --test-dir .*test \(or --data"):
        load_folder_test_set(test.parent, SIZE)  # an MVTec category's root: --test-dir bottle
    (test / "good").rename(test / "ok")
    with pytest.raises(DataError) as err:
        load_folder_test_set(test, SIZE)
    assert "no good/ folder" in str(err.value) and str(test) in str(err.value)
    assert "Fix:" in str(err.value)


def test_mask_without_an_image_is_named(folder: tuple[Path, Path]) -> None:
    test, masks = folder
    orphan = masks / "scratch" / "003_mask.png"
    _mask(0).save(orphan)
    with pytest.raises(DataError) as err:
        load_folder_test_set(test, SIZE, masks)
    assert str(orphan) in str(err.value) and "mask without an image" in str(err.value)
    assert "Fix:" in str(err.value)


def test_defect_image_without_a_mask_is_named(folder: tuple[Path, Path]) -> None:
    test, masks = folder
    (masks / "dent" / "001_mask.png").unlink()
    with pytest.raises(DataError) as err:
        load_folder_test_set(test, SIZE, masks)
    assert str(test / "dent" / "001.jpeg") in str(err.value) and "missing" in str(err.value)


def test_ambiguous_and_duplicate_masks_are_refused(tmp_path: Path, folder: tuple[Path, Path]) -> None:
    test, masks = folder
    flat = tmp_path / "flat"
    flat.mkdir()
    _mask(0).save(flat / "001_mask.png")  # dent/001 and scratch/x/001 both want it
    _mask(0).save(flat / "001.png")
    with pytest.raises(DataError, match="two masks for one image"):
        load_folder_test_set(test, SIZE, flat)
    (flat / "001.png").unlink()
    (flat / "other").mkdir()
    _mask(0).save(flat / "other" / "001_mask.png")
    _mask(12).save(flat / "002.png")
    with pytest.raises(DataError, match="masks share its name"):
        load_folder_test_set(test, SIZE, flat)


def test_images_loose_in_the_test_folder_are_refused(folder: tuple[Path, Path]) -> None:
    test, _ = folder
    Image.fromarray(_image(9)).save(test / "loose.png")
    with pytest.raises(DataError, match="directly in the test folder"):
        load_folder_test_set(test, SIZE)


def test_load_defect_set_pairs_images_and_masks(folder: tuple[Path, Path]) -> None:
    test, masks = folder
    images, found = load_defect_set(test / "scratch", masks / "scratch", SIZE)
    assert images.shape == (2, 3, SIZE, SIZE) and found.shape == (2, SIZE, SIZE)
    assert found.any(axis=(1, 2)).all()
    broken = sorted(p for p in (test / "scratch").rglob("*") if p.is_file())
    for path in broken:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=r"2 of 2 images cannot be read") as err:  # each named at once
        load_defect_set(test / "scratch", masks / "scratch", SIZE)
    assert all(str(p) in str(err.value) for p in broken)


def test_load_defect_set_takes_a_whole_test_folder(folder: tuple[Path, Path], caplog) -> None:
    """The test folder given as --defects (as `test --test-dir` takes it): its good/ is
    left out, said, and each defect image gets its own mask."""
    test, masks = folder
    with caplog.at_level("WARNING", logger="pfadseg.data"):
        images, found = load_defect_set(test, masks, SIZE)
    assert f"{test / 'good'}: left out" in caplog.text
    assert images.shape[0] == 3  # dent/001.jpeg, scratch/002.tif, scratch/x/001.bmp
    assert np.allclose([_band_start(m) * SRC / SIZE for m in found], [24, 12, 0], atol=1)
    (test / "dent" / "001.jpeg").rename(test / "dent" / "009.jpeg")  # its mask's name: a typo now
    with pytest.raises(DataError, match=r"dent/001_mask\.png: mask without an image"):
        load_defect_set(test, masks, SIZE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 64-pixel model: enough to exercise evaluation and the report."""
    torch.manual_seed(0)
    model = AnomalyModel.build(ModelConfig.named("pfadseg", teacher="efficientnet_lite0",
                                                 image_size=SIZE), teacher_weights=RANDOM)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    save_checkpoint(model, path, {}, Thresholds(0.5, 0.5, "test"))
    return path


def test_cli_test_dir_without_masks_gives_image_metrics_only(
        checkpoint: Path, folder: tuple[Path, Path], tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "out"
    assert main(["test", "--checkpoint", str(checkpoint), "--test-dir", str(folder[0]),
                 "--out", str(out), "--device", "cpu", "--no-bf16"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["pixel_metrics"] is False and "pixel_ap" not in result
    assert 0.0 <= result["image_auroc"] <= 1.0 and set(result["per_defect"]) == {"dent", "scratch"}
    assert "No ground-truth masks were given" in (out / "report.html").read_text()
    # <category>/test without a category in the checkpoint: the parent names it (was "test")
    assert result["category"] == folder[0].parent.name


def test_cli_test_dir_with_masks_gives_all_metrics(
        checkpoint: Path, folder: tuple[Path, Path], tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "out"
    assert main(["test", "--checkpoint", str(checkpoint), "--test-dir", str(folder[0]),
                 "--mask-dir", str(folder[1]), "--out", str(out), "--device", "cpu",
                 "--no-bf16", "--no-report"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["pixel_metrics"] is True and result["n_images"] == 5
    for key in ("pixel_auroc", "pixel_ap", "iap", "iap90", "aupro"):
        assert 0.0 <= result[key] <= 1.0 and 0.0 <= result["dest"][key] <= 1.0
    assert "pixel_f1" in result["calibrated"] and not (out / "report.html").exists()


def test_cli_test_needs_one_way_to_name_the_data(checkpoint: Path, folder: tuple[Path, Path],
                                                 tmp_path: Path, capsys) -> None:
    code = main(["test", "--checkpoint", str(checkpoint), "--test-dir", str(folder[0]),
                 "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "o")])
    assert code == 2 and "--test-dir" in capsys.readouterr().err
    code = main(["test", "--checkpoint", str(checkpoint), "--test-dir", str(folder[0] / "good"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2 and "no good/ folder" in capsys.readouterr().err


def test_a_test_set_of_one_class_is_refused_with_what_to_do(checkpoint: Path, folder: tuple[Path, Path],
                                                            tmp_path: Path, capsys) -> None:
    """Good images alone (no defects collected yet) or defects alone define no metric:
    the error says what to add, and where false alarms on good images alone are counted."""
    test = folder[0]
    for defect in ("scratch", "dent"):
        (test / defect).rename(tmp_path / defect)
    code = main(["test", "--checkpoint", str(checkpoint), "--test-dir", str(test), "--out",
                 str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "no defect images" in err and "pfadseg predict" in err
    (test / "good").rename(tmp_path / "good")
    (tmp_path / "dent").rename(test / "dent")
    (test / "good").mkdir()
    code = main(["test", "--checkpoint", str(checkpoint), "--test-dir", str(test), "--out",
                 str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "no good images" in err and "good/" in err
    assert not (tmp_path / "o").exists()  # nothing written, no empty folder left


@pytest.mark.parametrize("value", [1, 3, 255])
def test_label_masks_mark_every_non_zero_pixel(folder: tuple[Path, Path], value: int) -> None:
    """Masks saved as 0/1 (or class ids) read as empty under the 0.5 threshold before."""
    test, masks = folder
    band = np.zeros((SRC, SRC), dtype=np.uint8)
    band[12:24] = value
    Image.fromarray(band).save(masks / "scratch" / "002.png")
    ts = load_folder_test_set(test, SIZE, masks, mask_size=None)
    mask = ts.masks[[p.name for p in ts.paths].index("002.tif")]
    assert mask.sum() == 12 * SRC and _band_start(mask) == 12


def test_mask_of_an_exif_rotated_photo_matches_it_upright(folder: tuple[Path, Path]) -> None:
    """A camera JPEG stored landscape with orientation 6 shows (and is scored) portrait:
    its mask is drawn portrait and must be compared with the upright size."""
    test, masks = folder
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(np.zeros((SRC, 2 * SRC, 3), dtype=np.uint8)).save(
        test / "dent" / "001.jpeg", exif=exif)
    upright = np.zeros((2 * SRC, SRC), dtype=np.uint8)
    upright[:10] = 255
    Image.fromarray(upright).save(masks / "dent" / "001_mask.png")
    ts = load_folder_test_set(test, SIZE, masks)  # was refused: "mask is 48x96 but its image is 96x48"
    mask = ts.masks[[p.name for p in ts.paths].index("001.jpeg")]
    assert mask[:6].all() and not mask[8:].any()  # the top 10 of 96 rows, at 64 px
    Image.fromarray(upright.T.copy()).save(masks / "dent" / "001_mask.png")  # drawn on the stored image
    with pytest.raises(DataError, match=r"turned as its EXIF orientation says\). Fix: .* drawn on the upright image"):
        load_folder_test_set(test, SIZE, masks)


def test_linked_defect_folders_are_searched(tmp_path: Path, folder: tuple[Path, Path]) -> None:
    """Path.rglob skipped linked folders: a test set of linked defect folders had no
    defect images, and a link back up the tree must not loop."""
    test, masks = folder
    linked = tmp_path / "linked"
    (linked / "good").mkdir(parents=True)
    Image.fromarray(_image(9)).save(linked / "good" / "a.png")
    (linked / "dent").symlink_to(test / "dent", target_is_directory=True)
    (linked / "good" / "loop").symlink_to(linked / "good", target_is_directory=True)
    only_dent = tmp_path / "dent_masks"
    only_dent.mkdir()
    (only_dent / "dent").symlink_to(masks / "dent", target_is_directory=True)
    ts = load_folder_test_set(linked, SIZE, only_dent)
    assert sorted(p.relative_to(linked).as_posix() for p in ts.paths) == ["dent/001.jpeg", "good/a.png"]
    assert ts.masks[[p.name for p in ts.paths].index("001.jpeg")].any()


def test_a_link_to_a_folder_above_is_not_followed(folder: tuple[Path, Path], caplog) -> None:
    """good/up -> .. read every defect image a second time as a good one (image AUROC
    fell with no word), and a/up -> .. read the sibling folder b/."""
    test, masks = folder
    (test / "good" / "up").symlink_to("..", target_is_directory=True)
    ts = load_folder_test_set(test, SIZE, masks)
    assert len(ts.paths) == 5 and int(ts.labels.sum()) == 3
    assert "skipping this link to" in caplog.text and "a folder above" in caplog.text
    assert [p.name for p in list_images(test / "good", recursive=True)] == ["a.png", "b.jpg"]


def test_a_file_and_a_link_to_it_are_listed_once_by_the_file_name(tmp_path: Path) -> None:
    Image.fromarray(_image(0)).save(tmp_path / "target.png")
    (tmp_path / "a_link.png").symlink_to("target.png")  # sorts first
    assert [p.name for p in list_images(tmp_path)] == ["target.png"]
    # and a folder and a link to it: by the folder's path, which its masks follow
    (tmp_path / "real").mkdir()
    (tmp_path / "target.png").rename(tmp_path / "real" / "x.png")
    (tmp_path / "a_link").symlink_to("real", target_is_directory=True)
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == ["real/x.png"]


def test_masks_kept_beside_their_images_are_refused_with_the_fix(folder: tuple[Path, Path]) -> None:
    """Labelling tools often save a.png and a_mask.png side by side: every image was
    then read as its own mask ("two masks for one image", "marks a defect in good/")."""
    test, masks = folder
    (masks / "dent" / "001_mask.png").rename(test / "dent" / "001_mask.png")
    with pytest.raises(DataError, match=r"holds the images as well as their masks .*Fix: keep "
                                        r"the masks in a folder of their own"):
        load_folder_test_set(test, SIZE, test)
    with pytest.raises(DataError, match="holds the images as well as their masks"):
        load_defect_set(test / "dent", test / "dent", SIZE)


def test_a_capitalised_good_folder_is_named_in_the_error(folder: tuple[Path, Path]) -> None:
    test, _ = folder
    (test / "good").rename(test / "Good")
    with pytest.raises(DataError, match=r"no good/ folder, but Good/\. Fix: rename it to good/"):
        load_folder_test_set(test, SIZE)


def test_listing_leaves_out_links_predict_outputs_and_says_so(tmp_path: Path, caplog) -> None:
    """A link to an image of the same folder was trained on twice; predict's overlays
    and masks (a summary.csv beside them) were taken as good images; HEIC photos
    were left out with nothing said unless -v."""
    for name in ("a.png", "b.png", "b_overlay.png", "b_mask.png"):
        Image.fromarray(_image(0)).save(tmp_path / name)
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "phone.heic").write_bytes(b"\0")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png", "b_mask.png", "b_overlay.png"]
    assert "format pfadseg cannot read, e.g. phone.heic" in caplog.text
    (tmp_path / "summary.csv").write_text("image\n")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png"]
    assert "leaving out 2 overlays and masks that pfadseg predict wrote" in caplog.text
    # a predict killed hard leaves no summary.csv: each output's map (written first) marks it
    (tmp_path / "summary.csv").unlink()
    np.save(tmp_path / "b_map.npy", np.zeros((2, 2), np.float32))
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png"]


def test_only_the_first_frame_of_an_animation_is_read_and_that_is_said(tmp_path: Path, caplog) -> None:
    frames = [Image.fromarray(_image(seed)) for seed in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_rgb(tmp_path / "anim.gif", None).shape == (SRC, SRC, 3)
    assert "anim.gif: 3 frames (an animation or a multi-page file); only the first is read" in caplog.text


def test_an_empty_file_is_called_one(tmp_path: Path) -> None:
    (tmp_path / "zero.png").touch()
    with pytest.raises(DataError, match=r"zero\.png: empty file \(0 bytes\)"):
        load_rgb(tmp_path / "zero.png", None)


def test_missing_pieces_of_a_test_set_are_said(folder: tuple[Path, Path], caplog) -> None:
    """An empty defect folder was left out, and an MVTec category without ground_truth/
    gave image metrics only, with nothing said about where the masks were expected."""
    test, _ = folder
    (test / "crack").mkdir()
    assert set(load_folder_test_set(test, SIZE).defects) == {"good", "dent", "scratch"}
    assert "no images in crack/, left out of the test set" in caplog.text
    category = test.parent
    assert len(load_test_set(category.parent, category.name, SIZE).paths) == 5
    assert "no ground_truth/ folder beside test/, so image metrics only" in caplog.text
