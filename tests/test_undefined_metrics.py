"""Undefined metrics (#22 items 6, 7): every .json/.jsonl the scripts write is strict JSON (an
undefined metric is null, never NaN), readers take null back as NaN, and test.py notes a table's
undefined metrics once, in words, instead of three RuntimeWarnings with source lines."""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evaluation import bootstrap
import summarize_results
from generate_dataset.demo import build_demo
from tests.helpers import BASELINE, TINY_SIZE, test_script
from utils import atomic_write_json, strict_json, write_result_files

EVAL = [*BASELINE, "--num_workers", "0", "--batch_size", "8"]


def strict_load(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as JSON.parse and RFC 8259 do."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def undefined_run(tmp_path_factory) -> dict:
    """test.py (zero-training baseline, 20 patient resamples) on two small sets, then
    summarize_results.py on its results: ``Shared``, where every patient (case) has a normal and an
    abnormal slice, so patient metrics are undefined; ``Lesions``, whose test split holds abnormal
    images only, so image metrics are undefined (pixel ones are not: lesion images have normal
    pixels). Warnings raised during the run are kept."""
    root = tmp_path_factory.mktemp("undefined")
    built = Path(build_demo(str(root / "data"), n_train=1, n_valid=(1, 1), n_test=(4, 4), image_size=TINY_SIZE))
    shared, lesions = root / "Shared", root / "Lesions"
    shutil.copytree(built, shared)
    shutil.copytree(built, lesions)
    test = shared / "test"
    for folder, slice_number in (("good/img", 1), ("Ungood/img", 2), ("Ungood/anomaly_mask", 2)):
        for case, path in enumerate(sorted((test / folder).glob("*.png"))):
            path.rename(path.with_name(f"case{case}_{slice_number}.png"))
    shutil.rmtree(lesions / "test" / "good")
    out = root / "results"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = test_script.main(["--data_path", str(shared), str(lesions), "--save_path", str(out),
                                    "--bootstrap", "20", *EVAL])
    summarize_results.main(["--results", str(out / "results.json"), "--save_path", str(root / "summary")])
    summarize_results.main(["--paper", "--results", str(out / "results.json"), "--dataset", "Lesions",
                            "--save_path", str(root / "paper"), "--name", "table"])
    return {"root": root, "out": out, "summary": summary, "warnings": [str(w.message) for w in caught]}


def test_every_json_a_pipeline_writes_parses_strictly_with_undefined_metrics_as_null(undefined_run,
                                                                                    strict_json_files):
    root, out = undefined_run["root"], undefined_run["out"]
    written = set(strict_json_files(root))
    assert {"results/results.json", "results/manifest.json", "summary/summary.json", "paper/table.json",
            "data/Brain/demo.json"} <= written
    results = strict_load((out / "results.json").read_text())
    shared, lesions = results["datasets"]["Shared"], results["datasets"]["Lesions"]
    assert results["patients"]["Shared"]["patient_auroc"] is None
    assert results["patients"]["Shared"]["patient_auroc_ci"] == [None, None]
    assert lesions["image_auroc"] is None and lesions["image_ap"] is None
    assert lesions["image_auroc_ci"] == [None, None] and lesions["image_f1_threshold"] is None
    # the defined figures are kept as numbers: Shared's image AUROC is scikit-learn's on scores.csv
    rows = [row for row in csv.DictReader((out / "scores.csv").open()) if row["dataset"] == "Shared"]
    assert shared["image_auroc"] == pytest.approx(
        roc_auc_score([int(r["label"]) for r in rows], [float(r["score"]) for r in rows]), abs=1e-6)
    assert 0 <= lesions["pixel_auroc"] <= 1


def test_readers_take_null_back_as_undefined(undefined_run):
    """summarize_results.py reads null as NaN and computes with it: the mean of an undefined metric
    is undefined ('-', null), the defined ones are the values test.py wrote."""
    root = undefined_run["root"]
    lesions = undefined_run["summary"]["datasets"]["Lesions"]
    summary = {row["dataset"]: row for row in strict_load((root / "summary" / "summary.json").read_text())}
    assert summary["Lesions"]["image_auroc"] == {"mean": None, "std": None, "runs": 1}
    assert summary["Lesions"]["pixel_auroc"]["mean"] == pytest.approx(lesions["pixel_auroc"])
    table = {row[0]: row for row in csv.reader((root / "summary" / "summary.csv").open())}
    assert table["Lesions"][3] == "-"  # image AUROC
    [row] = strict_load((root / "paper" / "table.json").read_text())["rows"]
    assert row["image_auroc"] is None and row["image_auroc_ci"] == [None, None]
    assert row["pixel_auroc"] == pytest.approx(lesions["pixel_auroc"])
    assert (root / "paper" / "table.md").read_text().splitlines()[-1].split("|")[4].strip() == "-"  # image AUROC


def test_a_defined_metric_with_an_undefined_interval_is_tabled_without_it(undefined_run, tmp_path):
    """Every resample of one class leaves a metric's interval undefined ([null, null]) while the
    metric is defined: the table shows the value alone."""
    results = strict_load((undefined_run["out"] / "results.json").read_text())
    pixel_auroc = results["datasets"]["Lesions"]["pixel_auroc"]
    results["datasets"]["Lesions"]["pixel_auroc_ci"] = [None, None]
    write_result_files(tmp_path / "run", {"results.json": strict_json(results)})
    rows = summarize_results.main(["--paper", "--results", str(tmp_path / "run" / "results.json"),
                                   "--dataset", "Lesions", "--save_path", str(tmp_path / "table"), "--name", "t"])
    assert math.isnan(rows["baseline"]["pixel_auroc_ci"][0]) and math.isnan(rows["baseline"]["image_auroc"])
    [row] = list(csv.DictReader((tmp_path / "table" / "t.csv").open()))
    assert row["pixel AUROC"] == f"{100 * pixel_auroc:.1f}" and row["pixel AUROC low"] == "-"


def test_undefined_metrics_are_noted_once_per_table_not_warned(undefined_run):
    assert not [message for message in undefined_run["warnings"] if "only one class" in message]
    notes = [line.split("] ", 1)[-1] for line in (undefined_run["out"] / "test_log.txt").read_text().splitlines()
             if "note: " in line]
    assert [note[note.index("note: "):] for note in notes] == [
        "note: Shared patient level: patient_auroc, patient_ap, patient_f1_max undefined (all 4 patients are "
        "abnormal); shown as '-' and null in results.json",
        "note: Lesions: image_auroc, image_ap, image_f1_max undefined (all 4 images are abnormal); shown as '-' "
        "and null in results.json",
    ]


def test_the_note_names_each_row_and_why(caplog):
    """A per-class table: the normal class has no image metric (all normal) and no pixel metric (no
    lesion); the lesion class no image metric (all abnormal); a class with both has none undefined."""
    nan = math.nan
    rows = {"good": ({"image_auroc": nan, "image_f1_threshold": nan, "pixel_auroc": nan, "pixel_aupro": nan,
                      "n_images": 3}, np.zeros(3, int)),
            "tumour": ({"image_auroc": nan, "image_ap": nan, "pixel_auroc": 0.9}, np.ones(2, int)),
            "mixed": ({"image_auroc": 0.5, "image_auroc_ci": [nan, nan]}, np.array([0, 1]))}
    logger = logging.getLogger("notes")
    caplog.set_level(logging.INFO, "notes")
    bootstrap.note_undefined(logger, "Brain per class", rows)
    bootstrap.note_undefined(logger, "Brain", {"Brain": rows["mixed"]})  # all defined
    assert [record.getMessage() for record in caplog.records] == [
        "note: Brain per class: good: image_auroc undefined (all 3 images are normal); pixel_auroc, pixel_aupro "
        "undefined (none of the 3 images has a lesion); tumour: image_auroc, image_ap undefined (all 2 images are "
        "abnormal); shown as '-' and null in results.json"]


def test_strict_json_writes_null_for_every_undefined_number(tmp_path):
    value = {"auroc": math.nan, "ci": (math.inf, -math.inf), "f32": np.float32("nan"), "ok": np.float64(0.25),
             "array": np.array([1.0, np.nan]), "nested": [{"x": float("nan"), "n": np.int64(3)}], "path": tmp_path}
    expected = {"auroc": None, "ci": [None, None], "f32": None, "ok": 0.25, "array": [1.0, None],
                "nested": [{"x": None, "n": 3}], "path": str(tmp_path)}
    assert strict_load(strict_json(value)) == expected
    assert strict_load(strict_json(value, indent=None)) == expected and "\n" not in strict_json(value, indent=None)
    atomic_write_json(tmp_path / "a.json", value)
    assert strict_load((tmp_path / "a.json").read_text()) == expected
