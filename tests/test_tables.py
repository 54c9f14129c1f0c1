"""evaluation/tables.py: cells x100 with one decimal, '-' when absent, intervals, the mean row and CSV columns."""
from __future__ import annotations

import csv
import io
import math

import pytest

from evaluation.tables import cell, csv_rows, csv_text, format_table, mean_std_cell, patient_columns, pipe_table


def test_cells_and_the_mean_row_skip_what_is_absent():
    results = {"a": {"image_auroc": 0.9, "pixel_auroc": math.nan}, "b": {"image_auroc": 0.8, "pixel_auroc": 0.7}}
    assert format_table(results) == [["a", "90.0", "-", "-", "-"], ["b", "80.0", "-", "70.0", "-"],
                                     ["mean", "85.0", "-", "70.0", "-"]]
    assert cell({"x": 0.5, "x_ci": (0.25, 0.75)}, "x") == "50.0 [25.0\u201375.0]"
    assert mean_std_cell(0.9, 0.0125) == "90.0 ± 1.2" and mean_std_cell(math.nan, math.nan) == "-"


def test_csv_rows_give_each_interval_its_own_columns():
    results = {"a": {"patient_auroc": 0.6, "patient_auroc_ci": (0.5, 0.7), "patient_ap": 0.4}}
    rows = csv_rows(results, patient_columns())
    assert rows[0] == ["dataset", "patient AUROC", "patient AUROC low", "patient AUROC high",
                       "patient AP", "patient AP low", "patient AP high"]
    assert rows[1] == ["a", "60.0", "50.0", "70.0", "40.0", "-", "-"]
    assert list(csv.reader(io.StringIO(csv_text(rows)))) == rows
    assert pipe_table([["a", "1"]], ["x", "y"]).splitlines()[2] == "| a   | 1   |"


def test_paper_table_keeps_row_order_and_the_report_column_order():
    """Rows in the given order, no mean row; columns pixel AUROC, pixel AUPRO, image AUROC, image AP;
    the interval as '97.2 [96.8–97.5]'; CSV with low/high columns; JSON with the measured values."""
    import json

    from evaluation.tables import paper_table

    rows = {"mvfa": {"image_auroc": 0.75, "image_ap": 0.5, "pixel_auroc": 0.972, "pixel_auroc_ci": [0.968, 0.975],
                     "pixel_aupro": 0.6, "pixel_f1_max": 0.3},
            "medvmad": {"image_auroc": 0.9, "image_ap": 0.8, "pixel_auroc": 0.99, "pixel_aupro": math.nan}}
    texts = paper_table(rows)
    lines = texts["md"].splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "variant", "pixel AUROC", "pixel AUPRO", "image AUROC", "image AP"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["mvfa", "97.2 [96.8\u201397.5]", "60.0", "75.0",
                                                                   "50.0"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["medvmad", "99.0", "-", "90.0", "80.0"]
    assert len(lines) == 4  # no mean row
    table = list(csv.reader(io.StringIO(texts["csv"])))
    assert table[0][:4] == ["variant", "pixel AUROC", "pixel AUROC low", "pixel AUROC high"]
    assert table[1][:4] == ["mvfa", "97.2", "96.8", "97.5"] and [row[0] for row in table[1:]] == ["mvfa", "medvmad"]
    data = json.loads(texts["json"], parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert data["columns"] == ["pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"]
    assert data["rows"][0] == {"variant": "mvfa", "pixel_auroc": 0.972, "pixel_auroc_ci": [0.968, 0.975],
                               "pixel_aupro": 0.6, "image_auroc": 0.75, "image_ap": 0.5}
    assert data["rows"][1]["pixel_aupro"] is None


def test_variant_names_default_and_are_made_distinct():
    from evaluation.tables import distinct_names, variant_of

    assert variant_of({"sigma": 4}) == "medvmad" and variant_of({"variant": "mvfa"}) == "mvfa"
    assert distinct_names(["mvfa", "medvmad", "medvmad"], ["a", "b", "c"]) == ["mvfa", "medvmad (b)", "medvmad (c)"]
    assert distinct_names(["x", "x"], ["run", "run"]) == ["x (run) #1", "x (run) #2"]
