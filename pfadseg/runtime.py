"""Where and how a model runs: device, precision, memory layout, compilation and
CPU memory settings. Every device-specific choice lives here; the models under
`pfadseg.models` are plain torch and run anywhere."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)
Fn = TypeVar("Fn", bound=Callable)
DEVICE_HELP = ("where to run: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps "
               "(default: %(default)s)")


# --- device ---------------------------------------------------------------------
def device_name(name: str | torch.device | None) -> str:
    """A --device value as written ("CPU ", None, torch.device) in its plain form: cpu, auto, cuda:1."""
    return str(name) if isinstance(name, torch.device) else (name or "auto").strip().lower()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for a --device value; a clear error when it is not there."""
    name = device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__}, "
                             "CUDA build: " + str(torch.version.cuda) + "). Fix: use --device cpu, or "
                             "install a CUDA build of torch on a machine with an NVIDIA GPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def device_of(module: nn.Module) -> torch.device:
    """The device a module's parameters live on."""
    return next(module.parameters()).device


# --- precision and layout ---------------------------------------------------------
def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: CUDA GPUs with bf16 units, CPUs
    with native bf16 instructions (AVX512-BF16 or AMX). oneDNN also runs bf16 on
    other AVX-512 CPUs, by emulation: a 3x3 conv then took 3-4x as long as in
    fp32 (Xeon without AVX512-BF16, one thread), so those train in fp32."""
    if device.type == "cuda":  # Ampere (8.x) and later; is_bf16_supported() counts emulation
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type == "cpu":
        native = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(check is not None and check() for check in native)
    return False


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` when enabled and supported there, else a no-op."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_supported(device)):
        yield


def channels_last(device: torch.device) -> bool:
    """NHWC activations: what oneDNN (CPU) and cuDNN's bf16 kernels run fastest."""
    return device.type in ("cpu", "cuda")


def fused_sgd(device: torch.device) -> bool:
    """Whether SGD takes its fused kernel (one launch for all parameters): CPU and CUDA only."""
    return device.type in ("cpu", "cuda")


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device` in the memory layout that runs fastest there; on
    CUDA, cuDNN times its convolution algorithms once per shape (the shapes are fixed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if channels_last(device):
        model.to(memory_format=torch.channels_last)
    return model


# --- compilation -------------------------------------------------------------------
# How one CUDA GPU compiles: "cudagraphs" (dynamo's backend: the traced ops replayed as
# a CUDA graph, compiled in seconds) or "reduce-overhead" (Inductor's fused kernels
# replayed as CUDA graphs, minutes of compiling). `benchmarks/speed.py --cuda-compile`
# measures both; once they are measured on a GPU, the faster one is to stay alone.
CUDA_COMPILE = "cudagraphs"
CUDA_COMPILE_MODES = ("cudagraphs", "reduce-overhead")


def missing_compiler(device: torch.device, backend: str = "inductor") -> str | None:
    """What compiling with `backend` lacks on `device`, or None: Inductor writes C++ on
    the CPU (a compiler must be found) and Triton kernels on CUDA; dynamo's cudagraphs
    backend only records CUDA graphs and needs neither."""
    if backend == "cudagraphs":
        return None
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    if device.type != "cpu":
        return f"torch.compile is not supported on {device.type}"
    default = "cl" if sys.platform == "win32" else "clang++" if sys.platform == "darwin" else "g++"
    cxx = os.environ.get("CXX", default)
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) found"


def compiled(fn: Fn, device: torch.device, frozen: bool = False) -> Fn:
    """`fn` compiled by torch.compile for fixed input shapes.

    On one CUDA GPU the step is replayed as a CUDA graph (`CUDA_COMPILE` says
    whether Inductor fuses its kernels first): PFADSeg's many small ops are
    otherwise bound by launch time. Under torchrun Inductor compiles without
    CUDA graphs, which DDP's gradient hooks would break. Call `step_begin` once
    per training step or inference batch. On the CPU Inductor compiles, and
    `frozen` treats the weights as constants (batch norm folded into the
    convolutions, oneDNN weights packed once): only for weights that no longer
    change. Without a compiler, or where compiling fails at the first call, `fn`
    runs eagerly, with a warning. The one process-wide change: the logger
    torch.utils.cpp_extension is set to errors only.
    """
    graphs = device.type == "cuda" and not (torch.distributed.is_initialized()
                                            and torch.distributed.get_world_size() > 1)
    backend = CUDA_COMPILE if graphs else "inductor"
    missing = missing_compiler(device, backend)
    if missing:
        log.warning("torch.compile cannot run on %s here (%s): running eagerly", device, missing)
        return fn
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" noise
    from torch._inductor import config as inductor_config

    if backend == "reduce-overhead":
        compiled_fn = torch.compile(fn, dynamic=False, mode="reduce-overhead")
    else:
        compiled_fn = torch.compile(fn, dynamic=False, backend=backend)
    patch = {"freezing": frozen} if device.type == "cpu" else {}
    state = {"fn": compiled_fn, "first": True}

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        if not state["first"]:
            with inductor_config.patch(patch):
                return state["fn"](*args, **kwargs)
        state["first"] = False
        try:  # Inductor compiles at the first call: freezing must be on then
            with inductor_config.patch(patch):
                return compiled_fn(*args, **kwargs)
        except Exception as exc:  # a torch/compiler bug must not cost the run
            log.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            state["fn"] = fn
            return fn(*args, **kwargs)
    return run  # type: ignore[return-value]


def step_begin(device: torch.device) -> None:
    """Mark a new training step or inference batch: CUDA graphs may then reuse the
    memory of the previous one's outputs."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


# --- CPU-only workarounds and memory settings -----------------------------------------
class _Fp32Conv2d(nn.Conv2d):
    """An nn.Conv2d that runs in fp32 under bf16 autocast (same weights and values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def bf16_weight_grad_is_wrong(conv: nn.Conv2d) -> bool:
    """Whether oneDNN's bf16 channels-last weight gradient can be wrong for this conv.

    With torch 2.14.1 on an AVX512-BF16 CPU without AMX (AMD EPYC), the weight
    gradient of a dilated 3x3 conv under bf16 autocast, channels-last, came out
    as NaN, inf or 25-80% off (once a crash) for input channel counts from 20 to
    124 that are not multiples of 16, dilations 2 and 3, maps of 30x30 and up.
    It was right in fp32, undilated, and for 3-16 channels or multiples of 16.
    The EfficientNet-Lite0 teacher's 24 and 40 channels put such convs in
    PFADSeg's student decoder.
    """
    c = conv.in_channels
    return conv.dilation[0] > 1 and c > 16 and c % 16 != 0


def cpu_training_fixes(model: nn.Module, device: torch.device, bf16: bool) -> None:
    """Run the convs that `bf16_weight_grad_is_wrong` flags in fp32 when training
    on the CPU in bf16 (a few small convs; no change on other devices)."""
    if device.type != "cpu" or not bf16:
        return
    for m in model.modules():
        if type(m) is nn.Conv2d and bf16_weight_grad_is_wrong(m):
            m.__class__ = _Fp32Conv2d


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def cpu_heap_settings(device: torch.device) -> bool:
    """On Linux/glibc, for CPU runs: keep tensors up to 1 GiB in the heap instead
    of fresh mmaps, which page-fault their memory in again on every use (a bf16
    PFADSeg stage-2 step at batch 16 took 2.2 instead of 3.0 s). Process-wide, so
    only the CLI calls it. Returns whether the setting took."""
    libc = _libc() if device.type == "cpu" else None
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # malloc.h
    return all(libc.mallopt(param, value) for param, value in
               ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30), (m_arena_max, 1)))


def release_free_memory(device: torch.device) -> None:
    """Give memory freed between training stages back (glibc heap, CUDA cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "cpu" and (libc := _libc()) is not None:
        libc.malloc_trim(0)
