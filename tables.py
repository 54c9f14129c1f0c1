"""Results tables of test.py and summarize_results.py: the metric columns, their cells (x100, one
decimal, '-' when absent) and the tables as pipe text and CSV."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
from tabulate import tabulate

TABLE_COLUMNS = [("image_auroc", "image AUROC"), ("image_ap", "image AP"),
                 ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO")]
PATIENT_COLUMNS = [("patient_auroc", "patient AUROC"), ("patient_ap", "patient AP")]


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
                 columns: list[tuple[str, str]] = TABLE_COLUMNS) -> list[list[str]]:
    """Rows per dataset plus a mean row, metric values x100 with one decimal ('-' when absent),
    with the 95% interval as 'value [low-high]' when the results carry ``<metric>_ci``."""
    rows = [[name] + [cell(values, key) for key, _ in columns] for name, values in results.items()]
    means = {}
    for key, _ in columns:
        present = [values[key] for values in results.values() if key in values and not math.isnan(values[key])]
        if present:
            means[key] = float(np.mean(present))
    return rows + [["mean"] + [cell(means, key) for key, _ in columns]]


def csv_rows(results: dict[str, dict[str, float]], columns: list[tuple[str, str]] = TABLE_COLUMNS,
             first: str = "dataset") -> list[list[str]]:
    """The table as CSV rows (x100, one decimal, '-' when absent, a mean row); with bootstrap
    intervals, each metric is followed by its ``low`` and ``high`` columns."""
    with_ci = any(f"{key}_ci" in values for values in results.values() for key, _ in columns)
    plain = {name: {key: v for key, v in values.items() if not key.endswith("_ci")}
             for name, values in results.items()}
    header = [first]
    for _, title in columns:
        header += [title, f"{title} low", f"{title} high"] if with_ci else [title]
    rows = [header]
    for row in format_table(plain, columns):
        values = results.get(row[0], {})
        out = [row[0]]
        for (key, _), text in zip(columns, row[1:]):
            out.append(text)
            if with_ci:
                out += [cell({"v": bound}, "v") for bound in values.get(f"{key}_ci", (math.nan, math.nan))]
        rows.append(out)
    return rows
