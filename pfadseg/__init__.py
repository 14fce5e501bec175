"""pfadseg: unsupervised anomaly detection and segmentation (PFADSeg and DeSTSeg)."""
__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str) -> object:
    """`from pfadseg import Detector` without importing torch for `import pfadseg` alone."""
    if name in ("Detector", "Prediction"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'pfadseg' has no attribute {name!r}")
