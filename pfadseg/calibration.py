"""Decision thresholds found without test labels, and scores normalised to them.

A model outputs probabilities: the segmentation map is a sigmoid and the image
score the mean of its top pixels, both in [0, 1]. `calibrate` picks an image
threshold (verdict: score >= image) and a pixel threshold (mask: map >= pixel)
from defect-free images the model never trained on (at the end of training, a
held-out tenth of the good images):

- image threshold: a false-alarm rate of 1% on new good images, from a normal
  fit to their log-odds and its prediction bound (tens of images cannot show a 1% tail).
- pixel threshold: a false-alarm rate of 0.1% on the good images' pixels.

Why false-alarm rates and not F1 on the run's synthetic defects: the real
defects of a product are unknown at training time, and the synthetic ones are
a different, louder population (texture pasted at up to full opacity), so a
threshold tuned to them sits too high for real defects. The good images are
the one population a held-out split really samples. The synthetic
defects still serve as a check that needs no labels: the fraction of them each
threshold catches is stored beside the thresholds.

With the user's own labelled defects (`defect_images`, `defect_masks`), both
thresholds maximise F1 on them instead (method "f1").

`Thresholds.normalize_*` map raw values to [0, 1] with the threshold at 0.5 by
comparing odds: n = sigmoid(logit(raw) - logit(threshold)). Raw values are
probabilities, so log-odds are their natural linear scale; no spread is fitted,
so a few held-out images cannot mis-scale it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from scipy import special, stats

from . import checkpoint as ckpt
from . import metrics
from .inference import infer
from .models import AnomalyModel
from .synthesis import DefectSynthesizer

DEFAULT_FALSE_ALARM_RATE = 0.01  # of good images flagged by the image threshold
DEFAULT_PIXEL_FALSE_ALARM_RATE = 0.001  # of good pixels inside the predicted mask
CALIBRATED_SUFFIX = ".calibrated.safetensors"  # `pfadseg calibrate`'s copy: <name>.calibrated.safetensors
FEW_GOOD_IMAGES = 20  # fewer give rough thresholds (a normal fitted to few scores; F1 on few)
HELD_OUT_FRACTION = 0.1  # of the good training images, kept for calibration
MIN_HELD_OUT, MAX_HELD_OUT = 4, 30  # fewer than 2 * MIN_HELD_OUT images: none held out
SYNTHETIC_COPIES = 2  # synthetic defects drawn per held-out good image
_EPS = 1e-6  # probabilities are clipped to [_EPS, 1 - _EPS] before taking log-odds


class CalibrationError(ValueError):
    """Calibration cannot run on what it was given; the message says what to fix."""


def _logit(p: np.ndarray | float) -> np.ndarray:
    """Log-odds of probabilities clipped to [_EPS, 1 - _EPS] (0 and 1 stay finite)."""
    return special.logit(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS))


def _normalize(raw: np.ndarray | float, threshold: float) -> np.ndarray | float:
    """Odds of `raw` relative to the threshold's, as a probability: monotonic,
    in [0, 1], 0.5 exactly at the threshold. Keeps scalars scalar and float32 float32."""
    arr = np.asarray(raw)
    out = special.expit(_logit(arr) - _logit(threshold))
    if arr.ndim == 0:
        return float(out)
    return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64)


RENAMED = {"synthetic_recall": "defect_recall", "synthetic_pixel_f1": "defect_pixel_f1"}  # older checkpoints


@dataclass(frozen=True)
class Thresholds:
    """An image and a pixel threshold on raw model outputs, and how they were found.

    `method` is "false_alarm" (rates on good images: training's default), "f1"
    (F1-max on labelled defects), "given" (an image threshold set by hand, e.g.
    `--threshold`) or "legacy" (a checkpoint from before calibration, whose one
    threshold served for both).
    """

    image: float
    pixel: float
    method: str
    false_alarm_rate: float | None = None  # of good images, for the image threshold
    pixel_false_alarm_rate: float | None = None  # of good pixels, for the pixel threshold
    n_good: int = 0
    n_defects: int = 0
    source: str = ""  # what the good images were, e.g. "held-out good images"
    # what the thresholds do on the defects calibration saw (synthetic ones for "false_alarm",
    # the labelled ones for "f1"): defect images flagged at `image`, pixel F1 at `pixel`
    defect_recall: float | None = None
    defect_pixel_f1: float | None = None

    def __post_init__(self) -> None:
        for name in ("image", "pixel"):
            value = getattr(self, name)
            try:
                number = float(value)  # numpy scalars become plain floats (JSON-ready)
            except (TypeError, ValueError):
                number = float("nan")
            if not np.isfinite(number):
                raise CalibrationError(f"{name} threshold {value!r} is not a finite number")
            object.__setattr__(self, name, number)

    def normalize_image(self, score: np.ndarray | float) -> np.ndarray | float:
        """Image score(s) -> [0, 1], 0.5 at the image threshold (>= 0.5: anomalous)."""
        return _normalize(score, self.image)

    def normalize_map(self, amap: np.ndarray | float) -> np.ndarray | float:
        """Anomaly map(s) -> [0, 1], 0.5 at the pixel threshold (>= 0.5: in the mask)."""
        return _normalize(amap, self.pixel)

    def to_meta(self) -> dict:
        """JSON-ready fields for a checkpoint's metadata ("threshold" stays the image one)."""
        return {"threshold": self.image, "thresholds": {**asdict(self), "normalization": "odds"}}

    @classmethod
    def from_meta(cls, meta: dict) -> Thresholds:
        """From a checkpoint's metadata; a checkpoint from before calibration has only
        `threshold`, which then serves for pixels too (as `predict` used it)."""
        saved = meta.get("thresholds")
        if isinstance(saved, dict):
            known = {f.name for f in fields(cls)}
            saved = {RENAMED.get(k, k): v for k, v in saved.items()}
            try:
                return cls(**{k: v for k, v in saved.items() if k in known})
            except (TypeError, ValueError) as exc:
                raise CalibrationError(f"damaged thresholds in the checkpoint metadata ({exc}). "
                                       "Fix: run `pfadseg calibrate` on it.") from exc
        if meta.get("threshold") is None:
            raise CalibrationError("the checkpoint stores no threshold. Fix: run `pfadseg "
                                   "calibrate --checkpoint C --good DIR` on it (predict and serve "
                                   "also take --threshold; Python: threshold=).")
        value = float(meta["threshold"])
        return cls(image=value, pixel=value, method="legacy")


def held_out_count(n: int) -> int:
    """How many of n good images are held out for the thresholds: about
    HELD_OUT_FRACTION, at least MIN_HELD_OUT and at most MAX_HELD_OUT; none when
    fewer than 2 * MIN_HELD_OUT images (then calibrate on the training ones)."""
    return 0 if n < 2 * MIN_HELD_OUT else min(MAX_HELD_OUT, max(MIN_HELD_OUT, round(HELD_OUT_FRACTION * n)))


def held_out_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) indices of n good images, `held_out_count(n)` of them
    held out, drawn with `seed`."""
    k = held_out_count(n)
    if k == 0:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[k:].sort().values, order[:k].sort().values


def false_alarm_threshold(good_scores: np.ndarray, rate: float) -> float:
    """Image threshold that flags a fraction `rate` of defect-free images.

    The log-odds of good scores are taken as normal, and the threshold is the
    upper prediction bound for a new image: mean + t(n-1, 1 - rate) * s * sqrt(1 + 1/n)
    (Student's t, as the mean and spread are estimated from the n images). With
    the few held-out images there are (4 to 30), the normal quantile of the
    estimates flagged about 6% at n = 4 for a rate of 1%; an empirical quantile
    would just be the highest image, the noise of a single one.
    """
    if not 0.0 < rate < 1.0:
        raise CalibrationError(f"false-alarm rate must be in (0, 1), got {rate}")
    z = _logit(np.asarray(good_scores, dtype=np.float64).ravel())
    if z.size == 0:
        raise CalibrationError("no good image to calibrate on")
    if z.size == 1:  # no spread to estimate: just above it (warned about by the callers)
        return float(special.expit(z[0] + stats.norm.ppf(1.0 - rate) * 1e-3))
    n, spread = z.size, max(float(z.std(ddof=1)), 1e-3)
    bound = stats.t.ppf(1.0 - rate, n - 1) * spread * np.sqrt(1.0 + 1.0 / n)
    return float(special.expit(z.mean() + bound))


def pixel_false_alarm_threshold(good_maps: np.ndarray, rate: float) -> float:
    """Pixel threshold above which a fraction `rate` of defect-free pixels lie
    (empirical: good images give hundreds of thousands of pixels)."""
    if not 0.0 < rate < 1.0:
        raise CalibrationError(f"false-alarm rate must be in (0, 1), got {rate}")
    return float(np.quantile(np.asarray(good_maps, dtype=np.float64), 1.0 - rate))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The F1-maximising threshold of "score >= t". When a whole range of
    thresholds reaches the best F1 (classes apart), the log-odds midpoint of
    that range: a margin on both sides instead of touching the lowest positive."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _, top = metrics.f1_max(scores, labels)
    below = scores[scores < top]
    if below.size == 0:
        return top
    # Every threshold in (highest score under top, top] gives the same counts.
    return float(special.expit(0.5 * (_logit(top) + _logit(below.max()))))


def calibrate_outputs(good_scores: np.ndarray, good_maps: np.ndarray,
                      defect_scores: np.ndarray | None = None, defect_maps: np.ndarray | None = None,
                      defect_masks: np.ndarray | None = None, *, synthetic: bool = True,
                      false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                      pixel_false_alarm_rate: float = DEFAULT_PIXEL_FALSE_ALARM_RATE) -> Thresholds:
    """Thresholds from model outputs already computed (see the module docstring).

    Real labelled defects (`synthetic=False`): both thresholds at F1-max on them.
    Otherwise both come from the false-alarm rates on the good images, and
    synthetic defects, when given, are only measured against them.
    """
    good_scores = np.asarray(good_scores, dtype=np.float64).ravel()
    good_maps = np.asarray(good_maps, dtype=np.float32)
    n_good = int(good_scores.size)
    if defect_maps is not None:
        if defect_masks is None or defect_scores is None:
            raise CalibrationError("defect maps need their masks and scores")
        defect_masks = np.asarray(defect_masks).astype(bool)
        if not defect_masks.any():
            raise CalibrationError("the defect masks are all empty: no defect pixel to calibrate "
                                   "on. Fix: give the masks of the defect images (defect pixels "
                                   "non-zero), or leave out --defects and --masks to check the "
                                   "thresholds on synthetic defects.")
        defect_scores = np.asarray(defect_scores, dtype=np.float64).ravel()
        maps = np.concatenate([good_maps, np.asarray(defect_maps, dtype=np.float32)])
        masks = np.concatenate([np.zeros(good_maps.shape, dtype=bool), defect_masks])
    if defect_maps is not None and not synthetic:
        scores = np.concatenate([good_scores, defect_scores])
        labels = np.concatenate([np.zeros(n_good, dtype=bool), np.ones(len(defect_scores), dtype=bool)])
        thresholds = Thresholds(f1_threshold(scores, labels), f1_threshold(maps, masks), "f1",
                                n_good=n_good)
    else:
        thresholds = Thresholds(false_alarm_threshold(good_scores, false_alarm_rate),
                                pixel_false_alarm_threshold(good_maps, pixel_false_alarm_rate),
                                "false_alarm", false_alarm_rate, pixel_false_alarm_rate, n_good)
    if defect_maps is None:
        return thresholds
    predicted = maps >= thresholds.pixel
    hits = int(np.count_nonzero(predicted & masks))
    return replace(thresholds, n_defects=len(defect_scores),
                   defect_recall=float(np.mean(defect_scores >= thresholds.image)),
                   defect_pixel_f1=2 * hits / (np.count_nonzero(predicted) + np.count_nonzero(masks)))


def synthetic_defects(good_images: torch.Tensor, synthesizer: DefectSynthesizer,
                      seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """SYNTHETIC_COPIES synthetic defects on each good image: uint8 images (M, 3, S, S) and
    bool masks (M, S, S). Draws without a defect (the synthesiser leaves some
    images clean) are left out; the draws depend only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    clean = good_images.float().div(255.0)
    images, masks = [], []
    for _ in range(SYNTHETIC_COPIES):
        augmented, mask = synthesizer(clean, generator)
        keep = mask.flatten(1).amax(dim=1) > 0
        images.append(augmented[keep].mul(255.0).round_().clamp_(0, 255).to(torch.uint8))
        masks.append(mask[keep, 0] > 0.5)
    return torch.cat(images), torch.cat(masks).numpy()


def calibrate(model: AnomalyModel, good_images: torch.Tensor,
              synthesizer: DefectSynthesizer | None, seed: int, *,
              defect_images: torch.Tensor | None = None, defect_masks: np.ndarray | None = None,
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
              pixel_false_alarm_rate: float = DEFAULT_PIXEL_FALSE_ALARM_RATE,
              batch_size: int = 16, bf16: bool = True,
              source: str = "good images given to calibrate()") -> Thresholds:
    """Thresholds for `model` from defect-free uint8 images (N, 3, S, S) it never trained on
    (`source` says what they are, for the checkpoint's metadata).

    With real `defect_images` and their bool `defect_masks` (N, S, S), both
    thresholds maximise F1 on them. Otherwise both come from the false-alarm
    rates on the good images, and `synthesizer` (seeded by `seed`; may be None)
    draws SYNTHETIC_COPIES defects per good image to measure what they catch. The model
    runs through `pfadseg.inference.infer`, on whatever device its parameters are on.
    """
    if len(good_images) == 0:
        raise CalibrationError("no good image to calibrate on")
    good_maps, _, good_scores = infer(model, good_images, batch_size, bf16=bf16)
    synthetic = defect_images is None
    defect_maps = defect_scores = None
    if defect_images is not None:
        if defect_masks is None or len(defect_masks) != len(defect_images):
            raise CalibrationError("every defect image needs its mask")
    elif synthesizer is not None:
        defect_images, defect_masks = synthetic_defects(good_images, synthesizer, seed)
        if len(defect_images) == 0:
            raise CalibrationError("the synthesiser drew no defect on the good images")
    if defect_images is not None:
        defect_maps, _, defect_scores = infer(model, defect_images, batch_size, bf16=bf16)
    thresholds = calibrate_outputs(good_scores, good_maps, defect_scores, defect_maps, defect_masks,
                                   synthetic=synthetic, false_alarm_rate=false_alarm_rate,
                                   pixel_false_alarm_rate=pixel_false_alarm_rate)
    return replace(thresholds, source=source)


def check_calibrated_path(source: Path, out: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """The calibrated copy never replaces its original, nor another model or file: an
    existing `out` is replaced only when it holds the same weights (an earlier
    calibration of the same model, such as `source` itself when it is a
    *.calibrated.safetensors copy). Checked before any work; `tensors` are the
    source's, when already read."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve() and not source.name.endswith(CALIBRATED_SUFFIX):
        raise CalibrationError(f"{out}: is the checkpoint being calibrated. Fix: choose another "
                               "--out; the original stays as it is.")
    if out.exists() and not _same_weights(out, ckpt.read(source)[0] if tensors is None else tensors):
        raise CalibrationError(f"{out} exists and is not a calibrated copy of {source} (another "
                               f"model or another file); it is left as it is. Fix: choose another "
                               f"--out, or delete {out} first.")


def _same_weights(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the file at `path` is a checkpoint holding exactly `tensors`."""
    try:
        theirs, _ = ckpt.read(path)
    except ckpt.CheckpointError:
        return False
    return theirs.keys() == tensors.keys() and all(torch.equal(theirs[k], v) for k, v in tensors.items())


def write_calibrated_checkpoint(source: Path, out: Path, thresholds: Thresholds) -> Path:
    """A copy of checkpoint `source` at `out` with `thresholds` in its metadata
    (weights and everything else unchanged). `source` is rewritten only when it is
    itself a calibrated copy and `out` (see `check_calibrated_path`)."""
    source, out = Path(source), Path(out)
    tensors, meta = ckpt.read(source)
    check_calibrated_path(source, out, tensors)
    meta.update(thresholds.to_meta())
    ckpt.atomic_save(tensors, meta, out)
    return out
