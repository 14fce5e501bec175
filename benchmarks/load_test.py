"""Load test of `pfadseg serve` on localhost: many requests from concurrent clients.

    python benchmarks/load_test.py --checkpoint run/checkpoint.safetensors \
        [--requests 200] [--concurrency 8] [--images DIR_OR_FILES ...]

Starts `pfadseg serve` on a free localhost port (or tests a running one given
with --url), scores each image once alone for its reference score, then sends
--requests POSTs to /predict, one image each (the images in turn), from
--concurrency client threads at once. Every answer must be a 200 with the
image's own name and reference score. Prints the latency percentiles, the
throughput and the server's peak resident memory (Linux), and exits 1 if any
answer was wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from pfadseg.demo import demo_root
from pfadseg.predict import collect_inputs

SCORE_TOLERANCE = 1e-3  # in a batch with other images, or alone: the same score up to bf16 rounding


@contextlib.contextmanager
def running_server(checkpoint: Path, args: tuple[str, ...] = (),
                   timeout: float = 180.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pfadseg serve` in a child process on a free localhost port (--port 0, the
    port the server printed: no other process can take it in between); yields
    (base URL, process) once /health answers, and stops it afterwards. Its log goes
    to a temporary file whose tail is in the error when it fails to start."""
    cmd = [sys.executable, "-m", "pfadseg", "serve", "--checkpoint", str(checkpoint),
           "--port", "0", *args]
    token = args[args.index("--token") + 1] if "--token" in args else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with tempfile.NamedTemporaryFile() as log:  # read by name: the child's offset stays its own
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                printed = Path(log.name).read_text(errors="replace")
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`{' '.join(cmd)}` did not come up "
                                       f"(exit code {proc.poll()}):\n{printed[-3000:]}")
                page = re.search(r"page at (http://127\.0\.0\.1:\d+)/", printed)
                with contextlib.suppress(httpx.HTTPError):
                    if page and httpx.get(f"{page[1]}/health", headers=headers, timeout=2,
                                          trust_env=False).status_code == 200:  # no HTTP_PROXY for localhost
                        url = page[1]
                        break
                time.sleep(0.2)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of a live process in MiB (Linux /proc), else None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _post(client: httpx.Client, url: str, image: Path) -> tuple[float, dict | str]:
    """One /predict call: (seconds, the JSON body, or a description of what went wrong)."""
    start = time.perf_counter()
    try:
        response = client.post(f"{url}/predict", files=[("file", (image.name, image.read_bytes()))])
    except httpx.HTTPError as exc:
        return time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        return elapsed, f"HTTP {response.status_code}: {response.text[:200]}"
    return elapsed, response.json()


def run_load(url: str, images: list[Path], requests: int, concurrency: int,
             token: str | None = None) -> dict:
    """Send `requests` single-image POSTs from `concurrency` threads; check each
    answer against the image's score alone. Returns counts, errors and latencies."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    local = urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")  # never through HTTP_PROXY
    with httpx.Client(headers=headers, timeout=120, limits=limits, trust_env=not local) as client:
        reference = {}
        for image in images:
            _, body = _post(client, url, image)
            if isinstance(body, str):
                raise RuntimeError(f"reference request for {image} failed: {body}")
            reference[image.name] = body["results"][0]["score"]
        jobs = [images[i % len(images)] for i in range(requests)]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(lambda image: _post(client, url, image), jobs))
        wall = time.perf_counter() - start
    errors = []
    for image, (_, body) in zip(jobs, answers):
        if isinstance(body, str):
            errors.append(f"{image.name}: {body}")
            continue
        results = body.get("results", [])
        if len(results) != 1 or results[0].get("name") != image.name:
            errors.append(f"{image.name}: answered {[r.get('name') for r in results]}")
        elif abs(results[0]["score"] - reference[image.name]) > SCORE_TOLERANCE:
            errors.append(f"{image.name}: score {results[0]['score']} against "
                          f"{reference[image.name]} alone")
    latencies = sorted(seconds * 1000 for seconds, _ in answers)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": requests, "concurrency": concurrency, "correct": requests - len(errors),
            "errors": errors, "p50_ms": quantiles[49], "p95_ms": quantiles[94],
            "max_ms": latencies[-1], "requests_per_s": requests / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model to serve (not needed with --url)")
    parser.add_argument("--url", help="test this running server instead of starting one")
    parser.add_argument("--token", help="the server's --token")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=Path, nargs="+",
                        default=[demo_root() / "bottle" / "test"],
                        help="image files or folders (default: the bundled bottle test images)")
    parser.add_argument("--device", default="auto", help="the server's --device (default: auto)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.checkpoint is None):
        parser.error("give --checkpoint (start a server) or --url (use a running one)")
    images = collect_inputs(args.images)
    if args.url:
        stats = run_load(args.url.rstrip("/"), images, args.requests, args.concurrency, args.token)
    else:
        extra = ("--device", args.device) + (("--token", args.token) if args.token else ())
        with running_server(args.checkpoint, extra) as (url, proc):
            stats = run_load(url, images, args.requests, args.concurrency, args.token)
            stats["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
    print(f"{stats['correct']}/{stats['requests']} answered correctly from {stats['concurrency']} "
          f"concurrent clients in {stats['wall_s']:.1f} s ({stats['requests_per_s']:.1f} requests/s)")
    print(f"latency p50 {stats['p50_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} ms, "
          f"max {stats['max_ms']:.0f} ms")
    if stats.get("server_peak_rss_mb") is not None:
        print(f"server peak memory {stats['server_peak_rss_mb']:.0f} MiB")
    for error in stats["errors"][:10]:
        print(f"wrong: {error}")
    if args.json:
        args.json.write_text(json.dumps(stats, indent=2))
    return 0 if not stats["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
