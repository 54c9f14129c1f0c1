"""Figures beyond one number per metric: bootstrap intervals over patients, patient-level
detection, and per-class metrics of meta.json datasets.

Patients are the case ids of BMAD slice names (``<case>_<slice>.png``, dataset.patient_of); an
image whose name carries no slice number is its own patient. Every declared metric
(evaluation.metrics.METRICS) gets an interval from the same draws (``resample_counts``): those with
a ``curve`` (the built-ins) exactly and fast from per-patient histograms, any other by its own
function on each replicate's images (``own_replicates``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np

from evaluation import metrics
from dataset import find_meta_index, patient_of
from utils import InputError, available_memory

# Pixel intervals use per-patient histograms over shared score bins: at most this many cells
# (patients x bins) per histogram, and at most MAX_BINS bins (quantiles of the scores).
HISTOGRAM_CELLS = 1 << 22
MAX_BINS = 1 << 12
REPLICATES_AT_ONCE = 64
T = TypeVar("T")


def interval_metrics(needs_masks: bool) -> dict[str, str]:
    """Name -> bootstrap curve key of the declared image (pixel with ``needs_masks``) metrics whose
    intervals come from the shared histograms (evaluation.metrics.METRICS, ``curve``)."""
    return {metric.name: metric.curve for metric in metrics.declared(needs_masks) if metric.curve}


def resampled_metrics(needs_masks: bool) -> list[metrics.Metric]:
    """The declared image (pixel with ``needs_masks``) metrics without a ``curve``: their intervals
    come from their own function on each replicate's images (``own_replicates``)."""
    return [metric for metric in metrics.declared(needs_masks) if not metric.curve]


def groups_of(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Patient index [N] of each image and the patient names [G], in order of first appearance."""
    names: dict[str, int] = {}
    index = np.array([names.setdefault(patient_of(path), len(names)) for path in paths], dtype=np.int64)
    return index, list(names)


def resample_counts(n_groups: int, n_replicates: int, seed: int) -> np.ndarray:
    """How often each group is drawn [R, G] in each of n_replicates draws of n_groups groups
    with replacement (numpy default_rng(seed))."""
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_replicates, n_groups))
    counts = np.zeros((n_replicates, n_groups), dtype=np.int64)
    np.add.at(counts, (np.arange(n_replicates)[:, None], draws), 1)
    return counts


def resample_bytes(n_groups: int, n_replicates: int) -> int:
    """Memory ``resample_counts`` takes: the draws and the counts of every replicate, int64 [R, G] each."""
    return n_replicates * n_groups * 16


def check_memory(name: str, n_groups: int, n_replicates: int, maps_bytes: int, maps_budget: float) -> None:
    """Refuse (InputError naming dataset ``name`` and the way out), before anything is scored,
    ``n_replicates`` resamples of ``n_groups`` patients whose draws and counts take over half the
    memory available now; and, when a declared pixel metric has no histogram curve (it is
    resampled on a copy of the maps and masks, ``maps_bytes``; 0 when pixel metrics are not
    computed), a copy over the maps' RAM budget ``maps_budget`` (bytes)."""
    need, available = resample_bytes(n_groups, n_replicates), available_memory()
    if need > available / 2:
        raise InputError(f"--bootstrap {n_replicates}: {n_groups} patients of {name} need "
                         f"{need / 2**30:.1f} GiB for the resamples, over half the available memory "
                         f"({available / 2**30:.1f} GiB); use at most "
                         f"{int(available / 2 // resample_bytes(n_groups, 1))} resamples")
    slow = [metric.name for metric in resampled_metrics(needs_masks=True)]
    if maps_bytes and slow and maps_bytes > maps_budget:
        raise InputError(f"--bootstrap {n_replicates}: {', '.join(slow)} (declared without a histogram curve) is "
                         f"resampled on a copy of {name}'s maps and masks in memory, {maps_bytes / 2**30:.1f} GiB, "
                         f"over the {maps_budget / 2**30:.1f} GiB maps budget; raise --max_ram_maps_gb or run "
                         f"with --bootstrap 0")


def interval(values: np.ndarray) -> list[float]:
    """95% percentile interval [low, high] of replicate values [R], NaN replicates ignored."""
    finite = values[~np.isnan(values)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def quietly(function: Callable[..., T], *args) -> T:
    """``function(*args)`` without evaluation/metrics.py's warnings of undefined (single-class) metrics, which
    stay nan: replicates are many, and evaluation/results.py notes a table's undefined metrics once
    (``note_undefined``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.UndefinedMetricWarning)
        return function(*args)


def undefined_metrics(values: dict, labels: np.ndarray, unit: str = "image") -> str | None:
    """Which metrics of ``values`` are undefined (nan) and why, as "image_auroc, image_ap undefined
    (all 6 images are abnormal)"; None when every one is defined. ``labels`` [N] are those of the
    images (or patients: ``unit``) the values were computed on."""
    undefined = [key for key, value in values.items() if isinstance(value, float) and math.isnan(value)
                 and not key.endswith(("_ci", "_threshold"))]
    if not undefined:
        return None
    n, n_abnormal = len(labels), int(np.sum(labels))
    one_class = (f"all {n} {unit}s are abnormal" if n_abnormal == n else
                 f"all {n} {unit}s are normal" if n_abnormal == 0 else None)
    reasons: dict[str, list[str]] = {}
    for key in undefined:
        if key.startswith("pixel_"):
            why = f"none of the {n} {unit}s has a lesion" if n_abnormal == 0 else "its maps give no curve over FPR"
        else:
            why = one_class or "its labels give no curve"
        reasons.setdefault(why, []).append(key)
    return "; ".join(f"{', '.join(keys)} undefined ({why})" for why, keys in reasons.items())


def note_undefined(logger: logging.Logger, table: str, rows: dict[str, tuple[dict, np.ndarray]],
                   unit: str = "image") -> None:
    """Log one line for ``table`` naming the undefined metrics of its rows and why (row name ->
    (values, labels [N] they were computed on)); nothing when every metric is defined. The row
    names are left out of a one-row table."""
    found = {row: undefined_metrics(values, labels, unit) for row, (values, labels) in rows.items()}
    parts = [what if len(rows) == 1 else f"{row}: {what}" for row, what in found.items() if what]
    if parts:
        logger.info(f"note: {table}: {'; '.join(parts)}; shown as '-' and null in results.json")


def replicate_images(groups: np.ndarray, counts: np.ndarray) -> Iterator[np.ndarray]:
    """Image indices [M] of each replicate in turn: groups [N] (patient of each image), counts
    [R, G] (draws of each patient); a patient drawn k times gives its images k times."""
    order = np.argsort(groups, kind="stable")
    for drawn in counts:
        yield np.repeat(order, drawn[groups[order]])


def own_replicates(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, counts: np.ndarray,
                   needs_masks: bool) -> dict[str, np.ndarray]:
    """Values [R] of the declared metrics without a curve (``resampled_metrics``), image ones for
    labels, scores [N] or pixel ones (``needs_masks``) for masks, maps [N,H,W]: each metric's own
    function on each replicate's images (``replicate_images``; groups [N], counts [R, G]), its
    undefined-metric warnings silenced (``quietly``). Slow and obvious, and it holds one replicate's
    copy of the images (or maps) in memory at a time; {} when every such metric has a curve."""
    declared = resampled_metrics(needs_masks)
    results = {metric.name: np.empty(len(counts)) for metric in declared}
    if not declared:
        return results
    for replicate, chosen in enumerate(replicate_images(groups, counts)):
        drawn_labels, drawn_scores = np.asarray(labels[chosen]), np.asarray(scores[chosen])
        for metric in declared:
            results[metric.name][replicate] = quietly(metric.function, drawn_labels, drawn_scores)
    return results


def image_replicates(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                     counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every declared image metric [R] of each replicate, in declaration order: labels, scores [N],
    groups [N] (patient of each image), counts [R, G] (draws of each patient); exact. Metrics with
    a curve (image AUROC/AP/F1-max) from per-patient histograms over the distinct scores when they
    fit in HISTOGRAM_CELLS, the others (and all of them when the histograms do not fit) by each
    replicate resampled and scored by the metrics' own functions."""
    declared = interval_metrics(needs_masks=False)
    values, inverse = np.unique(scores, return_inverse=True)
    n_groups = counts.shape[1]
    if n_groups * len(values) <= HISTOGRAM_CELLS:
        cell = groups * len(values) + inverse.reshape(-1)
        neg, pos = (np.bincount(cell[labels == label], minlength=n_groups * len(values))
                    .reshape(n_groups, -1)[:, ::-1].astype(np.float64) for label in (0, 1))
        parts = {key: [] for key in declared}
        for start in range(0, len(counts), REPLICATES_AT_ONCE):
            weights = counts[start:start + REPLICATES_AT_ONCE].astype(np.float64)
            curves = _curve_metrics(weights @ neg, weights @ pos)
            for key, curve in declared.items():
                parts[key].append(curves[curve])
        results = {key: np.concatenate(part) for key, part in parts.items()}
        results.update(own_replicates(labels, scores, groups, counts, needs_masks=False))
    else:
        results = {metric.name: np.empty(len(counts)) for metric in metrics.declared(needs_masks=False)}
        for replicate, chosen in enumerate(replicate_images(groups, counts)):
            scored = quietly(metrics.image_metrics, labels[chosen], scores[chosen])
            for key in results:
                results[key][replicate] = scored[key]
    return {metric.name: results[metric.name] for metric in metrics.declared(needs_masks=False)}


def _curve_metrics(neg: np.ndarray, pos: np.ndarray, region: np.ndarray | None = None,
                   n_regions: np.ndarray | None = None, fpr_limit: float = 0.3) -> dict[str, np.ndarray]:
    """AUROC, AP, F1-max (and with ``region`` AUPRO) [R] of histograms neg, pos [R, B] (bins in
    descending order of score), as evaluation/metrics.py defines them; nan for single-class rows."""
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    valid = ((n_pos > 0) & (n_neg > 0))[:, 0]
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["auroc"] = np.sum(neg * (tp - 0.5 * pos), axis=1) / (n_pos * n_neg)[:, 0]
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
        out["ap"] = np.sum(pos * precision, axis=1) / n_pos[:, 0]
        out["f1_max"] = np.max(2 * tp / (n_pos + tp + fp), axis=1)
        if region is not None:
            zero = np.zeros((len(neg), 1))
            fpr = np.hstack([zero, fp / n_neg])
            pro = np.hstack([zero, np.cumsum(region, axis=1) / n_regions[:, None]])
            area = metrics.clipped_area(fpr[:, :-1], fpr[:, 1:], pro[:, :-1], pro[:, 1:], fpr_limit)
            out["aupro"] = np.where(n_regions > 0, np.clip(np.sum(area, axis=1) / fpr_limit, 0.0, 1.0), np.nan)
    return {key: np.where(valid, value, np.nan) for key, value in out.items()}


@dataclass
class GroupHistograms:
    """Per-patient pixel counts over shared score bins (bins in descending order of score)."""
    neg: np.ndarray        # float64 [G, B] normal pixels per bin
    pos: np.ndarray        # float64 [G, B] lesion pixels per bin
    region: np.ndarray     # float64 [G, B] sum of 1/region size of the lesion pixels per bin
    n_regions: np.ndarray  # float64 [G] lesion regions per patient


def _bin_edges(maps: np.ndarray, n_bins: int) -> np.ndarray:
    """Ascending score edges [E <= n_bins]: the distinct values when there are few (exact
    intervals), else quantiles of a sample of whole images."""
    step = max(1, len(maps) // 64)
    sample = np.unique(np.asarray(maps[::step]))
    if len(sample) <= n_bins and step == 1:
        return sample.astype(maps.dtype)
    return np.unique(np.quantile(sample, np.linspace(0, 1, n_bins), method="nearest").astype(maps.dtype))


def group_histograms(masks: np.ndarray, maps: np.ndarray, groups: np.ndarray,
                     n_groups: int) -> GroupHistograms:
    """Histograms of masks, maps [N,H,W] per patient (groups [N]) over quantile bins of the
    scores; the bins resolve every distinct value when a set of fewer than 128 images has no more
    distinct values than bins (then the replicates are exact)."""
    n_bins = int(np.clip(HISTOGRAM_CELLS // max(n_groups, 1), 256, MAX_BINS))
    edges = _bin_edges(maps, n_bins)
    size = len(edges) + 1
    neg = np.zeros((n_groups, size))
    pos = np.zeros((n_groups, size))
    region = np.zeros((n_groups, size))
    n_regions = np.zeros(n_groups)
    step = max(1, metrics.CHUNK_PIXELS // max(1, maps[0].size))
    for start in range(0, len(maps), step):
        mask = np.asarray(masks[start:start + step], dtype=bool)
        chunk = np.asarray(maps[start:start + step])
        local, group = np.unique(groups[start:start + step], return_inverse=True)
        raw = np.searchsorted(edges, chunk.reshape(len(chunk), -1))
        bins = raw + size * group[:, None]
        flat_mask = mask.reshape(len(mask), -1)
        total = np.bincount(bins.reshape(-1), minlength=len(local) * size).reshape(len(local), size)
        lesion = np.bincount(bins[flat_mask], minlength=len(local) * size).reshape(len(local), size)
        neg[local] += total - lesion
        pos[local] += lesion
        for image in np.flatnonzero(flat_mask.any(axis=1)):
            sizes, count = metrics.region_sizes(mask[image:image + 1])
            region[local[group[image]]] += np.bincount(raw[image][flat_mask[image]],
                                                       weights=1.0 / sizes, minlength=size)
            n_regions[local[group[image]]] += count
    # Bin i holds scores in (edges[i-1], edges[i]]: descending order is the reversed bins.
    return GroupHistograms(neg[:, ::-1], pos[:, ::-1], region[:, ::-1], n_regions)


def pixel_replicates(histograms: GroupHistograms, counts: np.ndarray,
                     fpr_limit: float = 0.3) -> dict[str, np.ndarray]:
    """The declared pixel metrics with a curve (pixel AUROC/AP/AUPRO/F1-max) [R] of each replicate,
    counts [R, G]: each replicate's histogram is the count-weighted sum of the patients' histograms
    (no re-sort). The pixel metrics without a curve: ``own_replicates`` with ``needs_masks``."""
    declared = interval_metrics(needs_masks=True)
    results = {key: [] for key in declared}
    for start in range(0, len(counts), REPLICATES_AT_ONCE):
        weights = counts[start:start + REPLICATES_AT_ONCE].astype(np.float64)
        curves = _curve_metrics(weights @ histograms.neg, weights @ histograms.pos,
                                weights @ histograms.region, weights @ histograms.n_regions, fpr_limit)
        for key, curve in declared.items():
            results[key].append(curves[curve])
    return {key: np.concatenate(parts) for key, parts in results.items()}


def patient_level(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                  n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient labels and scores [G]: a patient is abnormal if any of its slices is, and scores
    the maximum of its slice scores (the most suspicious slice decides, as a reader would)."""
    patient_labels = np.zeros(n_groups, dtype=np.int64)
    np.maximum.at(patient_labels, groups, labels)
    patient_scores = np.full(n_groups, -np.inf)
    np.maximum.at(patient_scores, groups, scores.astype(np.float64))
    return patient_labels, patient_scores


def meta_classes(root: str, split: str) -> dict[str, str]:
    """Class name of each image path of ``split`` in the meta.json index of ``root`` ({} when
    the dataset has no meta.json)."""
    meta_path = find_meta_index(root)
    if meta_path is None:
        return {}
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    base = os.path.dirname(meta_path)
    return {os.path.join(base, entry["img_path"]): name
            for name, entries in meta.get(split, {}).items() for entry in entries}
