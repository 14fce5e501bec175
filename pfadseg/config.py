"""Training schedules ("presets") and the settings of one training run."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

LR_SCHEDULES = ("constant", "cosine")


def check_whole(name: str, value: object, least: int = 1) -> int:
    """A count or step number given from Python, checked as the command line checks it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number of {least} or more, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """Schedule, optimiser and speed settings of the two training stages."""

    batch_size: int = 16
    stage1_steps: int = 3000
    stage2_steps: int = 4000
    lr_student: float = 0.5
    lr_seg_res: float = 0.1  # residual blocks of the segmentation net
    lr_seg_head: float = 0.01  # its head (RCM or ASPP and the output convs)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    focal_gamma: float = 4.0
    grad_clip: float | None = None  # max gradient norm; the papers use none
    # "constant" (the papers; every preset) or "cosine": each stage's rates fall from the
    # set value to near zero by its last step (an option: it did not steady bottle runs)
    lr_schedule: str = "constant"
    validations: int = 4  # validation points in stage 2 (0: no validation at all)
    # student checks over stage 1's second half: stage 2 reads the student that found the
    # validation set's synthetic defects best (pfadseg.validation); 0 or 1: the last one
    student_checks: int = 0
    seed: int = 0
    bf16: bool = True  # bf16 autocast where the device supports it
    compile: bool = True  # Inductor for stage 2 (segmentation net, frozen teacher+student)
    # Inductor for stage 1 too (the student's forward and backward): its 3 minutes or so of
    # compiling pays back only over long stage-1 schedules, so only those presets set it
    compile_stage1: bool = False
    save_every: int = 100  # steps between resumable state files
    log_every: int = 10

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def __post_init__(self) -> None:
        """The checks the command line makes, for settings given from Python."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: choose from {LR_SCHEDULES}")
        for name, least in (("batch_size", 1), ("save_every", 1), ("log_every", 1), ("stage1_steps", 0),
                            ("stage2_steps", 0), ("student_checks", 0), ("validations", 0)):
            check_whole(name, getattr(self, name), least)
        for name in ("lr_student", "lr_seg_res", "lr_seg_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number above 0, got {value!r}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the set learning rates for the 0-based training `step`:
        1 under "constant"; under "cosine", 0.5 * (1 + cos(pi * t / n)) with t the
        step's index within its stage and n that stage's length."""
        if self.lr_schedule == "constant":
            return 1.0
        t, n = ((step, self.stage1_steps) if step < self.stage1_steps
                else (step - self.stage1_steps, self.stage2_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t / max(n, 1)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PRESETS: dict[str, TrainConfig] = {
    # PFADSeg paper, Sec. 4.3: batch 16, 3000 + 4000 SGD steps, lr 0.5 / 0.1 / 0.01
    "paper": TrainConfig(compile_stage1=True),
    # the official DeSTSeg code: batch 32, 1000 + 4000 steps, lr 0.4 / 0.1 / 0.01
    "official": TrainConfig(batch_size=32, stage1_steps=1000, stage2_steps=4000, lr_student=0.4,
                            compile_stage1=True),
    # fits a 2-core CPU: see README "Presets" for how it was chosen
    "cpu": TrainConfig(batch_size=8, stage1_steps=700, stage2_steps=500, lr_student=0.25,
                       student_checks=4, save_every=50),
    # `pfadseg demo`: the bundled 128x128 sample (about 20 minutes on 2 cores without bf16)
    "demo": TrainConfig(batch_size=8, stage1_steps=400, stage2_steps=300, lr_student=0.25,
                        student_checks=4, save_every=50, compile=False),
    # seconds; for tests and smoke checks only. Batch 4 splits over two processes (torchrun)
    # with two images each for AFF's BN on pooled features, whose small-batch gradients explode:
    # clip them
    "tiny": TrainConfig(batch_size=4, stage1_steps=2, stage2_steps=2, log_every=1, grad_clip=1.0,
                        compile=False),
}


def preset(name: str, **overrides: object) -> TrainConfig:
    """A preset's TrainConfig with some fields replaced (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; the schedule's are "
                         f"{', '.join(f.name for f in fields(TrainConfig))}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
