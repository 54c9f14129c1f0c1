"""End to end: train.py -> test.py on a small demo set with the tiny model (CPU)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import train
from CLIP.checkpoint import load_model
from dataset import load_image, preprocess
from generate_dataset.demo import build_demo
from utils import InputError
from tests.helpers import (TINY, TINY_SIZE, f1_max_threshold, reference_aupro, run_train, spy_predict,
                           test_script)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=4, n_valid=(8, 8), n_test=(6, 6),
                      image_size=TINY_SIZE)


def masks_from_disk(paths: list[str]) -> np.ndarray:
    """Ground truth read straight from the demo files (64 px, as the maps): Ungood/anomaly_mask > 0."""
    masks = []
    for path in map(Path, paths):
        mask_path = path.parent.parent / "anomaly_mask" / path.name
        masks.append(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 0 if path.parts[-3] == "Ungood"
                     else np.zeros((TINY_SIZE, TINY_SIZE), bool))
    return np.stack(masks)


def test_train_then_test_writes_every_file(tmp_path, demo, monkeypatch, strict_json_files):
    """best.pth is the epoch with the best mean selection AUROC, with its F1-max threshold; test.py's
    metrics equal scikit-learn's and a slow AUPRO on its maps and the masks on disk; the model learned."""
    selection = spy_predict(monkeypatch, train)
    run_train(tmp_path / "run", demo)
    for name in ("args.json", "train_log.txt", "epoch_1.pth", "epoch_2.pth", "best.pth"):
        assert (tmp_path / "run" / name).is_file(), name
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    assert best["config"]["backbone"]["model_name"] == "tiny" and "optimizer" not in best
    assert best["framing"] == {"axis": 2, "window": None, "white_level": 0.65, "min_area": 0.75, "size": TINY_SIZE,
                               "margin": 0.06, "slice_range": None, "skip_empty": False,
                               "masked": None}  # the demo's, from its demo.json: volumes are framed alike
    assert len(selection) == 2  # one selection pass per epoch, on held-out valid images only
    assert all("/valid/" in path for path in selection[0].paths)
    means = [np.mean([roc_auc_score(p.labels, p.scores),
                      roc_auc_score(masks_from_disk(p.paths).ravel(), p.maps.astype(np.float32).ravel())])
             for p in selection]
    assert best["epoch"] == 1 + int(np.argmax(means))
    chosen = selection[best["epoch"] - 1]
    assert best["threshold"] == pytest.approx(f1_max_threshold(chosen.labels, chosen.scores), abs=1e-6)

    out = tmp_path / "results"
    tested = spy_predict(monkeypatch, test_script)
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(tmp_path / "run" / "best.pth"),
                                "--save_path", str(out), "--num_workers", "0", "--device", "cpu",
                                "--batch_size", "5", "--visualize", "2"])
    brain = summary["datasets"]["Brain"]
    assert brain["n_images"] == 12 and brain["n_abnormal"] == 6
    written = json.loads((out / "results.json").read_text())
    assert written["datasets"]["Brain"] == pytest.approx(brain)
    assert written["checkpoint"]["epoch"] == best["epoch"] and written["versions"]["torch"]

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 12 and all("/test/" in row["path"] for row in rows)
    assert [int(r["label"]) for r in rows] == [int("/Ungood/" in r["path"]) for r in rows]
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert brain["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert brain["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)
    [predictions] = tested
    assert predictions.paths == [r["path"] for r in rows]
    model, _ = load_model(tmp_path / "run" / "best.pth", torch.device("cpu"))
    with torch.no_grad():  # each image scored alone, straight from its file: maps keep their orientation
        direct = model.eval()(torch.stack([preprocess(load_image(path), TINY_SIZE) for path in predictions.paths]))
    np.testing.assert_allclose(predictions.maps.astype(np.float32), direct.anomaly_map.numpy(), atol=1e-3)
    np.testing.assert_allclose(scores, direct.image_score.numpy(), atol=1e-5)
    masks, maps = masks_from_disk(predictions.paths), predictions.maps.astype(np.float32)
    assert brain["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert brain["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps), abs=1e-6)
    assert brain["pixel_auroc"] > 0.75  # far above chance: maps and masks line up (0.92 when written)

    table = list(csv.reader((out / "results.csv").open()))
    assert table[0] == ["dataset", "image AUROC", "image AP", "pixel AUROC", "pixel AUPRO"]
    assert table[1][0] == "Brain" and table[-1][0] == "mean"
    assert table[1][1:] == [f"{100 * brain[k]:.1f}" for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")]
    assert len(list((out / "visualization" / "Brain" / "abnormal").glob("*.png"))) == 2
    assert (out / "visualization" / "Brain" / "roc_image.png").is_file()
    assert (out / "visualization" / "Brain" / "pro_pixel.png").is_file()
    assert {"run/args.json", "results/results.json", "results/manifest.json"} <= set(strict_json_files(tmp_path))


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, demo):
    """A run stopped after epoch 1 and resumed ends with bit-identical weights; changed flags are refused."""
    run_train(tmp_path / "whole", demo)
    train.main(["--train_data_path", demo, "--save_path", str(tmp_path / "split"), "--epoch", "1",
                "--learning_rate", "1e-3", *TINY])
    with pytest.raises(InputError, match="started with other --learning_rate 0.001"):
        run_train(tmp_path / "split", demo, "--resume", "--learning_rate", "1e-2")
    with pytest.raises(InputError, match="started with other --keep last"):
        run_train(tmp_path / "split", demo, "--resume", "--keep", "best")
    run_train(tmp_path / "split", demo, "--resume", "--adam_betas", "0.5", "0.999")  # the recipe's, given
    whole = torch.load(tmp_path / "whole" / "epoch_2.pth", weights_only=True)["trainable"]
    resumed = torch.load(tmp_path / "split" / "epoch_2.pth", weights_only=True)["trainable"]
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, demo, monkeypatch):
    """A NaN loss stops the run naming the last good checkpoint, which stays finite and intact."""
    real_loss = train.medvmad_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:  # epoch 1 has 3 steps of batch 4 on 12-13 images
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(train, "medvmad_loss", poisoned)
    with pytest.raises(InputError, match=r"loss became nan at epoch 2 .*epoch_1\.pth"):
        run_train(tmp_path / "run", demo)
    kept = torch.load(tmp_path / "run" / "epoch_1.pth", weights_only=True)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["trainable"].values())
    assert not (tmp_path / "run" / "epoch_2.pth").exists()


def test_training_never_reads_the_test_split(tmp_path, demo):
    """Training and selection read valid/ only: unreadable test/ and no train/ do not matter."""
    copy = tmp_path / "Brain"
    shutil.copytree(demo, copy)
    for image in (copy / "test").rglob("*.png"):
        image.write_bytes(b"unreadable")
    shutil.rmtree(copy / "train")  # not used either: training reads valid/
    run_train(tmp_path / "run", str(copy), "--epoch", "1")
    assert (tmp_path / "run" / "best.pth").is_file()


def test_zero_training_baseline_and_bad_inputs(tmp_path, demo):
    """The baseline runs without a checkpoint; missing data, a foreign backbone or a non-checkpoint are errors."""
    summary = test_script.main(["--data_path", demo, "--model_name", "tiny", "--pretrained", "none",
                                "--image_size", str(TINY_SIZE), "--save_path", str(tmp_path / "base"),
                                "--num_workers", "0", "--device", "cpu", "--metrics", "image-level"])
    assert summary["checkpoint"] is None and "pixel_auroc" not in summary["datasets"]["Brain"]
    with pytest.raises(InputError, match="missing"):
        test_script.main(["--data_path", str(tmp_path / "missing"), "--model_name", "tiny", "--pretrained",
                          "none", "--save_path", str(tmp_path / "x"), "--device", "cpu"])
    checkpoint = tmp_path / "run" / "best.pth"
    run_train(tmp_path / "run", demo, "--epoch", "1")
    with pytest.raises(InputError, match="trained on tiny, not --model_name ViT-B-16"):
        test_script.main(["--data_path", demo, "--checkpoint_path", str(checkpoint), "--model_name", "ViT-B-16",
                          "--save_path", str(tmp_path / "x"), "--device", "cpu"])
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"visual.proj": torch.zeros(2)}, not_a_checkpoint)
    with pytest.raises(InputError, match="not a MedVMAD checkpoint"):
        test_script.main(["--data_path", demo, "--checkpoint_path", str(not_a_checkpoint),
                          "--save_path", str(tmp_path / "x"), "--device", "cpu"])


def test_fewshot_train_and_test_share_the_support_set(tmp_path, demo, monkeypatch):
    """train.py samples k normal + k abnormal valid images; test.py banks exactly that file's normal images."""
    run = tmp_path / "fewshot"
    train.main(["--train_data_path", demo, "--save_path", str(run), "--epoch", "1", "--k_shot", "2",
                "--fewshot_seed", "3", *TINY])
    support = run / "support_2shot_seed3.txt"
    lines = [line.split("\t") for line in support.read_text().splitlines() if not line.startswith("#")]
    assert [fields[0] for fields in lines] == ["0", "0", "1", "1"]
    for fields in lines:
        folder = "valid/good/img/" if fields[0] == "0" else "valid/Ungood/img/"
        assert fields[1].startswith(folder) and (Path(demo) / fields[1]).is_file()
        assert len(fields) == (2 if fields[0] == "0" else 3)  # abnormal images carry their mask
    banked = []
    real_bank = test_script.memory_bank_from_support

    def spy(model, samples, *args, **kwargs):
        result = real_bank(model, samples, *args, **kwargs)
        banked.append(([s.image_path for s in samples if s.label == 0], model.memory_bank.groups.clone()))
        return result

    monkeypatch.setattr(test_script, "memory_bank_from_support", spy)
    tested = spy_predict(monkeypatch, test_script)
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(run / "best.pth"), "--k_shot", "2",
                                "--fewshot_seed", "3", "--save_path", str(tmp_path / "res"),
                                "--num_workers", "0", "--device", "cpu"])
    assert summary["support_files"]["Brain"] == str(support)
    assert (tmp_path / "res" / "support_Brain_2shot_seed3.txt").read_text() == support.read_text()
    [(normal_paths, groups)] = banked
    assert [Path(p) for p in normal_paths] == [Path(demo) / fields[1] for fields in lines[:2]]
    assert torch.bincount(groups).tolist() == [11 * 16, 11 * 16]  # 2 images x 11 copies x 16 patches
    [predictions] = tested
    masks, maps = masks_from_disk(predictions.paths), predictions.maps.astype(np.float32)
    pixel_auroc = summary["datasets"]["Brain"]["pixel_auroc"]
    assert pixel_auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)


def test_best_checkpoint_is_the_epoch_with_the_best_mean_of_image_and_pixel_auroc(tmp_path, monkeypatch):
    """Selection keeps the best mean(image AUROC, pixel AUROC) epoch, not the last, the max or one metric."""
    small = build_demo(str(tmp_path / "data"), n_train=1, n_valid=(3, 3), n_test=(1, 1), image_size=TINY_SIZE)
    planned = iter([dict(image_auroc=0.9, pixel_auroc=0.4),   # mean 0.65, max 0.9
                    dict(image_auroc=0.7, pixel_auroc=0.7),   # mean 0.70: best
                    dict(image_auroc=0.3, pixel_auroc=0.8)])  # mean 0.55, last
    monkeypatch.setattr(train, "compute_metrics", lambda predictions: next(planned))
    run_train(tmp_path / "run", small, "--epoch", "3", "--keep", "best")
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    assert best["epoch"] == 2 and best["selection_metrics"]["pixel_auroc"] == pytest.approx(0.7)
    # medvmad's recipe keeps the last epoch, as the seed's code evaluates its final one
    planned = iter([dict(image_auroc=0.9, pixel_auroc=0.4), dict(image_auroc=0.3, pixel_auroc=0.8)])
    run_train(tmp_path / "last", small, "--epoch", "2")
    assert torch.load(tmp_path / "last" / "best.pth", weights_only=True)["epoch"] == 2
    # (its threshold, F1-max over all selection sources pooled, is pinned in test_real_weights_and_data.py)


def test_dataset_without_masks_trains_with_the_image_loss_only(tmp_path, demo, monkeypatch):
    """Abnormal images without masks train with the image loss and select on image AUROC only."""
    copy = tmp_path / "Brain"
    shutil.copytree(demo, copy)
    shutil.rmtree(copy / "valid" / "Ungood" / "anomaly_mask")
    seen = []
    real_loss = train.medvmad_loss

    def spy(output, masks, labels, has_mask, weights, *rest):
        seen.append(has_mask.clone())
        return real_loss(output, masks, labels, has_mask, weights, *rest)

    monkeypatch.setattr(train, "medvmad_loss", spy)
    run_train(tmp_path / "run", str(copy), "--epoch", "1")
    labels_without_mask = torch.cat(seen)
    assert labels_without_mask.sum() < len(labels_without_mask)  # abnormal images carry no mask
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    assert "pixel_auroc" not in best["selection_metrics"] and "image_auroc" in best["selection_metrics"]


def test_test_split_without_masks_gets_image_metrics_only(tmp_path, demo):
    """A test split without masks gets sklearn's image AUROC and '-' for pixel metrics; an empty one is an error."""
    copy = tmp_path / "Brain"
    shutil.copytree(demo, copy)
    shutil.rmtree(copy / "test" / "Ungood" / "anomaly_mask")
    summary = test_script.main(["--data_path", str(copy), "--model_name", "tiny", "--pretrained", "none",
                                "--image_size", str(TINY_SIZE), "--save_path", str(tmp_path / "res"),
                                "--num_workers", "0", "--device", "cpu"])
    values = summary["datasets"]["Brain"]
    rows = list(csv.DictReader((tmp_path / "res" / "scores.csv").open()))
    recomputed = roc_auc_score([int(r["label"]) for r in rows], [float(r["score"]) for r in rows])
    assert values["image_auroc"] == pytest.approx(recomputed, abs=1e-6) and "pixel_auroc" not in values
    assert (tmp_path / "res" / "results.csv").read_text().splitlines()[1].endswith(",-,-")
    for image in (copy / "test" / "good" / "img").glob("*.png"):
        image.unlink()
    for image in (copy / "test" / "Ungood" / "img").glob("*.png"):
        image.unlink()
    with pytest.raises(InputError, match="test"):
        test_script.main(["--data_path", str(copy), "--model_name", "tiny", "--pretrained", "none",
                          "--save_path", str(tmp_path / "res2"), "--device", "cpu"])


def test_skip_bad_scores_the_readable_images_and_says_so(tmp_path, demo, capsys):
    """An unreadable test image stops the run unless --skip_bad, which scores the rest and says so."""
    copy = tmp_path / "Brain"
    shutil.copytree(demo, copy)
    broken = sorted((copy / "test" / "good" / "img").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    flags = ["--data_path", str(copy), "--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE),
             "--save_path", str(tmp_path / "res"), "--num_workers", "0", "--device", "cpu", "--metrics", "image-level"]
    with pytest.raises(InputError, match=broken.name):
        test_script.main(flags)
    summary = test_script.main(flags + ["--skip_bad"])
    assert summary["datasets"]["Brain"]["n_images"] == 11
    assert "skipped 1 bad sample" in capsys.readouterr().err


def test_valid_data_path_selects_on_another_dataset_and_trains_on_all(tmp_path, demo):
    """--valid_data_path selects on that dataset's valid split and trains on all training images."""
    other = build_demo(str(tmp_path / "other"), n_train=2, n_valid=(3, 3), n_test=(2, 2), image_size=TINY_SIZE,
                       view="coronal")
    run_train(tmp_path / "run", demo, "--epoch", "1", "--valid_data_path", other)
    log = (tmp_path / "run" / "train_log.txt").read_text()
    assert "Brain/valid (training): 16 images" in log
    assert "BrainCoronal (model selection): 6 images (3 normal, 3 abnormal" in log
