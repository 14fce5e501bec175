"""Training and inference speed of DeSTSeg and PFADSeg on one device.

For each model at 256x256 and batch 16, in fp32 and in bf16 (autocast), it
measures images/s of a whole stage-1 and stage-2 training step
(`Trainer.train_step`: batch drawing, defect synthesis, forward, backward,
optimiser) and of inference (`inference.forward_fn`), with the paper preset's
compile settings (`--no-compile` for eager), the peak memory, and the minutes
the paper schedule (3000 + 4000 steps at batch 16) would take. Warm-up steps,
compilation included, are not timed. Random weights: speed does not depend on them.
`--profile N` also prints, per measured function, torch.profiler's N costliest
ops and how much of the wall time the GPU was busy (launch-bound when low).
Each images/s is also printed to stderr, one JSON line each, as soon as it is
measured; the JSON object on stdout comes also when an error or SIGTERM (a time
limit) ends the run, with what was measured by then.

    python benchmarks/speed.py --device cuda > speed.json
    python benchmarks/speed.py --device cuda --models pfadseg --precisions bf16 \
        --cuda-compile reduce-overhead --profile 25
    python benchmarks/speed.py --device cpu --quick --no-compile  # smoke check: 64x64, seconds
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pfadseg import __version__, runtime
from pfadseg.config import preset
from pfadseg.inference import forward_fn, to_input
from pfadseg.models import AnomalyModel, ModelConfig
from pfadseg.runtime import bf16_supported, resolve_device
from pfadseg.synthesis import DefectSynthesizer
from pfadseg.trainer import TrainData, Trainer

PAPER_STEPS = (3000, 4000)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], object], images: int, warmup: int, iters: int,
                      device: torch.device) -> float:
    """Images/s of `step` (which handles `images` images) over `iters` calls after `warmup`."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return images * iters / (time.perf_counter() - start)


def profile(step: Callable[[], object], label: str, rows: int, device: torch.device) -> None:
    """Print the `rows` ops of three calls of `step` that took longest (GPU time on a
    GPU, else CPU time) and the GPU's busy share of the wall time, to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    start = time.perf_counter()
    with profiler(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"--- {label}: {wall_us / 3e3:.1f} ms per call under the profiler", file=sys.stderr)
    if cuda:
        busy = sum(e.self_device_time_total for e in events) / wall_us
        print(f"GPU kernels busy {busy:.0%} of the wall time", file=sys.stderr)
    print(events.table(sort_by=sort, row_limit=rows), file=sys.stderr, flush=True)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, bf16: bool, args: argparse.Namespace, device: torch.device, figures: dict) -> None:
    """Stage-1, stage-2 and inference images/s of one model in one precision, put in
    `figures` and printed to stderr as one JSON line each as soon as measured (a run cut
    off by a time limit keeps them), then the peak memory and the paper schedule's minutes."""
    size, batch = args.image_size, args.batch_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8, generator=gen)
    data = TrainData(images, DefectSynthesizer(torch.rand(4, 3, size, size, generator=gen)), "none")
    torch.manual_seed(0)
    model = AnomalyModel.build(ModelConfig.named(variant, teacher=args.teacher, image_size=size), "random")
    compile = not args.no_compile
    # the paper's schedule at a tiny student rate: a random teacher at 0.5 can run to NaN, and speed
    # does not depend on the weights
    cfg = preset("paper", batch_size=batch, bf16=bf16, compile=compile, compile_stage1=compile, lr_student=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    precision = "bf16" if bf16 else "fp32"
    label = f"{variant} {precision}"

    def speed(step: Callable[[], object], what: str) -> float:
        rate = images_per_second(step, batch, args.warmup, args.iters, device)
        figures[what.replace(" ", "") + "_images_per_s"] = round(rate, 1)
        print(json.dumps({"model": variant, "precision": precision, "stage": what, "images_per_s": round(rate, 1),
                          "peak_memory_mib": round(peak_memory_mib(device))}), file=sys.stderr, flush=True)
        if args.profile:
            profile(step, f"{label} {what}", args.profile, device)
        return rate

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, data, Path(tmp), device)
        stage1 = speed(trainer.train_step, "stage 1")
        trainer.step = cfg.stage1_steps
        stage2 = speed(trainer.train_step, "stage 2")
    forward = forward_fn(model, bf16, compile)
    x = to_input(images[:batch], device)
    speed(lambda: forward(x), "inference")
    s1, s2 = PAPER_STEPS
    minutes = (s1 * batch / stage1 + s2 * batch / stage2) / 60
    figures.update(peak_memory_mib=round(peak_memory_mib(device)), paper_schedule_minutes=round(minutes, 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--models", default="destseg,pfadseg", help="comma-separated (default: %(default)s)")
    p.add_argument("--teacher", default="resnet18", help="teacher architecture (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=256, help="input size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compiling included "
                                                         "(default: %(default)s)")
    p.add_argument("--iters", type=int, default=20, help="timed steps (default: %(default)s)")
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="eager PyTorch instead of torch.compile")
    p.add_argument("--cuda-compile", choices=runtime.CUDA_COMPILE_MODES, default=runtime.CUDA_COMPILE,
                   help="how one CUDA GPU compiles: dynamo's cudagraphs backend or Inductor's "
                        "reduce-overhead mode (default: %(default)s)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N costliest ops of each measured function (default: off)")
    p.add_argument("--quick", action="store_true", help="smoke check: 64x64, batch 4, one step each")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.warmup, args.iters = 64, 4, 1, 1
    device = resolve_device(args.device)
    runtime.CUDA_COMPILE = args.cuda_compile
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "torch": torch.__version__, "pfadseg": __version__,
                    "image_size": args.image_size, "batch_size": args.batch_size, "compiled": not args.no_compile,
                    "cuda_compile": args.cuda_compile if device.type == "cuda" else None,
                    "teacher": args.teacher, "bf16_supported": bf16_supported(device), "models": {}}
    failed = False
    try:  # what was measured is printed also when a failure or SIGTERM (a time limit) ends the run
        for variant in args.models.split(","):
            for precision in args.precisions.split(","):
                figures = result["models"].setdefault(variant, {}).setdefault(precision, {})
                try:
                    measure(variant, precision == "bf16", args, device, figures)
                except Exception as exc:  # noqa: BLE001 - the other configurations are still measured
                    traceback.print_exc()
                    figures["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    failed = True
    finally:
        print(json.dumps(result, indent=2), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # timeout's signal
    sys.exit(main())
