"""Compiled inference of an earlier commit's code against the working tree's, in one process.

This machine's speed drifts by a fifth within an hour, so two benchmark runs at
different times cannot show a change of a few percent. Here both versions are
compiled in one process, given the same weights, and their batches alternate:

    python benchmarks/compare_commits.py 63b5c23 --teacher efficientnet_lite0

The earlier code is checked out into a temporary git worktree and imported as
`pfadseg_base`. Prints each version's median ms per batch, quartiles, the
change, and the fraction of a bf16 conv peak timed between the batches.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from speed import PeakConv, build_model, count_flops

from pfadseg.inference import forward_fn, to_input
from pfadseg.memory import keep_large_tensors_in_heap
from pfadseg.models.teacher import RANDOM

ROOT = Path(__file__).resolve().parents[1]


def import_commit(rev: str, into: Path) -> None:
    """Import the pfadseg package as of `rev` under the name `pfadseg_base`."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), rev],
                   check=True, capture_output=True)
    init = into / "pfadseg" / "__init__.py"
    spec = importlib.util.spec_from_file_location("pfadseg_base", init,
                                                  submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["pfadseg_base"] = package
    spec.loader.exec_module(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="the earlier commit (anything git rev-parse takes)")
    parser.add_argument("--model", default="pfadseg", choices=["pfadseg", "destseg"])
    parser.add_argument("--teacher", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=12, help="timed batches of each version")
    args = parser.parse_args()
    keep_large_tensors_in_heap()

    current = build_model(args.model, args.teacher, args.size).eval()
    with torch.no_grad():
        gflop = count_flops(lambda: current(torch.rand(1, 3, args.size, args.size))) / 1e9 * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "base"
        try:
            import_commit(args.rev, worktree)
            models = importlib.import_module("pfadseg_base.models")
            inference = importlib.import_module("pfadseg_base.inference")
            cfg = models.ModelConfig.named(args.model, teacher=args.teacher, image_size=args.size)
            base = models.AnomalyModel.build(cfg, RANDOM)
            # same weights; an older teacher may hold layers the current one dropped
            missing, unexpected = base.load_state_dict(current.state_dict(), strict=False)
            if unexpected or any(not k.startswith("teacher.") for k in missing):
                raise SystemExit(f"the two versions' models differ: {missing[:3]} {unexpected[:3]}")
            versions = {args.rev: inference.forward_fn(base, compile=True),
                        "working tree": forward_fn(current, compile=True)}
            x = to_input(torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0)))
            first = None
            for name, fn in versions.items():
                start = time.perf_counter()
                seg = fn(x)[0]
                first = seg if first is None else first
                print(f"{name}: first batch (compiling) {time.perf_counter() - start:.1f} s, "
                      f"max |seg map difference| {(seg - first).abs().max().item():.1e}", flush=True)
            peak = PeakConv(batch=16)
            times: dict[str, list[float]] = {name: [] for name in versions}
            conv: list[float] = []
            for _ in range(args.iters):
                for name, fn in versions.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
                conv += [peak.seconds(), peak.seconds()]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    peak_gflop_s = peak.gflop_s(conv)
    base_ms = statistics.median(times[args.rev]) * 1000
    for name, seconds in times.items():
        q1, median, q3 = (v * 1000 for v in statistics.quantiles(seconds, n=4))
        print(f"{name:>14s}: {median:6.1f} ms per batch (quartiles {q1:.0f}-{q3:.0f}), "
              f"{median / base_ms - 1:+.1%}, {gflop / (median / 1000) / peak_gflop_s:.3f} of the peak")
    print(f"conv peak between batches: {peak_gflop_s:.0f} GFLOP/s; {gflop / args.batch:.2f} GFLOP per image "
          "(the working tree's FLOP count, for both)")


if __name__ == "__main__":
    main()
