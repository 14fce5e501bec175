"""`pfadseg predict`: scores, anomaly maps, overlays and masks for new images."""
from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data import DataError, list_images, load_rgb
from .visualize import mask_image, overlay

MapFn = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]  # uint8 batch -> (maps, scores)
MAX_OUTPUT_SIDE = 1024  # overlays of huge images are written downscaled to this side


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given plus the images of given folders (recursively), in order."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = list_images(item, recursive=True)
            if not found:
                raise DataError(f"{item}: folder holds no images")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """A unique output stem per input: the file's stem, or <folder>_<stem> for
    stems that occur more than once (good/000.png, crack/000.png), numbered if needed."""
    counts = Counter(p.stem for p in paths)
    names, used = [], set()
    for p in paths:
        name = p.stem if counts[p.stem] == 1 else f"{p.parent.name}_{p.stem}"
        base, i = name, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        names.append(name)
    return names


def predict_images(paths: list[Path], map_fn: MapFn, size: int, threshold: float, out_dir: Path,
                   batch_size: int = 8, skip_bad: bool = False, progress: bool = True) -> list[dict]:
    """Write <name>_overlay.png, <name>_mask.png and <name>_map.npy per image and
    summary.csv / summary.json; return the summary rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    names = dict(zip(paths, output_names(paths)))
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    for start in range(0, len(paths), batch_size):
        batch_paths, originals = [], []
        for path in paths[start:start + batch_size]:
            try:
                originals.append(load_rgb(path, None))
                batch_paths.append(path)
            except DataError as exc:
                if not skip_bad:
                    raise
                rows.append({"image": str(path), "error": str(exc)})
        if not originals:
            continue
        small = np.stack([np.asarray(Image.fromarray(o).resize((size, size), Image.BILINEAR))
                          for o in originals])
        maps, scores = map_fn(torch.from_numpy(small).permute(0, 3, 1, 2).contiguous())
        for path, original, amap, score in zip(batch_paths, originals, maps, scores):
            name = names[path]
            h, w = original.shape[:2]
            scale = min(1.0, MAX_OUTPUT_SIDE / max(h, w))
            oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
            big = F.interpolate(torch.from_numpy(amap)[None, None], size=(oh, ow), mode="bilinear",
                                align_corners=False)[0, 0].numpy()
            shown = original if scale == 1.0 else np.asarray(Image.fromarray(original).resize((ow, oh)))
            mask = big >= threshold
            overlay(shown, big, mask).save(out_dir / f"{name}_overlay.png")
            mask_image(mask).save(out_dir / f"{name}_mask.png")
            np.save(out_dir / f"{name}_map.npy", amap.astype(np.float32))
            rows.append({"image": str(path), "name": name, "score": float(score),
                         "anomalous": bool(score >= threshold), "threshold": threshold,
                         "defect_area": float(mask.mean())})
        bar.update(len(batch_paths))
    bar.close()
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    fields = ["image", "name", "score", "anomalous", "threshold", "defect_area", "error"]
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows
