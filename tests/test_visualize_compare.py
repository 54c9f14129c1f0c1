"""visualize_compare.py: panel layout, column titles, one shared heat scale, honest image picking,
bad input as one line; two tiny checkpoints trained 1 epoch on a small demo set."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import train
import visualize_compare
from CLIP.checkpoint import load_model
from dataset import MedicalDataset, list_samples
from generate_dataset.demo import build_demo
from tests.helpers import TINY, TINY_SIZE
from utils import InputError


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, list[str]]:
    """The demo root and two checkpoints (different seeds) trained 1 epoch."""
    root = build_demo(str(tmp_path_factory.mktemp("data")), n_train=2, n_valid=(4, 4), n_test=(4, 4),
                      image_size=TINY_SIZE)
    folder = tmp_path_factory.mktemp("runs")
    paths = []
    for name, seed in (("first", "1"), ("second", "2")):
        train.main(["--train_data_path", root, "--save_path", str(folder / name), "--epoch", "1",
                    "--learning_rate", "1e-3", "--seed", seed, *TINY])
        paths.append(str(folder / name / "best.pth"))
    return root, paths


def spy_figure(monkeypatch) -> list:
    seen = []
    real = visualize_compare.comparison_figure
    monkeypatch.setattr(visualize_compare, "comparison_figure",
                        lambda *args, **kwargs: seen.append(real(*args, **kwargs)) or seen[-1])
    return seen


def test_layout_titles_and_one_shared_heat_scale(tmp_path, runs, monkeypatch, capsys):
    root, checkpoints = runs
    figures = spy_figure(monkeypatch)
    out = visualize_compare.main(["--checkpoint_path", *checkpoints, "--data_path", root, "--n_abnormal", "2",
                                  "--n_normal", "1", "--save_path", str(tmp_path / "fig.png"), "--device", "cpu"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "fig.png")
    assert cv2.imread(str(out)) is not None and not list(tmp_path.glob(".*.tmp"))
    figure = figures[0]
    panels, colorbar = figure.axes[:-1], figure.axes[-1]
    rows, columns = 3, 2 + len(checkpoints)
    assert len(panels) == rows * columns
    # default names: both checkpoints are plain medvmad, so each takes its folder name
    titles = ["image", "medvmad (first)", "medvmad (second)", "ground truth"]
    assert [axis.get_title() for axis in panels[:columns]] == titles
    assert all(axis.get_title() == "" for axis in panels[columns:])
    heat = [panels[r * columns + c].images[0] for r in range(rows) for c in range(1, columns - 1)]
    limits = {image.get_clim() for image in heat}
    assert len(limits) == 1
    vmin, vmax = limits.pop()
    drawn = np.stack([image.get_array() for image in heat])
    assert (vmin, vmax) == pytest.approx((drawn.min(), drawn.max()))
    assert heat[-1].colorbar.ax is colorbar and colorbar.get_ylim() == pytest.approx((vmin, vmax))
    # first column the image (RGB), last the mask; abnormal rows first, labelled
    assert panels[0].images[0].get_array().shape == (TINY_SIZE, TINY_SIZE, 3)
    assert panels[columns - 1].images[0].get_array().any()  # the largest lesion
    assert [panels[r * columns].get_ylabel().split("\n")[1] for r in range(rows)] == ["abnormal", "abnormal", "normal"]


def test_chosen_images_in_order_with_given_names(tmp_path, runs, monkeypatch):
    root, checkpoints = runs
    samples = list_samples(root, "test")
    chosen = [next(s for s in samples if s.label == 0).image_path, next(s for s in samples if s.label == 1).image_path]
    figures = spy_figure(monkeypatch)
    visualize_compare.main(["--checkpoint_path", checkpoints[1], checkpoints[0], "--data_path", root,
                            "--names", "B", "A", "--image_paths", *chosen, "--save_path", str(tmp_path / "f.png")])
    panels = figures[0].axes[:-1]
    assert [axis.get_title() for axis in panels[:4]] == ["image", "B", "A", "ground truth"]
    assert len(panels) == 8
    assert [panels[r * 4].get_ylabel().split("\n")[0] for r in range(2)] == [Path(p).stem for p in chosen]
    assert not panels[3].images[0].get_array().any() and panels[7].images[0].get_array().any()
    # each heat panel is its own model's map of its own row's image, as drawn (not transposed)
    by_path = {s.image_path: s for s in samples}
    items = [MedicalDataset([by_path[path] for path in chosen], TINY_SIZE)[i] for i in range(2)]
    for column, checkpoint in ((1, checkpoints[1]), (2, checkpoints[0])):
        model = load_model(checkpoint, torch.device("cpu"))[0].eval()
        with torch.no_grad():
            expected = model(torch.stack([item["image"] for item in items])).anomaly_map.numpy()
        for row in range(2):
            np.testing.assert_allclose(panels[row * 4 + column].images[0].get_array(), expected[row], atol=1e-5)
    for row in range(2):
        np.testing.assert_array_equal(panels[row * 4 + 3].images[0].get_array(), items[row]["mask"].numpy() > 0.5)


def test_picking_uses_lesion_area_and_a_fixed_seed_only(runs):
    root, _ = runs
    samples = list_samples(root, "test")
    picked = visualize_compare.pick_samples(samples, 2, 2, seed=0)
    assert picked == visualize_compare.pick_samples(list(reversed(samples)), 2, 2, seed=0)
    areas = {s.image_path: int(cv2.imread(s.mask_path, cv2.IMREAD_GRAYSCALE).astype(bool).sum())
             for s in samples if s.label == 1}
    assert [areas[s.image_path] for s in picked[:2]] == sorted(areas.values(), reverse=True)[:2]
    assert [s.label for s in picked] == [1, 1, 0, 0]


def test_bad_input_is_one_line_naming_the_path(tmp_path, runs):
    root, checkpoints = runs
    base = ["--save_path", str(tmp_path / "f.png")]
    with pytest.raises(InputError, match=f"--checkpoint_path {tmp_path / 'no.pth'}: no such file"):
        visualize_compare.main(["--checkpoint_path", checkpoints[0], str(tmp_path / "no.pth"),
                                "--data_path", root, *base])
    with pytest.raises(InputError, match=f"data path {tmp_path / 'nodata'} does not exist"):
        visualize_compare.main(["--checkpoint_path", checkpoints[0], "--data_path", str(tmp_path / "nodata"), *base])
    train_image = list_samples(root, "train")[0].image_path
    with pytest.raises(InputError, match=f"--image_paths {train_image}: not an image of the test split"):
        visualize_compare.main(["--checkpoint_path", checkpoints[0], "--data_path", root,
                                "--image_paths", train_image, *base])
    with pytest.raises(InputError, match="--names gives 1 names for 2"):
        visualize_compare.main(["--checkpoint_path", *checkpoints, "--data_path", root, "--names", "x", *base])
