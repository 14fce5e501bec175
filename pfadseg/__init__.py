"""pfadseg: unsupervised anomaly detection and segmentation (PFADSeg and DeSTSeg)."""
__version__ = "0.1.0"
