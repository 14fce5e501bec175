"""Run by torchrun in tests/test_distributed.py: trains the tiny preset on two CPU
processes (gloo), 4 + 1 steps with a state file after each, then every rank saves its
own final weights for comparison. 4 of 8 images are held out and rank 0's validation
scores the student of step 3 best, so rank 0 puts it back when stage 1 ends (step 4).
With PFADSEG_TEST_DIE_AT=K, rank 1 dies at step K (a crashed GPU, a killed process).
With PFADSEG_TEST_SAME_BATCH=1, instead, one step per stage without gradient clipping,
each on the same two images repeated to fill each rank's share (two ranks of two see what
one process of four sees), DeSTSeg (AFF's batch norm of two pooled values magnifies
rounding), and the weights before training are saved too (init_rank<r>.pt)."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pfadseg import distributed as dist
from pfadseg.config import preset
from pfadseg.models import ModelConfig
from pfadseg.synthesis import DefectSynthesizer, procedural_textures
from pfadseg.trainer import TrainData, Trainer, train
from pfadseg.validation import ValidationSet

out, resume = Path(sys.argv[1]), "--resume" in sys.argv
die_at = int(os.environ.get("PFADSEG_TEST_DIE_AT", "0"))
if die_at:
    step = Trainer.train_step

    def dying_step(self: Trainer) -> dict:
        if self.step + 1 == die_at and dist.rank() == 1:
            os._exit(3)
        return step(self)
    Trainer.train_step = dying_step  # type: ignore[method-assign]

same = os.environ.get("PFADSEG_TEST_SAME_BATCH") == "1"
if same:
    draw = Trainer._batch

    def same_batch(self: Trainer) -> tuple:
        share, self.batch_size = self.batch_size, 2
        self.generator = torch.Generator().manual_seed(self.step)
        two = draw(self)
        self.batch_size = share
        return tuple(torch.cat([t] * (share // 2)) for t in two)
    Trainer._batch = same_batch  # type: ignore[method-assign]

trainers: list[Trainer] = []
run = Trainer.run


def recording_run(self: Trainer, progress: bool = True) -> None:
    trainers.append(self)
    if same:
        torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                   Path(os.environ["PFADSEG_TEST_WEIGHTS"]) / f"init_rank{dist.rank()}.pt")
    run(self, progress)


Trainer.run = recording_run  # type: ignore[method-assign]
if not same:
    def scripted_score(self: ValidationSet, model, bf16: bool, batch_size: int = 16) -> dict:
        return {"seg_pixel_ap": 0.5, "seg_image_auroc": 0.5,
                "dest_pixel_ap": 0.9 if trainers[0].step == 3 else 0.1}
    ValidationSet.score = scripted_score  # type: ignore[method-assign]
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (6 if same else 8, 3, 64, 64), dtype=torch.uint8, generator=gen)
data = TrainData(images, DefectSynthesizer(procedural_textures(2, 64)), "none")
cfg = (replace(preset("tiny", batch_size=4, stage1_steps=1, stage2_steps=1, bf16=False), grad_clip=None)
       if same else preset("tiny", batch_size=4, stage1_steps=4, stage2_steps=1, student_checks=2,
                           save_every=1, bf16=False))
train(ModelConfig.named("destseg" if same else "pfadseg", teacher="efficientnet_lite0", image_size=64), cfg, data, out,
      teacher_weights="random", resume=resume, progress=False, device="cpu")
weights = {k: v.detach().cpu() for k, v in trainers[0].model.state_dict().items()}
torch.save(weights, Path(os.environ["PFADSEG_TEST_WEIGHTS"]) / f"rank{dist.rank()}.pt")
