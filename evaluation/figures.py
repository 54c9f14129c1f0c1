"""test.py's figures of one dataset: overlays of its first normal and abnormal images and its image
ROC and PRO curves (``--visualize``: ``visualization/<name>/``), and its reliability diagram
(``reliability_<name>.png``). Drawing primitives are visualization.py's; every file is written
atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from dataset import MedicalDataset, Sample
from evaluation import metrics
from evaluation.calibration import reliability_figure
from evaluation.predict import Predictions
from utils import atomic_write_bytes, atomic_write_image, unique_stems
from visualization import curve_figure, figure_bytes, overlay_panel, to_display

VISUAL_KINDS = ((0, "normal"), (1, "abnormal"))  # (label, folder) of the overlays
CURVE_FILES = ("roc_image.png", "pro_pixel.png")
RELIABILITY = "reliability_{}.png"  # per dataset, in --save_path


def roc_figure(labels: np.ndarray, scores: np.ndarray, title: str) -> Figure:
    """Image ROC of scores [N] for labels [N] (both classes present), its AUROC in the legend."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return curve_figure(fpr, tpr, "false positive rate", "true positive rate", title,
                        f"AUROC = {auc(fpr, tpr):.3f}", chance=True)


def pro_figure(masks: np.ndarray, maps: np.ndarray, title: str, fpr_limit: float = 0.3) -> Figure:
    """PRO against FPR up to ``fpr_limit`` of maps [N,H,W] for masks [N,H,W] (an anomalous region
    present), the standard AUPRO (``metrics.aupro``) in the legend."""
    fpr, pro = metrics.pro_curve(masks, maps)
    return curve_figure(fpr, pro, "false positive rate", "per-region overlap", title,
                        f"AUPRO (FPR ≤ {fpr_limit:g}) = {metrics.aupro(masks, maps, fpr_limit):.3f}", xlim=fpr_limit)


def drawn_overlays(samples: list[Sample], count: int) -> list[tuple[int, str]]:
    """(index, visualization/NAME/ name) of the overlays ``write_visuals`` draws: the first
    ``count`` normal and abnormal images, named by their stems, made unique (``unique_stems``)."""
    stems = unique_stems([sample.image_path for sample in samples])
    labels = np.array([sample.label for sample in samples])
    return [(int(index), f"{kind}/{stems[index]}.png") for label, kind in VISUAL_KINDS
            for index in np.flatnonzero(labels == label)[:count]]


def figure_paths(name: str, samples: list[Sample], visualize: int) -> tuple[list[str], list[str]]:
    """(files, folders) relative to --save_path that one dataset's figures take: its reliability
    diagram, and with ``visualize`` > 0 its overlays and curves (what ``write_visuals`` writes)."""
    files, folders = [RELIABILITY.format(name)], []
    if visualize:
        folders += ["visualization", f"visualization/{name}"] + [f"visualization/{name}/{kind}"
                                                                 for _, kind in VISUAL_KINDS]
        files += [f"visualization/{name}/{file_name}" for file_name in CURVE_FILES]
        files += [f"visualization/{name}/{file_name}" for _, file_name in drawn_overlays(samples, visualize)]
    return files, folders


def write_visuals(folder: Path, name: str, dataset: MedicalDataset, predictions: Predictions, count: int) -> None:
    """Overlays for ``count`` normal and abnormal images (one heat scale per dataset) and curves."""
    maps = predictions.maps
    sample = maps[:: max(1, len(maps) // 256)].astype(np.float32)  # a display scale needs no exact quantile
    vmin, vmax = float(np.percentile(sample, 1)), float(np.percentile(sample, 99.9))
    for index, file_name in drawn_overlays(dataset.samples, count):
        item = dataset[index]
        panel = overlay_panel(to_display(item["image"]), maps[index].astype(np.float32), vmin, vmax,
                              predictions.masks[index], f"score {predictions.scores[index]:.3f}")
        atomic_write_image(folder / name / file_name, panel)
    figures = {}
    if len(set(predictions.labels.tolist())) == 2:
        figures[CURVE_FILES[0]] = roc_figure(predictions.labels, predictions.scores, f"{name} image ROC")
    if predictions.has_masks and predictions.masks.any():
        figures[CURVE_FILES[1]] = pro_figure(predictions.masks, predictions.maps, f"{name} PRO")
    for file_name, figure in figures.items():
        atomic_write_bytes(folder / name / file_name, figure_bytes(figure))


def write_reliability(save_path: Path, name: str, values: dict, patient_values: dict | None,
                      described: dict | None) -> bool:
    """``reliability_<name>.png``: a panel per level (images; patients where there are some) that
    has reliability bins in ``described`` (evaluation.results.evaluate_dataset's), titled with its
    Brier and ECE. False when there is nothing to draw (no image metrics or no calibration)."""
    panels = [(f"{name} {level}: Brier {figures[prefix + 'brier']:.3f}, ECE {figures[prefix + 'ece']:.3f}",
               level, part["reliability"]) for level, part, figures, prefix in
              (("images", described or {}, values, ""),
               ("patients", (described or {}).get("patients") or {}, patient_values, "patient_"))
              if part.get("reliability")]
    if panels:
        atomic_write_bytes(save_path / RELIABILITY.format(name), figure_bytes(reliability_figure(panels)))
    return bool(panels)
