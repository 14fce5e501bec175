"""One self-contained HTML file per run: metrics, curves, score histogram and a
gallery of every image, for a person deciding whether to trust a model.

Everything is embedded (PNG/JPEG as base64 data URIs), so the file can be
mailed or archived alone. Plots are drawn by matplotlib on its Agg canvas
(`matplotlib.figure.Figure` with `FigureCanvasAgg`): it renders PNGs without a
display or GUI toolkit, and without pyplot's global state. Gallery thumbnails
are at most `THUMB` pixels a side and drawn with PIL, so a report of a few
hundred images takes seconds and a few megabytes.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .calibration import Thresholds
from .data import TestSet
from .evaluation import TestOutputs, threshold_warning
from .files import write_text
from .metrics import average_precision
from .visualize import colorize, outline

THUMB = 192  # longest side of a gallery thumbnail, in pixels
MAX_CURVE_POINTS = 2000  # points drawn per curve (pixel curves have millions of thresholds)
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP",
                "iap": "IAP", "iap90": "IAP@90", "aupro": "AUPRO"}
GT_COLOUR = (0, 230, 0)  # ground-truth outline


# --- images as data URIs -------------------------------------------------------------
def _data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=85)
    else:
        img.save(buf, format="PNG", optimize=False)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _figure_uri(fig: Figure) -> str:
    """A matplotlib Figure rendered to a PNG data URI by the Agg canvas."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, THUMB / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))  # PIL order (w, h)


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized (area-averaged when shrinking) to PIL size (w, h)."""
    if values.shape[::-1] == size:
        return values.astype(np.float32, copy=False)
    img = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.BOX if size[0] < values.shape[1] else Image.BILINEAR))


def _fixed(value: float, threshold: float, digits: int) -> str:
    """`value` with `digits` decimals, or as many more (up to 8) as tell it apart from
    `threshold`: a score just over the threshold must not print as the threshold."""
    while digits < 8 and value != threshold and f"{value:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}"


def _paint(rgb: np.ndarray, edge: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = rgb.copy()
    out[edge] = colour
    return out


# --- the gallery ---------------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    group: str
    score: float
    norm: float
    flagged: bool
    label: int | None
    panels: list[tuple[str, str]]  # (heading, data URI)

    @property
    def error(self) -> float:
        """How wrong the verdict is, 0..1 (above 0.5: wrong); without a label, how
        anomalous the image looks, so the likeliest defects come first."""
        if self.label is None:
            return self.norm
        return 1.0 - self.norm if self.label else self.norm

    @property
    def verdict(self) -> str:
        if self.label is None:
            return "anomalous" if self.flagged else "ok"
        if bool(self.label) == self.flagged:
            return "correct: " + ("defect found" if self.flagged else "ok")
        return "WRONG: false alarm" if self.flagged else "WRONG: defect missed"


def _panel(name: str, heading: str, uri: str) -> str:
    alt = html.escape(f"{name}: {heading}")
    if heading != "anomaly map":
        return f'<td><img src="{uri}" alt="{alt}"></td>'
    return (f'<td><div class="heat"><img src="{uri}" alt="{alt}"><span class="bar"></span>'
            '<span class="ticks"><b>1</b><b title="the pixel threshold">0.5</b><b>0</b></span></div></td>')


@dataclass
class Gallery:
    """Thumbnails of images, their ground truth, anomaly maps and predicted masks,
    added one at a time (a caller can stream images) and written as HTML sorted
    worst error first (without labels: most anomalous first)."""

    thresholds: Thresholds
    entries: list[_Entry] = field(default_factory=list)

    def add(self, name: str, image: np.ndarray, amap: np.ndarray, score: float,
            mask: np.ndarray | None = None, label: int | None = None, group: str = "") -> None:
        """One image: uint8 RGB (H, W, 3), its raw anomaly map (any size), raw
        image score, and when known its ground-truth mask (bool, the map's size)
        and label (1 = defective)."""
        size = _thumb_size(*image.shape[:2])
        rgb = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        heat = self.thresholds.normalize_map(_resize_map(amap, size))
        predicted = _resize_map((amap >= self.thresholds.pixel).astype(np.float32), size) >= 0.5
        shown = np.where(predicted[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
        panels = [("input", _data_uri(Image.fromarray(rgb)))]
        if mask is not None:
            edge = outline(_resize_map(mask.astype(np.float32), size) >= 0.5, width=2)
            panels.append(("ground truth", _data_uri(Image.fromarray(_paint(rgb, edge, GT_COLOUR)))))
            shown = _paint(shown, edge, GT_COLOUR)
        panels += [("anomaly map", _data_uri(Image.fromarray(colorize(heat)))),
                   ("predicted mask", _data_uri(Image.fromarray(shown), "PNG"))]
        self.entries.append(_Entry(name, group, float(score),
                                   float(self.thresholds.normalize_image(float(score))),
                                   bool(score >= self.thresholds.image), label, panels))

    def html(self) -> str:
        """The gallery's section: one row per image, worst first."""
        if not self.entries:
            return "<p>No images.</p>"
        with_truth = any(len(e.panels) == 4 for e in self.entries)
        labelled = any(e.label is not None for e in self.entries)
        t = self.thresholds
        rows = []
        for e in sorted(self.entries, key=lambda e: -e.error):
            # the row is tinted where the verdict is wrong, or, without labels, where it flags
            alarm = e.verdict.startswith("WRONG") if labelled else e.flagged
            group = f"<br>{html.escape(e.group)}" if e.group else ""
            rows.append(
                f'<tr class="{"alarm" if alarm else ""}"><td class="cap"><b>{html.escape(e.name)}</b>'
                f"{group}<br>score {_fixed(e.score, t.image, 4)}<br>normalised {_fixed(e.norm, 0.5, 3)}"
                f'<br><span class="verdict {"bad" if e.flagged else "good"}">{html.escape(e.verdict)}'
                "</span></td>" + "".join(_panel(e.name, h, uri) for h, uri in e.panels) + "</tr>")
        heads = ["image", "input"] + (["ground truth (green)"] if with_truth else []) + [
            "anomaly map", "predicted mask" + (" (truth outlined)" if with_truth else "")]
        head = "".join(f"<th scope='col'>{h}</th>" for h in heads)
        return (f"<p>Anomaly maps are normalised so that the pixel threshold ({t.pixel:.4f} raw) "
                "is 0.5 on the colour bar; the predicted mask is the map at or above it. "
                f"Image verdicts: raw score at or above the image threshold ({t.image:.4f}, "
                f"normalised 0.5). {'Worst errors first.' if labelled else 'Most anomalous first.'}"
                f'</p><div class="scroll"><table class="gallery"><tr>{head}</tr>{"".join(rows)}</table></div>')


def _colour_bar_uri() -> str:
    """The heat colour map as a vertical strip, 1 at the top."""
    values = np.linspace(1.0, 0.0, THUMB)[:, None].repeat(12, axis=1)
    return _data_uri(Image.fromarray(colorize(values)), "PNG")


# --- plots -----------------------------------------------------------------------------
def curve_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall points of "score >= t" over every
    distinct threshold, thinned to at most MAX_CURVE_POINTS (the first and last kept)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    if last.size > MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, last.size - 1, MAX_CURVE_POINTS).round().astype(int))
        tp, fp = tp[keep], fp[keep]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return {"fpr": np.r_[0.0, fp / n_neg], "tpr": np.r_[0.0, tp / n_pos],
            "recall": tp / n_pos, "precision": tp / np.maximum(tp + fp, 1)}


def _curves_figure(curves: list[tuple[str, str, dict, float]]) -> str:
    """Side-by-side panels: (title, kind "roc"/"pr", points, area) each."""
    fig = Figure(figsize=(4.2 * len(curves), 3.8), dpi=90, layout="constrained")
    for ax, (title, kind, pts, area) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves):
        if kind == "roc":
            ax.plot(pts["fpr"], pts["tpr"], lw=1.8)
            ax.plot([0, 1], [0, 1], ls=":", c="grey")
            ax.set(xlabel="false-positive rate", ylabel="true-positive rate")
        else:
            ax.plot(pts["recall"], pts["precision"], lw=1.8)
            ax.set(xlabel="recall", ylabel="precision")
        ax.set(title=f"{title}\narea {area:.3f}", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    return _figure_uri(fig)


def _histogram_figure(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> str:
    """Image scores of good and defective images, with the threshold as a line."""
    fig = Figure(figsize=(7.5, 3.4), dpi=90, layout="constrained")
    ax = fig.subplots()
    edges = np.histogram_bin_edges(np.r_[scores, threshold if threshold is not None else []], 40)
    # blue and orange (told apart with any colour vision), outlined where they overlap
    ax.hist(scores[labels == 0], bins=edges, alpha=0.5, color="tab:blue", label="good")
    ax.hist(scores[labels == 1], bins=edges, alpha=0.5, color="tab:orange", label="defective")
    ax.hist(scores[labels == 0], bins=edges, histtype="step", color="tab:blue")
    ax.hist(scores[labels == 1], bins=edges, histtype="step", color="tab:orange")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4f}")
    ax.set(xlabel="image score (raw)", ylabel="images", title="image scores")
    ax.legend()
    return _figure_uri(fig)


# --- the pages -------------------------------------------------------------------------
_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}
.scroll{overflow-x:auto}
img.plot{max-width:100%;height:auto}
.gallery th{text-align:center}
.gallery td{text-align:center;vertical-align:top;padding:2px}
.gallery td.cap{text-align:left;font-size:85%;min-width:11em}
tr.alarm td.cap{background:#fde2e2}
.verdict{font-weight:bold}
.verdict.bad{color:#b00020}
.verdict.good{color:#1a7f37}
.heat{display:inline-flex;align-items:stretch;gap:2px}
.bar{width:12px;background-image:url(COLOURBAR);background-size:100% 100%}
.ticks{display:flex;flex-direction:column;justify-content:space-between;font-size:70%}
.note{background:#fff6d5;padding:.5em;border-left:4px solid #e0b000}
table.cal td{text-align:left}
</style>"""


def _page(title: str, body: str) -> str:
    style = _STYLE.replace("COLOURBAR", _colour_bar_uri())
    # a file name that is not UTF-8 (surrogates in Python) shows as U+FFFD, the page stays UTF-8
    body = body.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"{style}</head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _pct(value: float | None) -> str:
    return "&ndash;" if value is None else f"{100 * value:.1f}"


def _metrics_table(rows: list[tuple[str, dict, dict]], keys: Sequence[str]) -> str:
    """One row per (name, segmentation metrics, DeST metrics); both maps per metric."""
    head = "".join(f"<th colspan=2>{METRIC_NAMES[k]}</th>" for k in keys)
    sub = "<th>seg</th><th>DeST</th>" * len(keys)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{_pct(seg.get(k))}</td><td>{_pct(dest.get(k))}</td>" for k in keys)
        + "</tr>" for name, seg, dest in rows)
    return (f"<div class='scroll'><table><tr><th rowspan=2></th>{head}</tr><tr>{sub}</tr>{body}</table>"
            "</div><p>seg: the segmentation net's map (the model's output); DeST: the "
            "teacher-student difference map, DeSTSeg's first stage, for comparison.</p>")


def _how_found(t: Thresholds) -> str:
    """One sentence on where the checkpoint's thresholds come from."""
    if t.method == "false_alarm":
        text = (f"set to flag {_pct(t.false_alarm_rate)}% of good images and "
                f"{_pct(t.pixel_false_alarm_rate)}% of good pixels (target rates), from the scores "
                f"of {t.n_good} {t.source or 'good images'}")
    elif t.method == "f1":
        text = f"best F1 on {t.n_defects} labelled defect and {t.n_good} good images ({t.source})"
    elif t.method == "given":  # what calibration measured was at another image threshold
        return "an image threshold given by hand (--threshold); the pixel threshold the checkpoint's"
    else:
        text = "one threshold from before calibration, for images and pixels alike"
    if t.defect_recall is not None:
        kind = "synthetic" if t.method == "false_alarm" else "labelled"
        text += (f"; on {t.n_defects} {kind} defects it flags {_pct(t.defect_recall)}% of "
                 f"the images, pixel F1 {_pct(t.defect_pixel_f1)}%")
    return html.escape(text)


def _calibrated_html(result: dict, thresholds: Thresholds) -> str:
    cal = result["calibrated"]
    rows = [("image threshold (raw)", f"{cal['image_threshold']:.4f}"),
            ("pixel threshold (raw)", f"{cal['pixel_threshold']:.4f}"),
            ("found by", _how_found(thresholds)),
            ("image F1 at the checkpoint's threshold / best possible",
             f"{_pct(cal['image_f1'])}% / {_pct(result.get('image_f1_max'))}%"),
            ("good images flagged", str(cal["good_flagged"])),
            ("defective images missed", str(cal["defects_missed"]))]
    if "pixel_f1" in cal:
        rows.append(("pixel F1 at the checkpoint's threshold / best possible",
                     f"{_pct(cal['pixel_f1'])}% / {_pct(result.get('pixel_f1_max'))}%"))
    body = "".join(f"<tr><th scope='row'>{a}</th><td>{b}</td></tr>" for a, b in rows)
    warning = threshold_warning(result)
    note = f"<p class='note'>{html.escape(warning[0].upper() + warning[1:])}</p>" if warning else ""
    return f"<h2>Thresholds of the checkpoint</h2>{note}<div class='scroll'><table class='cal'>{body}</table></div>"


def write_test_report(path: Path, test: TestSet, outputs: TestOutputs, result: dict,
                      thresholds: Thresholds | None) -> Path:
    """report.html of `pfadseg test`: metrics per defect type for both maps, image ROC
    and PR curves, the pixel PR curve, the score histogram and the gallery."""
    has_masks = test.masks is not None
    calibrated = _calibrated_html(result, thresholds) if thresholds is not None else (
        "<p class='note'>The checkpoint stores no threshold: the gallery uses this test "
        "set's own F1-max thresholds.</p>")
    if thresholds is None:  # show the test set's own best thresholds instead
        thresholds = Thresholds(result["image_threshold"],
                                result.get("pixel_threshold", result["image_threshold"]),
                                "test-set F1-max")
    keys = [k for k in METRIC_NAMES if k in result]
    rows = [("all", result, result["dest"])] + [
        (d, result["per_defect"][d], result["per_defect_dest"][d]) for d in result["per_defect"]]
    parts = [f"<p>{result['n_images']} images ({result['n_anomalous']} defective), "
             f"model {html.escape(str(result.get('variant')))} with "
             f"{html.escape(str(result.get('teacher')))} teacher. Metrics in percent; each defect "
             "type is scored together with all good images.</p>"]
    if not has_masks:
        parts.append("<p class='note'>No ground-truth masks were given: only image-level "
                     "metrics are computed (pixel AUROC, pixel AP, IAP, IAP@90 and AUPRO need "
                     "masks; pass --mask-dir).</p>")
    parts += ["<h2>Metrics</h2>", _metrics_table(rows, keys), calibrated]
    labels = test.labels
    image_pts = curve_points(outputs.scores, labels)
    curves = [("image ROC", "roc", image_pts, result["image_auroc"]),
              ("image precision-recall", "pr", image_pts, average_precision(outputs.scores, labels))]
    if has_masks:
        curves.append(("pixel precision-recall", "pr", curve_points(outputs.seg, test.masks),
                       result["pixel_ap"]))
    histogram = _histogram_figure(outputs.scores, labels, thresholds.image)
    areas = ", ".join(f"{title} area {area:.3f}" for title, _, _, area in curves)
    parts += ["<h2>Curves (image scores and segmentation map)</h2>",
              f'<img class="plot" src="{_curves_figure(curves)}" alt="curves: {areas}">',
              "<h2>Image scores</h2>",
              f'<img class="plot" src="{histogram}" alt="histogram of the image scores of good and '
              'defective images, with the threshold">']
    gallery = Gallery(thresholds)
    for i, name in enumerate(_shown_names(test.paths)):
        image = test.images[i].permute(1, 2, 0).numpy()
        gallery.add(name, image, outputs.seg[i], float(outputs.scores[i]),
                    test.masks[i] if has_masks else None, int(labels[i]), test.defects[i])
    parts += [f"<h2>Gallery ({len(test.paths)} images)</h2>", gallery.html()]
    title = f"pfadseg test: {result.get('category', '')}"
    path = Path(path)
    write_text(path, _page(title, "".join(parts)))
    return path


def _shown_names(paths: Sequence[Path]) -> list[str]:
    """Each image's path below the folder common to all (its name when there is one image)."""
    if len(paths) < 2:
        return [Path(p).name for p in paths]
    root = Path(os.path.commonpath([str(Path(p).absolute()) for p in paths]))
    return [Path(p).absolute().relative_to(root).as_posix() for p in paths]


def write_gallery_page(path: Path, gallery: Gallery, skipped: Sequence[str] = ()) -> Path:
    """A page holding only `gallery` (see `Gallery.add`), after a list of the
    files that could not be scored (`skipped`: their errors, each naming its file)."""
    flagged = sum(e.flagged for e in gallery.entries)
    t = gallery.thresholds
    body = (f"<p>{len(gallery.entries)} images, {flagged} anomalous at the image threshold "
            f"{t.image:.4f} ({_how_found(t)}).</p>")
    if skipped:  # each error names its file
        body += (f"<p>{len(skipped)} file(s) could not be read and are not shown:</p><ul>"
                 + "".join(f"<li>{html.escape(error)}</li>" for error in skipped) + "</ul>")
    body += gallery.html()
    path = Path(path)
    write_text(path, _page("pfadseg predict", body))
    return path
