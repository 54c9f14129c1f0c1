"""evaluation/bootstrap.py, the patient bootstrap: patients from case ids, resample counts drawn with
replacement, every metric's replicates against a naive resample-and-score loop (and the image
replicates by histogram against scoring each), the central 95% interval, patient-level labels and
scores, meta.json classes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation import bootstrap
from tests.helpers import brute_force_f1, reference_aupro


def small_case(seed: int = 0):
    """Eight slices of four patients (two normal), maps with few distinct values (0.05 steps,
    so the shared bins resolve every value) and lesion blobs."""
    rng = np.random.default_rng(seed)
    paths = [f"/d/{case}_{slice_}.png" for case in ("BraTS_001", "BraTS_002", "c3", "c4")
             for slice_ in (60, 61)]
    masks = np.zeros((8, 10, 10), dtype=bool)
    for image in (0, 1, 3, 4):
        y, x = rng.integers(1, 7, 2)
        masks[image, y:y + 3, x:x + rng.integers(1, 4)] = True
    maps = np.round((rng.random(masks.shape) + 0.8 * masks * rng.random(masks.shape)) * 20) / 20
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    labels[5] = 1  # an abnormal slice without a lesion mask still counts at image level
    scores = np.round(rng.random(8) + 0.4 * labels, 2)
    return paths, labels, scores, masks, maps.astype(np.float32)


def test_groups_follow_case_ids():
    groups, names = bootstrap.groups_of(["/a/BraTS2021_00012_70.png", "/a/BraTS2021_00012_71.png",
                                          "/b/volume-3_5.png", "/b/plain.png"])
    assert names == ["BraTS2021_00012", "volume-3", "plain"]
    assert groups.tolist() == [0, 0, 1, 2]


def test_resample_counts_draw_every_patient_count_with_replacement():
    counts = bootstrap.resample_counts(5, 200, seed=3)
    assert counts.shape == (200, 5) and (counts.sum(axis=1) == 5).all()
    assert (counts == 0).any() and (counts > 1).any()  # with replacement
    assert np.array_equal(counts, bootstrap.resample_counts(5, 200, seed=3))
    assert not np.array_equal(counts, bootstrap.resample_counts(5, 200, seed=4))
    # Each patient is drawn about once per replicate on average.
    assert counts.mean(axis=0) == pytest.approx(np.ones(5), abs=0.2)


def naive_resample(counts_row: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Image indices of one replicate, by an obvious loop: each drawn patient's slices."""
    chosen = []
    for patient, times in enumerate(counts_row):
        for _ in range(times):
            chosen += [i for i in range(len(groups)) if groups[i] == patient]
    return np.array(chosen, dtype=np.int64)


def test_bootstrap_replicates_match_a_naive_loop():
    paths, labels, scores, masks, maps = small_case()
    groups, names = bootstrap.groups_of(paths)
    counts = bootstrap.resample_counts(len(names), 40, seed=111)
    images = bootstrap.image_replicates(labels, scores, groups, counts)
    pixels = bootstrap.pixel_replicates(bootstrap.group_histograms(masks, maps, groups, len(names)),
                                         counts)
    checked = 0
    for replicate, row in enumerate(counts):
        chosen = naive_resample(row, groups)
        y, s = labels[chosen], scores[chosen]
        if 0 < y.sum() < len(y):
            assert images["image_auroc"][replicate] == pytest.approx(roc_auc_score(y, s))
            assert images["image_ap"][replicate] == pytest.approx(average_precision_score(y, s))
            assert images["image_f1_max"][replicate] == pytest.approx(brute_force_f1(y.astype(bool), s)[0])
        else:
            assert math.isnan(images["image_auroc"][replicate])
        m, p = masks[chosen], maps[chosen]
        if m.any() and not m.all():
            checked += 1
            assert pixels["pixel_auroc"][replicate] == pytest.approx(roc_auc_score(m.ravel(), p.ravel()), abs=1e-9)
            assert pixels["pixel_ap"][replicate] == pytest.approx(
                average_precision_score(m.ravel(), p.ravel()), abs=1e-9)
            assert pixels["pixel_aupro"][replicate] == pytest.approx(reference_aupro(m, p), abs=1e-9)
            assert pixels["pixel_f1_max"][replicate] == pytest.approx(brute_force_f1(m.ravel(), p.ravel())[0])
        else:
            assert math.isnan(pixels["pixel_auroc"][replicate])
    assert checked > 20


def test_interval_is_the_central_95_percent_and_skips_nan():
    values = np.concatenate([np.arange(1, 201) / 200, [np.nan] * 5])
    low, high = bootstrap.interval(values)
    assert low == pytest.approx(np.percentile(np.arange(1, 201) / 200, 2.5))
    assert high == pytest.approx(np.percentile(np.arange(1, 201) / 200, 97.5))
    assert all(math.isnan(v) for v in bootstrap.interval(np.full(3, np.nan)))


def test_patient_level_takes_any_label_and_max_score():
    labels = np.array([0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.1, 0.3, 0.4])
    groups = np.array([0, 0, 1, 2, 2])
    patient_labels, patient_scores = bootstrap.patient_level(labels, scores, groups, 3)
    assert patient_labels.tolist() == [1, 0, 0]
    assert patient_scores.tolist() == [0.9, 0.1, 0.4]


def test_meta_classes_map_paths_to_their_class(tmp_path):
    meta = {"test": {"brain": [{"img_path": "b/1.png", "anomaly": 0}],
                     "liver": [{"img_path": "l/2.png", "anomaly": 1}]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert bootstrap.meta_classes(str(tmp_path), "test") == {
        str(tmp_path / "b/1.png"): "brain", str(tmp_path / "l/2.png"): "liver"}
    assert bootstrap.meta_classes(str(tmp_path / "nothing"), "test") == {}


def test_image_replicates_without_histograms_agree(monkeypatch):
    paths, labels, scores, _, _ = small_case(1)
    groups, names = bootstrap.groups_of(paths)
    counts = bootstrap.resample_counts(len(names), 30, seed=5)
    by_histogram = bootstrap.image_replicates(labels, scores, groups, counts)
    monkeypatch.setattr(bootstrap, "HISTOGRAM_CELLS", 1)  # too many cells: resample and score each
    by_loop = bootstrap.image_replicates(labels, scores, groups, counts)
    for key, values in by_histogram.items():
        np.testing.assert_allclose(values, by_loop[key], atol=1e-12)
