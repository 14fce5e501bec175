"""Merge per-category result files into the paper's table layout.

Each result is a dict ``{"category": str, "variant": str, "metrics": {name:
value in [0, 1]}}`` (``"model"`` is accepted instead of ``"variant"``, and the
top-level numbers of `pfadseg test`'s metrics.json instead of ``"metrics"``),
with an optional ``"per_defect": {defect_type: {name: value}}`` and an optional
``"run"`` label that tells apart runs of the same category and variant (seeds,
commits). Values print in percent with one decimal.

Table 1 has one row per category and one column per (series, metric), where a
series is a variant, or "variant (run)" for labelled runs (results.md splits it
into one table per metric when there are several series); texture, object and
overall means cover only the categories present, and only groups of two or
more. results.md starts with the settings the results ran with. With several
series, Table 4 gives each series' mean over its categories, with RCM / AFF /
PCAR columns when the series are DeSTSeg module combinations.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .files import write_text
from .variants import ABLATION, modules_of, variant_name

__all__ = ["TEXTURES", "OBJECTS", "CATEGORIES", "run_labels", "build_tables", "read_results", "write_report"]

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut",
    "pill", "screw", "toothbrush", "transistor", "zipper",
)
CATEGORIES = TEXTURES + OBJECTS  # the 15 MVTec AD categories, in the paper's order
TABLE4_MODULES = ("rcm", "aff", "pcar")  # Table 4's module columns, in the paper's order

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
_ON = "✓"

Column = tuple[str, str]  # (series, metric)
Table = dict[str, dict[Column, float]]  # row -> column -> value


def _variant(result: dict) -> str:
    return str(result.get("variant", result.get("model", "default")))


def _series(result: dict) -> str:
    run = result.get("run")
    return f"{_variant(result)} ({run})" if run else _variant(result)


def _metrics_of(result: dict) -> dict[str, float]:
    """The metrics of a result: its "metrics" dict, or its top-level numbers
    (the layout of `pfadseg test`'s metrics.json), leaving out counts."""
    if "metrics" in result:
        return result["metrics"]
    return {k: v for k, v in result.items()  # other numbers are counts (ints)
            if isinstance(v, float) or (k in METRIC_NAMES and _numbers({k: v}))}


def _is_reported(metric: str) -> bool:
    """Thresholds are not fractions, so they stay out of percentage tables."""
    return not metric.endswith("threshold")


def _metric_order(names: set[str]) -> list[str]:
    known = [m for m in METRIC_NAMES if m in names]
    return known + sorted(names - set(known))


def _series_variants(results: list[dict]) -> dict[str, str]:
    """Each series' variant, series ordered by variant in Table 4 order (other
    variants after), then by first appearance."""
    first: dict[str, tuple[int, int]] = {}
    variant: dict[str, str] = {}
    for index, result in enumerate(results):
        modules = modules_of(_variant(result))
        rank = ABLATION.index(variant_name(modules)) if modules is not None else len(ABLATION)
        first.setdefault(_series(result), (rank, index))
        variant[_series(result)] = _variant(result)
    return {s: variant[s] for s in sorted(first, key=first.__getitem__)}


def _collect(results: list[dict]) -> tuple[Table, Table, list[str]]:
    """Per-category and per-defect tables, and the metrics in column order."""
    by_category: Table = {}
    by_defect: Table = {}
    metrics: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for result in results:
        category, series = str(result["category"]), _series(result)
        if (category, series) in seen:
            raise ValueError(f"two results for category {category!r}, {series!r}: label each "
                             "run (a \"run\" key, or `pfadseg report --label`)")
        seen.add((category, series))
        row = by_category.setdefault(category, {})
        for metric, value in _metrics_of(result).items():
            if _is_reported(metric) and value is not None:
                row[(series, metric)] = float(value)
                metrics.add(metric)
        for defect, values in result.get("per_defect", {}).items():
            defect_row = by_defect.setdefault(f"{category}/{defect}", {})
            for metric, value in values.items():
                if _is_reported(metric) and value is not None:
                    defect_row[(series, metric)] = float(value)
                    metrics.add(metric)
    return by_category, by_defect, _metric_order(metrics)


def _category_order(categories: set[str]) -> list[str]:
    """MVTec categories in the paper's order, then any others by name."""
    mvtec = [c for c in CATEGORIES if c in categories]
    return mvtec + sorted(categories - set(mvtec))


def _mean(rows: list[dict[Column, float]], key: Column) -> float | None:
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else None


def _averaged(by_category: Table) -> list[str]:
    """The categories the overall means (Table 1's Mean row, Table 4) average: the MVTec
    AD ones when there are any, else all (your own categories, among themselves)."""
    present = set(by_category)
    mvtec = [c for c in CATEGORIES if c in present]
    return mvtec or _category_order(present)


def _mean_rows(by_category: Table, columns: list[Column]) -> tuple[Table, list[str]]:
    """Texture, object and overall means over the categories present, each only
    when it averages two or more categories and differs from the rows above; plus
    notes listing the MVTec categories missing from them. Other categories (your
    own) are averaged only among themselves, never into the paper's MVTec means."""
    present = set(by_category)
    extras = _category_order(present - set(CATEGORIES))
    overall = list(CATEGORIES) if present & set(CATEGORIES) else extras
    groups = {"Texture mean": list(TEXTURES), "Object mean": list(OBJECTS), "Mean": overall}
    means: Table = {}
    covered: list[list[str]] = []
    for label, members in groups.items():
        there = [c for c in members if c in present]
        if len(there) < 2 or there in covered:
            continue
        covered.append(there)
        if len(there) < len(members):
            label = f"{label} ({len(there)}/{len(members)})"
        rows = [by_category[c] for c in there]
        means[label] = {key: value for key in columns
                        if (value := _mean(rows, key)) is not None}
    missing = [c for c in CATEGORIES if c not in present]
    notes = []
    if means and present & set(CATEGORIES) and missing:
        notes.append(f"means cover the categories present; missing {len(missing)} of "
                     f"{len(CATEGORIES)} MVTec AD categories: {', '.join(missing)}")
    if extras and present & set(CATEGORIES):
        notes.append(f"not MVTec AD categories, so in no mean: {', '.join(extras)}")
    return means, notes


def _fmt(value: float | None) -> str:
    return _MISSING if value is None else f"{100.0 * value:.1f}"


def _header(columns: list[Column], several: bool) -> list[str]:
    names = [METRIC_NAMES.get(metric, metric) for _, metric in columns]
    if several:
        names = [f"{series}: {name}" for (series, _), name in zip(columns, names)]
    return names


def _markdown(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * text_columns + "---:|" * (len(header) - text_columns))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _rows(table: Table, order: list[str], columns: list[Column]) -> list[list[str]]:
    return [[name] + [_fmt(table[name].get(key)) for key in columns] for name in order]


def _series_table(by_category: Table, variants: dict[str, str],
                  metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """Table 4 layout: one row per series, its means over its categories as
    columns; RCM / AFF / PCAR marks first (the paper's columns) when the series
    are runs of two or more module combinations."""
    series = list(variants)
    modules = {s: modules_of(v) for s, v in variants.items()}
    flags = len(set(modules.values())) > 1 and None not in modules.values()
    header = ["Variant"] + ([m.upper() for m in TABLE4_MODULES] if flags else [])
    header += [METRIC_NAMES.get(m, m) for m in metrics]
    averaged = [by_category[c] for c in _averaged(by_category)]
    rows = []
    for s in series:
        marks = [_ON if m in (modules[s] or ()) else "" for m in TABLE4_MODULES] if flags else []
        values = [_fmt(_mean(averaged, (s, m))) for m in metrics]
        rows.append([s] + marks + values)
    return header, rows


def _coverage(by_category: Table, series: list[str]) -> tuple[str, list[str]]:
    """What Table 4's means cover, and a note for each series that lacks categories."""
    categories = _averaged(by_category)
    notes = []
    for s in series:
        lacking = [c for c in categories if not any(key[0] == s for key in by_category[c])]
        if lacking:
            notes.append(f"{s}: no result for {', '.join(lacking)}; its means cover the rest")
    scope = (f"mean over {len(categories)} categories" if len(categories) > 1
             else f"{categories[0]} only")
    return scope, notes


def build_tables(results: list[dict]) -> dict[str, str]:
    """The report's files by name: ``results.md`` (all tables), ``results.csv``
    (Table 1: per-category rows, the mean rows, then per-defect rows labelled
    ``category/defect``, under one header) and, with several series,
    ``variants.csv`` (Table 4)."""
    if not results:
        raise ValueError("no results to report")
    by_category, by_defect, metrics = _collect(results)
    variants = _series_variants(results)
    series = list(variants)
    several = len(series) > 1
    columns = [(s, m) for s in series for m in metrics]
    header = _header(columns, several)
    categories = _category_order(set(by_category))
    means, notes = _mean_rows(by_category, columns)

    body = _rows(by_category, categories, columns) + _rows(means, list(means), columns)
    defects = _rows(by_defect, sorted(by_defect), columns)
    files = {"results.csv": _csv(["category"] + header, body + defects)}
    parts = [_settings(results), "## Table 1: results per category",
             *_tables("Category", [(by_category, categories), (means, list(means))], series, metrics)]
    if several:
        scope, lacking = _coverage(by_category, series)
        notes += lacking
    if notes:
        parts.append("\n".join(f"- {note}" for note in notes))
    if several:
        table4_header, table4 = _series_table(by_category, variants, metrics)
        text_columns = len(table4_header) - len(metrics)
        parts += [f"## Table 4: variants ({scope})", _markdown(table4_header, table4, text_columns)]
        files["variants.csv"] = _csv(table4_header, table4)
    if defects:
        parts += ["## Results per defect type",
                  *_tables("Defect", [(by_defect, sorted(by_defect))], series, metrics)]
    files["results.md"] = "\n\n".join(p for p in parts if p) + "\n"
    return files


def _tables(label: str, blocks: list[tuple[Table, list[str]]], series: list[str],
            metrics: list[str]) -> list[str]:
    """Markdown of rows (categories or defect types) from several tables: for one
    series a column per metric; for several, one table per metric with a column
    per series (eight variants in one table made 65 columns)."""
    def body(columns: list[Column]) -> list[list[str]]:
        return [row for table, order in blocks for row in _rows(table, order, columns)]

    if len(series) == 1:
        columns = [(series[0], m) for m in metrics]
        return [_markdown([label] + _header(columns, False), body(columns))]
    return [part for m in metrics for part in (
        f"### {METRIC_NAMES.get(m, m)}", _markdown([label] + series, body([(s, m) for s in series])))]


def _settings(results: list[dict]) -> str:
    """One line with what the results were run with (each value once), so a table
    from a smoke test does not pass for the paper's."""
    def text(value: object) -> str:
        return "x".join(map(str, value)) if isinstance(value, list) else str(value)

    found = [(name, sorted({text(r[key]) for r in results if r.get(key) is not None}))
             for key, name in (("teacher", "teacher"), ("preset", "preset"),
                               ("image_size", "input size"), ("eval_size", "evaluated at"))]
    line = "; ".join(f"{name} {', '.join(values)}" for name, values in found if values)
    # which row ran with which is in its metrics.json; sizes evaluated at differ per category
    # at their original resolutions (--eval-size original), which compares nothing across rows
    if any(len(values) > 1 for name, values in found if name != "evaluated at"):
        line += " (mixed: rows run with different settings are not comparable)"
    return line[:1].upper() + line[1:]


def run_labels(paths: list[Path]) -> list[str]:
    """Short labels telling result files apart: the parts of their paths
    (folders and file stem) that differ, e.g. runs/seed0/bottle/pfadseg/test/metrics.json
    and runs/seed1/bottle/pfadseg/test/metrics.json -> seed0, seed1."""
    parts = [Path(p).resolve().with_suffix("").parts for p in paths]
    shortest = min(len(p) for p in parts)
    prefix = 0
    while prefix < shortest and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    suffix = 0
    while prefix + suffix < shortest and len({p[-1 - suffix] for p in parts}) == 1:
        suffix += 1
    return ["/".join(p[prefix:len(p) - suffix]) or p[max(prefix - 1, 0)] for p in parts]


def read_results(path: str | Path) -> list[dict]:
    """The results in one file (a dict or a list of dicts), checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        hint = f" (e.g. {path / 'metrics.json'})" if path.is_dir() else ""
        raise ValueError(f"{path}: cannot read it ({exc.strerror}). Fix: give the metrics.json "
                         f"files that `pfadseg test` wrote{hint}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file. Fix: give the metrics.json files that "
                         "`pfadseg test` wrote") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}). Fix: give the metrics.json files that "
                         "`pfadseg test` wrote") from None
    results = data if isinstance(data, list) else [data]
    for result in results:
        if not isinstance(result, dict) or "category" not in result:
            raise ValueError(f"{path}: a result without a \"category\" key. Fix: give the "
                             "metrics.json files that `pfadseg test` wrote")
        per_defect = result.get("per_defect", {})
        top = result.get("metrics", {k: v for k, v in result.items() if k in METRIC_NAMES})
        if not (_numbers(top) and isinstance(per_defect, dict)
                and all(_numbers(values) for values in per_defect.values())):
            raise ValueError(f"{path}: the metrics (\"metrics\" or the top-level ones) and each "
                             "\"per_defect\" entry must map names to numbers. Fix: give the "
                             "metrics.json files that `pfadseg test` wrote")
        values = [(k, v) for table in (_metrics_of(result), *per_defect.values())
                  for k, v in table.items() if _is_reported(k) and v is not None]
        if not values:
            raise ValueError(f"{path}: no metrics in the result for {result['category']}. Fix: "
                             "give the metrics.json files that `pfadseg test` wrote")
        for name, value in values:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{path}: {name} is {value}, not a fraction in [0, 1] (the tables "
                                 "print percentages of fractions). Fix: divide percentages by 100")
    return results


def _numbers(values: object) -> bool:
    """Whether `values` maps names to numbers (None: not measured)."""
    return isinstance(values, dict) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values.values())


def _label_runs(paths: list[Path], loaded: list[list[dict]], labels: list[str] | None) -> None:
    """Set each result's "run": the given labels, or, when two files hold the
    same category and variant, labels from where the files differ in their
    paths (category and variant folders left out)."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(paths)} result files but {len(labels)} --label values. Fix: give "
                         "one --label per file, in the same order")
    owner: dict[tuple[str, str], Path] = {}
    clash = False
    for path, results in zip(paths, loaded):
        for result in results:
            key = (str(result["category"]), _variant(result))
            clash |= key in owner and owner[key] != path
            owner.setdefault(key, path)
    if labels is None and not clash:
        return
    auto = run_labels(paths)
    for index, (path, results) in enumerate(zip(paths, loaded)):
        if labels is not None:
            label = labels[index]
        else:
            names = {str(r["category"]) for r in results} | {_variant(r) for r in results}
            label = "/".join(part for part in auto[index].split("/")
                             if part not in names) or path.parent.name
        for result in results:
            result["run"] = label


def write_report(result_files: list[str | Path], out_dir: str | Path,
                 labels: list[str] | None = None) -> list[Path]:
    """Read result JSON files and write ``results.md``, ``results.csv`` and,
    with several variants or runs, ``variants.csv`` into ``out_dir``; returns
    their paths, results.md first.

    Two files with the same category and variant are two runs: `labels` (one
    per file) names them, else the parts where their paths differ do.
    """
    paths = [Path(p) for p in result_files]
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise ValueError(f"{path}: given twice (also as {seen[path.resolve()]}). Fix: "
                             "give each result file once")
        seen[path.resolve()] = path
    loaded = [read_results(path) for path in paths]
    _label_runs(paths, loaded, labels)
    where: dict[tuple[str, str], Path] = {}
    for path, results in zip(paths, loaded):
        for result in results:
            key = (str(result["category"]), _series(result))
            if key in where:
                raise ValueError(f"{where[key]} and {path} both hold {key[0]} {key[1]}. Fix: "
                                 "give each run its own --label (one per file, in order)")
            where[key] = path
    files = build_tables([r for results in loaded for r in results])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("results.md", "results.csv", "variants.csv"):
        if name in files:
            write_text(out / name, files[name])
            written.append(out / name)
        else:  # a variants.csv from an earlier report of other runs would mislead
            (out / name).unlink(missing_ok=True)
    return written
