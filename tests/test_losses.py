"""Tests for the training losses: the stage-1 cosine loss and its (official) batch-sum
reduction, the stage-2 focal and L1 losses, and the downsampled mask target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfadseg.config import PRESETS
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.models.losses import focal_loss, l1_loss, mask_target


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> AnomalyModel:
    torch.manual_seed(0)
    return AnomalyModel.build(ModelConfig.named("destseg", image_size=64), "random").eval()


# --- stage 1 --------------------------------------------------------------------------


def _by_hand(model: AnomalyModel, clean: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of sum over levels of mean over pixels of 1 - cos."""
    with torch.no_grad():
        targets = model.teacher(model.normalize(clean))
        preds = model.student(model.normalize(augmented))
    per_sample = sum((1 - F.cosine_similarity(t, s, dim=1)).mean(dim=(1, 2))
                     for t, s in zip(targets, preds))
    return per_sample.sum()


def test_student_loss_sums_over_the_batch(model: AnomalyModel) -> None:
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(1, 3, 64, 64, generator=gen)
    augmented = torch.rand(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        one = model.student_loss(clean, augmented)
        two = model.student_loss(clean.repeat(2, 1, 1, 1), augmented.repeat(2, 1, 1, 1))
    assert one.dtype == torch.float32 and one.ndim == 0
    assert float(one) > 0
    # bit-exact with one thread; other thread counts may pick other kernels (~1e-7 off)
    assert torch.allclose(two, 2 * one, rtol=1e-6, atol=0)


def test_student_loss_matches_hand_computation(model: AnomalyModel) -> None:
    gen = torch.Generator().manual_seed(2)
    clean = torch.rand(2, 3, 64, 64, generator=gen)
    augmented = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        loss = model.student_loss(clean, augmented)
    assert torch.allclose(loss, _by_hand(model, clean, augmented), rtol=1e-5, atol=1e-6)
    # three levels, each 1 - cos in [0, 2]: at most 2 * 3 per image
    assert 0 < float(loss) <= 2 * 3 * 2


def test_student_loss_trains_only_the_student(model: AnomalyModel) -> None:
    gen = torch.Generator().manual_seed(3)
    clean = torch.rand(1, 3, 64, 64, generator=gen)
    model.zero_grad(set_to_none=True)
    model.student_loss(clean, clean).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.segmentation.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.student.parameters())
    model.zero_grad(set_to_none=True)


# --- stage 2 --------------------------------------------------------------------------


def _official_focal(logits: torch.Tensor, y: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """The official DeSTSeg definition, on probabilities: BCE(p, y) * (1 - p_t)^gamma, mean."""
    p = torch.sigmoid(logits.double())
    y = y.double()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    return (bce * (1 - p_t) ** gamma).mean()


def _data(seed: int, shape=(2, 1, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=gen)
    target = (torch.rand(shape, generator=gen) < 0.3).float()
    return logits, target


def test_focal_loss_matches_official_definition() -> None:
    assert PRESETS["paper"].focal_gamma == 4.0
    for seed in range(3):
        logits, target = _data(seed)
        got = focal_loss(logits, target)
        assert got.ndim == 0
        assert abs(float(got) - float(_official_focal(logits, target))) < 1e-6
        got2 = focal_loss(logits, target, gamma=2.0)
        assert abs(float(got2) - float(_official_focal(logits, target, 2.0))) < 1e-6


def test_focal_loss_limits() -> None:
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert float(focal_loss(torch.tensor([[[[30.0, -30.0]]]]), target)) < 1e-12  # confident, right
    # p = 0.5 everywhere: BCE = log 2, (1 - p_t)^4 = 1/16
    half = focal_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
    assert abs(float(half) - torch.log(torch.tensor(2.0)).item() / 16) < 1e-7


def test_l1_loss_is_mean_abs_probability_error() -> None:
    logits, target = _data(5)
    expected = (torch.sigmoid(logits) - target).abs().mean()
    assert abs(float(l1_loss(logits, target)) - float(expected)) < 1e-7


@pytest.mark.parametrize("loss", [focal_loss, l1_loss])
def test_stage2_losses_are_mean_reduced(loss) -> None:
    logits, target = _data(6)
    single = loss(logits, target)
    doubled = loss(torch.cat([logits, logits]), torch.cat([target, target]))
    assert torch.allclose(single, doubled, rtol=1e-6, atol=1e-8)
    # and independent of the map size for a constant map
    small = loss(torch.full((1, 1, 4, 4), 0.7), torch.ones(1, 1, 4, 4))
    big = loss(torch.full((1, 1, 32, 32), 0.7), torch.ones(1, 1, 32, 32))
    assert torch.allclose(small, big, rtol=1e-6)


# --- mask target ------------------------------------------------------------------------


def test_mask_target_downsample_then_threshold() -> None:
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(2, 1, 64, 64, generator=gen) < 0.5).float()
    mask = F.max_pool2d(mask, 5, stride=1, padding=2)  # blobs, so the threshold matters
    target = mask_target(mask, torch.Size((16, 16)))
    assert target.shape == (2, 1, 16, 16)
    assert set(target.unique().tolist()) <= {0.0, 1.0}
    expected = (F.interpolate(mask, size=(16, 16), mode="bilinear", align_corners=False) >= 0.5).float()
    assert torch.equal(target, expected)


def test_mask_target_block_and_threshold_value() -> None:
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1
    target = mask_target(mask, (16, 16))
    expected = torch.zeros(1, 1, 16, 16)
    expected[..., :8, :8] = 1
    assert torch.equal(target, expected)
    # exactly 0.5 counts as defect (official: values below 0.5 become 0)
    assert torch.equal(mask_target(torch.full((1, 1, 8, 8), 0.5), (2, 2)), torch.ones(1, 1, 2, 2))
    assert torch.equal(mask_target(torch.full((1, 1, 8, 8), 0.49), (2, 2)), torch.zeros(1, 1, 2, 2))
    # the size of the logits, whatever it is
    assert mask_target(torch.zeros(3, 1, 256, 256), torch.Size((64, 64))).shape == (3, 1, 64, 64)
