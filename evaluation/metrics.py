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
- float32/float64: the scores become order-preserving integer keys (float bits, sign-flipped).
  Positive pixels are sorted with the size of their region. Negative pixels are sorted block by
  block of consecutive images, each block once, with two markers per distinct positive value
  (its key and the next) packed among them, so the markers' positions give how many negatives
  lie below and at each positive value. Runs of negative-only values between two positive values
  become one histogram entry: the curves are unchanged (see _sorted_histogram).
WORKERS threads read chunks and sort blocks at once (numpy releases the GIL). Extra memory stays
below the maps' size (chunks of CHUNK_PIXELS; the blocks in flight hold at most NEGATIVE_FRACTION
of the maps' bytes), and maps may be np.memmap arrays. Single-class input gives nan with an
UndefinedMetricWarning (a RuntimeWarning); NaN or inf scores, and labels and scores of different
shapes, raise ValueError.

Every metric of results files and tables is declared once, in ``METRICS`` (``Metric``: name,
function, whether it needs masks, its results-table title, its bootstrap histogram curve, its place
in the paper tables): ``image_metrics``, ``pixel_metrics``, ``compute_metrics``,
the patient level, the bootstrap intervals (every declared metric: by its curve, else by its own
function on each resample), the results and paper tables, test.py and summarize_results.py read
that declaration. Add a metric to ``BUILT_IN_METRICS`` at the bottom of this file (or at run time
with ``declare(Metric(...))``); nothing else changes.
"""
from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import numpy as np
from scipy import ndimage

CHUNK_PIXELS = 1 << 20  # pixels handled at once: temporaries of a few MB, reused
WORKERS = min(4, os.cpu_count() or 1)  # threads reading chunks and sorting blocks (numpy frees the GIL)
# The blocks of negative pixels sorted at once take at most this share of the scores' bytes
# (a block is at least BLOCK_BYTES_MIN).
NEGATIVE_FRACTION = 0.4
BLOCK_BYTES_MIN = 1 << 26
HIST_BLOCK = 1 << 20  # histogram entries read at once by the curve functions
_8_CONNECTED = np.ones((3, 3), dtype=bool)


class _Histogram(NamedTuple):
    """Per distinct score value, in descending order of value; all float64 [V]."""
    values: np.ndarray
    neg: np.ndarray  # number of negative pixels with this value
    pos: np.ndarray  # number of positive pixels with this value
    region: np.ndarray  # sum over positive pixels of 1 / (size of their region); zeros if unused
    n_regions: int


class UndefinedMetricWarning(RuntimeWarning):
    """A metric of single-class input: undefined, returned as nan (test.py notes these per table instead)."""


def _nan(what: str, why: str) -> float:
    warnings.warn(f"{what} is undefined: {why}; returning nan", UndefinedMetricWarning, stacklevel=3)
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
    for mask, chunk, sizes, count, _, _ in _chunks(labels, scores, regions):
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


def _parts(scores: np.ndarray) -> list[slice]:
    """Slices of about CHUNK_PIXELS pixels along the first axis of scores."""
    step = max(1, CHUNK_PIXELS * len(scores) // scores.size)
    return [slice(start, start + step) for start in range(0, len(scores), step)]


class _Chunk(NamedTuple):
    mask: np.ndarray  # bool, the chunk's shape
    scores: np.ndarray  # contiguous copy, checked finite
    sizes: np.ndarray | None  # with regions: size of the region of each positive pixel (C order)
    n_regions: int
    low: float  # smallest and largest score of the chunk (nan for float16)
    high: float


def _read(labels: np.ndarray, scores: np.ndarray, part: slice, regions: bool) -> _Chunk:
    """One checked chunk (works on np.memmap): NaN or inf raise ValueError, labels must be binary."""
    chunk = np.ascontiguousarray(scores[part])
    if chunk.dtype == np.float16:  # float16 math is slow: test the exponent bits
        low = high = np.nan
        finite = not ((chunk.view(np.uint16) & 0x7C00) == 0x7C00).any()
    else:
        low, high = chunk.min(), chunk.max()  # NaN propagates to both; inf shows in one
        finite = np.isfinite(low) and np.isfinite(high)
    if not finite:
        raise ValueError("scores contain NaN or inf")
    mask = _as_bool(np.asarray(labels[part]))
    sizes, count = region_sizes(mask) if regions else (None, 0)
    return _Chunk(mask, chunk, sizes, count, float(low), float(high))


def _chunks(labels: np.ndarray, scores: np.ndarray, regions: bool) -> Iterator[_Chunk]:
    """The checked chunks of labels and scores, in order."""
    for part in _parts(scores):
        yield _read(labels, scores, part, regions)


def region_sizes(masks: np.ndarray) -> tuple[np.ndarray, int]:
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


def _keys(values: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Unsigned integer keys [K] of float32/float64 values [K] in the same order (-0 and +0
    share a key): the sign bit set for positives, all bits flipped for negatives. ``in_place``
    writes them over the values' bytes (returned as a view)."""
    unsigned = np.uint32 if values.dtype == np.float32 else np.uint64
    top = unsigned(1) << unsigned(8 * values.itemsize - 1)
    zero = values.dtype.type(0)  # -0.0 + 0.0 is +0.0
    bits = (np.add(values, zero, out=values) if in_place else values + zero).view(unsigned)
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


class _Packing(NamedTuple):
    """How a block's keys are stored for its one sort: (key - low) * 2 + flag in ``dtype`` (flag
    1: a negative pixel, 0: a marker, so a marker sorts before the negatives of its own key);
    ``dtype`` None when the keys' span leaves no bit free (float64 over a huge range): the
    negatives are then sorted alone and the markers binary-searched."""
    dtype: type | None
    low: int


def _packing(key_dtype: type, low_key: int, high_key: int) -> _Packing:
    span = high_key - low_key
    for dtype in (key_dtype, np.uint64):
        if span < 1 << (8 * np.dtype(dtype).itemsize - 1):
            return _Packing(dtype, low_key)
    return _Packing(None, 0)


def _rank_block(labels: np.ndarray, scores: np.ndarray, parts: list[slice], negatives: np.ndarray,
                markers: np.ndarray, packing: _Packing, buffer: np.ndarray,
                below: np.ndarray, lock: threading.Lock) -> float:
    """Adds to ``below`` [M] the number of negative pixels of the chunks ``parts`` (negatives
    [len(parts)] of them in each) with a key below each of the sorted ``markers`` [M] (keys);
    returns the smallest of their scores (inf if none). One sort of the block's negative keys
    with the markers packed among them, in ``buffer`` (packing.dtype, at least sum(negatives) + M
    long; its contents are lost). ``lock`` guards ``below``, shared by the threads."""
    n_neg = int(negatives.sum())
    dtype = packing.dtype or markers.dtype.type
    one = dtype(1)
    block = buffer[:n_neg + (len(markers) if packing.dtype else 0)]
    filled = 0
    for part, count in zip(parts, negatives):
        negative = ~np.asarray(labels[part], dtype=bool).reshape(-1)
        keys = block[filled:filled + count]
        filled += count
        if keys.itemsize == scores.itemsize:  # select straight into the block, then key in place
            np.compress(negative, np.asarray(scores[part]).reshape(-1), out=keys.view(scores.dtype))
            _keys(keys.view(scores.dtype), in_place=True)
        else:  # float32 keys packed in uint64
            keys[:] = _keys(np.asarray(scores[part]).reshape(-1)[negative])
        if packing.dtype:
            keys -= dtype(packing.low)
            keys <<= one
            keys |= one
    if not packing.dtype:
        block.sort()
        for start in range(0, len(markers), CHUNK_PIXELS):
            found = np.searchsorted(block, markers[start:start + CHUNK_PIXELS])
            with lock:
                below[start:start + len(found)] += found
        return float(_values(block[:1], scores.dtype)[0]) if n_neg else np.inf
    block[n_neg:] = markers - markers.dtype.type(packing.low)
    block[n_neg:] <<= one
    block.sort()
    # A marker's position minus the markers before it: the negatives below it.
    flags = np.empty(min(len(block), CHUNK_PIXELS), dtype=dtype)
    is_marker = np.empty(len(flags), dtype=bool)
    seen, smallest = 0, np.inf
    for start in range(0, len(block), CHUNK_PIXELS):
        piece = block[start:start + CHUNK_PIXELS]
        marker = np.equal(np.bitwise_and(piece, one, out=flags[:len(piece)]), 0,
                          out=is_marker[:len(piece)])
        if smallest == np.inf and not marker.all():
            key = (piece[int(np.argmin(marker))] >> one) + dtype(packing.low)
            smallest = float(_values(np.array([key], dtype=markers.dtype), scores.dtype)[0])
        found = np.flatnonzero(marker)
        found -= np.arange(len(found))
        found += start - seen
        with lock:
            below[seen:seen + len(found)] += found
        seen += len(found)
    return smallest


def _blocks_of(negatives: np.ndarray, capacity: int) -> list[slice]:
    """Consecutive chunks (negatives [C] per chunk) grouped into blocks of about equal numbers of
    negatives, at most ``capacity`` (a chunk alone may hold more), as many as a multiple of
    WORKERS so the threads finish together: slices of chunk indices."""
    n_blocks = -(-int(negatives.sum()) // max(1, capacity))
    n_blocks = min(len(negatives), -(-n_blocks // WORKERS) * WORKERS)
    ends = np.searchsorted(np.cumsum(negatives), np.arange(1, n_blocks) * negatives.sum() / n_blocks)
    edges = np.unique(np.concatenate([[0], ends + 1, [len(negatives)]]).clip(0, len(negatives)))
    return [slice(start, stop) for start, stop in zip(edges[:-1], edges[1:])]


def _sorted_histogram(labels: np.ndarray, scores: np.ndarray, regions: bool,
                      breakpoints: np.ndarray | None) -> _Histogram:
    """Exact histogram of float32/float64 scores from sorted order-preserving integer keys.

    Positive pixels are sorted once, with the size of their region. Negative pixels matter only
    through how many lie below and at each distinct positive value (and at each of the optional
    ``breakpoints``, values no entry may straddle), so each run of negatives between two such
    "query" values becomes one entry, valued at the next representable value above the query
    (the threshold that selects the whole run); the curves of every metric are those of the
    full per-value histogram. Negatives are counted block by block of consecutive images: each
    block's negative keys are sorted once with two markers per query (its key and the next), so
    the markers' positions give the counts below and at each query. WORKERS threads read chunks
    and sort blocks at once; the blocks in flight hold at most NEGATIVE_FRACTION of the scores' bytes.
    """
    dtype = scores.dtype
    parts = _parts(scores)

    def positives(part: slice) -> tuple[np.ndarray, np.ndarray | None, int, int, float, float]:
        chunk = _read(labels, scores, part, regions)
        flat_mask = chunk.mask.reshape(-1)
        keys = _keys(chunk.scores.reshape(-1)[flat_mask])
        return keys, chunk.sizes, chunk.n_regions, flat_mask.size - len(keys), chunk.low, chunk.high

    with ThreadPoolExecutor(WORKERS) as pool:
        found = list(pool.map(positives, parts))
    pos_keys = np.concatenate([f[0] for f in found])
    pos_sizes = np.concatenate([f[1] for f in found]) if regions else None
    n_regions = sum(f[2] for f in found)
    negatives = np.array([f[3] for f in found], dtype=np.int64)
    n_neg = int(negatives.sum())
    low, high = min(f[4] for f in found), max(f[5] for f in found)
    del found
    query = np.sort(pos_keys)
    query = query[np.concatenate([[True], query[1:] != query[:-1]])[:len(query)]]
    if breakpoints is not None and len(breakpoints):
        query = np.union1d(query, _keys(breakpoints.astype(dtype)))
    markers = np.empty(2 * len(query), dtype=query.dtype)
    markers[0::2], markers[1::2] = query, query + query.dtype.type(1)
    bounds = _keys(np.array([low, high], dtype=dtype))
    packing = _packing(query.dtype.type, int(min(bounds[0], markers[:1].min(initial=bounds[0]))),
                       int(max(bounds[1], markers[-1:].max(initial=bounds[1]))))
    key_bytes = np.dtype(packing.dtype or query.dtype).itemsize
    capacity = max(BLOCK_BYTES_MIN, int(NEGATIVE_FRACTION * scores.nbytes / WORKERS)) // key_bytes
    blocks = _blocks_of(negatives, capacity)
    buffer_size = max(int(negatives[block].sum()) for block in blocks) + len(markers)
    below = np.zeros(len(markers), dtype=np.int64)
    smallest = [np.inf]
    lock, per_thread = threading.Lock(), threading.local()

    def count(block: slice) -> None:
        if not hasattr(per_thread, "buffer"):  # one buffer a thread, reused block after block
            per_thread.buffer = np.empty(buffer_size, dtype=packing.dtype or query.dtype)
        # markers and below are deleted after every count has run (ruff sees only the del)
        smallest.append(_rank_block(labels, scores, parts[block], negatives[block], markers,  # noqa: F821
                                    packing, per_thread.buffer, below, lock))  # noqa: F821

    with ThreadPoolExecutor(WORKERS) as pool:  # the positives' counts while the blocks sort
        positives = pool.submit(_sorted_positives, pos_keys, pos_sizes)
        list(pool.map(count, blocks))
    pos_distinct, pos_count, pos_region = positives.result()
    del markers, pos_keys, pos_sizes
    below, equal = below[0::2], below[1::2] - below[0::2]
    # Entries in ascending order: the run below the first query, then per query its own entry
    # and the run of negatives above it (up to the next query).
    size = 1 + 2 * len(query)
    values, neg, pos, region = np.empty(size), np.empty(size), np.zeros(size), np.zeros(size)
    values[0], values[1::2] = min(smallest), _values(query, dtype)
    values[2::2] = _values(query + query.dtype.type(1), dtype)
    neg[0] = below[0] if len(query) else n_neg
    neg[1::2] = equal
    neg[2::2] = np.diff(np.append(below, n_neg))
    neg[2::2] -= equal
    del below, equal
    at = 1 + 2 * (np.searchsorted(query, pos_distinct) if len(query) > len(pos_distinct)
                  else np.arange(len(query)))
    pos[at], region[at] = pos_count, pos_region
    present = (neg > 0) | (pos > 0)
    kept = []
    for array in (values, neg, pos, region):  # one copy at a time: peak memory
        kept.append(array[present][::-1])
        del array
    del values, neg, pos, region
    return _Histogram(*kept, n_regions)


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


def clipped_area(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray,
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
        area += float(np.sum(clipped_area(x[:-1], x[1:], y[:-1], y[1:], fpr_limit)))
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
    """The declared pixel metrics (AUROC, AP, AUPRO and F1-max with its threshold, and any other
    metric declared with ``needs_masks``) of maps [N,H,W] for masks [N,H,W] (bool); the built-in
    ones from one pass over the pixels."""
    h = _histogram(masks, maps, regions=True)
    f1, threshold = _f1_max(h, "pixel F1-max")
    return _with_declared({"pixel_auroc": _auroc(h, "pixel AUROC"), "pixel_ap": _ap(h, "pixel AP"),
                           "pixel_aupro": _aupro(h, fpr_limit), "pixel_f1_max": f1,
                           "pixel_f1_threshold": threshold}, masks, maps, needs_masks=True)


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The declared image metrics (AUROC, AP and F1-max with its threshold, and any other metric
    declared without ``needs_masks``) of scores [N] for labels [N] (bool or 0/1); the built-in ones
    from one pass."""
    h = _histogram(labels, scores, regions=False)
    f1, threshold = _f1_max(h, "image F1-max")
    return _with_declared({"image_auroc": _auroc(h, "image AUROC"), "image_ap": _ap(h, "image AP"),
                           "image_f1_max": f1, "image_f1_threshold": threshold}, labels, scores, needs_masks=False)


def f1_max_value(labels: np.ndarray, scores: np.ndarray) -> float:
    """The best F1 of ``f1_max`` without its threshold."""
    return f1_max(labels, scores)[0]


@dataclass(frozen=True)
class Metric:
    """One metric, declared once for everything downstream (results.json, results.csv, the results
    and paper tables, bootstrap intervals).

    name: its key in results (``image_...`` or ``pixel_...``); function: (labels [N], scores [N])
    -> float, or (masks [N,H,W], maps [N,H,W]) -> float with ``needs_masks``; title: its column in
    the results tables and results.csv (None: results.json only); curve: its key among the
    bootstrap's histogram curve metrics ("auroc", "ap", "aupro", "f1_max"), the fast exact path of
    the built-ins; a metric without one gets its interval from its own function on each resampled
    set of patients (slow); paper: its place among the paper tables' columns (ascending, ties in
    declaration order; the column is headed by ``title``), None to leave it out of them."""
    name: str
    function: Callable[[np.ndarray, np.ndarray], float]
    needs_masks: bool
    title: str | None = None
    curve: str | None = None
    paper: int | None = None


METRICS: dict[str, Metric] = {}  # name -> Metric, in the order of the results tables' columns
# The curves evaluation/bootstrap.py reads off its shared histograms, for image (False) and pixel (True) metrics.
CURVES = {False: ("auroc", "ap", "f1_max"), True: ("auroc", "ap", "aupro", "f1_max")}


def declare(metric: Metric) -> Metric:
    """Add (or replace) ``metric`` in METRICS; ValueError for a name without the ``image_``/``pixel_``
    prefix its ``needs_masks`` implies, a curve the bootstrap does not draw for its kind (``CURVES``),
    or a paper column without a title."""
    prefix = "pixel_" if metric.needs_masks else "image_"
    if not metric.name.startswith(prefix):
        raise ValueError(f"metric {metric.name!r}: a {'pixel' if metric.needs_masks else 'image'} metric's name "
                         f"starts with {prefix!r}")
    if metric.curve is not None and metric.curve not in CURVES[metric.needs_masks]:
        kind, curves = ("pixel" if metric.needs_masks else "image"), ", ".join(CURVES[metric.needs_masks])
        raise ValueError(f"metric {metric.name!r}: curve {metric.curve!r} is not one of the bootstrap's {kind} "
                         f"curves ({curves})")
    if metric.paper is not None and not metric.title:
        raise ValueError(f"metric {metric.name!r}: a paper table column needs a title")
    METRICS[metric.name] = metric
    return metric


def declared(needs_masks: bool | None = None) -> list[Metric]:
    """The declared metrics, image ones (``needs_masks=False``), pixel ones (True) or all (None)."""
    return [metric for metric in METRICS.values() if needs_masks is None or metric.needs_masks == needs_masks]


def _with_declared(built_in: dict[str, float], labels: np.ndarray, scores: np.ndarray,
                   needs_masks: bool) -> dict[str, float]:
    """``built_in`` (one pass's figures) with the declared metrics it lacks, computed by their own
    functions; built-in figures no longer declared are left out (thresholds are kept)."""
    out = {key: value for key, value in built_in.items() if key in METRICS or key.endswith("_threshold")}
    for metric in declared(needs_masks):
        if metric.name not in out:
            out[metric.name] = float(metric.function(labels, scores))
    return out


class Scored(Protocol):
    """What ``compute_metrics`` reads of a dataset's predictions (``evaluation.predict.Predictions``):
    labels [N] and scores [N]; maps [N,H,W] (None when not kept) and masks [N,H,W] where
    ``has_masks``."""
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray | None
    masks: np.ndarray | None
    has_masks: bool


def compute_metrics(predictions: Scored, pixel: bool = True, image: bool = True,
                    aupro_variant: str = "standard") -> dict[str, float]:
    """The declared metrics of a dataset's predictions: image ones and, where masks and maps exist,
    pixel ones (built in: image AUROC/AP/F1-max, pixel AUROC/AP/AUPRO/F1-max, values in [0,1]);
    ``aupro_variant="legacy"``: ``aupro_legacy`` as pixel_aupro."""
    results: dict[str, float] = {}
    if image:
        results.update(image_metrics(predictions.labels, predictions.scores))
    if pixel and predictions.has_masks and predictions.maps is not None:
        results.update(pixel_metrics(predictions.masks, predictions.maps))
        if aupro_variant == "legacy":
            results["pixel_aupro"] = aupro_legacy(predictions.masks, predictions.maps)
    return results


def declare_all(metrics: Iterable[Metric]) -> None:
    """``declare`` each of ``metrics``, in order."""
    for metric in metrics:
        declare(metric)


# The built-in metrics, in the order of the results tables' columns; the paper tables (Tables 1 and
# 2 of the report) put the pixel metrics first.
BUILT_IN_METRICS = (Metric("image_auroc", image_auroc, False, "image AUROC", "auroc", paper=3),
                    Metric("image_ap", image_ap, False, "image AP", "ap", paper=4),
                    Metric("image_f1_max", f1_max_value, False, None, "f1_max"),
                    Metric("pixel_auroc", pixel_auroc, True, "pixel AUROC", "auroc", paper=1),
                    Metric("pixel_ap", pixel_ap, True, None, "ap"),
                    Metric("pixel_aupro", aupro, True, "pixel AUPRO", "aupro", paper=2),
                    Metric("pixel_f1_max", f1_max_value, True, None, "f1_max"))
declare_all(BUILT_IN_METRICS)
