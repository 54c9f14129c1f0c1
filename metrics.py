"""Anomaly-detection metrics: image/pixel AUROC and AP, AUPRO, F1-max.

Definitions: AUROC and AP as scikit-learn's ``roc_auc_score`` / ``average_precision_score``. AUPRO:
at each threshold, FPR over all normal pixels of all images and PRO = mean over the connected
(8-connectivity) ground-truth regions of the share of the region above the threshold; PRO is
integrated over FPR in [0, 0.3] and divided by 0.3 (``aupro_legacy``: the 200-threshold variant of
several papers, comparison only). F1-max: the best F1 over all thresholds, with its threshold.

Every figure is exact at the scores' own precision (float16, float32 or float64; other dtypes
are read as float64) and fast at Brain scale. The pixels are reduced to a histogram over the
distinct score values, in descending order, and every curve is read off its cumulative sums:
- float16: a bincount over the 65,536 bit patterns (O(n), no sort);
- float32/float64: the scores become order-preserving integer keys (float bits, sign-flipped);
  positive pixels are sorted with the size of their region, negative pixels are sorted slab by
  slab of the value range with the positive values packed among them, so one sort gives how
  many negatives lie below and at each positive value. Runs of negative-only values between two
  positive values become one histogram entry: the curves are unchanged (see _sorted_histogram).
Extra memory stays below the maps' size (chunks of CHUNK_PIXELS, slabs of SLAB_FRACTION), and
maps may be np.memmap arrays. Single-class input gives nan with a RuntimeWarning; NaN or inf
scores, and labels and scores of different shapes, raise ValueError.
"""
from __future__ import annotations

import warnings
import math
from typing import Iterator, NamedTuple

import numpy as np
from scipy import ndimage

CHUNK_PIXELS = 1 << 20  # pixels handled at once: temporaries of a few MB, reused
# Negative pixels of float32/float64 scores are sorted in slabs of about this share of the
# scores' bytes (one slab below SLAB_BYTES_MIN): one pass over the scores per slab.
SLAB_FRACTION = 0.4
SLAB_BYTES_MIN = 1 << 28
SAMPLE_IMAGES = 64  # images whose scores place the slab cuts
HIST_BLOCK = 1 << 20  # histogram entries read at once by the curve functions
_8_CONNECTED = np.ones((3, 3), dtype=bool)


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


def _float16_histogram(labels: np.ndarray, scores: np.ndarray, regions: bool) -> _Histogram:
    """Exact histogram of float16 scores: a bincount over the 65,536 bit patterns (no sort)."""
    bin_values = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    n_bins = len(bin_values)
    total = np.zeros(n_bins)
    pos = np.zeros(n_bins)
    region = np.zeros(n_bins)
    n_regions = 0
    for mask, chunk, sizes, count in _chunks(labels, scores, regions):
        bins = chunk.reshape(-1).view(np.uint16)
        total += np.bincount(bins, minlength=n_bins)
        pos_bins = bins[mask.reshape(-1)]
        pos += np.bincount(pos_bins, minlength=n_bins)
        if regions:
            region += np.bincount(pos_bins, weights=1.0 / sizes, minlength=n_bins)
            n_regions += count
    is_nan = np.isnan(bin_values)
    # Merge bins of equal value (-0 and +0), sort, and keep values that occur.
    values, merged = np.unique(bin_values[~is_nan], return_inverse=True)
    total, pos, region = (np.bincount(merged, weights=h[~is_nan], minlength=len(values))
                          for h in (total, pos, region))
    present = np.flatnonzero(total)[::-1]
    return _Histogram(values[present].astype(np.float64), total[present] - pos[present],
                      pos[present], region[present], n_regions)


def _check(labels: np.ndarray, scores: np.ndarray, regions: bool) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.atleast_1d(np.asanyarray(labels)), np.atleast_1d(np.asanyarray(scores))
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if scores.size == 0:
        raise ValueError("empty input")
    if regions and scores.ndim != 3:
        raise ValueError(f"masks and maps must be [N,H,W], got {scores.shape}")
    if scores.dtype not in (np.float16, np.float32, np.float64):
        scores = scores.astype(np.float64)  # integers, bool: exact in float64 up to 2**53
    return labels, scores


def _chunks(labels: np.ndarray, scores: np.ndarray, regions: bool,
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, int]]:
    """Chunks of about CHUNK_PIXELS along the first axis (works on np.memmap): masks (bool),
    scores (checked finite), and with ``regions`` the size of the 8-connected region of each
    positive pixel (C order of mask[mask]) and the chunk's number of regions."""
    step = max(1, CHUNK_PIXELS * len(scores) // scores.size)
    for start in range(0, len(scores), step):
        chunk = np.ascontiguousarray(scores[start:start + step])
        if not (np.isfinite(chunk).all() if chunk.dtype != np.float16 else  # float16 math is slow
                not ((chunk.view(np.uint16) & 0x7C00) == 0x7C00).any()):
            raise ValueError("scores contain NaN or inf")
        mask = _as_bool(np.asarray(labels[start:start + step]))
        sizes, count = _region_sizes(mask) if regions else (None, 0)
        yield mask, chunk, sizes, count


def _region_sizes(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Size of the 8-connected region of each positive pixel of masks [N,H,W] (bool), in the C
    order of masks[masks], and the number of regions; each image labelled in its lesion box."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    sizes, count = [np.zeros(0, dtype=np.int64)], 0
    for image in np.flatnonzero(rows.any(axis=1)):
        r, c = np.flatnonzero(rows[image]), np.flatnonzero(cols[image])
        box = masks[image, r[0]:r[-1] + 1, c[0]:c[-1] + 1]
        region_ids, found = ndimage.label(box, structure=_8_CONNECTED)
        sizes.append(np.bincount(region_ids.reshape(-1))[region_ids[box]])
        count += found
    return np.concatenate(sizes), count


def _keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integer keys [K] of float32/float64 values [K] in the same order (-0 and +0
    share a key): the sign bit set for positives, all bits flipped for negatives."""
    unsigned = np.uint32 if values.dtype == np.float32 else np.uint64
    top = unsigned(1) << unsigned(8 * values.itemsize - 1)
    bits = (values + values.dtype.type(0)).view(unsigned)  # -0.0 + 0.0 is +0.0
    flip = bits >> unsigned(8 * values.itemsize - 1)
    flip *= top - unsigned(1)
    flip |= top
    bits ^= flip
    return bits


def _values(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of ``_keys``: the float64 values [K] of keys [K]."""
    top = keys.dtype.type(1) << keys.dtype.type(8 * keys.itemsize - 1)
    bits = np.where(keys & top, keys ^ top, ~keys)
    return bits.view(dtype).astype(np.float64)


def _slab_bounds(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Score values [S-1] cutting the scores into S slabs of about equal numbers of pixels, so
    that one slab's negative keys take at most SLAB_FRACTION of the scores' bytes (S=1, no cut,
    for small inputs); placed from a sample of whole images."""
    n_slabs = math.ceil(scores.nbytes / max(SLAB_BYTES_MIN, SLAB_FRACTION * scores.nbytes))
    if n_slabs == 1:
        return scores.reshape(-1)[:0]
    step = max(1, len(scores) // SAMPLE_IMAGES)
    sample = np.sort(np.asarray(scores[::step]), axis=None)
    sample = sample[np.isfinite(sample)]
    return np.unique(sample[(np.arange(1, n_slabs) * len(sample)) // n_slabs])


def _light_chunks(labels: np.ndarray, scores: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(negative-pixel mask, scores) per chunk, for passes after the checked first one."""
    step = max(1, CHUNK_PIXELS * len(scores) // scores.size)
    for start in range(0, len(scores), step):
        yield (~np.asarray(labels[start:start + step], dtype=bool)).reshape(-1), \
            np.asarray(scores[start:start + step]).reshape(-1)


def _in_slab(negative: np.ndarray, chunk: np.ndarray, bounds: np.ndarray, index: int) -> np.ndarray:
    """Negative pixels (mask [K]) of scores ``chunk`` [K] in slab ``index`` of the cut at ``bounds``."""
    if index:
        negative = negative & (chunk >= bounds[index - 1])
    if index < len(bounds):
        negative = negative & (chunk < bounds[index])
    return negative


def _sorted_positives(keys: np.ndarray, sizes: np.ndarray | None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct keys [V] (ascending), pixel counts [V] and region weights [V] (sum of 1/size of
    each pixel's region; zeros without ``sizes``) of positive pixels: keys [P], sizes [P]."""
    if sizes is None:
        keys = np.sort(keys)
    elif keys.dtype == np.uint32:  # pack the region size below the key: one uint64 sort
        packed = np.sort(keys.astype(np.uint64) << np.uint64(32) | sizes.astype(np.uint64))
        keys, sizes = (packed >> np.uint64(32)).astype(np.uint32), packed & np.uint64(0xFFFFFFFF)
    else:
        order = np.argsort(keys)
        keys, sizes = keys[order], sizes[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])[:len(keys)])
    counts = np.diff(np.append(starts, len(keys))).astype(np.float64)
    region = (np.add.reduceat(1.0 / sizes, starts) if sizes is not None and len(keys)
              else np.zeros(len(starts)))
    return keys[starts], counts, region


def _sorted_histogram(labels: np.ndarray, scores: np.ndarray, regions: bool,
                      breakpoints: np.ndarray | None) -> _Histogram:
    """Exact histogram of float32/float64 scores from sorted order-preserving integer keys.

    Positive pixels are sorted once, with the size of their region. Negative pixels matter only
    through how many lie below and at each distinct positive value (and at each of the optional
    ``breakpoints``, values no entry may straddle), so each run of negatives between two such
    "query" values becomes one entry, valued at the next representable value above the query
    (the threshold that selects the whole run); the curves of every metric are those of the
    full per-value histogram. Negatives are sorted slab by slab of the value range, one pass
    over the scores per slab, so extra memory stays near SLAB_FRACTION of the scores' bytes.
    """
    dtype = scores.dtype
    bounds = _slab_bounds(labels, scores)
    pos_keys, pos_sizes = [], []
    n_regions = n_neg = 0
    at_or_above = np.zeros(len(bounds), dtype=np.int64)  # negatives at or above each bound
    neg_min = np.inf
    for mask, chunk, sizes, count in _chunks(labels, scores, regions):
        flat, flat_mask = chunk.reshape(-1), mask.reshape(-1)
        pos_sizes.append(sizes)
        n_regions += count
        positives = flat[flat_mask]
        pos_keys.append(_keys(positives))
        n_neg += len(flat) - len(positives)
        neg_min = min(neg_min, float(np.min(flat, where=~flat_mask, initial=np.inf)))
        at_or_above += np.array([np.count_nonzero(flat >= bound) - np.count_nonzero(positives >= bound)
                                 for bound in bounds], dtype=np.int64)
    pos_distinct, pos_count, pos_region = _sorted_positives(
        np.concatenate(pos_keys), np.concatenate(pos_sizes) if regions else None)
    del pos_keys, pos_sizes
    query = pos_distinct
    if breakpoints is not None and len(breakpoints):
        query = np.union1d(query, _keys(breakpoints.astype(dtype)))
    slab_sizes = -np.diff(np.concatenate([[n_neg], at_or_above, [0]]))
    cuts = np.searchsorted(query, _keys(bounds))  # queries of slab i: cuts[i-1]:cuts[i]
    below, equal = [], []  # per query: negatives strictly below it, and equal to it
    seen = 0
    slab_queries = np.diff(np.concatenate([[0], cuts, [len(query)]]))
    buffer = np.empty(int(np.max(slab_sizes + slab_queries)), dtype=query.dtype)  # one for all
    bound_keys = np.concatenate([[_keys(np.array([neg_min], dtype=dtype))[0] if n_neg else 0],
                                 _keys(bounds)])
    for index, size in enumerate(slab_sizes):
        here = query[(cuts[index - 1] if index else 0):(cuts[index] if index < len(cuts) else None)]
        # Keys of the slab start at ``low``: when their span leaves a bit free, each is stored as
        # (key - low) * 2 + 1 and each query as (key - low) * 2, so one sort ranks both.
        low = min(bound_keys[index], here[0]) if len(here) else bound_keys[index]
        high = max(bound_keys[index + 1] if index + 1 < len(bound_keys) else 0,
                   here[-1] if len(here) else 0)
        packed = int(high) - int(low) < 1 << (8 * query.itemsize - 2)
        slab = buffer[:size + len(here)]
        filled = 0
        for negative, chunk in _light_chunks(labels, scores):
            keys = _keys(chunk[_in_slab(negative, chunk, bounds, index)])
            if packed:
                keys -= low
                keys <<= keys.dtype.type(1)
                keys |= keys.dtype.type(1)
            slab[filled:filled + len(keys)] = keys
            filled += len(keys)
        slab[size:] = (here - low) << query.dtype.type(1) if packed else here
        left, tied_right = _ranks(slab, size, packed)
        below.append(seen + left)
        equal.append(tied_right - left)
        seen += size
    del buffer, slab
    below, equal = np.concatenate(below), np.concatenate(equal)
    # Entries in ascending order: the run below the first query, then per query its own entry
    # and the run of negatives above it (up to the next query).
    size = 1 + 2 * len(query)
    values, neg, pos, region = np.empty(size), np.empty(size), np.zeros(size), np.zeros(size)
    values[0], values[1::2] = neg_min, _values(query, dtype)
    values[2::2] = _values(query + query.dtype.type(1), dtype)
    neg[0] = below[0] if len(query) else n_neg
    neg[1::2] = equal
    neg[2::2] = np.diff(np.append(below, n_neg))
    neg[2::2] -= equal
    del below, equal
    at = 1 + 2 * np.searchsorted(query, pos_distinct)
    pos[at], region[at] = pos_count, pos_region
    present = (neg > 0) | (pos > 0)
    kept = []
    for array in (values, neg, pos, region):  # one copy at a time: peak memory
        kept.append(array[present][::-1])
        del array
    del values, neg, pos, region
    return _Histogram(*kept, n_regions)


def _ranks(slab: np.ndarray, size: int, packed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sorts ``slab`` in place: negative keys slab[:size] (any order), then distinct sorted query
    keys [Q]; per query the number of negatives below it, and below or equal. ``packed``: keys
    carry a flag bit (1: negative, 0: query, so a query sorts before equal negatives) and one
    sort ranks both; otherwise the negatives are sorted and binary-searched."""
    if not packed:
        queries = slab[size:].copy()
        negatives = slab[:size]
        negatives.sort()
        return (np.searchsorted(negatives, queries),
                np.searchsorted(negatives, queries, side="right"))
    one = slab.dtype.type(1)
    slab.sort()
    at = np.concatenate([start + np.flatnonzero((slab[start:start + CHUNK_PIXELS] & one) == 0)
                         for start in range(0, len(slab), CHUNK_PIXELS)] + [np.zeros(0, np.int64)])
    # Negatives equal to a query follow it: step over short runs, binary-search long ones.
    run = np.zeros(len(at), dtype=np.int64)
    tied = np.flatnonzero(at + 1 < len(slab))
    for _ in range(16):
        tied = tied[slab[at[tied] + run[tied] + 1] == (slab[at[tied]] | one)]
        run[tied] += 1
        tied = tied[at[tied] + run[tied] + 1 < len(slab)]
    run[tied] = np.searchsorted(slab, slab[at[tied]] | one, side="right") - at[tied] - 1
    at -= np.arange(len(at))  # negatives below each query
    run += at
    return at, run


def _histogram(labels: np.ndarray, scores: np.ndarray, regions: bool,
               breakpoints: np.ndarray | None = None) -> _Histogram:
    """Negative/positive counts per score entry (descending); with ``regions``, labels are
    [N,H,W] masks and each positive pixel also adds 1/size of its 8-connected region."""
    labels, scores = _check(labels, scores, regions)
    if scores.dtype == np.float16:
        return _float16_histogram(labels, scores, regions)
    return _sorted_histogram(labels, scores, regions, breakpoints)


def _single_class(h: _Histogram) -> bool:
    return h.pos.sum() == 0 or h.neg.sum() == 0


def _blocks(h: _Histogram) -> Iterator[tuple[slice, float, float, float]]:
    """Slices of HIST_BLOCK entries of ``h`` with the positives, negatives and region weight
    of the entries before each: the curves are read block by block (small temporaries)."""
    tp = fp = region = 0.0
    for start in range(0, len(h.pos), HIST_BLOCK):
        block = slice(start, start + HIST_BLOCK)
        yield block, tp, fp, region
        tp, fp, region = tp + h.pos[block].sum(), fp + h.neg[block].sum(), region + h.region[block].sum()


def _auroc(h: _Histogram, what: str) -> float:
    if _single_class(h):
        return _nan(what, "only one class present")
    # Each negative beats the positives scored strictly higher; ties count one half.
    total = 0.0
    for block, tp, _, _ in _blocks(h):
        beaten = np.cumsum(h.pos[block])
        beaten += tp - 0.5 * h.pos[block]
        total += float(np.dot(h.neg[block], beaten))
    return float(total / (h.pos.sum() * h.neg.sum()))


def _ap(h: _Histogram, what: str) -> float:
    if _single_class(h):
        return _nan(what, "only one class present")
    total = 0.0
    for block, tp_before, fp_before, _ in _blocks(h):
        tp = np.cumsum(h.pos[block])
        tp += tp_before
        called = np.cumsum(h.neg[block])
        called += fp_before
        called += tp
        total += float(np.dot(h.pos[block], tp / called))  # precision at each threshold
    return float(total / h.pos.sum())


def _f1_max(h: _Histogram, what: str) -> tuple[float, float]:
    if _single_class(h):
        return _nan(what, "only one class present"), float("nan")
    n_pos, best, at = h.pos.sum(), -1.0, 0
    for block, tp_before, fp_before, _ in _blocks(h):
        tp = np.cumsum(h.pos[block]) + tp_before
        f1 = 2 * tp / (n_pos + tp + np.cumsum(h.neg[block]) + fp_before)
        index = int(np.argmax(f1))
        if f1[index] > best:  # the highest threshold among equal F1
            best, at = float(f1[index]), block.start + index
    return best, float(h.values[at])


def _clipped_area(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray,
                  x_max: float) -> np.ndarray:
    """Trapezoid areas [..., K] of the segments (x0, y0)-(x1, y1) [..., K] (x0 <= x1) left of
    x_max, a segment crossing x_max interpolated linearly there; sum them for the area."""
    end = np.minimum(x1, x_max)
    width = np.clip(end - x0, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        y_end = y0 + np.divide((y1 - y0) * (end - x0), x1 - x0, out=np.zeros_like(y0), where=x1 > x0)
    return width * (y0 + y_end) / 2


def _pro_curve(h: _Histogram) -> tuple[np.ndarray, np.ndarray]:
    """FPR [V+1] and PRO [V+1] at every distinct threshold, from the highest down, with (0, 0) first."""
    fpr = np.concatenate([[0.0], np.cumsum(h.neg) / h.neg.sum()])
    pro = np.concatenate([[0.0], np.cumsum(h.region) / h.n_regions])
    return fpr, pro


def _aupro(h: _Histogram, fpr_limit: float) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    n_neg = h.neg.sum()
    if h.n_regions == 0 or n_neg == 0:
        return _nan("AUPRO", "no anomalous region or no normal pixel")
    area = 0.0
    for block, _, fp, region in _blocks(h):
        if fp / n_neg >= fpr_limit:
            break
        x = np.concatenate([[fp], np.cumsum(h.neg[block]) + fp]) / n_neg
        y = np.concatenate([[region], np.cumsum(h.region[block]) + region]) / h.n_regions
        area += float(np.sum(_clipped_area(x[:-1], x[1:], y[:-1], y[1:], fpr_limit)))
    return float(np.clip(area / fpr_limit, 0.0, 1.0))


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
    masks, maps = _check(masks, maps, regions=True)
    low, high = float(np.min(maps)), float(np.max(maps))
    thresholds = low + (high - low) / num_thresholds * np.arange(num_thresholds)
    # "map > t" is "map >= the smallest value of the maps' dtype above t": entries split there.
    cast = thresholds.astype(maps.dtype)
    first_above = np.where(cast > thresholds, cast, np.nextafter(cast, np.inf, dtype=maps.dtype))
    h = _histogram(masks, maps, regions=True, breakpoints=first_above[np.isfinite(first_above)])
    if h.n_regions == 0 or h.neg.sum() == 0:
        return _nan("legacy AUPRO", "no anomalous region or no normal pixel")
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
