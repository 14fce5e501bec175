"""torch.compile (Inductor) paths: compiled inference and stage 2 agree with eager
PyTorch, and a machine without a C++ compiler runs eagerly instead of failing."""
from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from torch._dynamo.utils import counters

from pfadseg import inference, runtime
from pfadseg.config import preset
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.synthesis import DefectSynthesizer
from pfadseg.trainer import TrainData, Trainer

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(
    runtime.missing_compiler(CPU) is not None or torch._dynamo.config.disable,
    reason="torch.compile needs a C++ compiler (and TORCH_COMPILE_DISABLE unset)")


def _compilations() -> int:
    """Graphs Inductor compiled so far (a failed compilation that fell back to eager adds none)."""
    return counters["aot_autograd"]["ok"]


def _model() -> AnomalyModel:
    torch.manual_seed(0)
    return AnomalyModel.build(ModelConfig.named("destseg", image_size=64), "random")


def test_no_compiler_runs_eagerly(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert "no C++ compiler" in runtime.missing_compiler(CPU)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    with caplog.at_level(logging.WARNING):
        assert runtime.compiled(fn, CPU, frozen=True) is fn
    assert "(no C++ compiler (g++) found): running eagerly" in caplog.text


@needs_compiler
def test_failed_compilation_runs_eagerly_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A compiler error at the first call costs the speed-up, not the run; the
    fallback is local to that function (dynamo's suppress_errors stays off)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: broken)
    with caplog.at_level(logging.WARNING):
        run = runtime.compiled(fn, CPU)
        assert torch.equal(run(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(run(torch.ones(1)), torch.full((1,), 2.0))
    assert caplog.text.count("torch.compile failed (RuntimeError: compiler exploded)") == 1
    assert not torch._dynamo.config.suppress_errors


@needs_compiler
def test_compiled_inference_matches_eager(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=gen)
    # batch 4 over 5 images: the compiled run pads the last batch of 1 up to 4
    seg, dest, scores = inference.infer(model, images, batch_size=4, bf16=False)
    before = _compilations()
    seg_c, dest_c, scores_c = inference.infer(model, images, batch_size=4, bf16=False, compile=True)
    # one graph: the padded last batch needs no other
    assert _compilations() == before + 1
    np.testing.assert_allclose(seg_c, seg, atol=1e-4)
    np.testing.assert_allclose(dest_c, dest, atol=1e-4)
    np.testing.assert_allclose(scores_c, scores, atol=1e-4)


def _tiny_data(seed: int) -> TrainData:
    """Four random 64x64 images and two textures."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=gen)
    return TrainData(images, DefectSynthesizer(torch.rand(2, 3, 64, 64, generator=gen)), "none")


def _eager_and_compiled(model: AnomalyModel, tmp_path: Path, seed: int, stage1_steps: int,
                        stage2_steps: int, flag: str) -> dict[bool, tuple[list[float], AnomalyModel]]:
    """Losses and trained copies of `model` after the tiny preset's first steps (fp32),
    eager and with the compile setting `flag` on; only the compiled run compiles."""
    data = _tiny_data(seed)
    runs = {}
    for compile in (False, True):
        m = copy.deepcopy(model)
        cfg = preset("tiny", stage1_steps=stage1_steps, stage2_steps=stage2_steps, bf16=False,
                     **{flag: compile})
        trainer = Trainer(m, cfg, data, tmp_path / str(compile))
        before = _compilations()
        losses = [trainer.train_step()["loss"] for _ in range(cfg.total_steps)]
        assert _compilations() > before if compile else _compilations() == before
        runs[compile] = (losses, m)
    return runs


@needs_compiler
def test_compiled_stage2_matches_eager(one_thread: None, tmp_path: Path) -> None:
    model = _model()
    runs = _eager_and_compiled(model, tmp_path, 2, 0, 2, "compile")
    (eager_losses, eager_model), (comp_losses, m) = runs[False], runs[True]
    np.testing.assert_allclose(comp_losses, eager_losses, rtol=1e-4)
    comp_state = m.segmentation.state_dict()
    for key, value in eager_model.segmentation.state_dict().items():
        torch.testing.assert_close(comp_state[key], value, atol=1e-4, rtol=1e-4, msg=key)
    # the frozen half is the teacher and student: compiling them never changes them
    assert all(torch.equal(a, b) for a, b in zip(model.student.state_dict().values(),
                                                  m.student.state_dict().values()))


@pytest.mark.slow  # ~95 s of compiling with a cold cache on 2 cores; the paper presets' path
@needs_compiler
def test_compiled_stage1_matches_eager(one_thread: None, tmp_path: Path) -> None:
    """`compile_stage1` (paper and official presets) trains the student as eager PyTorch does.

    The student's gradients at this tiny size are ill-conditioned (BatchNorm over 8
    values per channel): a 1e-6 change of the input image alone moves them by about
    3% (whole-gradient norm), so the step is compared at that scale, not elementwise.
    """
    assert preset("paper").compile_stage1 and not preset("cpu").compile_stage1
    model = _model()
    runs = _eager_and_compiled(model, tmp_path, 3, 1, 0, "compile_stage1")

    def update(m: AnomalyModel) -> torch.Tensor:
        return torch.cat([(p - p0).detach().flatten()
                          for p, p0 in zip(m.student.parameters(), model.student.parameters())])

    (eager_losses, eager_model), (comp_losses, comp_model) = runs[False], runs[True]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-5)
    eager_step, comp_step = update(eager_model), update(comp_model)
    assert eager_step.norm() > 0
    assert (comp_step - eager_step).norm() < 0.05 * eager_step.norm()


def test_stage2_features_run_without_autograd(tmp_path: Path) -> None:
    """Inductor folds BatchNorm and pre-packs the frozen teacher's and student's weights
    only in a graph compiled with autograd off: the compiled features of a batch of 16
    took 244 ms that way, 360 ms with autograd on."""
    model = _model()
    grad_modes = []
    features = model.segmentation_input

    def spy(images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grad_modes.append(torch.is_grad_enabled())
        return features(images)

    model.segmentation_input = spy  # type: ignore[method-assign]
    trainer = Trainer(model, preset("tiny", stage1_steps=0, stage2_steps=1), _tiny_data(4), tmp_path)
    trainer.train_step()
    assert grad_modes == [False]


@pytest.mark.parametrize("mode, expected", [("cudagraphs", {"backend": "cudagraphs"}),
                                            ("reduce-overhead", {"mode": "reduce-overhead"})])
def test_one_cuda_gpu_compiles_as_cuda_compile_says(monkeypatch: pytest.MonkeyPatch, mode: str,
                                                    expected: dict) -> None:
    """The CUDA setting reaches torch.compile (stubbed: CI has no GPU); the CPU keeps Inductor."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # Triton is there
    monkeypatch.setattr(runtime, "CUDA_COMPILE", mode)
    runtime.compiled(torch.neg, torch.device("cuda"))
    runtime.compiled(torch.neg, CPU)
    assert calls == [{"dynamic": False, **expected}, {"dynamic": False, "backend": "inductor"}]


def test_cuda_graphs_need_no_triton_and_inductor_on_cuda_says_it_does(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Without Triton, --compile on one GPU ran eagerly, saying "no compiler found",
    though dynamo's cudagraphs backend needs no Triton (stubbed: CI has no GPU)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(runtime, "CUDA_COMPILE", "cudagraphs")
    runtime.compiled(torch.neg, torch.device("cuda"))
    assert calls == [{"dynamic": False, "backend": "cudagraphs"}]
    monkeypatch.setattr(runtime, "CUDA_COMPILE", "reduce-overhead")
    with caplog.at_level(logging.WARNING):
        assert runtime.compiled(torch.neg, torch.device("cuda")) is torch.neg
    assert "(Triton is not installed): running eagerly" in caplog.text and len(calls) == 1


def test_a_device_is_checked_whether_named_or_given_as_torch_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch.device("cuda") passed through the Python API was taken unchecked before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", torch.device("cuda"), torch.device("cuda", 1)):
        with pytest.raises(ValueError, match="this torch sees no CUDA GPU.*Fix: use --device cpu"):
            runtime.resolve_device(device)
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert runtime.resolve_device(" Auto ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        runtime.resolve_device(torch.device("cuda", 1))


def test_bf16_on_a_cuda_gpu_means_its_own_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.is_bf16_supported() says yes for a V100 (emulated bf16, slow) and asks
    the current GPU, not the one given: Ampere (8.x) and later, of the device named."""
    from types import SimpleNamespace

    from pfadseg.runtime import bf16_supported

    majors = {0: 9, 1: 7}  # an H100 and a V100
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=majors[d.index]))
    assert bf16_supported(torch.device("cuda", 0)) and not bf16_supported(torch.device("cuda", 1))
