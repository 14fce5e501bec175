"""ONNX export: `pfadseg export` is quiet on success and says in one line why it
failed; the onnxruntime maps match the PyTorch fp32 model's at any batch size.

One real export runs by default: DeSTSeg with the RCM head (the module that the
TorchScript exporter could not translate) and the EfficientNet-Lite0 teacher.
torch's exporter traces the dynamic batch axis symbolically, which is slow for big
graphs (on a busy 2-core machine: about 30 s for this one, about 2 minutes for
pfadseg's 2,800 nodes), so the full models run with -m slow.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from pfadseg import checkpoint as ckpt  # noqa: E402
from pfadseg import cli  # noqa: E402
from pfadseg import export  # noqa: E402
from pfadseg.detector import Detector  # noqa: E402
from pfadseg.export import ExportError, export_onnx, onnx_map_fn  # noqa: E402
from pfadseg.inference import infer  # noqa: E402
from pfadseg.models import AnomalyModel, ModelConfig  # noqa: E402

SIZE = 64


def random_model(variant: str, teacher: str, **modules: bool) -> AnomalyModel:
    torch.manual_seed(0)
    config = ModelConfig.named(variant, teacher=teacher, image_size=SIZE, **modules)
    return AnomalyModel.build(config, "random").eval()


def assert_matches_torch(model: AnomalyModel, path: Path) -> None:
    """onnxruntime's maps, DeST maps and scores equal the model's (fp32, to 1e-3)
    for batch sizes 2 (traced) and 3 (never traced: the batch axis is dynamic)."""
    import onnxruntime as ort

    map_fn = onnx_map_fn(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for batch in (2, 3):
        images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        ref_seg, ref_dest, ref_scores = infer(model, images, batch_size=batch, bf16=False)
        seg, scores = map_fn(images)
        assert seg.shape == (batch, SIZE, SIZE) and seg.dtype == np.float32
        assert scores.shape == (batch,)
        np.testing.assert_allclose(seg, ref_seg, atol=1e-3, rtol=0)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-3, rtol=0)
        _, dest, _ = session.run(None, {"images": images.numpy().astype(np.float32) / 255})
        assert dest.shape == (batch, 1, SIZE, SIZE)
        np.testing.assert_allclose(dest[:, 0], ref_dest, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeSTSeg + RCM checkpoint (random weights, EfficientNet-Lite0 teacher, 64x64)."""
    path = tmp_path_factory.mktemp("export") / "checkpoint.safetensors"
    ckpt.save_checkpoint(random_model("destseg", "efficientnet_lite0", rcm=True), path, {}, 0.5)
    return path


def test_cli_export_is_quiet_and_matches_torch(checkpoint: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--device", "cpu"]) == 0
    printed = capfd.readouterr()
    assert printed.out.splitlines() == [
        f"exporting to {out}, then checking it with onnxruntime (a few minutes on a CPU)...",
        f"exported: {out}", f"  input 'images': float32 (B, 3, {SIZE}, {SIZE}), RGB in [0, 1], each "
        f"image resized to {SIZE}x{SIZE}; outputs 'seg_map', 'dest_map', 'score'",
        "  thresholds: image 0.5, pixel 0.5 (legacy)", "  all of this, in full, is in the file's metadata_props"]
    assert printed.err == ""  # no exporter progress, IR dumps, warnings or tracebacks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no .tmp, no .log
    model, meta = ckpt.load_checkpoint(checkpoint)
    assert_matches_torch(model, out)
    # what a program without pfadseg needs is in the file: thresholds, input size, contract
    import onnxruntime as ort

    props = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert props == export.onnx_metadata(model, meta)
    assert (props["image_threshold"], props["pixel_threshold"], props["image_size"]) == ("0.5", "0.5", str(SIZE))
    assert "RGB in [0, 1]" in props["input"] and ">= pixel_threshold" in props["outputs"]
    # the file records the weights it came from: this checkpoint's run it, others' are refused
    assert Detector.load(checkpoint, backend="onnx", onnx=out).predict([np.zeros((8, 8, 3), np.uint8)])
    other = tmp_path / "other.safetensors"
    with torch.no_grad():
        next(model.segmentation.parameters()).add_(0.01)  # one weight changed
    ckpt.save_checkpoint(model, other, {}, 0.5)
    with pytest.raises(ValueError, match=r"model\.onnx was not exported from this checkpoint's "
                                         r"weights \(another model\)\. Fix: export it again"):
        Detector.load(other, backend="onnx", onnx=out)


def test_export_never_writes_over_a_file_that_is_not_onnx(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """`--out` naming the checkpoint itself replaced the trained model with the ONNX file."""
    before = checkpoint.read_bytes()
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(checkpoint)]) == 2
    assert f"not a .onnx file name (the model written there replaces any file of that name). Fix: " \
           f"--out {checkpoint.with_suffix('.onnx')}" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("variant,teacher", [("pfadseg", "resnet18"),
                                             ("pfadseg", "efficientnet_lite0"),
                                             ("destseg", "resnet18")])
def test_onnx_matches_torch(variant: str, teacher: str, tmp_path: Path) -> None:
    model = random_model(variant, teacher)
    path = export_onnx(model, tmp_path / f"{variant}.onnx")
    assert_matches_torch(model, path)


def _noisy_failing_export(*args: object, **kwargs: object) -> None:
    """Fails the way torch's exporters do: pages on stdout and stderr, from Python
    and from C++ (straight to the file descriptors), then a many-line error."""
    print("Torch IR graph at exception: graph(%images : Float(*, 3, 64, 64)) ...")
    print("Traceback (most recent call last): ...", file=sys.stderr)
    os.write(2, b"axes_input_to_attribute.h:55: adapt: Assertion failed\n")
    raise RuntimeError("Failed to export a node '%6713'\n  (node defined in ...)\n" * 50)


def test_failed_export_says_why_in_one_line(checkpoint: Path, tmp_path: Path, capfd,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.onnx, "export", _noisy_failing_export)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--device", "cpu"]) == 2
    printed = capfd.readouterr()
    log = tmp_path / f"model.onnx.{os.getpid()}.log"  # the process's own: two exports, two logs
    assert printed.out.startswith("exporting to")
    assert printed.err.splitlines() == [
        f"pfadseg export: error: ONNX export to {out} failed: RuntimeError: Failed to export "
        f"a node '%6713' (exporter log: {log})"]
    noise = log.read_text()  # the exporter's output is kept for a bug report
    assert "Torch IR graph" in noise and "Traceback" in noise and "Assertion failed" in noise
    assert sorted(p.name for p in tmp_path.iterdir()) == [log.name]  # no half file


def test_interrupted_export_leaves_nothing_behind(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C left model.onnx.tmp and model.onnx.log (the log is kept only for a failure)."""
    def interrupted(*args: object, **kwargs: object) -> None:
        Path(args[2]).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(random_model("destseg", "resnet18"), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
    # nor when Ctrl-C comes after the check, while the metadata is written (left an empty log)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Path(a[2]).write_bytes(b"x"))
    monkeypatch.setattr(export, "_largest_difference", lambda *a: 0.0)
    import onnx

    monkeypatch.setattr(onnx, "load", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_onnx(random_model("destseg", "resnet18"), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_that_computes_otherwise_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that loads but whose outputs differ from the model's never replaces --out."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Path(a[2]).write_bytes(b"x"))
    monkeypatch.setattr(export, "_largest_difference", lambda *a: 0.25)
    with pytest.raises(ExportError, match=r"differ from the model's by up to 0\.25") as err:
        export_onnx(random_model("destseg", "resnet18"), out)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"an earlier export"
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_exporter_package_is_a_clear_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails
    with pytest.raises(ExportError, match=r"onnxscript package: pip install pfadseg\[onnx\]"):
        export_onnx(random_model("destseg", "resnet18"), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ValueError, match="pfadseg export") as info:
        onnx_map_fn(missing)
    assert "nope.onnx" in str(info.value)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx: not an ONNX model onnxruntime can load.*Fix: export"):
        onnx_map_fn(junk)


def test_missing_onnxruntime_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install pfadseg\[onnx\]"):
        onnx_map_fn(path)
