"""evaluation/calibration.py against scikit-learn's own calibration, hand-computed figures and slow loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, f1_score

from evaluation import calibration
from evaluation import bootstrap
import train
from utils import InputError
from tests.helpers import sklearn_calibrated, slow_ece, slow_rates


def two_classes(n_normal: int, n_abnormal: int, seed: int, gap: float = 1.0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(0, 1, n_normal), rng.normal(gap, 1, n_abnormal)] * scale
    return scores, np.r_[np.zeros(n_normal, int), np.ones(n_abnormal, int)]


# ----------------------------------------------------------------------------- the maps

@pytest.mark.parametrize("scale", [1.0, 60.0, 1e-3])  # probabilities, few-shot z values, a narrow range
def test_platt_equals_scikit_learns_sigmoid_calibration(scale):
    scores, labels = two_classes(30, 20, seed=1, scale=scale)
    fitted = calibration.fit(scores, labels)
    assert fitted["method"] == "platt" and (fitted["n_images"], fitted["n_abnormal"]) == (50, 20)
    queries = np.linspace(scores.min() - scale, scores.max() + scale, 101)
    np.testing.assert_allclose(calibration.probabilities(fitted, queries),
                               sklearn_calibrated(scores, labels, "sigmoid", queries), atol=1e-6)


def test_platt_on_two_shot_support_stays_finite_and_equals_scikit_learn():
    """k = 2: two normal and two abnormal images that separate; Platt's targets keep the slope finite."""
    scores, labels = np.array([-1.5, -0.2, 3.0, 7.5]), np.array([0, 0, 1, 1])
    fitted = calibration.fit(scores, labels)
    assert np.isfinite(fitted["slope"]) and fitted["slope"] > 0
    np.testing.assert_allclose(calibration.probabilities(fitted, scores),
                               sklearn_calibrated(scores, labels, "sigmoid", scores), atol=1e-6)


def test_isotonic_from_the_rule_equals_scikit_learns_isotonic_calibration_after_a_weights_only_round_trip(tmp_path):
    """1000 images take isotonic regression; stored as lists in a checkpoint read with weights_only,
    it gives scikit-learn's probabilities, outside the fitted range too (clipped)."""
    scores, labels = two_classes(600, 400, seed=2)
    stored = calibration.Calibration.fitted(scores, labels, [str(i) for i in range(1000)], "validation images")
    assert stored.image["method"] == "isotonic"
    torch.save({"calibration": stored.to_dict()}, tmp_path / "c.pth")
    loaded = calibration.Calibration.from_dict(torch.load(tmp_path / "c.pth", weights_only=True)["calibration"], "x")
    queries = np.r_[np.linspace(scores.min() - 2, scores.max() + 2, 301), scores[:50]]
    np.testing.assert_allclose(calibration.probabilities(loaded.image, queries),
                               sklearn_calibrated(scores, labels, "isotonic", queries), atol=1e-12)
    assert calibration.fit(scores[:999], labels[:999])["method"] == "platt"  # the stated rule: fewer -> Platt


def test_a_platt_fit_that_would_fall_is_the_constant_base_rate():
    """Validation scores ranked the wrong way: the map stays non-decreasing, at Platt's smoothed base
    rate (3 abnormal: (3+1)/(3+2); 2 normal: 1/(2+2); mean over the 5 images = (3 * 0.8 + 2 * 0.25) / 5)."""
    scores, labels = np.array([0.9, 0.8, 0.1, 0.2, 0.3]), np.array([0, 0, 1, 1, 1])
    fitted = calibration.fit(scores, labels)
    assert fitted["slope"] == 0
    np.testing.assert_allclose(calibration.probabilities(fitted, np.array([-5.0, 0.5, 5.0])), 0.58)


def test_one_class_is_not_calibrated():
    assert calibration.fit(np.array([0.1, 0.4]), np.array([1, 1])) is None


@pytest.mark.parametrize("broken, message", [
    ({"method": "platt", "slope": -1.0, "intercept": 0.0, "n_images": 4, "n_abnormal": 2}, "slope is negative"),
    ({"method": "isotonic", "x": [0.2, 0.1], "y": [0.1, 0.2], "n_images": 4, "n_abnormal": 2}, "x must increase"),
    ({"method": "isotonic", "x": [0.1, 0.2], "y": [0.1, float("nan")], "n_images": 4, "n_abnormal": 2}, "finite"),
    ({"method": "bins"}, "not an isotonic or platt"),
])
def test_a_damaged_stored_calibration_is_one_line_naming_the_checkpoint(broken, message):
    stored = calibration.Calibration.fitted(np.array([0.1, 0.9]), np.array([0, 1]), ["a", "b"], "v").to_dict()
    stored["image"] = broken
    with pytest.raises(InputError, match=rf"--checkpoint_path x.pth: its calibration .*{message}"):
        calibration.Calibration.from_dict(stored, "--checkpoint_path x.pth")


# ----------------------------------------------------------------------------- operating points


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_a_sensitivity_target_is_reached_on_validation_at_the_highest_threshold(target):
    scores, labels = two_classes(40, 20, seed=3)  # 19/20 = 0.95 exactly: reached
    threshold = calibration.choose_threshold(labels, scores, calibration.operating_point(f"sensitivity={target}"))
    assert slow_rates(labels, scores, threshold)[0] >= target
    higher = scores[scores > threshold]
    assert all(slow_rates(labels, scores, t)[0] < target for t in higher)  # no higher threshold reaches it


@pytest.mark.parametrize("target", [0.5, 0.9, 1.0])
def test_a_specificity_target_is_reached_at_the_lowest_threshold(target):
    scores, labels = two_classes(40, 20, seed=4)
    threshold = calibration.choose_threshold(labels, scores, calibration.operating_point(f"specificity={target}"))
    assert slow_rates(labels, scores, threshold)[1] >= target
    lower = scores[scores < threshold]
    assert all(slow_rates(labels, scores, t)[1] < target for t in lower)


def test_specificity_one_above_every_normal_score_calls_nothing_when_a_normal_scores_highest():
    scores, labels = np.array([0.1, 0.9, 0.5]), np.array([1, 0, 1])
    threshold = calibration.choose_threshold(labels, scores, calibration.operating_point("specificity=1"))
    assert threshold > 0.9 and np.isfinite(threshold) and not (scores >= threshold).any()


def test_youden_and_f1_are_the_brute_force_best_thresholds():
    scores, labels = two_classes(30, 25, seed=5, gap=1.2)
    candidates = np.unique(scores)[::-1]  # the highest first: ties go to the higher threshold
    youden = [sum(slow_rates(labels, scores, t)) - 1 for t in candidates]
    f1 = [f1_score(labels, scores >= t) for t in candidates]
    assert calibration.choose_threshold(labels, scores, calibration.operating_point("youden")) == \
        candidates[int(np.argmax(youden))]
    assert calibration.choose_threshold(labels, scores, calibration.F1_MAX) == candidates[int(np.argmax(f1))]


@pytest.mark.parametrize("text", ["sensitivity", "sensitivity=0", "sensitivity=1.5", "specificity=nan",
                                  "sens=0.9", "f1=0.5", "youden=1", ""])
def test_a_bad_operating_point_is_one_line(text):
    with pytest.raises(InputError, match=r"argument --operating_point: expected f1, youden, sensitivity=X or "
                                         r"specificity=X with X in \(0, 1\]"):
        train.parse_args(["--operating_point", text])


def test_operating_points_read_and_describe_themselves():
    point = calibration.operating_point("sensitivity=0.950")
    assert str(point) == "sensitivity=0.95" and point.describe() == "sensitivity 0.95 on validation"
    assert calibration.operating_point("youden").describe("support images") == "Youden's J on support images"


# ----------------------------------------------------------------------------- figures and their intervals

def test_ece_by_hand_and_bins_as_scikit_learns_calibration_curve():
    """Bins of width 0.1, (b-1)/10 to b/10 with the edge in the lower bin: 0.1 goes with 0.05."""
    probability = np.array([0.05, 0.1, 0.15, 0.95, 0.85, 0.62, 0.68])
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    # bins: [0.05, 0.1] -> mean 0.075, observed 0.5; [0.15]: 0.15 vs 0; [0.62, 0.68]: 0.65 vs 0.5;
    # [0.85]: 0.85 vs 1; [0.95]: 0.95 vs 1
    by_hand = (2 * 0.425 + 0.15 + 2 * 0.15 + 0.15 + 0.05) / 7
    assert calibration.expected_calibration_error(labels, probability) == pytest.approx(by_hand, abs=1e-12)
    bins = calibration.reliability(labels, probability)
    assert bins["count"] == [2, 1, 0, 0, 0, 0, 2, 0, 1, 1]
    observed, predicted = calibration_curve(labels, probability, n_bins=10, strategy="uniform")
    kept = [i for i, count in enumerate(bins["count"]) if count]
    np.testing.assert_allclose([bins["observed"][i] for i in kept], observed)
    np.testing.assert_allclose([bins["mean_probability"][i] for i in kept], predicted)
    assert bins["observed"][2] is None


def test_figures_at_the_operating_point_and_their_patient_intervals_equal_a_slow_resampling_loop():
    scores, labels = two_classes(36, 24, seed=6)
    groups = np.arange(60) // 3  # 20 patients of 3 images
    fitted = calibration.fit(scores[::2], labels[::2])
    counts = bootstrap.resample_counts(20, 200, seed=0)
    threshold = np.sort(scores)[33]  # an image at the threshold is called abnormal
    values, bins = calibration.assess(labels, scores, fitted, threshold, groups, counts)
    probability = calibration.probabilities(fitted, scores)
    tn, fp, fn, tp = confusion_matrix(labels, scores >= threshold).ravel()
    assert values["sensitivity"] == tp / (tp + fn) and values["specificity"] == tn / (tn + fp)
    assert values["ppv"] == tp / (tp + fp) and values["npv"] == tn / (tn + fn)
    assert values["brier"] == pytest.approx(np.mean((probability - labels) ** 2), abs=1e-12)
    assert values["ece"] == pytest.approx(slow_ece(labels, probability), abs=1e-12)
    assert bins["count"] == np.bincount(np.clip(np.ceil(probability * 10) - 1, 0, 9).astype(int), minlength=10).tolist()
    slow = {key: [] for key in ("sensitivity", "specificity", "ppv", "npv", "brier", "ece")}
    for drawn in counts:
        chosen = np.concatenate([np.flatnonzero(groups == g).repeat(n) for g, n in enumerate(drawn)])
        y, s, p = labels[chosen], scores[chosen], probability[chosen]
        tn, fp, fn, tp = confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel()
        for key, (hit, miss) in {"sensitivity": (tp, fn), "specificity": (tn, fp), "ppv": (tp, fp),
                                 "npv": (tn, fn)}.items():
            slow[key].append(hit / (hit + miss) if hit + miss else np.nan)
        slow["brier"].append(brier_score_loss(y, p, labels=[0, 1]))
        slow["ece"].append(slow_ece(y, p))
    for key, samples in slow.items():
        np.testing.assert_allclose(values[f"{key}_ci"], bootstrap.interval(np.array(samples)), atol=1e-12)


def test_without_a_fit_or_a_threshold_nothing_is_made_up():
    values, bins = calibration.assess(np.array([0, 1]), np.array([0.2, 0.7]), None, None)
    assert values == {} and bins is None


def test_the_patient_calibration_is_fitted_on_each_patients_maximum_score():
    """A patient is abnormal when any image is, and scores its highest image; its map is the one
    scikit-learn fits on those patient scores."""
    scores, labels = two_classes(45, 45, seed=7)
    names = [f"case{p}" for p in np.random.default_rng(8).permutation(np.repeat(np.arange(30), 3))]
    fitted = calibration.Calibration.fitted(scores, labels, names, "validation images")
    patient_scores = np.array([scores[[n == f"case{p}" for n in names]].max() for p in range(30)])
    patient_labels = np.array([labels[[n == f"case{p}" for n in names]].max() for p in range(30)])
    assert fitted.patient["n_images"] == 30 and fitted.patient["n_abnormal"] == patient_labels.sum()
    np.testing.assert_allclose(calibration.probabilities(fitted.patient, patient_scores),
                               sklearn_calibrated(patient_scores, patient_labels, "sigmoid", patient_scores), atol=1e-6)
    point = calibration.operating_point("sensitivity=0.9")
    assert fitted.threshold(point, patients=True) == calibration.choose_threshold(patient_labels, patient_scores, point)


def test_a_checkpoint_from_before_calibration_is_uncalibrated_at_its_f1_threshold():
    decision = calibration.checkpoint_decision({"threshold": 0.55}, "old.pth", None)
    assert (decision.threshold, decision.patient_threshold, decision.image) == (0.55, 0.55, None)
    assert decision.calibration() == "uncalibrated" and decision.probability(0.9) is None
    assert decision.operating_point(patient=True) == "F1-max on validation images, applied to the highest slice"
    with pytest.raises(InputError, match="old.pth was saved before calibration was stored: .*sensitivity=0.9"):
        calibration.checkpoint_decision({"threshold": 0.55}, "old.pth", "sensitivity=0.9")


def test_a_checkpoint_whose_point_calls_nothing_abnormal_loads_with_its_threshold_above_one():
    """specificity=1 with a normal image at score 1.0: train.py stores the next float above 1, which the
    checkpoint's own decision reads back (and calls every image normal)."""
    scores, labels = np.array([0.2, 1.0, 0.5, 0.4]), np.array([1, 0, 1, 0])
    fitted = calibration.Calibration.fitted(scores, labels, ["a_1", "b_1", "c_1", "d_1"], "validation images")
    payload = {"calibration": fitted.to_dict(), "operating_point": "specificity=1",
               "threshold": float(np.nextafter(1.0, 2.0))}
    decision = calibration.checkpoint_decision(payload, "x.pth", None)
    assert decision.threshold == payload["threshold"] and not (scores >= decision.threshold).any()
    with pytest.raises(InputError, match="its threshold 1.5 is not a number in"):
        calibration.checkpoint_decision({**payload, "threshold": 1.5}, "x.pth", None)


def test_a_decision_reads_images_and_patients_each_with_its_own_map_and_threshold():
    scores, labels = two_classes(45, 45, seed=9)
    names = [f"case{p}" for p in np.random.default_rng(10).permutation(np.repeat(np.arange(30), 3))]
    fitted = calibration.Calibration.fitted(scores, labels, names, "validation images")
    point = calibration.operating_point("sensitivity=0.8")
    decision = calibration.Decision.chosen_by(fitted, point)
    patient_labels, patient_scores = fitted.patient_level()
    assert decision.threshold == calibration.choose_threshold(labels, scores, point)
    assert decision.patient_threshold == calibration.choose_threshold(patient_labels, patient_scores, point)
    assert decision.threshold != decision.patient_threshold
    assert decision.probability(0.4) == pytest.approx(float(sklearn_calibrated(scores, labels, "sigmoid",
                                                                                np.array([0.4]))[0]), abs=1e-6)
    assert decision.probability(0.4, patient=True) == pytest.approx(float(sklearn_calibrated(
        patient_scores, patient_labels, "sigmoid", np.array([0.4]))[0]), abs=1e-6)
    assert decision.operating_point() == "sensitivity 0.8 on validation images"
    assert decision.operating_point(patient=True) == "sensitivity 0.8 on validation patients"
    assert decision.calibration(patient=True).startswith("platt, fitted on 30 validation patients")


def test_the_reliability_diagram_draws_each_bin_against_its_observed_frequency_with_its_count():
    probability = np.random.default_rng(11).uniform(0, 1, 80)
    labels = (np.random.default_rng(12).uniform(0, 1, 80) < probability ** 2).astype(int)
    figure = calibration.reliability_figure([("Brain images", "images", calibration.reliability(labels, probability))])
    top, bottom = figure.axes
    observed, predicted = calibration_curve(labels, probability, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(top.lines[1].get_xydata(), np.c_[predicted, observed])  # x: predicted, y: observed
    np.testing.assert_array_equal(top.lines[0].get_xydata(), [[0, 0], [1, 1]])  # the diagonal
    counts = np.bincount(np.clip(np.ceil(probability * 10) - 1, 0, 9).astype(int), minlength=10)
    assert [patch.get_height() for patch in bottom.patches] == counts.tolist()
    assert [patch.get_x() for patch in bottom.patches] == pytest.approx(np.arange(10) / 10)
    assert top.get_title() == "Brain images" and bottom.get_ylabel() == "images"
