"""ONNX export: the onnxruntime maps match the PyTorch fp32 model's, any batch size."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pfadseg.export import export_onnx, onnx_map_fn  # noqa: E402
from pfadseg.inference import infer  # noqa: E402
from pfadseg.models import AnomalyModel, ModelConfig  # noqa: E402

SIZE = 64


@pytest.mark.parametrize("variant,teacher", [("pfadseg", "resnet18"), ("destseg", "resnet18"),
                                             ("destseg", "efficientnet_lite0")])  # Lite0: mirrored
def test_onnx_matches_torch(variant: str, teacher: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AnomalyModel.build(ModelConfig.named(variant, teacher=teacher, image_size=SIZE),
                               "random").eval()
    path = export_onnx(model, tmp_path / f"{variant}.onnx")
    assert path.is_file()
    map_fn = onnx_map_fn(path, threads=1)
    gen = torch.Generator().manual_seed(1)
    for batch in (2, 3):  # 3 was never traced: proves the dynamic batch axis
        images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        seg, scores = map_fn(images)
        ref_seg, _, ref_scores = infer(model, images, batch_size=batch, bf16=False,
                                       channels_last=False)
        assert seg.shape == (batch, SIZE, SIZE) and seg.dtype == np.float32
        assert scores.shape == (batch,)
        np.testing.assert_allclose(seg, ref_seg, atol=1e-3, rtol=0)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-3, rtol=0)
    # the raw graph: all three outputs, the DeST map included
    import onnxruntime as ort

    ref_seg, ref_dest, ref_scores = infer(model, images, bf16=False, channels_last=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seg, dest, scores = session.run(None, {"images": images.numpy().astype(np.float32) / 255})
    assert seg.shape == dest.shape == (3, 1, SIZE, SIZE) and scores.shape == (3,)
    np.testing.assert_allclose(dest[:, 0], ref_dest, atol=1e-3, rtol=0)


def test_missing_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ValueError, match="pfadseg export") as info:
        onnx_map_fn(missing)
    assert "nope.onnx" in str(info.value)


def test_missing_onnxruntime_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install pfadseg\[onnx\]"):
        onnx_map_fn(path)
