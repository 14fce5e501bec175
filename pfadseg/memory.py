"""glibc allocator settings: large CPU tensors reuse heap memory instead of
page-faulting fresh maps on every use."""
from __future__ import annotations

import ctypes
import gc
import sys

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def keep_large_tensors_in_heap() -> bool:
    """Serve tensors up to 1 GiB from glibc's heap instead of fresh mmaps.

    glibc maps every block of 32 MiB or more (a bf16 batch of 16 at 256
    channels and 64x64 is exactly that) straight from the kernel and unmaps it
    on free, so each such tensor page-faults its memory in again: about 150 ms
    per 64 MiB tensor in the stage-2 step measured here. With this setting a
    bf16 3x3 convolution of that size ran at about 2500 instead of 1550
    GFLOP/s, and a PFADSeg stage-2 step at batch 16 took 2.2 instead of 3.0 s.
    One arena (the default gives each thread its own) keeps the heap compact:
    the same run's peak RSS was 3.9 GiB, against 4.1 with per-thread arenas.
    Process-wide, so the library itself never calls it: the CLI does. Returns
    whether the setting took (False off glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    # and keep up to 1 GiB of freed memory rather than trimming the heap's top
    return all(libc.mallopt(param, value) for param, value in
               ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_ARENA_MAX, 1)))


def release_free_memory() -> None:
    """Collect Python's garbage and give the heap's free memory back to the system
    (glibc's malloc_trim; off glibc only the first): between training stages, so
    that stage 2 does not grow on top of what stage 1 freed, and after stage 2's
    first step, whose compiling leaves freed blocks all through the heap. The
    latter took a PFADSeg run's peak RSS at batch 16 from 4.45 to 3.25 GiB."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
