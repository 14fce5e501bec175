"""pfadseg: unsupervised anomaly detection and segmentation (PFADSeg and DeSTSeg)."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them on use
    from .detector import Detector, Prediction

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]
JOB_ENV = "PFADSEG_BENCHMARK_JOB"  # set by `pfadseg benchmark` for the subprocesses it starts


def heed_interrupts() -> None:
    """In a `benchmark` job, restore Ctrl-C's handler at once: a shell starts background
    jobs with SIGINT ignored, and the benchmark passes its interrupts on as SIGINT."""
    import os
    import signal

    if os.environ.get(JOB_ENV):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def __getattr__(name: str) -> object:
    """`from pfadseg import Detector` without importing torch for `import pfadseg` alone."""
    if name in ("Detector", "Prediction"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'pfadseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
