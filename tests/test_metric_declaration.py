"""One metric is added by one declaration (evaluation.metrics.declare): it reaches compute_metrics,
the patient level, the tables and test.py's results files without touching anything else."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from evaluation import metrics, tables
from evaluation.predict import Predictions, compute_metrics
from generate_dataset.demo import build_demo
from tests.helpers import SIZE, test_script


def score_gap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Toy metric: mean score of the positives minus that of the negatives."""
    labels = np.asarray(labels, dtype=bool)
    return float(np.mean(scores[labels]) - np.mean(scores[~labels]))


@pytest.fixture
def toy(monkeypatch):
    """``image_gap`` (a table column) and ``pixel_gap`` (results.json only), declared for one test."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=False, title="image gap", paper=5))
    metrics.declare(metrics.Metric("pixel_gap", score_gap, needs_masks=True))


def test_the_built_in_declaration() -> None:
    assert [name for name in metrics.METRICS] == ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc",
                                                  "pixel_ap", "pixel_aupro", "pixel_f1_max"]
    assert tables.table_columns() == [("image_auroc", "image AUROC"), ("image_ap", "image AP"),
                                      ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO")]
    assert tables.patient_columns() == [("patient_auroc", "patient AUROC"), ("patient_ap", "patient AP")]
    assert tables.paper_columns() == [("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO"),
                                      ("image_auroc", "image AUROC"), ("image_ap", "image AP")]


def test_a_declaration_is_checked() -> None:
    """A name without the prefix its kind implies, or a paper column without a title, is refused."""
    with pytest.raises(ValueError, match="starts with 'pixel_'"):
        metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=True))
    with pytest.raises(ValueError, match="needs a title"):
        metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=False, paper=5))
    assert "image_gap" not in metrics.METRICS


def test_a_declared_metric_reaches_metrics_and_tables(toy) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2:, 2:5, 2:5] = True
    maps = rng.random((4, 8, 8)) + masks
    scores = maps.max(axis=(1, 2))
    values = compute_metrics(Predictions([f"{i}.png" for i in range(4)], labels, scores, maps, masks, True))
    assert values["image_gap"] == pytest.approx(score_gap(labels, scores))
    assert values["pixel_gap"] == pytest.approx(score_gap(masks, maps))
    assert values["image_auroc"] == 1.0 and "pixel_aupro" in values
    assert ("image_gap", "image gap") in tables.table_columns() and "pixel_gap" not in dict(tables.table_columns())
    assert ("patient_gap", "patient gap") in tables.patient_columns()
    header, row, _ = tables.csv_rows({"Brain": values})
    assert header[-1] == "image gap" and row[-1] == f"{100 * values['image_gap']:.1f}"
    assert tables.paper_columns()[-1] == ("image_gap", "image gap")  # paper=5: after the built-ins' 1-4
    paper = tables.paper_table({"medvmad": values})
    assert paper["md"].splitlines()[0].rstrip(" |").endswith("| image gap")
    assert json.loads(paper["json"])["rows"][0]["image_gap"] == values["image_gap"]


def test_a_declared_metric_reaches_test_py_results(toy, tmp_path) -> None:
    demo = build_demo(str(tmp_path / "data"), n_train=4, n_valid=(4, 4), n_test=(6, 6), image_size=SIZE)
    out = tmp_path / "results"
    summary = test_script.main(["--data_path", demo, "--model_name", "tiny", "--pretrained", "none",
                                "--image_size", str(SIZE), "--save_path", str(out), "--num_workers", "0",
                                "--device", "cpu", "--bootstrap", "20"])
    brain = json.loads((out / "results.json").read_text())["datasets"]["Brain"]
    assert brain == pytest.approx(summary["datasets"]["Brain"])
    assert np.isfinite(brain["image_gap"]) and np.isfinite(brain["pixel_gap"])
    assert "image_auroc_ci" in brain and "image_gap_ci" not in brain  # no bootstrap curve declared
    rows = list(csv.reader((out / "results.csv").open()))
    assert "image gap" in rows[0] and "pixel gap" not in rows[0]
