"""Time every metric on a synthetic test set the size of MVTec AD bottle.

83 images, 63 of them anomalous with 1-3 elliptic blobs each, float32 maps
with (almost) all-distinct scores, which is the hardest case for the exact
metrics.  Prints wall time and extra peak memory (tracemalloc) per metric and
the process's peak resident memory; ``--json`` adds one JSON line.

    python benchmarks/metrics_speed.py --sizes 256 900 --json
"""
from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc
from typing import Callable

import numpy as np

from pfadseg import metrics

N_IMAGES, N_ANOMALOUS = 83, 63


def synthetic_set(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maps, masks, image scores and image labels of a bottle-sized test set."""
    rng = np.random.default_rng(seed)
    maps = rng.random((N_IMAGES, size, size), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    rows, cols = np.ogrid[:size, :size]
    for image in range(N_ANOMALOUS):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(0.03, 0.15, 2) * size
            masks[image] |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    maps[masks] += np.float32(0.6)  # anomalies score higher, with overlap
    scores = maps.max(axis=(1, 2))
    labels = masks.any(axis=(1, 2))
    return maps, masks, scores, labels


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and peak extra memory (MiB, tracemalloc) of one call."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (tracemalloc.get_traced_memory()[1] - base) / 2**20


def run(size: int, seed: int) -> dict[str, dict[str, float]]:
    """Timings and memory of each metric and of ``evaluate`` at one size."""
    maps, masks, scores, labels = synthetic_set(size, seed)
    calls: dict[str, Callable[[], object]] = {
        "image_auroc": lambda: metrics.image_auroc(scores, labels),
        "pixel_auroc": lambda: metrics.pixel_auroc(maps, masks),
        "pixel_ap": lambda: metrics.pixel_ap(maps, masks),
        "iap": lambda: metrics.iap(maps, masks),
        "aupro": lambda: metrics.aupro(maps, masks),
        "pixel_f1_max": lambda: metrics.f1_max(maps, masks),
        "evaluate": lambda: metrics.evaluate(maps, masks, scores, labels),
    }
    results = {}
    for name, fn in calls.items():
        seconds, peak_mib = measure(fn)
        results[name] = {"seconds": round(seconds, 3), "peak_extra_mib": round(peak_mib, 1)}
    results["data"] = {
        "pixels": int(maps.size),
        "anomalous_pixels": int(masks.sum()),
        "data_mib": round((maps.nbytes + masks.nbytes) / 2**20, 1),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 900])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()

    tracemalloc.start()
    report: dict[str, object] = {}
    for size in args.sizes:
        results = run(size, args.seed)
        report[f"{size}x{size}"] = results
        data = results["data"]
        print(f"{size}x{size}: {data['pixels']:,} pixels, {data['anomalous_pixels']:,} anomalous, "
              f"data {data['data_mib']} MiB")
        for name, row in results.items():
            if name != "data":
                print(f"  {name:<13} {row['seconds']:8.3f} s   peak extra {row['peak_extra_mib']:8.1f} MiB")
    tracemalloc.stop()
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report["max_rss_mib"] = round(max_rss_mib, 1)
    print(f"peak resident memory of the process: {max_rss_mib:.1f} MiB")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
