"""Issue 24: the learning-rate decay option, validation on synthetic defects over
held-out good images, the best of several stage-1 students going on to stage 2, and
the warning for a run that looks bad."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pfadseg import checkpoint as ckpt
from pfadseg.config import PRESETS, TrainConfig, preset
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.synthesis import DefectSynthesizer
from pfadseg.trainer import STATE_FORMAT, STATE_NAME, TrainData, Trainer, train
from pfadseg.validation import (MIN_SEG_PIXEL_AP, MIN_STUDENT_DEST_AP, ValidationSet, assess,
                                student_check_steps, validation_steps)


def test_papers_presets_keep_constant_rates() -> None:
    """Item 3: paper and official are the papers' schedules; no preset decays (an option)."""
    paper, official = PRESETS["paper"], PRESETS["official"]
    assert (paper.batch_size, paper.stage1_steps, paper.stage2_steps) == (16, 3000, 4000)
    assert (paper.lr_student, paper.lr_seg_res, paper.lr_seg_head) == (0.5, 0.1, 0.01)
    assert (official.batch_size, official.stage1_steps, official.stage2_steps) == (32, 1000, 4000)
    assert official.lr_student == 0.4
    for name in PRESETS:
        cfg = PRESETS[name]
        assert cfg.lr_schedule == "constant"
        assert {cfg.lr_factor(s) for s in range(0, cfg.total_steps, 97)} == {1.0}


def test_cosine_factor_restarts_each_stage() -> None:
    cfg = TrainConfig(stage1_steps=4, stage2_steps=2, lr_schedule="cosine")
    got = [cfg.lr_factor(s) for s in range(cfg.total_steps)]
    want = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 1.0, 0.5]
    np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def _tiny_trainer(out: Path, **overrides: object) -> Trainer:
    """destseg at 64 px on random images, 4 + 2 steps unless overridden, 4 held-out images."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=gen)
    data = TrainData(images[:4], DefectSynthesizer(torch.rand(2, 3, 64, 64, generator=gen)), "none")
    torch.manual_seed(0)
    model = AnomalyModel.build(ModelConfig.named("destseg", image_size=64), "random")
    cfg = preset("tiny", **{"stage1_steps": 4, "stage2_steps": 2, "bf16": False, **overrides})
    return Trainer(model, cfg, data, out, held_out=images[4:])


def test_trainer_steps_with_the_decayed_rates(tmp_path: Path) -> None:
    """The optimiser's rates at each step are the set rates times the factor."""
    trainer = _tiny_trainer(tmp_path, stage1_steps=2, lr_schedule="cosine")
    cfg = trainer.config
    seen = []
    for _ in range(cfg.total_steps):
        opt = trainer.opt_student if trainer.step < cfg.stage1_steps else trainer.opt_seg
        trainer.train_step()
        seen.append([g["lr"] for g in opt.param_groups])
    half = 0.5 * (1 + math.cos(math.pi / 2))
    assert seen == [[cfg.lr_student], [cfg.lr_student * half],
                    [cfg.lr_seg_res, cfg.lr_seg_head], [cfg.lr_seg_res * half, cfg.lr_seg_head * half]]


def test_validation_points() -> None:
    assert student_check_steps(PRESETS["cpu"]) == [438, 525, 613, 700]
    assert student_check_steps(PRESETS["demo"]) == [250, 300, 350, 400]
    assert student_check_steps(PRESETS["paper"]) == [3000]  # the papers: the last student
    assert student_check_steps(PRESETS["official"]) == [1000]
    assert validation_steps(PRESETS["cpu"]) == [438, 525, 613, 700, 825, 950, 1075, 1200]
    assert validation_steps(preset("tiny")) == [2, 3, 4]
    assert student_check_steps(preset("tiny", student_checks=4)) == [2]  # too short for more
    assert validation_steps(preset("cpu", validations=0)) == []
    assert validation_steps(preset("tiny", stage1_steps=0, stage2_steps=3, validations=1)) == [3]


def _row(step: int, seg: float, dest: float = 0.45) -> dict[str, float]:
    return {"step": step, "seg_pixel_ap": seg, "seg_image_auroc": 0.99, "dest_pixel_ap": dest}


def test_warnings_name_the_signal_and_the_fix() -> None:
    good = [_row(10, 0.0), _row(12, 0.70), _row(14, 0.80)]
    assert assess(good, stage1_steps=10) == []
    assert assess(good[:1], stage1_steps=10) == []  # stage 2 never validated: nothing to judge

    (low,) = assess([_row(10, 0.0), _row(14, MIN_SEG_PIXEL_AP - 0.01, 0.4)], stage1_steps=10)
    assert "poorly" in low and "--seed" in low
    (weak,) = assess([_row(10, 0.0, 0.2), _row(14, 0.75, MIN_STUDENT_DEST_AP - 0.01)], stage1_steps=10)
    assert "student left stage 1 weak" in weak and "--seed" in weak
    (flat,) = assess([_row(10, 0.0), _row(14, 0.6, 0.65)], stage1_steps=10)
    assert "no better than the raw" in flat
    (drop,) = assess([_row(10, 0.0), _row(12, 0.85), _row(14, 0.70)], stage1_steps=10)
    assert "fell from 0.850 to 0.700" in drop


def test_validation_figures_see_a_model_that_finds_the_defects() -> None:
    """The figures are real metrics: a map equal to the mask scores 1, an inverted one low."""
    gen = torch.Generator().manual_seed(0)
    good = torch.randint(100, 156, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    vset = ValidationSet.build(good, DefectSynthesizer(torch.rand(3, 3, 32, 32, generator=gen)), seed=0)
    assert vset.labels.sum() > 0 and vset.masks[vset.labels == 0].sum() == 0
    assert len(vset.images) == len(vset.masks) == len(vset.labels)

    class Oracle(torch.nn.Module):
        """Segmentation map = the true mask (or its inverse); DeST map = noise."""

        def __init__(self, invert: bool) -> None:
            super().__init__()
            self.invert, self.weight = invert, torch.nn.Parameter(torch.zeros(1))
            self.config = ModelConfig(image_size=32)  # what inference checks its inputs against
            self.lookup = {img.numpy().tobytes(): m for img, m in zip(vset.images, vset.masks)}

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = [(xi * 255).round().to(torch.uint8).numpy().tobytes() for xi in x]
            seg = torch.stack([torch.from_numpy(self.lookup[k]).float() for k in keys])[:, None]
            return (1 - seg if self.invert else seg), torch.rand_like(seg)

    right = vset.score(Oracle(False), bf16=False)
    wrong = vset.score(Oracle(True), bf16=False)
    assert right["seg_pixel_ap"] == pytest.approx(1.0) and right["seg_image_auroc"] == pytest.approx(1.0)
    assert wrong["seg_pixel_ap"] < 0.5 and right["dest_pixel_ap"] < 0.5




def _student(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.student.state_dict().items()}


def test_stage2_reads_the_best_checked_student(tmp_path: Path, monkeypatch) -> None:
    """Checks at steps 3 and 4 score 0.6 and 0.2: the student of step 3 goes on, in a
    straight run and in one stopped after step 3 and resumed from its state file."""
    scripted = {3: 0.6, 4: 0.2}
    current: dict[str, Trainer] = {}
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def score(self, model, bf16, batch_size=16):
        step = current["t"].step
        seen.setdefault(step, _student(current["t"]))
        return {"seg_pixel_ap": 0.5, "seg_image_auroc": 0.9, "dest_pixel_ap": scripted.get(step, 0.3)}

    monkeypatch.setattr(ValidationSet, "score", score)
    straight = current["t"] = _tiny_trainer(tmp_path / "a", student_checks=2)
    assert straight.student_checks == {3, 4}
    straight.run(progress=False)
    final = _student(straight)
    assert all(torch.equal(final[k], seen[3][k]) for k in final)
    assert not all(torch.equal(final[k], seen[4][k]) for k in final)
    assert straight.pick.step == 3

    stopped = current["t"] = _tiny_trainer(tmp_path / "b", student_checks=2, save_every=1)
    real_step = Trainer.train_step

    def stop_after_3(self: Trainer) -> dict:
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_after_3)
    with pytest.raises(KeyboardInterrupt):
        stopped.run(progress=False)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    tensors, meta = ckpt.read(tmp_path / "b" / STATE_NAME, kind=STATE_FORMAT)
    assert meta["step"] == 3 and meta["student_pick"]["step"] == 3
    assert any(k.startswith("pick.") for k in tensors)

    resumed = current["t"] = _tiny_trainer(tmp_path / "b", student_checks=2, save_every=1)
    resumed.load_state(tmp_path / "b" / STATE_NAME)
    resumed.run(progress=False)
    assert resumed.pick.step == 3
    got = _student(resumed)
    assert all(torch.equal(got[k], final[k]) for k in final)


def test_without_checks_the_last_student_goes_on(tmp_path: Path, monkeypatch) -> None:
    """student_checks 0 (the papers' presets): one stage-1 point, at its end, and that
    student goes on whatever it scores."""
    at_end: dict[str, torch.Tensor] = {}

    def score(self, model, bf16, batch_size=16):
        if not at_end:
            at_end.update(_student(trainer))
        return {"seg_pixel_ap": 0.5, "seg_image_auroc": 0.9, "dest_pixel_ap": 0.0}

    monkeypatch.setattr(ValidationSet, "score", score)
    trainer = _tiny_trainer(tmp_path, student_checks=0)
    assert trainer.student_checks == set()
    trainer.run(progress=False)
    assert trainer.pick.step is None
    final = _student(trainer)
    assert all(torch.equal(final[k], at_end[k]) for k in final)


def test_a_run_without_validation_leaves_no_earlier_figures(tmp_path: Path, caplog) -> None:
    """Too few images to hold any out: nothing is validated, the validation.json of
    an earlier run in the same folder goes (`pfadseg train` prints that file), and a
    warning says the thresholds came from the training images and how to redo them."""
    (tmp_path / "validation.json").write_text('{"final": {"seg_pixel_ap": 0.9}}')
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    data = TrainData(images, DefectSynthesizer(torch.rand(2, 3, 64, 64)), "none")
    cfg = preset("tiny", stage1_steps=1, stage2_steps=1, bf16=False, compile=False)
    path = train(ModelConfig.named("destseg", image_size=64), cfg, data, tmp_path,
                 teacher_weights="random", progress=False, device="cpu")
    assert path.is_file() and "validation" not in ckpt.read_meta(path)
    assert not (tmp_path / "validation.json").exists()
    assert "4 training images are too few to hold any out" in caplog.text
    assert f"pfadseg calibrate --checkpoint {path}" in caplog.text
