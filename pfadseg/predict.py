"""`pfadseg predict`: scores, anomaly maps, overlays and masks for new images, written to a folder."""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from .data import PREDICT_OUTPUTS, DataError, list_images, load_rgb
from .files import replacing, write_text
from .visualize import mask_image

if TYPE_CHECKING:  # detector imports this module (MapFn)
    from .detector import Detector

log = logging.getLogger(__name__)
MapFn = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]  # uint8 batch -> (maps, scores)
SUMMARY_FIELDS = ["image", "name", "score", "normalized_score", "anomalous", "threshold",
                  "defect_area", "error"]
MAX_NAME_BYTES = 200  # a file system's name limit is 255 bytes
PER_IMAGE = (*PREDICT_OUTPUTS, "_map.npy")  # all predict_files writes per input


def collect_inputs(inputs: list[Path], skip: Path | None = None) -> list[Path]:
    """Files as given plus the images of given folders (recursively), in order,
    each file once (a file also inside a given folder is not scored twice). The
    overlays and masks `predict_files` wrote, under the folder `skip` (--out) or
    beside an earlier run's summary.csv (see `list_images`), are left out of
    folders: a rerun with its output inside an input folder would score them too."""
    paths: list[Path] = []
    skip = skip.resolve() if skip is not None else None

    def ours(path: Path) -> bool:
        return (path.name.endswith(PREDICT_OUTPUTS) and skip is not None
                and path.resolve().is_relative_to(skip))

    for item in map(Path, inputs):
        if item.is_dir():
            listed = list_images(item, recursive=True)
            found = [p for p in listed if not ours(p)]
            if len(found) < len(listed):
                log.info("%s: leaving out %d overlays and masks that predict wrote", item,
                         len(listed) - len(found))
            if not found:
                raise DataError(f"{item}: folder holds no images")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    first: dict[Path, Path] = {}
    for path in paths:
        first.setdefault(path.resolve(), path)
    if len(first) < len(paths):
        log.info("%d input(s) given more than once, each scored once", len(paths) - len(first))
    return list(first.values())


def output_names(paths: list[Path]) -> list[str]:
    """A unique output stem per input: the file's stem, or <folder>_<stem> for
    stems that occur more than once (good/000.png, crack/000.png), numbered if needed."""
    counts = Counter(p.stem for p in paths)
    names, used = [], set()
    for p in paths:
        name = p.stem if counts[p.stem] == 1 else f"{p.parent.name}_{p.stem}"
        while len(os.fsencode(name)) > MAX_NAME_BYTES:  # room for "_overlay.png" within 255 bytes
            name = name[:-1]
        base, i = name, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        names.append(name)
    return names


def predict_files(detector: Detector, paths: list[Path], out_dir: Path, batch_size: int = 8,
                  skip_bad: bool = False, progress: bool = True) -> list[dict]:
    """Write <name>_overlay.png, <name>_mask.png and <name>_map.npy per image and
    summary.csv / summary.json; return the summary rows. An unreadable file
    stops the run with its name, unless `skip_bad` (then its row holds the error);
    the summary and report.html (every image, most anomalous first) are written
    for the images done before it, as they are when the run is interrupted (none
    when no image was done)."""
    from .html_report import Gallery, write_gallery_page  # here: it imports inference, which imports this

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = dict(zip(paths, output_names(paths)))
    rows: list[dict] = []
    gallery = Gallery(detector.thresholds)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            batch, images, done, failure = [], [], {}, None
            for path in chunk:
                try:
                    images.append(load_rgb(path, None))
                    batch.append(path)
                except DataError as exc:
                    if not skip_bad:  # the images read before it are still scored
                        failure = exc
                        break
                    log.warning("skipped: %s", exc)
                    done[path] = {"image": str(path), "error": str(exc)}
            for path, p in zip(batch, detector.predict(images, batch_size, [names[q] for q in batch])):
                gallery.add(p.name, p.image, p.anomaly_map, p.score)
                mask = p.mask_at(p.output_size())
                # whole or not at all, as the summary: an interrupt leaves no truncated image.
                # The map first: an overlay or mask beside its map is known as ours (data.list_images)
                # also where a hard kill left no summary.csv
                with replacing(out_dir / f"{p.name}_map.npy") as tmp, open(tmp, "wb") as fh:
                    np.save(fh, p.anomaly_map)
                with replacing(out_dir / f"{p.name}_overlay.png") as tmp:
                    p.overlay().save(tmp, "PNG", compress_level=1)  # much faster than the default 6, a bit larger
                with replacing(out_dir / f"{p.name}_mask.png") as tmp:
                    mask_image(mask).save(tmp, "PNG")
                done[path] = {"image": str(path), "name": p.name, "score": p.score,
                              "normalized_score": p.normalized_score, "anomalous": p.anomalous,
                              "threshold": detector.thresholds.image,
                              "defect_area": float(mask.mean())}
            rows.extend(done[path] for path in chunk if path in done)  # in the inputs' order
            if failure is not None:
                if rows:
                    raise DataError(f"{failure} The {len(rows)} image(s) scored before it are in "
                                    f"{out_dir / 'summary.csv'}; to go on past unreadable files, "
                                    "rerun with --skip-bad-images --overwrite.") from failure
                raise DataError(f"{failure} No image was scored; to go on past unreadable files, "
                                "rerun with --skip-bad-images.") from failure
            bar.update(len(chunk))
    finally:
        bar.close()
        if rows:  # else stopped before its first image: an earlier run's files stay as they were
            write_gallery_page(out_dir / "report.html", gallery,
                               [row["error"] for row in rows if "error" in row])
            write_text(out_dir / "summary.json", json.dumps(rows, indent=2))
            with replacing(out_dir / "summary.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                                 errors="surrogateescape") as fh:
                writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            _warn_of_older_files(out_dir, {row["name"] for row in rows if "name" in row})
    return rows


def _warn_of_older_files(out_dir: Path, names: set[str]) -> None:
    """Per-image files in --out that the summary does not list: an earlier run's that
    this one did not overwrite (--overwrite), or an image's first files when it was
    interrupted (never deleted: they may be someone's results); say so."""
    older = [p for suffix in PER_IMAGE for p in out_dir.glob(f"*{suffix}")
             if p.name.removesuffix(suffix) not in names]
    if older:
        log.warning("%s also holds %d per-image files that its summary.csv does not list (e.g. %s: "
                    "an earlier run's, or an image's interrupted half-way). Fix: use a new --out, or "
                    "delete them.", out_dir, len(older), older[0].name)
