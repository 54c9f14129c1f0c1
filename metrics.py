"""Anomaly-detection metrics: image/pixel AUROC and AP, AUPRO, F1-max (see PROTOCOLS.md, Metrics).

All results are exact (no quantisation of scores) and fast on Brain-scale pixel sets: the pixels
are reduced, chunk by chunk, to histograms over the distinct score values, and every curve is
read off cumulative sums of those histograms. For float16 scores the histogram is a bincount over
the 65,536 bit patterns (O(n), no sort); other dtypes use np.unique + searchsorted (a sort).
Single-class input gives nan with a RuntimeWarning.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage

CHUNK_PIXELS = 1 << 22  # pixels handled at once: bounds each temporary to about 32 MB
# 8-connectivity inside each image of an [N,H,W] stack, no connection across images.
_PER_IMAGE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTED[1] = True


class _Histogram(NamedTuple):
    """Per distinct score value, in descending order of value; all float64 [V]."""
    values: np.ndarray
    neg: np.ndarray  # number of negative pixels with this value
    pos: np.ndarray  # number of positive pixels with this value
    region: np.ndarray  # sum over positive pixels of 1 / (size of their region); zeros if unused
    n_regions: int


def _nan(what: str, why: str) -> float:
    warnings.warn(f"{what} is undefined: {why}; returning nan", RuntimeWarning, stacklevel=3)
    return float("nan")


def _as_bool(labels: np.ndarray) -> np.ndarray:
    """Binary labels (bool, or numbers 0/1) of any shape as bool, same shape."""
    if labels.dtype == bool:
        return labels
    as_bool = labels.astype(bool)
    if not np.array_equal(as_bool, labels):
        raise ValueError("labels/masks must be binary: bool or 0/1")
    return as_bool


def _binning(scores: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Bin values [B] (possibly unsorted, repeated or NaN) and a map flat chunk -> bin indices."""
    if scores.dtype == np.float16:
        return np.arange(1 << 16, dtype=np.uint16).view(np.float16), lambda c: c.view(np.uint16)
    values = np.unique(scores)
    return values, lambda c: np.searchsorted(values, c)


def _histogram(labels: np.ndarray, scores: np.ndarray, regions: bool) -> _Histogram:
    """Count negative/positive pixels per distinct score; with ``regions``, labels are [N,H,W]
    masks and each positive pixel also adds 1/size of its 8-connected region."""
    labels, scores = np.atleast_1d(np.asarray(labels)), np.atleast_1d(np.asarray(scores))
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if scores.size == 0:
        raise ValueError("empty input")
    if regions and scores.ndim != 3:
        raise ValueError(f"masks and maps must be [N,H,W], got {scores.shape}")
    bin_values, bin_of = _binning(scores)
    n_bins = len(bin_values)
    total = np.zeros(n_bins)
    pos = np.zeros(n_bins)
    region = np.zeros(n_bins)
    n_regions = 0
    step = max(1, CHUNK_PIXELS * len(scores) // scores.size)
    for start in range(0, len(scores), step):
        bins = bin_of(np.ascontiguousarray(scores[start:start + step]).reshape(-1))
        mask = _as_bool(labels[start:start + step])
        total += np.bincount(bins, minlength=n_bins)
        pos_bins = bins[mask.reshape(-1)]
        pos += np.bincount(pos_bins, minlength=n_bins)
        if regions:
            # Positive pixels of the images holding any, in the same C order as pos_bins.
            lesioned = mask[mask.reshape(len(mask), -1).any(axis=1)]
            region_ids, count = ndimage.label(lesioned, structure=_PER_IMAGE_8_CONNECTED)
            inverse_size = 1.0 / np.bincount(region_ids.reshape(-1))
            region += np.bincount(pos_bins, weights=inverse_size[region_ids[lesioned]],
                                  minlength=n_bins)
            n_regions += count
    is_nan = np.isnan(bin_values)
    if total[is_nan].any():
        raise ValueError("scores contain NaN")
    # Merge bins of equal value (float16 -0 and +0), sort, and keep values that occur.
    values, merged = np.unique(bin_values[~is_nan], return_inverse=True)
    total, pos, region = (np.bincount(merged, weights=h[~is_nan], minlength=len(values))
                          for h in (total, pos, region))
    present = np.flatnonzero(total)[::-1]
    return _Histogram(values[present].astype(np.float64), total[present] - pos[present],
                      pos[present], region[present], n_regions)


def _single_class(h: _Histogram) -> bool:
    return h.pos.sum() == 0 or h.neg.sum() == 0


def _auroc(h: _Histogram, what: str) -> float:
    if _single_class(h):
        return _nan(what, "only one class present")
    pos_above = np.cumsum(h.pos) - h.pos
    # Each negative beats the positives scored strictly higher; ties count one half.
    return float(np.sum(h.neg * (pos_above + 0.5 * h.pos)) / (h.pos.sum() * h.neg.sum()))


def _ap(h: _Histogram, what: str) -> float:
    if _single_class(h):
        return _nan(what, "only one class present")
    tp = np.cumsum(h.pos)
    precision = tp / (tp + np.cumsum(h.neg))
    return float(np.sum(h.pos * precision) / tp[-1])


def _f1_max(h: _Histogram, what: str) -> tuple[float, float]:
    if _single_class(h):
        return _nan(what, "only one class present"), float("nan")
    tp = np.cumsum(h.pos)
    f1 = 2 * tp / (tp[-1] + tp + np.cumsum(h.neg))
    best = int(np.argmax(f1))
    return float(f1[best]), float(h.values[best])


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve (x [K] non-decreasing, y [K]) from x[0] to x_max,
    interpolating the curve linearly at x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(np.diff(x[:inside]) * (y[1:inside] + y[:inside - 1]) / 2))
    if inside < len(x):
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_max) / 2
    return area


def _pro_curve(h: _Histogram) -> tuple[np.ndarray, np.ndarray]:
    """FPR [V+1] and PRO [V+1] at every distinct threshold, from the highest down, with (0, 0) first."""
    fpr = np.concatenate([[0.0], np.cumsum(h.neg) / h.neg.sum()])
    pro = np.concatenate([[0.0], np.cumsum(h.region) / h.n_regions])
    return fpr, pro


def _aupro(h: _Histogram, fpr_limit: float) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if h.n_regions == 0 or h.neg.sum() == 0:
        return _nan("AUPRO", "no anomalous region or no normal pixel")
    fpr, pro = _pro_curve(h)
    return float(np.clip(_area_up_to(fpr, pro, fpr_limit) / fpr_limit, 0.0, 1.0))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of scores [N] for labels [N] (bool or 0/1); equals sklearn's roc_auc_score."""
    return _auroc(_histogram(labels, scores, regions=False), "image AUROC")


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of scores [N] for labels [N]; equals sklearn's
    average_precision_score."""
    return _ap(_histogram(labels, scores, regions=False), "image AP")


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels of maps [N,H,W] (any float dtype) for masks [N,H,W] (bool)."""
    return _auroc(_histogram(masks, maps, regions=False), "pixel AUROC")


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over all pixels of maps [N,H,W] for masks [N,H,W] (bool)."""
    return _ap(_histogram(masks, maps, regions=False), "pixel AP")


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 and its threshold (predicted positive: score >= threshold; the highest threshold
    on ties) for labels and scores of any one shape, e.g. [N] images or [N,H,W] pixels."""
    return _f1_max(_histogram(labels, scores, regions=False), "F1-max")


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Standard AUPRO of maps [N,H,W] for masks [N,H,W]: area under the exact PRO-vs-FPR curve
    (every distinct threshold; PRO = mean over 8-connected regions of each image of the fraction
    of the region at or above the threshold) from FPR 0 to fpr_limit, divided by fpr_limit."""
    return _aupro(_histogram(masks, maps, regions=True), fpr_limit)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO-vs-FPR curve behind ``aupro`` (for plots): FPR [K] and PRO [K], FPR ascending.
    masks, maps [N,H,W]; ValueError when there is no anomalous region or no normal pixel."""
    h = _histogram(masks, maps, regions=True)
    if h.n_regions == 0 or h.neg.sum() == 0:
        raise ValueError("PRO curve needs an anomalous region and a normal pixel")
    return _pro_curve(h)


def aupro_legacy(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 200,
                 fpr_limit: float = 0.3) -> float:
    """For comparison with papers only; use ``aupro`` for our own tables. The 200-threshold
    variant several repositories of this field use: thresholds min + i*(max-min)/num_thresholds
    for i < num_thresholds (their np.arange), prediction map > threshold, keep the points with
    FPR < fpr_limit, rescale their FPR to [0,1] by min-max, trapezoid area. masks, maps [N,H,W].
    Differs from ``aupro`` by up to about a point."""
    h = _histogram(masks, maps, regions=True)
    if h.n_regions == 0 or h.neg.sum() == 0:
        return _nan("legacy AUPRO", "no anomalous region or no normal pixel")
    low, high = h.values[-1], h.values[0]
    thresholds = low + (high - low) / num_thresholds * np.arange(num_thresholds)
    # Number of distinct values strictly above each threshold, then the counts above it.
    above = len(h.values) - np.searchsorted(h.values[::-1], thresholds, side="right")
    fpr = np.concatenate([[0.0], np.cumsum(h.neg)])[above] / h.neg.sum()
    pro = np.concatenate([[0.0], np.cumsum(h.region)])[above] / h.n_regions
    kept = fpr < fpr_limit
    fpr, pro = fpr[kept][::-1], pro[kept][::-1]
    if len(fpr) < 2 or fpr[-1] == fpr[0]:
        return _nan("legacy AUPRO", "fewer than two distinct FPRs below the limit")
    fpr = (fpr - fpr[0]) / (fpr[-1] - fpr[0])
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2))


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """AUROC, AP, AUPRO and F1-max (with threshold) of maps [N,H,W] for masks [N,H,W] (bool),
    from one pass over the pixels."""
    h = _histogram(masks, maps, regions=True)
    f1, threshold = _f1_max(h, "pixel F1-max")
    return {"pixel_auroc": _auroc(h, "pixel AUROC"), "pixel_ap": _ap(h, "pixel AP"),
            "pixel_aupro": _aupro(h, fpr_limit), "pixel_f1_max": f1,
            "pixel_f1_threshold": threshold}


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max (with threshold) of scores [N] for labels [N] (bool or 0/1)."""
    h = _histogram(labels, scores, regions=False)
    f1, threshold = _f1_max(h, "image F1-max")
    return {"image_auroc": _auroc(h, "image AUROC"), "image_ap": _ap(h, "image AP"),
            "image_f1_max": f1, "image_f1_threshold": threshold}
