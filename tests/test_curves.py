"""curves.py and train.py: metrics.csv and curves.png come from the run itself, every epoch."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import cv2
import pytest
import torch

import curves
import train
from generate_dataset.demo import build_demo
from tests.helpers import TINY


@pytest.fixture(autouse=True)
def keep_logging_as_it_was():
    """train.main's setup_logging stops the medvmad logger propagating; later tests' caplog needs it."""
    logger = logging.getLogger("medvmad")
    propagate, level, handlers = logger.propagate, logger.level, list(logger.handlers)
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate, logger.level = propagate, level


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_rows_are_added_per_epoch_and_a_resumed_epoch_replaces_its_row(tmp_path):
    for epoch, loss in ((1, 0.9), (2, 0.7), (3, 0.6)):
        curves.log_epoch(tmp_path, epoch, {"loss": loss, "focal": loss / 3},
                         {"image_auroc": 0.5 + epoch / 10, "Brain/image_auroc": 0.5 + epoch / 10,
                          "Brain/pixel_aupro": 0.2 * epoch, "Brain/image_f1_threshold": 0.4})
    curves.log_epoch(tmp_path, 3, {"loss": 0.5, "focal": 0.1}, {"image_auroc": 0.95})   # resumed at epoch 3
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train/focal", "train/loss", "Brain/image_auroc",
                             "Brain/image_f1_threshold", "Brain/pixel_aupro", "image_auroc"]
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert [float(row["train/loss"]) for row in rows] == [0.9, 0.7, 0.5]
    assert float(rows[1]["Brain/pixel_aupro"]) == 0.4 and rows[2]["Brain/pixel_aupro"] == ""
    assert curves.plotted_metrics(curves.read_rows(tmp_path / "metrics.csv")) == [
        "image_auroc", "Brain/image_auroc", "Brain/pixel_aupro"]
    image = cv2.imread(str(tmp_path / "curves.png"))
    assert image.shape == (420, 1100, 3) and image.std() > 10
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_training_writes_the_run_s_own_numbers_every_epoch(tmp_path, caplog):
    demo = build_demo(str(tmp_path / "data"), n_train=4, n_valid=(6, 6), n_test=(2, 2), image_size=64)
    run = tmp_path / "run"
    train.main(["--train_data_path", demo, "--save_path", str(run), "--epoch", "2", "--learning_rate", "1e-3",
                "--tensorboard", *TINY])
    rows = read_csv(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:  # the numbers stored in that epoch's checkpoint, not a copy typed in
        state = torch.load(run / f"epoch_{row['epoch']}.pth", weights_only=True)
        for key in ("loss", "focal", "dice", "image"):
            assert float(row[f"train/{key}"]) == pytest.approx(state["train_loss"][key], rel=1e-5)
        for key in ("image_auroc", "pixel_auroc", "Brain/image_auroc", "Brain/pixel_auroc", "Brain/pixel_aupro"):
            assert float(row[key]) == pytest.approx(state["selection_metrics"][key], rel=1e-5, abs=1e-6)
    assert cv2.imread(str(run / "curves.png")) is not None
    try:
        import tensorboard  # noqa: F401
        assert any((run / "tensorboard").iterdir())
    except ImportError:  # optional: the run goes on and says why there is no TensorBoard log
        assert "tensorboard package is not installed" in (run / "train_log.txt").read_text()
