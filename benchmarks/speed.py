"""Training and inference speed of DeSTSeg / PFADSeg on the CPU, plain fp32 vs optimised.

For each model (256x256 input, EfficientNet-Lite0 teacher by default) it measures,
side by side in one run:

* training images/s of stage 1 and stage 2 at batch 16 (`Trainer.train_step` on
  in-memory images with the defect synthesiser, so data preparation is included)
  for three paths: plain fp32 (no bf16, no channels_last, no compile), the
  optimised path "opt" (bf16 autocast, channels_last, both stages compiled by
  Inductor, as the paper and official presets train; the cpu preset compiles
  stage 2 only) and "eager" (the same without torch.compile); each (model, path)
  runs in its own subprocess, whose ru_maxrss is the peak resident memory of
  training alone; warm-up steps (and compilation) are not timed;
* the same three trainers again, each in a process of its own, all alive at once
  and taking one step each in turn ("turns"): the training speed-ups
  (`train_speedup_stage1` etc.) divide these, taken over the same minutes; the
  solo processes' ratios are `*_solo`;
* inference ms/image at batch 1 and images/s at batch 16 (`pfadseg.inference`):
  plain fp32, "opt" (what `pfadseg test/predict` run by default: bf16 +
  channels_last) and "compiled" (`--compile`: Inductor, frozen weights; batch
  16 only; the compile time is reported apart), each model in its own subprocess;
* GFLOPs per image (FlopCounterMode: inference forward; stage-1/2 forward+backward;
  its formula for grouped conv backwards corrected, see `conv_backward_flops`)
  and the GFLOP/s reached, next to the GFLOP/s of a bf16 3x3 convolution
  (256 channels, 64x64, batch 16, channels_last, autocast): the practical peak.
  The fractions of it divide by the peak timed beside the work: two conv calls
  after every timed training step or inference batch of the bf16 paths, in the
  same process (`timed`; the median call sets the figure), because this
  machine's conv speed drifts by a third and more within minutes. The peak is
  also measured at the start of the run in the main process (the median of 20
  calls; `*_fraction_of_start_peak` divide by it) and at its end. Every process
  keeps large tensors in glibc's heap, as `pfadseg train/test/predict` do
  (`pfadseg.memory.keep_large_tensors_in_heap`; page faults slow that conv by
  about a third without it); `--default-allocator` measures without it.

    python benchmarks/speed.py                      # table
    python benchmarks/speed.py --json > benchmarks/results/speed.json
    python benchmarks/speed.py --quick              # smoke check: tiny sizes, 1 iteration
    python benchmarks/speed.py --profile            # + torch.profiler top ops, pfadseg stage 2

Random teacher weights (`--teacher resnet18`) are fine: speed does not depend on weights.
The full run (`--iters 5`) takes about 7-8 minutes per model on 2 idle cores (stage-2 training of
PFADSeg at 256x256 needs ~146 GFLOP per image); `--quick` runs at 64x64 and
says nothing about 256x256 speed, only that the script works. Run it on an
otherwise idle machine: the JSON records the load average and any `pfadseg
train` processes seen at the start.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from pfadseg.config import TrainConfig
from pfadseg.inference import bf16_supported, forward_fn, infer, run_batches
from pfadseg.memory import keep_large_tensors_in_heap
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.models.teacher import RANDOM, TeacherWeightsError
from pfadseg.synthesis import DefectSynthesizer, procedural_textures
from pfadseg.trainer import TrainData, Trainer, focal_loss, l1_loss, mask_target

# plain fp32; the optimised path of the paper/official presets (both stages compiled; the
# cpu preset compiles stage 2 only, so its stage 1 is "eager"); the same without torch.compile
MODES = {"fp32": dict(bf16=False, channels_last=False, compile=False, compile_stage1=False),
         "opt": dict(bf16=True, channels_last=True, compile=True, compile_stage1=True),
         "eager": dict(bf16=True, channels_last=True, compile=False, compile_stage1=False)}
# inference: `pfadseg test/predict` by default ("opt") and with --compile ("compiled")
INFER_MODES = {"fp32": dict(bf16=False, channels_last=False), "opt": dict(bf16=True, channels_last=True),
               "compiled": dict(bf16=True, channels_last=True, compile=True)}
GIB = 2**30


def rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def build_model(name: str, teacher: str, size: int) -> AnomalyModel:
    """Model with the teacher's real weights where available offline, else random."""
    torch.manual_seed(0)
    cfg = ModelConfig.named(name, teacher=teacher, image_size=size)
    if teacher == "resnet18":
        return AnomalyModel.build(cfg, RANDOM)
    try:
        return AnomalyModel.build(cfg)
    except TeacherWeightsError:
        return AnomalyModel.build(cfg, RANDOM)


def train_data(size: int, count: int = 32) -> TrainData:
    """Image-like uint8 images and a procedural texture bank, all in memory."""
    images = (procedural_textures(count, size, seed=1) * 255).round().to(torch.uint8)
    return TrainData(images, DefectSynthesizer(procedural_textures(8, size, seed=2)))


# --- training (runs in a child process) -------------------------------------------
def bench_trainer(args: argparse.Namespace, mode: str, out_dir: Path) -> Trainer:
    """A trainer of one path on the benchmark's in-memory data, never leaving stage 1
    until `warm_up` moves it on."""
    config = TrainConfig(batch_size=args.batch, stage1_steps=10**9, stage2_steps=1,
                         seed=0, **MODES[mode])
    return Trainer(build_model(args.models[0], args.teacher, args.size), config,
                   train_data(args.size), out_dir)


def warm_up(trainer: Trainer, stage: int) -> None:
    """Put the trainer in `stage` and take two untimed steps (they compile it)."""
    trainer.step = 0 if stage == 1 else trainer.config.stage1_steps
    for _ in range(2):
        assert trainer.train_step()["stage"] == stage


def train_child(args: argparse.Namespace) -> dict:
    """Images/s of both stages for one (model, mode); ru_maxrss of this process. The
    bf16 modes time the conv peak beside their steps (`timed`)."""
    mode = args.child
    beside = PeakConv(batch=args.conv_batch) if MODES[mode]["bf16"] else None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench_trainer(args, mode, Path(tmp))
        out: dict = {"bf16_active": trainer.use_bf16}
        for stage in (1, 2):
            warm_up(trainer, stage)
            seconds, peak = timed(trainer.train_step, args.iters, beside)
            if peak is not None:
                out[f"stage{stage}_peak_beside_gflop_s"] = peak
            out[f"stage{stage}_img_s"] = args.iters * args.batch / seconds
            out[f"stage{stage}_step_s"] = seconds / args.iters
        start = time.perf_counter()
        for _ in range(max(args.iters, 2)):
            trainer._batch()
        out["batch_prep_s"] = (time.perf_counter() - start) / max(args.iters, 2)
        if args.profile and mode == "opt":
            out["profile_stage2"] = profile_stage2(trainer, trainer.config)
    out["peak_rss_gib"] = rss_gib()
    return out


def stepper_child(args: argparse.Namespace) -> None:
    """One path's trainer, stepping when the parent says (`turns`): a line "warm S"
    on stdin puts it in stage S (`warm_up`) and is answered "ok"; a line "step"
    takes one timed step, answered with its seconds; end of input ends it."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench_trainer(args, args.child, Path(tmp))
        for line in sys.stdin:
            if line.startswith("warm"):
                warm_up(trainer, int(line.split()[1]))
                print("ok", flush=True)
            else:
                start = time.perf_counter()
                trainer.train_step()
                print(time.perf_counter() - start, flush=True)


def turns(args: argparse.Namespace, model: str) -> dict:
    """Images/s of both stages for the three paths, each in a process of its own, all
    alive at once and stepping one at a time in turn: the speed-ups divide figures
    taken over the same minutes. (Run minutes apart, the same compiled stage-1 step
    took 1.066 s in one process and 1.138 s in another; run in turn inside one
    process, the paths slowed each other: plain fp32 stage 1 took 2.28 s a step
    there against 1.95 s alone, while the bf16 paths kept their speed:
    benchmarks/results/speed_epyc_10e2fe8.json. In own processes, compiled stage 2
    still ran a quarter slower in turn than alone in one run, for no reason found:
    speed_pfadseg_epyc_41687a3.json. Read the `*_solo` ratios beside these.)"""
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        try:
            for mode in MODES:
                err = files.enter_context(open(Path(tmp) / f"{mode}.err", "w"))
                procs[mode] = subprocess.Popen(child_command(args, model, mode) + ["--_stepper"],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=err, text=True)

            def ask(mode: str, line: str) -> str:
                procs[mode].stdin.write(line + "\n")
                procs[mode].stdin.flush()
                answer = procs[mode].stdout.readline()
                if not answer:
                    log = (Path(tmp) / f"{mode}.err").read_text()[-3000:]
                    raise RuntimeError(f"stepper {model}/{mode} failed:\n{log}")
                return answer

            out: dict = {}
            for stage in (1, 2):
                for mode in MODES:
                    ask(mode, f"warm {stage}")
                seconds = dict.fromkeys(MODES, 0.0)
                for _ in range(args.iters):
                    for mode in MODES:
                        seconds[mode] += float(ask(mode, "step"))
                for mode in MODES:
                    out[f"stage{stage}_img_s_{mode}"] = args.iters * args.batch / seconds[mode]
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait()
    return out


def profile_stage2(trainer: Trainer, config: TrainConfig, steps: int = 2) -> list[dict]:
    """Top operators (self CPU time) of a few stage-2 training steps."""
    from torch.profiler import ProfilerActivity, profile

    trainer.step = config.stage1_steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
            for e in events[:15]]


def infer_child(args: argparse.Namespace) -> dict:
    """Parameters, GFLOPs per image and inference speed of one model, in a process of
    its own as `pfadseg test` runs. (When both models shared the main process,
    PFADSeg's compiled inference after DeSTSeg's ran at 20.3 images/s, against
    26.4 in a process of its own in a run minutes apart.)"""
    model = build_model(args.models[0], args.teacher, args.size)
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    out.update(model_flops(model, args.size))
    out.update(inference_speed(model, args.size, args.batch, args.iters, args.conv_batch))
    return out


def child_command(args: argparse.Namespace, model: str, mode: str) -> list[str]:
    """This script's command line for a child of one (model, mode)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode,
           "--models", model, "--teacher", args.teacher, "--size", str(args.size),
           "--batch", str(args.batch), "--iters", str(args.iters)]
    if args.profile:
        cmd.append("--profile")
    if args.default_allocator:
        cmd.append("--default-allocator")
    return cmd


def run_child(args: argparse.Namespace, model: str, mode: str) -> dict:
    """Run `train_child` (`infer_child` for mode "infer") in a fresh interpreter,
    so that its peak RSS is that work's alone and no other model shares its heap."""
    proc = subprocess.run(child_command(args, model, mode), capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"child {model}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- FLOPs -------------------------------------------------------------------------
def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """FLOPs of a conv's backward: each of the two gradients costs the forward's multiply-adds.

    torch's own formula counts the weight gradient of a grouped conv as if it
    were dense, `groups` times too many: 256x for RCM's depthwise convs, which
    added about 11 phantom GFLOP per image to PFADSeg's stage-2 count.
    """
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn) -> int:
    """Multiply-add FLOPs of `fn` (torch's counter, with grouped conv backwards fixed)."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(model: AnomalyModel, size: int, batch: int = 2) -> dict[str, float]:
    """GFLOPs per image: inference (batch-1 forward) and each training stage
    (forward + backward at `batch` >= 2, which BatchNorm on pooled maps needs;
    fp32; the optimiser's element-wise work is not counted)."""
    batch = max(batch, 2)
    model.to(memory_format=torch.contiguous_format).eval()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, 3, size, size, generator=gen)
    clean = torch.rand(batch, 3, size, size, generator=gen)
    aug = torch.rand(batch, 3, size, size, generator=gen)
    mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.9).float()

    def stage1() -> None:
        model.student.train()
        model.student_loss(clean, aug).backward()

    def stage2() -> None:
        model.student.eval()
        model.segmentation.train()
        logits = model.segmentation_logits(aug)
        target = mask_target(mask, logits.shape[-2:])
        (focal_loss(logits, target) + l1_loss(logits, target)).backward()

    with torch.no_grad():
        infer_flops = count_flops(lambda: model(x1))
    out = {"infer_gflop_per_img": infer_flops / 1e9,
           "train_stage1_gflop_per_img": count_flops(stage1) / batch / 1e9,
           "train_stage2_gflop_per_img": count_flops(stage2) / batch / 1e9}
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


class PeakConv:
    """The practical peak: a 3x3 conv, 256->256 channels, 64x64, channels_last, under
    bf16 autocast (or in fp32), timed one call at a time so that its calls can
    alternate with the work it is compared with. Its input is made afresh for each
    call (outside the timing), so it holds no memory between calls."""

    def __init__(self, bf16: bool = True, batch: int = 16) -> None:
        self.conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        self.bf16, self.batch = bf16, batch
        self.flops = 2 * batch * 256 * 64 * 64 * 256 * 9
        for _ in range(2):
            self.seconds()

    def seconds(self) -> float:
        """Seconds of one call."""
        x = torch.rand(self.batch, 256, 64, 64).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            start = time.perf_counter()
            self.conv(x)
            return time.perf_counter() - start

    def gflop_s(self, seconds: list[float]) -> float:
        """GFLOP/s of the median call, so one slow or fast call does not set it."""
        return self.flops / statistics.median(seconds) / 1e9


def conv_peak(calls: int, bf16: bool = True, batch: int = 16) -> float:
    """GFLOP/s of the peak conv: the median of `calls` calls in a row."""
    peak = PeakConv(bf16, batch)
    return peak.gflop_s([peak.seconds() for _ in range(calls)])


def timed(step: Callable[[], object], iters: int, peak: PeakConv | None) -> tuple[float, float | None]:
    """Seconds of `iters` calls of `step` in all and, given a `peak`, its GFLOP/s
    timed beside them: two conv calls after each step (after one untimed warm-up
    call, as `conv_peak` warms up), so that the two figures of a fraction are
    measured over the same minutes of a noisy machine (the conv peak moved between
    about 1500 and 2900 GFLOP/s here within an hour)."""
    total, conv = 0.0, []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        total += time.perf_counter() - start
        if peak is not None:
            peak.seconds()
            conv += [peak.seconds(), peak.seconds()]
    return total, peak.gflop_s(conv) if peak is not None else None


# --- inference ---------------------------------------------------------------------
def inference_speed(model: AnomalyModel, size: int, batch: int, iters: int,
                    conv_batch: int = 16) -> dict[str, float]:
    """ms/image at batch 1 and images/s at batch `batch`, plain fp32 and optimised;
    the bf16 paths' batches alternate with calls of the conv peak (`timed`)."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (batch * iters, 3, size, size), dtype=torch.uint8, generator=gen)
    chunks = images.split(batch)
    n1 = max(iters, 2)
    peak = PeakConv(batch=conv_batch)
    out: dict[str, float] = {}
    for mode, opts in INFER_MODES.items():
        if not opts["channels_last"]:
            model.to(memory_format=torch.contiguous_format)
        if opts.get("compile"):  # compile once, outside the timing; batch 1 is not compiled
            forward = forward_fn(model, compile=True)
            start = time.perf_counter()
            run_batches(forward, images[:batch], batch, pad=True)
            out["infer_compile_s"] = time.perf_counter() - start
            run = lambda imgs: run_batches(forward, imgs, batch, pad=True)  # noqa: E731
        else:
            infer(model, images[:batch], batch, **opts)  # warm-up (and layout conversion)
            start = time.perf_counter()
            infer(model, images[:n1], 1, **opts)
            out[f"infer_bs1_ms_{mode}"] = (time.perf_counter() - start) / n1 * 1000
            run = lambda imgs: infer(model, imgs, batch, **opts)  # noqa: E731
        batches = iter(chunks)
        seconds, beside = timed(lambda: run(next(batches)), len(chunks), peak if opts["bf16"] else None)
        if beside is not None:
            out[f"infer_peak_beside_gflop_s_{mode}"] = beside
        out[f"infer_bs{batch}_img_s_{mode}"] = len(images) / seconds
    return out


# --- the whole run -----------------------------------------------------------------
def bench_model(args: argparse.Namespace, name: str, peak: float) -> dict:
    b = args.batch
    res: dict = {"model": name, "teacher": args.teacher, "size": args.size, "batch": b}
    for mode in MODES:
        child = run_child(args, name, mode)
        for key, value in child.items():
            res[f"train_{key}_{mode}" if key != "profile_stage2" else key] = value
    for key, value in turns(args, name).items():
        res[f"train_{key}_turns"] = value
    res.update(run_child(args, name, "infer"))
    for stage in (1, 2):
        for path, suffix in (("opt", ""), ("eager", "_eager")):
            # headline: the paths' steps in turn, each in its own process; "_solo": each run alone
            res[f"train_speedup_stage{stage}{suffix}"] = (res[f"train_stage{stage}_img_s_{path}_turns"]
                                                          / res[f"train_stage{stage}_img_s_fp32_turns"])
            res[f"train_speedup_stage{stage}{suffix}_solo"] = (res[f"train_stage{stage}_img_s_{path}"]
                                                               / res[f"train_stage{stage}_img_s_fp32"])
        for mode in MODES:
            gflops = res[f"train_stage{stage}_gflop_per_img"] * res[f"train_stage{stage}_img_s_{mode}"]
            res[f"train_stage{stage}_gflop_s_{mode}"] = gflops
        gflops = res[f"train_stage{stage}_gflop_s_opt"]
        res[f"train_stage{stage}_fraction_of_peak"] = gflops / res[f"train_stage{stage}_peak_beside_gflop_s_opt"]
        res[f"train_stage{stage}_fraction_of_start_peak"] = gflops / peak
    res["infer_speedup_bs1"] = res["infer_bs1_ms_fp32"] / res["infer_bs1_ms_opt"]
    res[f"infer_speedup_bs{b}"] = res[f"infer_bs{b}_img_s_opt"] / res[f"infer_bs{b}_img_s_fp32"]
    res[f"infer_speedup_bs{b}_compiled"] = (res[f"infer_bs{b}_img_s_compiled"]
                                            / res[f"infer_bs{b}_img_s_fp32"])
    for mode in INFER_MODES:
        res[f"infer_bs{b}_gflop_s_{mode}"] = res["infer_gflop_per_img"] * res[f"infer_bs{b}_img_s_{mode}"]
    res["infer_fraction_of_peak"] = (res[f"infer_bs{b}_gflop_s_compiled"]
                                     / res["infer_peak_beside_gflop_s_compiled"])
    res["infer_fraction_of_peak_eager"] = res[f"infer_bs{b}_gflop_s_opt"] / res["infer_peak_beside_gflop_s_opt"]
    res["infer_fraction_of_start_peak"] = res[f"infer_bs{b}_gflop_s_compiled"] / peak
    res["peak_rss_train_gib"] = res["train_peak_rss_gib_opt"]
    res["peak_rss_train_fp32_gib"] = res["train_peak_rss_gib_fp32"]
    return res


def other_trainings() -> list[str]:
    """Command lines of `pfadseg train` processes running beside the benchmark."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "pfadseg train" in cmd:
                found.append(f"{pid}: {cmd.strip()[:120]}")
    return found


def print_table(result: dict) -> None:
    b = result["batch"]
    env = result["env"]
    print(f"CPU threads {env['threads']}, bf16 kernels {env['bf16_supported']}, "
          f"size {result['size']}, batch {b}, iters {result['iters']}, teacher {result['teacher']}")
    print(f"practical peak: bf16 3x3 conv {result['peak_conv_bf16_gflop_s']:.0f} GFLOP/s "
          f"({result['peak_conv_bf16_gflop_s_end']:.0f} at the end of the run; "
          f"fp32 {result['peak_conv_fp32_gflop_s']:.0f})")
    if env["other_trainings"]:
        print("NOTE: other training processes were running:", *env["other_trainings"], sep="\n  ")
    # columns: plain fp32, bf16 + channels_last eager, the same compiled (Inductor);
    # training's default is compiled ("opt"), inference's is eager ("opt", --compile: "compiled")
    rows = [
        ("train stage 1 img/s", "train_stage1_img_s_fp32", "train_stage1_img_s_eager", "train_stage1_img_s_opt"),
        ("train stage 2 img/s", "train_stage2_img_s_fp32", "train_stage2_img_s_eager", "train_stage2_img_s_opt"),
        ("stage 1 in turn, img/s", "train_stage1_img_s_fp32_turns", "train_stage1_img_s_eager_turns",
         "train_stage1_img_s_opt_turns"),
        ("stage 2 in turn, img/s", "train_stage2_img_s_fp32_turns", "train_stage2_img_s_eager_turns",
         "train_stage2_img_s_opt_turns"),
        ("infer bs1 ms/img", "infer_bs1_ms_fp32", "infer_bs1_ms_opt", None),
        (f"infer bs{b} img/s", f"infer_bs{b}_img_s_fp32", f"infer_bs{b}_img_s_opt", f"infer_bs{b}_img_s_compiled"),
        ("train stage 1 GFLOP/s", "train_stage1_gflop_s_fp32", "train_stage1_gflop_s_eager", "train_stage1_gflop_s_opt"),
        ("train stage 2 GFLOP/s", "train_stage2_gflop_s_fp32", "train_stage2_gflop_s_eager", "train_stage2_gflop_s_opt"),
        (f"infer bs{b} GFLOP/s", f"infer_bs{b}_gflop_s_fp32", f"infer_bs{b}_gflop_s_opt", f"infer_bs{b}_gflop_s_compiled"),
        ("train peak RSS GiB", "train_peak_rss_gib_fp32", "train_peak_rss_gib_eager", "train_peak_rss_gib_opt"),
    ]
    for name, res in result["models"].items():
        print(f"\n{name}: {res['params_m']:.1f} M params; GFLOP/img: infer {res['infer_gflop_per_img']:.2f}, "
              f"train stage 1 {res['train_stage1_gflop_per_img']:.2f}, "
              f"stage 2 {res['train_stage2_gflop_per_img']:.2f}; "
              f"batch prep {res['train_batch_prep_s_opt'] * 1000:.0f} ms; "
              f"inference compile {res['infer_compile_s']:.0f} s")
        print(f"  {'':24s}{'fp32':>10s}{'bf16 eager':>12s}{'compiled':>10s}")
        for label, k32, keager, kcomp in rows:
            comp = f"{res[kcomp]:10.2f}" if kcomp else f"{'-':>10s}"
            print(f"  {label:24s}{res[k32]:10.2f}{res[keager]:12.2f}{comp}")
        print(f"  speed-up over fp32 (training: steps in turn): train stage 1 {res['train_speedup_stage1']:.2f}x "
              f"(eager {res['train_speedup_stage1_eager']:.2f}x), "
              f"stage 2 {res['train_speedup_stage2']:.2f}x (eager {res['train_speedup_stage2_eager']:.2f}x); "
              f"infer bs{b} {res[f'infer_speedup_bs{b}']:.2f}x "
              f"(compiled {res[f'infer_speedup_bs{b}_compiled']:.2f}x)")
        print(f"  training speed-up, each path in its own process: stage 1 "
              f"{res['train_speedup_stage1_solo']:.2f}x (eager {res['train_speedup_stage1_eager_solo']:.2f}x), "
              f"stage 2 {res['train_speedup_stage2_solo']:.2f}x (eager {res['train_speedup_stage2_eager_solo']:.2f}x)")
        print(f"  fraction of the bf16 conv peak timed beside it: infer bs{b} compiled "
              f"{res['infer_fraction_of_peak']:.1%} of {res['infer_peak_beside_gflop_s_compiled']:.0f} GFLOP/s "
              f"(eager {res['infer_fraction_of_peak_eager']:.1%}), "
              f"train stage 1 {res['train_stage1_fraction_of_peak']:.1%} "
              f"of {res['train_stage1_peak_beside_gflop_s_opt']:.0f}, "
              f"stage 2 {res['train_stage2_fraction_of_peak']:.1%} "
              f"of {res['train_stage2_peak_beside_gflop_s_opt']:.0f}")
        print(f"  against the run's start peak: infer {res['infer_fraction_of_start_peak']:.1%}, "
              f"stage 2 {res['train_stage2_fraction_of_start_peak']:.1%}")
        for op in res.get("profile_stage2", []):
            print(f"    {op['op'][:40]:40s} {op['self_ms_per_step']:9.1f} ms/step {op['share']:6.1%}")
    print(f"\npeak RSS of this process (inference, FLOP counting): {result['peak_rss_process_gib']:.2f} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--models", nargs="+", default=["destseg", "pfadseg"],
                        choices=["destseg", "pfadseg"])
    parser.add_argument("--teacher", default="efficientnet_lite0",
                        choices=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--iters", type=int, help="timed steps/batches (default 3; --quick 1)")
    parser.add_argument("--size", type=int, help="input size (default 256; --quick 64)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--quick", action="store_true", help="smoke check: tiny sizes, 1 iteration")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler top ops of optimised stage-2 training steps")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (the CLI keeps large tensors in its heap)")
    parser.add_argument("--_child", dest="child", choices=[*MODES, "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--_stepper", dest="stepper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.iters = args.iters or (1 if args.quick else 3)
    args.size = args.size or (64 if args.quick else 256)
    args.conv_batch = 2 if args.quick else 16  # the peak conv's batch

    heap = not args.default_allocator and keep_large_tensors_in_heap()  # as the CLI does
    if args.stepper:
        stepper_child(args)
        return 0
    if args.child:
        print(json.dumps((infer_child if args.child == "infer" else train_child)(args)))
        return 0

    start = time.perf_counter()
    peak = conv_peak(20, batch=args.conv_batch)
    result: dict = {
        "size": args.size, "batch": args.batch, "iters": args.iters, "teacher": args.teacher,
        "quick": args.quick, "peak_conv_bf16_gflop_s": peak,
        "peak_conv_fp32_gflop_s": conv_peak(10, bf16=False, batch=args.conv_batch),
        "env": {"threads": torch.get_num_threads(), "bf16_supported": bf16_supported(),
                "torch": torch.__version__, "python": platform.python_version(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "large_tensors_in_heap": heap,
                "loadavg_start": os.getloadavg(), "other_trainings": other_trainings()},
        "models": {},
    }
    for name in args.models:
        result["models"][name] = bench_model(args, name, peak)
    main_model = result["models"].get("pfadseg") or result["models"][args.models[-1]]
    b = args.batch
    for key in ("train_speedup_stage1", "train_speedup_stage2", "train_speedup_stage1_eager",
                "train_speedup_stage1_solo", "train_speedup_stage2_solo", f"infer_speedup_bs{b}",
                f"infer_speedup_bs{b}_compiled", "infer_fraction_of_peak",
                "infer_fraction_of_peak_eager", "infer_fraction_of_start_peak",
                "train_stage2_fraction_of_peak", "train_stage2_fraction_of_start_peak", "peak_rss_train_gib"):
        result[key] = main_model[key]
    # the same peak again after the models: how far the machine drifted during the run
    result["peak_conv_bf16_gflop_s_end"] = conv_peak(20, batch=args.conv_batch)
    result["peak_rss_process_gib"] = rss_gib()
    result["env"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
