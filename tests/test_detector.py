"""`Detector`: train, load and predict through one object, and what a `Prediction` holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfadseg.calibration import Thresholds
from pfadseg.data import DataError
from pfadseg.demo import demo_root
from pfadseg.detector import Detector, Prediction

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
    assert [p.name for p in predictions] == ["000.jpg", "000.jpg"]
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
    array = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_pil, by_array = trained.predict([path, pil, array])
    assert by_pil.score == pytest.approx(by_path.score, abs=1e-4)
    assert by_array.score == pytest.approx(by_path.score, abs=1e-4)
    assert (by_pil.name, by_array.name) == ("000.jpg", "image_2.png")
    assert [p.name for p in trained.predict([array], names=["mine"])] == ["mine"]


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
    with pytest.raises(DataError, match=r"image 1: an array must be uint8 \(H, W, 3\)"):
        trained.predict([IMAGES[0], np.zeros((8, 8), dtype=np.float32)])
    with pytest.raises(DataError, match="image 0: int is not an image"):
        trained.predict([3])  # type: ignore[list-item]


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
