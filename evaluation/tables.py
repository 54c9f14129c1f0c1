"""Results tables of test.py and summarize_results.py: the metric columns, their cells (x100, one
decimal, '-' when absent) and the tables as pipe text and CSV; the paper's tables (one row per model
variant) and the names their rows and figure columns go by. Every metric column comes from the
declaration (evaluation.metrics.METRICS: ``title`` for the results tables, ``paper`` for the paper's)."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
from tabulate import tabulate

from evaluation import metrics
from utils import strict_json


def table_columns() -> list[tuple[str, str]]:
    """(key, title) of the results tables' metric columns: the declared metrics with a title
    (evaluation.metrics.METRICS), in their order."""
    return [(metric.name, metric.title) for metric in metrics.declared() if metric.title]


def paper_columns() -> list[tuple[str, str]]:
    """(key, title) of the paper tables' columns: the declared metrics with a ``paper`` place
    (evaluation.metrics.METRICS), in that order (built in: pixel AUROC, pixel AUPRO, image AUROC,
    image AP, the report's Tables 1 and 2)."""
    placed = [metric for metric in metrics.declared() if metric.paper is not None]
    return [(metric.name, metric.title) for metric in sorted(placed, key=lambda metric: metric.paper)]


def patient_columns() -> list[tuple[str, str]]:
    """(key, title) of the patient-level table: the image columns as ``patient_...``, titled
    "patient " and the image title without its leading "image " ("image AUROC" -> "patient AUROC")."""
    return [(f"patient_{metric.name.removeprefix('image_')}", f"patient {metric.title.removeprefix('image ')}")
            for metric in metrics.declared(needs_masks=False) if metric.title]


# Calibrated probabilities (evaluation/calibration.py) and the decisions at the operating point; a row per
# dataset and one per dataset's patients.
CALIBRATION_COLUMNS = [("brier", "Brier"), ("ece", "ECE"), ("sensitivity", "sensitivity"),
                       ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV")]
DEFAULT_VARIANT = "medvmad"  # what a checkpoint written before the variant field was trained as


def csv_text(rows: list[list]) -> str:
    """Rows as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def pipe_table(rows: list[list], headers: list[str]) -> str:
    """Rows as a Markdown pipe table, cells kept as written."""
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def cell(values: dict, key: str) -> str:
    """A metric x100 with one decimal, '-' when absent or nan, and its interval when known."""
    value = values.get(key)
    if value is None or math.isnan(value):
        return "-"
    low, high = values.get(f"{key}_ci", (math.nan, math.nan))
    text = f"{100 * value:.1f}"
    return text if math.isnan(low) else f"{text} [{100 * low:.1f}\u2013{100 * high:.1f}]"


def mean_std_cell(mean: float, std: float) -> str:
    """'mean ± std' x100 with one decimal, '-' when the mean is nan."""
    return "-" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_table(results: dict[str, dict[str, float]],
                 columns: list[tuple[str, str]] | None = None, mean_row: bool = True) -> list[list[str]]:
    """Rows per dataset plus a mean row (unless ``mean_row`` is False), metric values x100 with one
    decimal ('-' when absent), with the 95% interval as 'value [low-high]' when the results carry
    ``<metric>_ci``. ``columns``: ``table_columns()`` unless given."""
    columns = table_columns() if columns is None else columns
    rows = [[name] + [cell(values, key) for key, _ in columns] for name, values in results.items()]
    if not mean_row:
        return rows
    means = {}
    for key, _ in columns:
        present = [values[key] for values in results.values() if key in values and not math.isnan(values[key])]
        if present:
            means[key] = float(np.mean(present))
    return rows + [["mean"] + [cell(means, key) for key, _ in columns]]


def csv_rows(results: dict[str, dict[str, float]], columns: list[tuple[str, str]] | None = None,
             first: str = "dataset", mean_row: bool = True) -> list[list[str]]:
    """The table as CSV rows (x100, one decimal, '-' when absent, a mean row unless ``mean_row`` is
    False); with bootstrap intervals, each metric is followed by its ``low`` and ``high`` columns.
    ``columns``: ``table_columns()`` unless given."""
    columns = table_columns() if columns is None else columns
    with_ci = any(f"{key}_ci" in values for values in results.values() for key, _ in columns)
    plain = {name: {key: v for key, v in values.items() if not key.endswith("_ci")}
             for name, values in results.items()}
    header = [first]
    for _, title in columns:
        header += [title, f"{title} low", f"{title} high"] if with_ci else [title]
    rows = [header]
    for row in format_table(plain, columns, mean_row):
        values = results.get(row[0], {})
        out = [row[0]]
        for (key, _), text in zip(columns, row[1:]):
            out.append(text)
            if with_ci:
                out += [cell({"v": bound}, "v") for bound in values.get(f"{key}_ci", (math.nan, math.nan))]
        rows.append(out)
    return rows


def paper_table(results_by_row: dict[str, dict[str, float]], columns: list[tuple[str, str]] | None = None,
                first: str = "variant") -> dict[str, str]:
    """One of the paper's tables, a row per model in the given order and ``columns`` in their order
    (``paper_columns()`` unless given; no mean row: the rows are different models), as {"md": pipe
    table, "csv": CSV text, "json": JSON text}. Cells are x100 with one decimal and the 95% interval
    as '97.2 [96.8–97.5]' when the results carry ``<metric>_ci``; the JSON keeps the values as
    measured (in [0, 1]) with their intervals, null where a metric is nan or infinite (strict JSON)."""
    columns = paper_columns() if columns is None else columns
    headers = [first] + [title for _, title in columns]
    markdown = pipe_table(format_table(results_by_row, columns, mean_row=False), headers)
    rows = [{first: name, **{field: values[field] for key, _ in columns
                             for field in (key, f"{key}_ci") if field in values}}
            for name, values in results_by_row.items()]
    return {"md": markdown + "\n", "csv": csv_text(csv_rows(results_by_row, columns, first, mean_row=False)),
            "json": strict_json({"columns": [key for key, _ in columns], "rows": rows}) + "\n"}


def variant_of(config: dict | None) -> str:
    """The model variant a checkpoint's stored config was trained as (``medvmad`` when the config
    predates the field)."""
    return (config or {}).get("variant", DEFAULT_VARIANT)


def distinct_names(names: list[str], folders: list[str]) -> list[str]:
    """``names`` made distinct: a name that several entries share gets its entry's folder name,
    ``"medvmad (run2)"``, and the entry's position when that still repeats."""
    counts = {name: names.count(name) for name in names}
    out = [name if counts[name] == 1 else f"{name} ({folder})" for name, folder in zip(names, folders)]
    return [name if out.count(name) == 1 else f"{name} #{i + 1}" for i, name in enumerate(out)]
