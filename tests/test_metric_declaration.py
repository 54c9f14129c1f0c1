"""One metric is added by one declaration (evaluation.metrics.declare): it reaches compute_metrics,
the patient level, the bootstrap intervals, the results and paper tables and test.py's results
files without touching anything else."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import summarize_results
from dataset import patient_of
from evaluation import bootstrap, metrics, tables
from evaluation.maps_io import load_maps
from evaluation.metrics import compute_metrics
from evaluation.predict import Predictions
from generate_dataset.demo import build_demo
from tests.helpers import TINY_SIZE, test_script
from utils import InputError


def score_gap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Toy metric in [0, 1] for scores in [0, 1]: half the mean score of the positives minus that of
    the negatives, plus a half; nan when a class is absent."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return math.nan
    return float(0.5 + (np.mean(scores[labels]) - np.mean(scores[~labels])) / 2)


def lesion_mean(masks: np.ndarray, maps: np.ndarray) -> float:
    """Toy pixel metric: the mean map value on the lesions; nan without one."""
    masks = np.asarray(masks, dtype=bool)
    return float(np.mean(maps[masks])) if masks.any() else math.nan


@pytest.fixture
def toy(monkeypatch):
    """Declared for one test: ``image_gap`` and ``pixel_gap`` (results and paper table columns after
    the built-ins) and ``pixel_lesion_mean`` (results.json only); none has a bootstrap curve."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=False, title="image gap", paper=5))
    metrics.declare(metrics.Metric("pixel_gap", score_gap, needs_masks=True, title="pixel gap", paper=6))
    metrics.declare(metrics.Metric("pixel_lesion_mean", lesion_mean, needs_masks=True))


def test_the_built_in_declaration() -> None:
    assert [name for name in metrics.METRICS] == ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc",
                                                  "pixel_ap", "pixel_aupro", "pixel_f1_max"]
    assert tables.table_columns() == [("image_auroc", "image AUROC"), ("image_ap", "image AP"),
                                      ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO")]
    assert tables.patient_columns() == [("patient_auroc", "patient AUROC"), ("patient_ap", "patient AP")]
    assert tables.paper_columns() == [("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO"),
                                      ("image_auroc", "image AUROC"), ("image_ap", "image AP")]
    assert bootstrap.resampled_metrics(needs_masks=False) == bootstrap.resampled_metrics(needs_masks=True) == []
    assert "_metric" not in vars(metrics)  # the built-ins are declared without a stray module global


def test_a_declaration_is_checked() -> None:
    """A name without the prefix its kind implies, or a paper column without a title, is refused."""
    with pytest.raises(ValueError, match="starts with 'pixel_'"):
        metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=True))
    with pytest.raises(ValueError, match="needs a title"):
        metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=False, paper=5))
    with pytest.raises(ValueError, match="curve 'aurocc' is not one of the bootstrap's image curves"):
        metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=False, curve="aurocc"))
    with pytest.raises(ValueError, match="curve 'aupro' is not one of the bootstrap's image curves"):
        metrics.declare(metrics.Metric("image_gap", score_gap, needs_masks=False, curve="aupro"))
    assert "image_gap" not in metrics.METRICS


def test_a_declared_curve_reads_the_bootstrap_s_own_curve(monkeypatch) -> None:
    """Every curve a declaration may name is one the bootstrap draws: a metric declared with it gets
    the replicates of the built-in metric of that curve (image and pixel)."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    for needs_masks, kind in ((False, "image"), (True, "pixel")):
        for curve in metrics.CURVES[needs_masks]:
            metrics.declare(metrics.Metric(f"{kind}_same_{curve}", score_gap, needs_masks, curve=curve))
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(4), 2)
    labels = np.tile([0, 1], 4)
    scores = rng.random(8) + 0.2 * labels
    counts = bootstrap.resample_counts(4, 15, seed=1)
    image = bootstrap.image_replicates(labels, scores, groups, counts)
    masks = np.zeros((8, 6, 6), bool)
    masks[1::2, 1:4, 2:5] = True
    maps = rng.random(masks.shape) + 0.5 * masks
    pixel = bootstrap.pixel_replicates(bootstrap.group_histograms(masks, maps, groups, 4), counts)
    for replicates, kind, curves in ((image, "image", metrics.CURVES[False]), (pixel, "pixel", metrics.CURVES[True])):
        for curve in curves:
            np.testing.assert_array_equal(replicates[f"{kind}_same_{curve}"], replicates[f"{kind}_{curve}"])


def test_a_patient_column_is_titled_from_any_image_title(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    metrics.declare(metrics.Metric("image_sens95", score_gap, needs_masks=False, title="Sens@95"))
    assert tables.patient_columns()[-1] == ("patient_sens95", "patient Sens@95")


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
    assert values["pixel_lesion_mean"] == pytest.approx(lesion_mean(masks, maps))
    assert values["image_auroc"] == 1.0 and "pixel_aupro" in values
    assert tables.table_columns()[-2:] == [("image_gap", "image gap"), ("pixel_gap", "pixel gap")]
    assert "pixel_lesion_mean" not in dict(tables.table_columns())
    assert ("patient_gap", "patient gap") in tables.patient_columns()
    header, row, _ = tables.csv_rows({"Brain": values})
    assert header[-2:] == ["image gap", "pixel gap"] and row[-2] == f"{100 * values['image_gap']:.1f}"
    assert tables.paper_columns()[-2:] == [("image_gap", "image gap"), ("pixel_gap", "pixel gap")]
    paper = tables.paper_table({"medvmad": values})
    assert [c.strip() for c in paper["md"].splitlines()[0].strip("|").split("|")][-2:] == ["image gap", "pixel gap"]
    assert json.loads(paper["json"])["rows"][0]["image_gap"] == values["image_gap"]


def by_hand_interval(counts: np.ndarray, members: list[list[int]], labels: np.ndarray,
                     scores: np.ndarray) -> list[float]:
    """95% percentile interval of score_gap over replicates, by an obvious loop: in replicate r,
    patient p's images (members[p]) taken counts[r, p] times; nan replicates left out."""
    values = []
    for row in counts:
        chosen = [image for patient, times in enumerate(row) for _ in range(times) for image in members[patient]]
        values.append(score_gap(labels[chosen], scores[chosen]))
    finite = [value for value in values if not math.isnan(value)]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def test_image_replicates_of_a_declared_metric_agree_on_both_paths(toy, monkeypatch) -> None:
    """The histogram path (curves) plus own replicates, and the resample-everything path, agree."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(6), 3)
    labels = rng.integers(0, 2, len(groups))
    scores = np.round(rng.random(len(groups)) + 0.3 * labels, 2) / 1.3
    counts = bootstrap.resample_counts(6, 25, seed=2)
    fast = bootstrap.image_replicates(labels, scores, groups, counts)
    monkeypatch.setattr(bootstrap, "HISTOGRAM_CELLS", 1)
    slow = bootstrap.image_replicates(labels, scores, groups, counts)
    assert list(fast) == list(slow) == ["image_auroc", "image_ap", "image_f1_max", "image_gap"]
    for key in fast:
        np.testing.assert_allclose(fast[key], slow[key], atol=1e-12)
    members = [list(np.flatnonzero(groups == patient)) for patient in range(6)]
    assert bootstrap.interval(fast["image_gap"]) == pytest.approx(by_hand_interval(counts, members, labels, scores))


def test_a_slow_pixel_metric_s_bootstrap_is_refused_before_scoring_when_its_copy_does_not_fit(toy, tmp_path,
                                                                                                monkeypatch) -> None:
    """A declared pixel metric without a curve resamples a copy of the maps in memory: over the maps
    budget, test.py refuses before any image is scored, naming the metrics and the way out."""
    demo = build_demo(str(tmp_path / "data"), n_train=1, n_valid=(1, 1), n_test=(2, 2), image_size=TINY_SIZE)
    monkeypatch.setattr(test_script, "predict", lambda *args, **kwargs: pytest.fail("scored before the check"))
    flags = ["--data_path", demo, "--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE),
             "--num_workers", "0", "--device", "cpu", "--bootstrap", "10", "--max_ram_maps_gb", "1e-9"]
    with pytest.raises(InputError, match=r"--bootstrap 10: pixel_gap, pixel_lesion_mean \(declared without a "
                                         r"histogram curve\) is resampled on a copy of Brain's maps"):
        test_script.main([*flags, "--save_path", str(tmp_path / "refused")])


def test_a_declared_metric_reaches_test_py_results(toy, tmp_path) -> None:
    demo = build_demo(str(tmp_path / "data"), n_train=4, n_valid=(4, 4), n_test=(6, 6), image_size=TINY_SIZE)
    out = tmp_path / "results"
    replicates, seed = 20, 7
    summary = test_script.main(["--data_path", demo, "--model_name", "tiny", "--pretrained", "none",
                                "--image_size", str(TINY_SIZE), "--save_path", str(out), "--num_workers", "0",
                                "--device", "cpu", "--bootstrap", str(replicates), "--bootstrap_seed", str(seed),
                                "--save_maps"])
    written = json.loads((out / "results.json").read_text())
    brain, patients = written["datasets"]["Brain"], written["patients"]["Brain"]
    assert brain == pytest.approx(summary["datasets"]["Brain"])
    for key in ("image_gap", "pixel_gap", "pixel_lesion_mean"):
        assert np.isfinite(brain[key]) and len(brain[f"{key}_ci"]) == 2
    assert "patient_gap" in patients and "patient_gap_ci" in patients

    # The intervals against a bootstrap by hand: the same draws, each drawn patient's images repeated.
    saved = load_maps(out / "maps", "Brain", mmap=False)
    names: dict[str, list[int]] = {}
    for image, path in enumerate(saved.paths):
        names.setdefault(patient_of(path), []).append(image)
    members = list(names.values())
    counts = bootstrap.resample_counts(len(members), replicates, seed)
    assert brain["image_gap"] == pytest.approx(score_gap(saved.labels, saved.scores))
    assert brain["image_gap_ci"] == pytest.approx(by_hand_interval(counts, members, saved.labels, saved.scores))
    assert brain["pixel_gap_ci"] == pytest.approx(by_hand_interval(counts, members, saved.masks, saved.maps))
    patient_labels = np.array([saved.labels[images].max() for images in members])
    patient_scores = np.array([saved.scores[images].max() for images in members])
    assert patients["patient_gap"] == pytest.approx(score_gap(patient_labels, patient_scores))
    assert patients["patient_gap_ci"] == pytest.approx(
        by_hand_interval(counts, [[patient] for patient in range(len(members))], patient_labels, patient_scores))

    # results.csv, results_patient.csv and the logged results table carry the titled ones.
    header = next(csv.reader((out / "results.csv").open()))
    assert header[-6:] == ["image gap", "image gap low", "image gap high", "pixel gap", "pixel gap low",
                           "pixel gap high"] and "pixel lesion mean" not in header
    assert "patient gap" in next(csv.reader((out / "results_patient.csv").open()))
    log = (out / "test_log.txt").read_text()
    assert "| image gap" in log and "| pixel gap" in log and "| patient gap" in log

    # The paper table and the mean ± std summary of summarize_results.py.
    rows = summarize_results.main(["--paper", "--results", str(out / "results.json"), "--names", "tiny",
                                   "--save_path", str(tmp_path / "paper"), "--name", "t"])
    assert rows["tiny"]["pixel_gap_ci"] == pytest.approx(brain["pixel_gap_ci"])
    markdown = (tmp_path / "paper" / "t.md").read_text().splitlines()
    assert [c.strip() for c in markdown[0].strip("|").split("|")] == [
        "variant", "pixel AUROC", "pixel AUPRO", "image AUROC", "image AP", "image gap", "pixel gap"]
    assert f"{100 * brain['image_gap']:.1f} [{100 * brain['image_gap_ci'][0]:.1f}" in markdown[2]
    paper_json = json.loads((tmp_path / "paper" / "t.json").read_text())
    assert paper_json["columns"][-2:] == ["image_gap", "pixel_gap"]
    assert paper_json["rows"][0]["image_gap_ci"] == pytest.approx(brain["image_gap_ci"])
    summary = summarize_results.main(["--results", str(out / "results.json"), "--save_path", str(tmp_path / "sum")])
    assert summary[("Brain", 0)]["pixel_gap"][:2] == (pytest.approx(brain["pixel_gap"]), 0.0)
    assert "image gap" in (tmp_path / "sum" / "summary.csv").read_text().splitlines()[0]
