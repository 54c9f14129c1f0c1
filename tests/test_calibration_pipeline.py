"""Calibration and operating points end to end: train.py fits and stores them on its validation
images, test.py reports Brier, ECE and the four rates on the test split from them (or fits them on
the support set / valid split), never on the test split, with the ranking metrics untouched;
test_one_example.py gives each scan its probability and the operating point of its decision."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from evaluation import calibration, decisions
import test_one_example
import train
import visualization
from CLIP.MedVMAD import MedVMAD
from CLIP.checkpoint import save_checkpoint
from dataset import load_image, preprocess
from generate_dataset.demo import build_demo
from tests.helpers import (TINY, TINY_SIZE, f1_max_threshold, medvmad_logger_kept, run_train, save_calibrated,
                           sklearn_calibrated, slow_ece, slow_rates, spy_predict, test_script, tiny_config)
from utils import InputError

EVAL = ["--num_workers", "0", "--device", "cpu", "--batch_size", "4"]
BASELINE = ["--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE), *EVAL]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=4, n_valid=(10, 10), n_test=(6, 6),
                      image_size=TINY_SIZE)


@pytest.fixture(scope="module")
def poisoned(demo, tmp_path_factory) -> str:
    """The demo set with its test labels swapped (good <-> Ungood): what a fit on the test split would see."""
    copy = tmp_path_factory.mktemp("poisoned") / "Brain"
    shutil.copytree(demo, copy)
    test = copy / "test"
    (test / "good").rename(test / "was_good")
    (test / "Ungood").rename(test / "good")
    shutil.rmtree(test / "good" / "anomaly_mask")
    (test / "was_good").rename(test / "Ungood")
    return str(copy)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> tuple[Path, list]:
    """A checkpoint kept at --operating_point sensitivity=0.9, and the selection predictions it saw."""
    run = tmp_path_factory.mktemp("run")
    monkeypatch = pytest.MonkeyPatch()
    selection = spy_predict(monkeypatch, train)
    try:
        with medvmad_logger_kept():
            run_train(run, demo, "--epoch", "1", "--operating_point", "sensitivity=0.9")
    finally:
        monkeypatch.undo()
    return run / "best.pth", selection


def scores_csv(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def test_train_stores_a_calibration_and_threshold_fitted_on_its_validation_images(trained):
    path, selection = trained
    stored = torch.load(path, weights_only=True)
    [predictions] = selection  # one epoch, one selection pass: the held-out valid images
    assert all("/valid/" in p for p in predictions.paths)
    entry = stored["calibration"]
    np.testing.assert_array_equal(entry["scores"], predictions.scores)
    np.testing.assert_array_equal(entry["labels"], predictions.labels)
    assert entry["image"]["method"] == "platt" and entry["images"] == "validation images"
    expected = sklearn_calibrated(predictions.scores, predictions.labels, "sigmoid", predictions.scores)
    np.testing.assert_allclose(calibration.probabilities(entry["image"], predictions.scores), expected, atol=1e-6)
    assert stored["operating_point"] == "sensitivity=0.9"
    labels, scores, threshold = predictions.labels, predictions.scores, stored["threshold"]
    assert slow_rates(labels, scores, threshold)[0] >= 0.9  # reached on the validation images
    assert all(slow_rates(labels, scores, t)[0] < 0.9 for t in scores[scores > threshold])


def test_test_reports_brier_ece_and_rates_of_the_stored_calibration_with_intervals(trained, demo, tmp_path):
    path, _ = trained
    stored = torch.load(path, weights_only=True)
    out = tmp_path / "res"
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(path), "--save_path", str(out),
                                "--bootstrap", "20", *EVAL])
    brain, described = summary["datasets"]["Brain"], summary["calibration"]["Brain"]
    labels, scores = scores_csv(out)
    fit = stored["calibration"]["image"]
    probability = expit(fit["slope"] * scores + fit["intercept"])  # Platt's sigmoid, by hand
    assert brain["brier"] == pytest.approx(brier_score_loss(labels, probability), abs=1e-6)
    assert brain["ece"] == pytest.approx(slow_ece(labels, probability), abs=1e-6)
    sensitivity, specificity = slow_rates(labels, scores, stored["threshold"])
    assert (brain["sensitivity"], brain["specificity"]) == pytest.approx((sensitivity, specificity))
    called = scores >= stored["threshold"]
    if called.any():
        assert brain["ppv"] == pytest.approx(labels[called].mean())
    for key in ("brier", "ece", "sensitivity", "specificity", "ppv", "npv"):
        assert len(brain[f"{key}_ci"]) == 2
    assert described["threshold"] == stored["threshold"]
    assert described["operating_point"] == "sensitivity 0.9 on validation images"
    labels_valid = stored["calibration"]["labels"]
    assert described["calibration"] == (f"platt, fitted on {len(labels_valid)} validation images "
                                        f"({sum(labels_valid)} abnormal)")
    assert sum(described["reliability"]["count"]) == 12
    assert (out / "reliability_Brain.png").stat().st_size > 5000
    table = list(csv.reader((out / "results_calibration.csv").open()))
    assert table[0][:4] == ["dataset", "Brier", "Brier low", "Brier high"] and table[1][0] == "Brain"
    assert table[1][1] == f"{100 * brain['brier']:.1f}"
    assert json.loads((out / "results.json").read_text())["calibration"]["Brain"]["fit"] == fit


def test_another_operating_point_is_chosen_on_the_stored_validation_scores(trained, demo, tmp_path):
    path, _ = trained
    entry = torch.load(path, weights_only=True)["calibration"]
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(path), "--save_path", str(tmp_path),
                                "--operating_point", "specificity=0.5", "--metrics", "image-level", *EVAL])
    labels, scores = np.array(entry["labels"]), np.array(entry["scores"])
    lowest = min(t for t in scores if slow_rates(labels, scores, t)[1] >= 0.5)
    assert summary["calibration"]["Brain"]["threshold"] == lowest


def test_ranking_metrics_are_those_of_the_scores_whatever_the_calibration(trained, demo, tmp_path):
    """A stored isotonic step that ties most images, and no calibration at all (a checkpoint from
    before): AUROC, AP and the pixel metrics stay those of the scores; the old one says uncalibrated."""
    path, _ = trained
    stored = torch.load(path, weights_only=True)
    calibrated = test_script.main(["--data_path", demo, "--checkpoint_path", str(path), "--save_path",
                                   str(tmp_path / "calibrated"), *EVAL])["datasets"]["Brain"]
    labels, scores = scores_csv(tmp_path / "calibrated")
    middle = float(np.median(scores))
    step = {"method": "isotonic", "x": [middle, middle + 1e-9], "y": [0.2, 0.8], "n_images": 4, "n_abnormal": 2}
    assert roc_auc_score(labels, calibration.probabilities(step, scores)) != roc_auc_score(labels, scores)
    torch.save({**stored, "calibration": {**stored["calibration"], "image": step}}, tmp_path / "step.pth")
    old = {key: value for key, value in stored.items() if key not in ("calibration", "operating_point")}
    torch.save(old, tmp_path / "old.pth")
    for name in ("step", "old"):
        summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(tmp_path / f"{name}.pth"),
                                    "--save_path", str(tmp_path / name), *EVAL])
        values = summary["datasets"]["Brain"]
        assert values["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert values["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro"):
            assert values[key] == calibrated[key], key
    assert summary["calibration"]["Brain"]["calibration"] == "uncalibrated" and "brier" not in values
    assert values["sensitivity"] == calibrated["sensitivity"]  # at the threshold it stores
    with pytest.raises(InputError, match="old.pth was saved before calibration was stored"):
        test_script.main(["--data_path", demo, "--checkpoint_path", str(tmp_path / "old.pth"),
                          "--save_path", str(tmp_path / "x"), "--operating_point", "youden", *EVAL])


def test_the_baseline_is_calibrated_on_the_valid_split_never_on_the_test_split(demo, poisoned, tmp_path):
    summaries = [test_script.main(["--data_path", root, "--save_path", str(tmp_path / name), "--metrics",
                                   "image-level", *BASELINE])
                 for name, root in (("clean", demo), ("poisoned", poisoned))]
    clean, dirty = (summary["calibration"]["Brain"] for summary in summaries)
    assert clean["calibration"] == "platt, fitted on 20 valid split images (10 abnormal)"
    assert clean["fit"] == dirty["fit"] and clean["threshold"] == dirty["threshold"]
    assert summaries[0]["datasets"]["Brain"]["brier"] != summaries[1]["datasets"]["Brain"]["brier"]
    on_valid = test_script.main(["--data_path", demo, "--save_path", str(tmp_path / "valid"), "--split", "valid",
                                 "--metrics", "image-level", *BASELINE])
    assert on_valid["calibration"]["Brain"]["calibration"] == "uncalibrated"  # never the evaluated split
    assert "brier" not in on_valid["datasets"]["Brain"] and "sensitivity" not in on_valid["datasets"]["Brain"]


def test_fewshot_is_calibrated_on_its_support_set_never_on_the_test_split(demo, poisoned, tmp_path, monkeypatch):
    """The normal support images scored against the bank without them, the abnormal ones as test images."""
    run = tmp_path / "fewshot"
    train.main(["--train_data_path", demo, "--save_path", str(run), "--epoch", "1", "--k_shot", "2", *TINY])
    seen, fitted_on = [], []
    real = decisions.support_predictions
    monkeypatch.setattr(decisions, "support_predictions", lambda model, support, *rest, **named: (
        seen.append((model, support)) or real(model, support, *rest, **named)))
    real_fit = calibration.Calibration.fitted
    monkeypatch.setattr(calibration.Calibration, "fitted", lambda scores, labels, *rest: (
        fitted_on.append((np.array(scores), np.array(labels))) or real_fit(scores, labels, *rest)))
    described = []
    for name, root in (("clean", demo), ("poisoned", poisoned)):
        summary = test_script.main(["--data_path", root, "--checkpoint_path", str(run / "best.pth"), "--k_shot",
                                    "2", "--save_path", str(tmp_path / name), "--metrics", "image-level", *EVAL])
        described.append(summary["calibration"]["Brain"])
    assert described[0]["calibration"] == "platt, fitted on 4 support images (2 abnormal)"
    assert described[0]["operating_point"] == "F1-max on support images"
    assert described[0]["fit"] == described[1]["fit"] and described[0]["threshold"] == described[1]["threshold"]
    model, support = seen[-1]
    normal = model.memory_bank.left_out_scores(model.config.fewshot_weight).numpy()
    with torch.no_grad():
        abnormal = model(torch.stack([preprocess(load_image(s.image_path), TINY_SIZE) for s in support
                                      if s.label == 1])).image_score.double().numpy()
    scores = np.r_[normal, abnormal]
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(abnormal), int)]
    np.testing.assert_allclose(fitted_on[-1][0], scores, rtol=1e-6)  # what the support set was calibrated on
    np.testing.assert_array_equal(fitted_on[-1][1], labels)
    assert described[1]["threshold"] == pytest.approx(f1_max_threshold(labels, scores), rel=1e-6)
    on_valid = test_script.main(["--data_path", demo, "--checkpoint_path", str(run / "best.pth"), "--k_shot", "2",
                                 "--split", "valid", "--save_path", str(tmp_path / "valid"), "--metrics",
                                 "image-level", *EVAL])
    assert on_valid["calibration"]["Brain"]["calibration"] == "uncalibrated"  # its support images are tested there


def by_patient(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Patient labels (any image abnormal) and scores (the highest), a loop over the names."""
    patients = sorted(set(names))
    return (np.array([max(y for y, n in zip(labels, names) if n == p) for p in patients]),
            np.array([max(s for s, n in zip(scores, names) if n == p) for p in patients]))


def youden_by_hand(labels: np.ndarray, scores: np.ndarray) -> float:
    candidates = np.unique(scores)[::-1]
    return candidates[int(np.argmax([sum(slow_rates(labels, scores, t)) - 1 for t in candidates]))]


def test_patients_are_read_by_their_highest_score_with_their_own_calibration_and_threshold(trained, demo, tmp_path):
    """A stored calibration of 20 validation patients (3 images each) at Youden's J: the patient rows
    are the test patients' highest scores, mapped and thresholded as fitted on those patients."""
    path, _ = trained
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    scores = np.r_[rng.uniform(0.40, 0.48, 30), rng.uniform(0.44, 0.52, 30)]
    # patients v0-v4: three normal images; v5-v19: one normal and two abnormal
    names = [f"v{p}" for p in np.r_[np.repeat(np.arange(5), 3), np.arange(5, 20), np.repeat(np.arange(5, 20), 2)]]
    entry = calibration.Calibration.fitted(scores, labels, names, "validation images").to_dict()
    stored = torch.load(path, weights_only=True)
    torch.save({**stored, "calibration": entry, "operating_point": "youden"}, tmp_path / "c.pth")
    out = tmp_path / "res"
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(tmp_path / "c.pth"), "--save_path",
                                str(out), "--metrics", "image-level", *EVAL])
    valid_labels, valid_scores = by_patient(labels, scores, names)
    described = summary["calibration"]["Brain"]
    assert described["patients"]["threshold"] == youden_by_hand(valid_labels, valid_scores)
    assert described["threshold"] == youden_by_hand(labels, scores)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    test_labels, test_scores = by_patient([int(r["label"]) for r in rows], [float(r["score"]) for r in rows],
                                          [Path(r["path"]).stem.split("_")[0] for r in rows])
    patient = summary["patients"]["Brain"]
    assert patient["patient_sensitivity"] == pytest.approx(
        slow_rates(test_labels, test_scores, described["patients"]["threshold"])[0])
    # scikit-learn's solver stops about 1e-8 short of the optimum, which a slope of 80 moves by 1e-6 here
    probability = sklearn_calibrated(valid_scores, valid_labels, "sigmoid", test_scores)
    brier = brier_score_loss(test_labels, probability, labels=[0, 1])
    assert patient["patient_brier"] == pytest.approx(brier, abs=1e-5)
    assert patient["patient_ece"] == pytest.approx(slow_ece(test_labels, probability), abs=1e-5)
    assert described["patients"]["calibration"] == "platt, fitted on 20 validation patients " \
                                                   f"({int(valid_labels.sum())} abnormal)"


# ----------------------------------------------------------------------------- single scans


def one_example(tmp_path: Path, image: Path, *extra: str) -> dict:
    [record] = test_one_example.main(["--image_path", str(image), "--save_path", str(tmp_path / "out"), "--device",
                                      "cpu", *extra])
    return record


def test_a_scan_gets_its_calibrated_probability_and_the_operating_point_it_was_decided_at(tmp_path, capsys,
                                                                                          monkeypatch):
    figures = []
    real = visualization.overlay_figure
    monkeypatch.setattr(visualization, "overlay_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    entry = save_calibrated(tmp_path / "c.pth")
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.random.default_rng(2).integers(0, 255, (48, 40), dtype=np.uint8))
    record = one_example(tmp_path, image, "--checkpoint_path", str(tmp_path / "c.pth"))
    image_fit = entry["image"]
    assert record["probability"] == pytest.approx(expit(image_fit["slope"] * record["score"] + image_fit["intercept"]))
    labels, scores = np.array(entry["labels"]), np.array(entry["scores"])
    assert record["threshold"] == f1_max_threshold(labels, scores) and record["threshold_from"] == "checkpoint"
    assert record["decision"] == ("anomalous" if record["score"] >= record["threshold"] else "normal")
    assert record["operating_point"] == "F1-max on validation images"
    assert record["calibration"] == "platt, fitted on 60 validation images (30 abnormal)"
    assert figures[0].get_suptitle() == (f"score {record['score']:.3f} (probability {record['probability']:.2f}) "
                                         f"{record['decision']}")
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["probability"] == record["probability"] and printed["operating_point"] == record["operating_point"]
    picked = one_example(tmp_path, image, "--checkpoint_path", str(tmp_path / "c.pth"), "--operating_point",
                         "sensitivity=0.9")
    assert picked["threshold"] == max(t for t in scores if slow_rates(labels, scores, t)[0] >= 0.9)
    assert picked["operating_point"] == "sensitivity 0.9 on validation images"
    given = one_example(tmp_path, image, "--checkpoint_path", str(tmp_path / "c.pth"), "--threshold", "0.3")
    assert given["operating_point"] == "--threshold 0.3" and given["probability"] == record["probability"]


def test_a_volume_is_a_patient_read_by_its_highest_slice(tmp_path):
    entry = save_calibrated(tmp_path / "c.pth")
    volume = tmp_path / "small.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(3).uniform(0, 500, (40, 48, 5)).astype(np.float32),
                                     np.diag([1, 1, 2, 1.])), str(volume))
    record = one_example(tmp_path, volume, "--checkpoint_path", str(tmp_path / "c.pth"))
    patient_fit = entry["patient"]
    assert record["score"] == max(record["slice_scores"].values())
    assert record["probability"] == pytest.approx(expit(patient_fit["slope"] * record["score"]
                                                        + patient_fit["intercept"]))
    labels, scores = by_patient(np.array(entry["labels"]), np.array(entry["scores"]),
                                [f"p{p}" for p in entry["patients"]])
    assert record["threshold"] == f1_max_threshold(labels, scores) != record["slice_threshold"]
    assert record["slice_threshold"] == f1_max_threshold(np.array(entry["labels"]), np.array(entry["scores"]))
    assert record["slices_over_threshold"] == [int(k) for k, v in record["slice_scores"].items()
                                               if v >= record["slice_threshold"]]
    assert record["calibration"] == "platt, fitted on 20 validation patients (15 abnormal)"
    assert record["operating_point"] == "F1-max on validation patients"


def test_a_checkpoint_from_before_calibration_says_uncalibrated(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "old.pth", MedVMAD(tiny_config()), epoch=1, threshold=0.55)
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.full((32, 32), 90, np.uint8))
    record = one_example(tmp_path, image, "--checkpoint_path", str(tmp_path / "old.pth"))
    assert record["probability"] is None and record["calibration"] == "uncalibrated"
    assert record["threshold"] == 0.55 and record["operating_point"] == "F1-max on validation images"
    assert '"probability": null' in (tmp_path / "out" / "predictions.jsonl").read_text()
    with pytest.raises(InputError, match="old.pth was saved before calibration was stored: it knows only its F1-max"):
        one_example(tmp_path, image, "--checkpoint_path", str(tmp_path / "old.pth"), "--operating_point", "youden")
    with pytest.raises(InputError, match="--operating_point picks a threshold on a checkpoint's validation images"):
        one_example(tmp_path, image, "--model_name", "tiny", "--pretrained", "none", "--operating_point", "youden")
