"""Merge per-category result files into the paper's table layout.

Each result is a dict ``{"category": str, "variant": str, "metrics": {name:
value in [0, 1]}}`` (``"model"`` is accepted instead of ``"variant"``), with an
optional ``"per_defect": {defect_type: {name: value}}``.  Tables have one row
per MVTec category, one column per (variant, metric), values in percent with
one decimal, and texture / object / overall mean rows computed over the
categories present (the missing ones are listed).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

__all__ = ["TEXTURES", "OBJECTS", "build_tables", "write_report"]

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut",
    "pill", "screw", "toothbrush", "transistor", "zipper",
)
# Column order and headers of the paper's tables; other metrics follow by name.
METRIC_NAMES = {
    "image_auroc": "I-AUROC",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "iap": "IAP",
    "iap90": "IAP@90",
    "aupro": "AUPRO",
    "image_f1_max": "I-F1max",
    "pixel_f1_max": "P-F1max",
}
_MISSING = "-"

Table = dict[str, dict[tuple[str, str], float]]  # row -> (variant, metric) -> value


def _variant(result: dict) -> str:
    return str(result.get("variant", result.get("model", "default")))


def _metrics_of(result: dict) -> dict[str, float]:
    """The metrics of a result: its "metrics" dict, or its top-level numbers
    (the layout of `pfadseg test`'s metrics.json), leaving out counts."""
    if "metrics" in result:
        return result["metrics"]
    return {k: v for k, v in result.items() if isinstance(v, float)}  # counts are ints


def _is_reported(metric: str) -> bool:
    """Thresholds are not fractions, so they stay out of percentage tables."""
    return not metric.endswith("threshold")


def _metric_order(names: set[str]) -> list[str]:
    known = [m for m in METRIC_NAMES if m in names]
    return known + sorted(names - set(known))


def _collect(results: list[dict]) -> tuple[Table, Table, list[str], list[str]]:
    """Per-category and per-defect tables, variants and metrics in order."""
    by_category: Table = {}
    by_defect: Table = {}
    variants: list[str] = []
    metrics: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for result in results:
        category, variant = str(result["category"]), _variant(result)
        if (category, variant) in seen:
            raise ValueError(f"duplicate result for category {category!r}, variant {variant!r}")
        seen.add((category, variant))
        if variant not in variants:
            variants.append(variant)
        row = by_category.setdefault(category, {})
        for metric, value in _metrics_of(result).items():
            if _is_reported(metric):
                row[(variant, metric)] = float(value)
                metrics.add(metric)
        for defect, values in result.get("per_defect", {}).items():
            defect_row = by_defect.setdefault(f"{category}/{defect}", {})
            for metric, value in values.items():
                if _is_reported(metric):
                    defect_row[(variant, metric)] = float(value)
                    metrics.add(metric)
    return by_category, by_defect, variants, _metric_order(metrics)


def _category_order(categories: set[str]) -> list[str]:
    """MVTec categories in the paper's order, then any others by name."""
    mvtec = [c for c in TEXTURES + OBJECTS if c in categories]
    return mvtec + sorted(categories - set(mvtec))


def _mean(rows: list[dict[tuple[str, str], float]], key: tuple[str, str]) -> float | None:
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else None


def _mean_rows(by_category: Table, columns: list[tuple[str, str]]) -> tuple[Table, list[str]]:
    """Texture, object and overall means, plus a note per incomplete group."""
    groups = {
        "Texture mean": list(TEXTURES),
        "Object mean": list(OBJECTS),
        "Mean": _category_order(set(by_category) | set(TEXTURES + OBJECTS)),
    }
    means: Table = {}
    notes = []
    for label, members in groups.items():
        present = [c for c in members if c in by_category]
        if not present:
            continue
        missing = [c for c in members if c not in by_category]
        if missing:
            label = f"{label} ({len(present)}/{len(members)})"
            notes.append(f"{label}: missing {', '.join(missing)}")
        rows = [by_category[c] for c in present]
        means[label] = {}
        for key in columns:
            value = _mean(rows, key)
            if value is not None:
                means[label][key] = value
    return means, notes


def _fmt(value: float | None) -> str:
    return _MISSING if value is None else f"{100.0 * value:.1f}"


def _header(columns: list[tuple[str, str]], several: bool) -> list[str]:
    names = [METRIC_NAMES.get(metric, metric) for _, metric in columns]
    if several:
        names = [f"{variant}: {name}" for (variant, _), name in zip(columns, names)]
    return names


def _markdown(first: str, header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join([first] + header) + " |"]
    lines.append("|" + "---|" + "---:|" * len(header))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _rows(table: Table, order: list[str], columns: list[tuple[str, str]]) -> list[list[str]]:
    return [[name] + [_fmt(table[name].get(key)) for key in columns] for name in order]


def _variant_summary(means: Table, variants: list[str], metrics: list[str]) -> str:
    """Ablation layout: one row per variant, overall means as columns."""
    overall = next(row for label, row in means.items() if label.startswith("Mean"))
    rows = [[v] + [_fmt(overall.get((v, m))) for m in metrics] for v in variants]
    return _markdown("Variant", [METRIC_NAMES.get(m, m) for m in metrics], rows)


def build_tables(results: list[dict]) -> tuple[str, str]:
    """Markdown and CSV tables (percent, one decimal) from per-category results.

    The CSV holds the per-category rows, the mean rows, then any per-defect
    rows labelled ``category/defect``, all under one header.
    """
    if not results:
        raise ValueError("no results to report")
    by_category, by_defect, variants, metrics = _collect(results)
    several = len(variants) > 1
    columns = [(v, m) for v in variants for m in metrics]
    header = _header(columns, several)
    categories = _category_order(set(by_category))
    means, notes = _mean_rows(by_category, columns)
    for variant in variants:
        lacking = [c for c in categories if not any(v == variant for v, _ in by_category[c])]
        if lacking:
            notes.append(f"{variant}: no result for {', '.join(lacking)}; its means cover the rest")

    body = _rows(by_category, categories, columns) + _rows(means, list(means), columns)
    defects = _rows(by_defect, sorted(by_defect), columns)
    parts = ["## Results per category", _markdown("Category", header, body)]
    if notes:
        parts.append("\n".join(f"- {note}" for note in notes))
    if several:
        parts += ["## Variants (mean over categories)", _variant_summary(means, variants, metrics)]
    if defects:
        parts += ["## Results per defect type", _markdown("Defect", header, defects)]
    markdown = "\n\n".join(parts) + "\n"

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category"] + header)
    writer.writerows(body + defects)
    return markdown, buffer.getvalue()


def write_report(result_files: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Read result JSON files (a dict or a list of dicts each) and write
    ``results.md`` and ``results.csv`` into ``out_dir``."""
    results: list[dict] = []
    for path in result_files:
        data = json.loads(Path(path).read_text())
        results += data if isinstance(data, list) else [data]
    markdown, table = build_tables(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "results.md", out / "results.csv"
    md_path.write_text(markdown)
    csv_path.write_text(table)
    return md_path, csv_path
