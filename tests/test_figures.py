"""Figures people look at: overlay panels (titles, colour bar, colormap and blending), ROC/PRO
curves (AUROC/AUPRO in the legend, the chance diagonal), test.py's --visualize files and
reliability diagram, the quick start's overlays (test.sh) and where test_one_example.py says it
wrote its outputs."""
from __future__ import annotations

import os
import re
import subprocess

import cv2
import matplotlib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import test_one_example
import visualization
from dataset import MedicalDataset, list_samples
from generate_dataset.demo import build_demo
from evaluation import figures as evaluation_figures
from evaluation.predict import Predictions
from tests.helpers import ROOT, blob_data, reference_aupro

INFERNO = matplotlib.colormaps["inferno"]  # the colormap the README names, at the alpha it states
ALPHA = 0.45


def quadrant_case(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image whose channels differ (R rises along columns, G along rows, B constant) and a heat
    map of four constant quadrants: 0 top-left, 1 top-right, 0.5 bottom-left, 0.25 bottom-right."""
    rows, columns = np.mgrid[:size, :size]
    image = np.stack([40 + 3 * columns, 30 + 2 * rows, np.full_like(rows, 200)], axis=2).astype(np.uint8)
    heat = np.zeros((size, size), np.float32)
    half = size // 2
    heat[:half, half:], heat[half:, :half], heat[half:, half:] = 1.0, 0.5, 0.25
    return image, heat


def expected_overlay(image: np.ndarray, score: float) -> np.ndarray:
    """The README's rule by hand: image x (1 - 0.45 s) + inferno(s) x 0.45 s, for a score s in [0, 1]."""
    colour = np.array(INFERNO(score)[:3]) * 255
    return image * (1 - ALPHA * score) + colour * ALPHA * score


def pixel_box(figure, axis) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows/columns of ``axis`` in the figure drawn by ``rendered``."""
    box = axis.get_window_extent(figure.canvas.get_renderer())
    height = figure.canvas.get_width_height()[1]
    return (int(round(height - box.y1)), int(round(height - box.y0)), int(round(box.x0)), int(round(box.x1)))


def test_overlay_panels_have_titles_and_a_colour_bar_of_the_score_scale():
    image, heat = quadrant_case()
    figure = visualization.overlay_figure(image, heat, 0.0, 1.0, heat > 0.9, "score 0.700 anomalous")
    *panels, bar = figure.axes
    assert [axis.get_title() for axis in panels] == ["image", "anomaly map", "overlay", "ground truth"]
    assert figure.get_suptitle() == "score 0.700 anomalous"
    assert bar.get_ylabel() == "anomaly score" and bar.get_ylim() == pytest.approx((0.0, 1.0))
    np.testing.assert_array_equal(panels[0].images[0].get_array(), image)
    drawn_map = panels[1].images[0]
    np.testing.assert_array_equal(drawn_map.get_array(), heat)   # not transposed, not rescaled
    assert drawn_map.get_cmap().name == "inferno" and drawn_map.get_clim() == (0.0, 1.0)
    np.testing.assert_array_equal(panels[3].images[0].get_array(), heat > 0.9)
    assert [axis.get_title() for axis in visualization.overlay_figure(image, heat, 0.0, 1.0).axes[:-1]] == \
        ["image", "anomaly map", "overlay"]


def test_the_overlay_leaves_score_0_as_the_image_and_shows_score_1_at_the_stated_alpha():
    image, heat = quadrant_case()
    figure = visualization.overlay_figure(image, heat, 0.0, 1.0)
    overlay = figure.axes[2].images[0].get_array().astype(float)
    expected = np.empty_like(overlay)
    for score in (0.0, 1.0, 0.5, 0.25):
        where = heat == score
        expected[where] = expected_overlay(image[where], score)
    assert np.abs(overlay - expected).max() <= 0.5 + 1e-9   # rounding to uint8 only
    np.testing.assert_array_equal(overlay[heat == 0], image[heat == 0])
    # the drawn figure: the middle of each quadrant of the overlay panel, as it is on screen
    drawn = visualization.rendered(figure).astype(float)
    top, bottom, left, right = pixel_box(figure, figure.axes[2])
    for (row, column), score in [((0.25, 0.25), 0.0), ((0.25, 0.75), 1.0), ((0.75, 0.25), 0.5)]:
        y, x = int(top + row * (bottom - top)), int(left + column * (right - left))
        source = image[int(row * 64), int(column * 64)]
        assert np.abs(drawn[y, x] - expected_overlay(source, score)).max() <= 8, (row, column, drawn[y, x])


def test_the_colour_bar_runs_through_the_colormap_from_0_to_1_in_order():
    image, heat = quadrant_case()
    figure = visualization.overlay_figure(image, heat, 0.0, 1.0)
    drawn = visualization.rendered(figure).astype(float)
    top, bottom, left, right = pixel_box(figure, figure.axes[-1])
    column = drawn[top + 2:bottom - 2, (left + right) // 2][::-1]               # bottom (0) to top (1)
    table = INFERNO(np.linspace(0, 1, 256))[:, :3] * 255
    levels = np.argmin(((column[:, None, :] - table[None]) ** 2).sum(axis=2), axis=1)  # nearest colormap entry
    assert levels[0] < 8 and levels[-1] > 247                                  # from the bottom colour to the top one
    assert np.all(np.diff(levels) >= -2)                                       # rising all the way
    assert np.abs(table[levels] - column).max() < 12                           # every pixel is a colormap colour


def test_a_heat_scale_other_than_0_1_is_the_colour_bar_and_the_blend_scale():
    image, heat = quadrant_case()
    figure = visualization.overlay_figure(image, heat * 4 - 2, -2.0, 2.0)       # z values on [-2, 2]
    assert figure.axes[-1].get_ylim() == pytest.approx((-2.0, 2.0))
    overlay = figure.axes[2].images[0].get_array().astype(float)
    assert np.abs(overlay[heat == 1] - expected_overlay(image[heat == 1], 1.0)).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(overlay[heat == 0], image[heat == 0])
    beyond = visualization.overlay_figure(image, heat * 3 - 1, 0.0, 1.0).axes[2].images[0].get_array().astype(float)
    assert np.abs(beyond[heat == 1] - expected_overlay(image[heat == 1], 1.0)).max() <= 0.5 + 1e-9  # 2 drawn as 1
    np.testing.assert_array_equal(beyond[heat == 0], image[heat == 0])                              # -1 drawn as 0


@pytest.mark.parametrize("height, width", [(40, 48), (64, 6000), (3000, 2000)])
def test_drawn_panels_are_bounded(height, width):
    """Each panel drawn with its longest side in [256, 1024] px: a 6000 px wide slice stays within
    WebP's 16383 px, a tiny one leaves room for its titles, and equal sizes give equal figures."""
    image = np.zeros((height, width, 3), np.uint8)
    drawn = visualization.overlay_panel(image, np.zeros((height, width)), 0, 1, np.zeros((height, width)))
    assert drawn.dtype == np.uint8 and drawn.shape[2] == 3
    assert drawn.shape[1] <= 4 * (1024 + 12) + 110 and drawn.shape[0] <= 1024 + 74
    assert drawn.shape[1] >= 4 * 256 and drawn.shape[0] >= 160
    again = visualization.overlay_panel(np.full((height, width, 3), 255, np.uint8), np.ones((height, width)), 0, 1,
                                        np.ones((height, width)))
    assert again.shape == drawn.shape


def legend_number(axis, name: str) -> float:
    [text] = [t.get_text() for t in axis.get_legend().get_texts() if t.get_text().startswith(name)]
    return float(re.search(r"= (\d\.\d+)$", text).group(1))


def test_the_roc_plot_has_its_auroc_in_the_legend_and_the_chance_diagonal():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    axis = evaluation_figures.roc_figure(labels, scores, "Brain image ROC").axes[0]
    assert legend_number(axis, "AUROC") == pytest.approx(roc_auc_score(labels, scores), abs=5e-4)
    [diagonal] = [line for line in axis.get_lines() if line.get_label() == "chance"]
    np.testing.assert_array_equal(diagonal.get_xydata(), [[0, 0], [1, 1]])
    assert axis.get_title() == "Brain image ROC" and axis.get_xlim() == (0, 1)


def test_the_pro_plot_has_its_aupro_in_the_legend():
    masks, maps = blob_data(1, np.float64)
    axis = evaluation_figures.pro_figure(masks, maps, "Brain PRO").axes[0]
    assert legend_number(axis, "AUPRO") == pytest.approx(reference_aupro(masks, maps), abs=5e-4)
    assert axis.get_xlim() == (0, 0.3)
    inverted = evaluation_figures.pro_figure(masks, -maps, "x").axes[0]
    assert legend_number(inverted, "AUPRO") == pytest.approx(reference_aupro(masks, -maps), abs=5e-4)


def test_test_py_visualize_writes_titled_overlays_and_curves_of_its_own_predictions(tmp_path, monkeypatch):
    """write_visuals: the ROC legend holds the AUROC of the dataset's labels and scores, the PRO
    legend the AUPRO of its maps and masks, and every overlay shows its image's own map."""
    root = build_demo(str(tmp_path / "demo"), n_train=1, n_valid=(1, 1), n_test=(3, 3), image_size=64)
    dataset = MedicalDataset(list_samples(root, "test"), 64)
    labels = np.array([sample.label for sample in dataset.samples])
    masks = np.stack([dataset[i]["mask"].numpy() > 0.5 for i in range(len(dataset))])
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 0.6, masks.shape) + 0.4 * masks
    scores = rng.uniform(size=len(labels))
    predictions = Predictions([s.image_path for s in dataset.samples], labels, scores, maps, masks, True)
    figures = []
    monkeypatch.setattr(evaluation_figures, "figure_bytes", lambda figure: figures.append(figure) or b"figure")
    panels = []
    real = visualization.overlay_figure
    monkeypatch.setattr(visualization, "overlay_figure", lambda *a, **k: panels.append(real(*a, **k)) or panels[-1])
    evaluation_figures.write_visuals(tmp_path / "out", "Brain", dataset, predictions, 2)
    roc, pro = (figure.axes[0] for figure in figures)
    assert legend_number(roc, "AUROC") == pytest.approx(roc_auc_score(labels, scores), abs=5e-4)
    assert legend_number(pro, "AUPRO") == pytest.approx(reference_aupro(masks, maps), abs=5e-4)
    drawn = [(index, name) for index, name in evaluation_figures.drawn_overlays(dataset.samples, 2)]
    assert len(panels) == len(drawn) == 4
    for figure, (index, name) in zip(panels, drawn):
        assert figure.axes[3].get_title() == "ground truth"
        np.testing.assert_array_equal(figure.axes[1].images[0].get_array(), maps[index].astype(np.float32))
        np.testing.assert_array_equal(figure.axes[3].images[0].get_array(), masks[index])
        assert figure.get_suptitle() == f"score {scores[index]:.3f}"
        assert cv2.imread(str(tmp_path / "out" / "Brain" / name)) is not None
    assert (tmp_path / "out" / "Brain" / "roc_image.png").read_bytes() == b"figure"


def test_the_reliability_diagram_titles_each_level_with_its_own_brier_and_ece(tmp_path, monkeypatch):
    """write_reliability: the image panel carries the image Brier/ECE (values' "brier", "ece"), the
    patient panel the patient ones (patient_values' "patient_brier", "patient_ece"), each drawing
    its own bins; without patient bins one panel, without bins none (and no file)."""
    figures = []
    monkeypatch.setattr(evaluation_figures, "figure_bytes", lambda figure: figures.append(figure) or b"figure")
    image_bins = {"edges": [0, 0.5, 1], "count": [3, 1], "mean_probability": [0.2, 0.9], "observed": [0.0, 1.0]}
    patient_bins = {"edges": [0, 0.5, 1], "count": [0, 2], "mean_probability": [0.0, 0.7], "observed": [0.0, 0.5]}
    values = {"brier": 0.1234, "ece": 0.0456, "patient_brier": 0.9, "patient_ece": 0.9}  # decoys: not these
    patient_values = {"patient_brier": 0.2468, "patient_ece": 0.0789, "brier": 0.8, "ece": 0.8}
    described = {"reliability": image_bins, "patients": {"reliability": patient_bins}}
    assert evaluation_figures.write_reliability(tmp_path, "Brain", values, patient_values, described)
    [figure] = figures
    top = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title() for axes in top] == ["Brain images: Brier 0.123, ECE 0.046",
                                                  "Brain patients: Brier 0.247, ECE 0.079"]
    bottom = [axes for axes in figure.axes if not axes.get_title()]
    assert [axes.get_ylabel() for axes in bottom] == ["images", "patients"]
    assert [[bar.get_height() for bar in axes.patches] for axes in bottom] == [[3, 1], [0, 2]]
    assert (tmp_path / "reliability_Brain.png").read_bytes() == b"figure"

    assert evaluation_figures.write_reliability(tmp_path, "Liver", values, None, {"reliability": image_bins})
    assert [axes.get_title() for axes in figures[-1].axes if axes.get_title()] == [
        "Liver images: Brier 0.123, ECE 0.046"]
    assert not evaluation_figures.write_reliability(tmp_path, "Chest", values, None, None)
    assert len(figures) == 2 and not (tmp_path / "reliability_Chest.png").exists()


def test_the_quick_start_draws_overlays_and_says_where_results_land(tmp_path):
    """bash test.sh indomain passes --visualize 4 to each target's test.py (VISUALIZE=0: none) and
    ends naming the folders; the test.py runs are stood in for by echo."""
    for target in ("Brain", "Liver"):
        (tmp_path / "data" / target).mkdir(parents=True)
    env = {**os.environ, "DATA_ROOT": str(tmp_path / "data"), "LAUNCH": "echo", "RESULTS": "out"}
    for visualize, shown in ((None, "4"), ("0", "0")):
        done = subprocess.run(["bash", "test.sh", "indomain"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**env, "VISUALIZE": visualize} if visualize else env)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        runs = [line for line in lines if line.startswith("test.py")]
        assert len(runs) == 2 and all(f"--visualize {shown} " in line for line in runs)
        assert lines[-2:] == ["  out/indomain/Brain", "  out/indomain/Liver"]
        assert ("overlays and ROC/PRO curves in visualization/<target>/" in lines[-3]) == (shown != "0")


def test_test_one_example_says_where_its_outputs_are(tmp_path, monkeypatch, capsys):
    """The default folder is results/one_example (in --help too); the last line names it."""
    with pytest.raises(SystemExit):
        test_one_example.parse_args(["--help"])
    assert "(default: results/one_example)" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("scan.png", np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8))
    [record] = test_one_example.main(["--image_path", "scan.png", "--model_name", "tiny", "--pretrained", "none",
                                      "--image_size", "64", "--device", "cpu"])
    assert record["overlay"] == os.path.join("results", "one_example", "scan.png")
    assert (tmp_path / "results" / "one_example" / "scan.png").is_file()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("outputs written to results/one_example ") and "predictions.jsonl" in last
