"""Checkpoint selection: one score from the metrics of each selection source (train.py keeps the
epoch with the best; the sources are the held-out training images or --valid_data_path)."""
from __future__ import annotations

import math

import numpy as np

SELECTION_KEYS = ("image_auroc", "pixel_auroc")


def selection_summary(per_source: dict[str, dict[str, float]]) -> tuple[float | None, dict[str, float]]:
    """Model-selection score from each selection source's own metrics.

    Sources are never pooled: domains score on different scales, and one source without masks
    must not drop the pixel metric of the others. Image AUROC is averaged over the sources, pixel
    AUROC over the sources with masks (``metrics.compute_metrics`` gives pixel metrics only to those); a
    metric that is NaN (one class only) is left out. The score is the mean of those two averages (of the one
    present). Returns (score or None when no metric is defined, {"image_auroc": mean,
    "pixel_auroc": mean, "<source>/<metric>": value, ...}).
    """
    summary: dict[str, float] = {}
    for key in SELECTION_KEYS:
        values = [metrics_[key] for metrics_ in per_source.values() if not math.isnan(metrics_.get(key, math.nan))]
        if values:
            summary[key] = float(np.mean(values))
    for name, metrics_ in per_source.items():
        summary.update({f"{name}/{key}": value for key, value in metrics_.items()})
    present = [summary[key] for key in SELECTION_KEYS if key in summary]
    return (float(np.mean(present)) if present else None), summary
