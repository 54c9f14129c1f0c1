"""tables.py: cells x100 with one decimal, '-' when absent, intervals, the mean row and CSV columns."""
from __future__ import annotations

import csv
import io
import math

from tables import PATIENT_COLUMNS, cell, csv_rows, csv_text, format_table, mean_std_cell, pipe_table


def test_cells_and_the_mean_row_skip_what_is_absent():
    results = {"a": {"image_auroc": 0.9, "pixel_auroc": math.nan}, "b": {"image_auroc": 0.8, "pixel_auroc": 0.7}}
    assert format_table(results) == [["a", "90.0", "-", "-", "-"], ["b", "80.0", "-", "70.0", "-"],
                                     ["mean", "85.0", "-", "70.0", "-"]]
    assert cell({"x": 0.5, "x_ci": (0.25, 0.75)}, "x") == "50.0 [25.0\u201375.0]"
    assert mean_std_cell(0.9, 0.0125) == "90.0 ± 1.2" and mean_std_cell(math.nan, math.nan) == "-"


def test_csv_rows_give_each_interval_its_own_columns():
    results = {"a": {"patient_auroc": 0.6, "patient_auroc_ci": (0.5, 0.7), "patient_ap": 0.4}}
    rows = csv_rows(results, PATIENT_COLUMNS)
    assert rows[0] == ["dataset", "patient AUROC", "patient AUROC low", "patient AUROC high",
                       "patient AP", "patient AP low", "patient AP high"]
    assert rows[1] == ["a", "60.0", "50.0", "70.0", "40.0", "-", "-"]
    assert list(csv.reader(io.StringIO(csv_text(rows)))) == rows
    assert pipe_table([["a", "1"]], ["x", "y"]).splitlines()[2] == "| a   | 1   |"
