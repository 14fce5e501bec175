"""DeSTSeg and PFADSeg (PFADSeg Sec. 3, Fig. 2): teacher, denoising student and
segmentation network.

`ModelConfig` names a variant: `destseg` is the CVPR 2023 baseline, `pfadseg`
turns on all three PFADSeg modules, and the switches give every ablation row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..variants import MODULES, modules_of, variant_name
from .losses import cosine_distance, l2_normalize, student_loss
from .residual import BlockOptions
from .segmentation import SegmentationNet
from .student import Student
from .teacher import TEACHERS, Teacher, build_teacher

TOP_K = 100  # image score = mean of the top-100 pixels of the anomaly map


@dataclass
class ModelConfig:
    """Architecture of one variant. Input images are RGB in [0, 1]."""

    aff: bool = True
    pcar: bool = True
    rcm: bool = True
    teacher: str = "resnet18"
    image_size: int = 256
    pcar_dilations: tuple[int, ...] = (1, 2, 3)
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:  # at once: Detector.train checks before images load
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; choose from {sorted(TEACHERS)}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the networks downsample by "
                             f"32), got {self.image_size}")

    @classmethod
    def named(cls, model: str, **kwargs: object) -> "ModelConfig":
        """`destseg` (no modules), `pfadseg` (AFF+PCAR+RCM) or an ablation row by its
        `variant` name such as `destseg+aff+rcm`; non-None kwargs override."""
        # variant names as written (not the "+aff" shorthand of benchmark and report)
        modules = modules_of(model) if model == model.strip().lower() and not model.startswith("+") else None
        if modules is None:
            raise ValueError(f"unknown model {model!r}; choose destseg, pfadseg or destseg+<modules> "
                             f"(modules: {', '.join(MODULES)}, e.g. destseg+aff+rcm)")
        base = {m: m in modules for m in MODULES}
        base.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**base)  # type: ignore[arg-type]

    @property
    def variant(self) -> str:
        """Readable name: destseg, pfadseg, or destseg+<modules>."""
        return variant_name([m for m in MODULES if getattr(self, m)])

    def to_dict(self) -> dict:
        return asdict(self)


class AnomalyModel(nn.Module):
    """Teacher + student + segmentation net, with the normalisation built in."""

    def __init__(self, config: ModelConfig, teacher: Teacher) -> None:
        super().__init__()
        self.config = replace(config, mean=tuple(teacher.mean), std=tuple(teacher.std))  # not the caller's
        opts = BlockOptions(aff=config.aff, pcar=config.pcar, pcar_dilations=tuple(config.pcar_dilations))
        self.teacher = teacher
        self.student = Student(teacher.channels, opts)
        self.segmentation = SegmentationNet(sum(teacher.channels), rcm=config.rcm, opts=opts)
        self.register_buffer("mean", torch.tensor(teacher.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(teacher.std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def build(cls, config: ModelConfig, teacher_weights: str | Path | None = None) -> "AnomalyModel":
        """Build with the teacher's pretrained weights (or a local/random source)."""
        return cls(config, build_teacher(config.teacher, teacher_weights))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation of images in [0, 1], as the teacher was trained."""
        return (images - self.mean) / self.std

    # --- the two training stages -------------------------------------------------
    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """T1..T3 of images in [0, 1]."""
        return self.teacher(self.normalize(images))

    def student_loss(self, clean: torch.Tensor, augmented: torch.Tensor,
                     targets: list[torch.Tensor] | None = None,
                     student: nn.Module | None = None) -> torch.Tensor:
        """Stage 1 (Eq. 4): teacher on the clean image, student on the synthetic one.
        `targets` are the clean images' teacher features when already known; `student`
        is the student to run (the trainer's DistributedDataParallel wrapper of it)."""
        if targets is None:
            targets = self.teacher_features(clean)
        student = self.student if student is None else student
        return student_loss(targets, student(self.normalize(augmented)))

    def segmentation_input(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 2's input: the frozen teacher and student on the same images, each
        level's product -T_l*S_l of the l2-normalised features upsampled to 1/4 of the
        input size, concatenated (448 channels for ResNet18)."""
        return _products(*self._frozen_features(images))

    @torch.no_grad()
    def _frozen_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = self.normalize(images)
        return self.teacher(x), self.student(x)

    # --- inference ----------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps at the input size: (segmentation map, DeST map), each (B, 1, H, W).

        The DeST map is the product over levels of 1 - cos(T_l, S_l) at 1/4 size
        (as the official code), the un-learned student-teacher map, for diagnosis.
        """
        t_feats, s_feats = self._frozen_features(images)
        logits = self.segmentation(_products(t_feats, s_feats))
        quarter = t_feats[0].shape[-2:]
        dest = torch.ones_like(logits, dtype=torch.float32)
        for t, s in zip(t_feats, s_feats):
            dest = dest * F.interpolate(cosine_distance(t, s), size=quarter, mode="bilinear", align_corners=False)
        maps = torch.cat([torch.sigmoid(logits.float()), dest], dim=1)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return maps[:, :1], maps[:, 1:]


def _products(t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
    """The segmentation input (Sec. 3.3, DeSTSeg): -T_l * S_l of the unit-normalised
    features, upsampled to T1's size (a quarter of the input) and concatenated."""
    size = t_feats[0].shape[-2:]
    return torch.cat([F.interpolate(-l2_normalize(t) * l2_normalize(s), size=size, mode="bilinear",
                                    align_corners=False) for t, s in zip(t_feats, s_feats)], dim=1)


def image_scores(maps: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Mean of the k highest pixels of each map (B, 1, H, W) -> (B,)."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
