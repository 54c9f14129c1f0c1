"""Tests of evaluation/metrics.py: hand-computed cases, a slow exact AUPRO reference, sklearn agreement."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation import metrics
from tests.helpers import blob_data, brute_force_f1, reference_aupro


def random_data(seed: int, dtype: type, shape: tuple[int, ...] = (4, 16, 16)):
    rng = np.random.default_rng(seed)
    masks = rng.random(shape) < 0.2
    maps = np.round(rng.random(shape) + 0.3 * masks, 2).astype(dtype)
    return masks, maps


def test_half_detected_region() -> None:
    # One 4-pixel region with two pixels at 1 and two at 0.5; normals at 0 and 0.75.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :4] = True
    maps = np.zeros((1, 4, 4), dtype=np.float16)
    maps[0, 0, :4] = [1, 1, 0.5, 0.5]
    maps[0, 3, :3] = 0.75  # 3 of the 12 normal pixels: FPR 0.25 from threshold 0.75 down
    # Curve: (0,0) -> (0,0.5) at t=1 -> (0.25,0.5) at t=0.75 -> (0.25,1) at t=0.5 -> (1,1).
    # Area up to 0.3: 0.25*0.5 + 0.05*1 = 0.175; / 0.3.
    assert metrics.aupro(masks, maps) == pytest.approx(0.175 / 0.3)
    assert metrics.aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.5)
    # AUROC: positives beat 9 normals fully; vs the 3 at 0.75, half the positives win.
    assert metrics.pixel_auroc(masks, maps) == pytest.approx((4 * 9 + 2 * 3) / (4 * 12))


def test_perfect_and_inverted_maps() -> None:
    masks, _ = blob_data(0, np.float32)
    perfect = masks.astype(np.float16)
    assert metrics.pixel_auroc(masks, perfect) == 1.0
    assert metrics.pixel_ap(masks, perfect) == 1.0
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)  # sum of 1/size weights
    assert metrics.f1_max(masks, perfect) == (1.0, 1.0)
    assert metrics.pixel_auroc(masks, -perfect) == 0.0
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_regions_count_equally() -> None:
    # A big region (16 px) fully detected and a small one (1 px) missed: PRO 0.5, not 16/17.
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, :4, :4] = True
    masks[1, 7, 7] = True
    maps = np.zeros((2, 8, 8), dtype=np.float32)
    maps[0, :4, :4] = 1.0
    # Curve: (0,0) -> (0,0.5) at t=1 -> (1,1) at t=0; area to 0.3 is 0.3*0.5 + 0.3*0.3*0.5/2.
    assert metrics.aupro(masks, maps) == pytest.approx((0.15 + 0.0225) / 0.3)


def test_diagonal_pixels_are_one_region() -> None:
    # 8-connectivity: two diagonal pixels form one region, so detecting one of them gives PRO 0.5.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps = np.zeros((1, 4, 4), dtype=np.float16)
    maps[0, 0, 0] = 1
    assert metrics.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5 + 0.5 / 2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_reference(dtype: type, seed: int) -> None:
    for masks, maps in (random_data(seed, dtype), blob_data(seed, dtype)):
        for limit in (0.3, 0.05, 1.0):
            expected = reference_aupro(masks, maps, limit)
            assert metrics.aupro(masks, maps, limit) == pytest.approx(expected, abs=1e-4)
        assert metrics.pixel_metrics(masks, maps)["pixel_aupro"] == pytest.approx(
            reference_aupro(masks, maps), abs=1e-4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_ap_match_sklearn(dtype: type, seed: int) -> None:
    masks, maps = random_data(seed, dtype, (5, 20, 20))
    maps.reshape(-1)[:10] = -0.0  # signed zeros tie with zeros
    maps.reshape(-1)[10:20] = 0.0
    labels, scores = masks.ravel(), maps.ravel().astype(np.float64)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores),
                                                             abs=1e-6)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-6)
    suite = metrics.pixel_metrics(masks, maps)
    assert suite["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert suite["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    masks, maps = blob_data(1, dtype, n=5)
    whole = metrics.pixel_metrics(masks, maps)
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 1)  # one image per chunk
    monkeypatch.setattr(metrics, "HIST_BLOCK", 3)  # curves read 3 entries at a time
    assert metrics.pixel_metrics(masks, maps) == pytest.approx(whole)
    assert metrics.f1_max(masks.ravel(), maps.ravel()) == pytest.approx(
        (whole["pixel_f1_max"], whole["pixel_f1_threshold"]))


@pytest.mark.parametrize("seed", range(3))
def test_image_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.3 * labels, 1)  # ties
    result = metrics.image_metrics(labels, scores)
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores))
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert (result["image_f1_max"], result["image_f1_threshold"]) == metrics.f1_max(labels, scores)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("seed", range(3))
def test_f1_max_matches_brute_force(dtype: type, seed: int) -> None:
    masks, maps = random_data(seed, dtype)
    f1, threshold = metrics.f1_max(masks, maps)
    expected_f1, expected_threshold = brute_force_f1(masks.ravel(), maps.ravel())
    assert f1 == pytest.approx(expected_f1)
    assert threshold == expected_threshold
    assert metrics.f1_max(masks.ravel(), maps.ravel()) == (f1, threshold)


@pytest.mark.parametrize("metric", [metrics.image_auroc, metrics.image_ap, metrics.pixel_auroc,
                                    metrics.pixel_ap, metrics.aupro, metrics.aupro_legacy])
@pytest.mark.parametrize("label", [False, True])
def test_single_class_gives_nan_and_warns(metric, label: bool) -> None:
    masks = np.full((2, 4, 4), label)
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float16)
    with pytest.warns(RuntimeWarning):
        assert math.isnan(metric(masks, maps))


def test_single_class_suites_give_nan_and_warn() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    with pytest.warns(RuntimeWarning):
        assert all(math.isnan(v) for v in metrics.pixel_metrics(masks, maps).values())
    with pytest.warns(RuntimeWarning):
        assert all(math.isnan(v) for v in metrics.image_metrics([1, 1], [0.2, 0.3]).values())
    with pytest.warns(RuntimeWarning):
        assert all(math.isnan(v) for v in metrics.f1_max(masks, maps))


def test_bad_input_raises() -> None:
    masks, maps = random_data(0, np.float16)
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc(masks[:1], maps)
    with pytest.raises(ValueError, match="binary"):
        metrics.image_auroc([0, 2], [0.1, 0.2])
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_metrics(masks, maps)


def test_aupro_legacy_close_to_aupro() -> None:
    masks, _ = blob_data(0, np.float32)
    rng = np.random.default_rng(0)
    # Separable map (normals in [0,0.4], lesions in [0.6,1]): every kept point has PRO 1.
    perfect = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.4 * rng.random(masks.shape))
    assert metrics.aupro_legacy(masks, perfect) == pytest.approx(1.0)
    # On a noisy map the 200-threshold, FPR-rescaled variant lands near (not on) the exact one.
    masks, maps = blob_data(1, np.float32, n=6, size=48)
    legacy, exact = metrics.aupro_legacy(masks, maps), metrics.aupro(masks, maps)
    assert 0.0 <= legacy <= 1.0
    assert abs(legacy - exact) < 0.1


def on_polyline(x: np.ndarray, y: np.ndarray, px: float, py: float) -> bool:
    """Whether (px, py) lies on the polyline through (x [K], y [K]) (x non-decreasing)."""
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        if x0 - 1e-12 <= px <= x1 + 1e-12:
            t = 0.0 if x1 == x0 else (px - x0) / (x1 - x0)
            if x1 == x0 and min(y0, y1) - 1e-12 <= py <= max(y0, y1) + 1e-12:
                return True
            if x1 != x0 and abs(y0 + t * (y1 - y0) - py) < 1e-9:
                return True
    return False


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pro_curve_matches_hand_values_and_aupro(dtype: type) -> None:
    """One 2-pixel region: half detected at the top threshold, fully at the next. Runs of
    normal-only thresholds may be merged into one point: the polyline is the same."""
    masks = np.zeros((1, 2, 3), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.array([[[0.9, 0.5, 0.1], [0.7, 0.3, 0.2]]], dtype=dtype)
    fpr, pro = metrics.pro_curve(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and fpr[0] == 0 and fpr[-1] == 1
    for point in zip([0, 0, 0.25, 0.25, 0.5, 0.75, 1.0], [0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]):
        assert on_polyline(fpr, pro, *point)
    area = 0.25 * 0.5 + 0.05 * 1.0  # FPR 0-0.25 at PRO 0.5, then 0.25-0.3 at PRO 1
    assert metrics.aupro(masks, maps) == pytest.approx(area / 0.3)


def full_precision_data(seed: int, dtype: type, n: int = 4, size: int = 20):
    """Blob masks and maps at the dtype's full precision (no rounding), some negative values,
    signed zeros, a block of exact ties across classes and a saturated patch."""
    masks, _ = blob_data(seed, np.float64, n=n, size=size)
    rng = np.random.default_rng(seed)
    maps = (rng.standard_normal(masks.shape) + 1.5 * masks * rng.random(masks.shape)).astype(dtype)
    maps[0, :3, :3] = -0.0
    maps[0, 3:6, :3] = 0.0
    maps[1, :, :2] = maps[1, 0, 0]  # ties between normal and lesion pixels
    maps[-1, -4:, -4:] = 1.0
    return masks, maps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(3))
def test_full_precision_matches_references(dtype: type, seed: int) -> None:
    masks, maps = full_precision_data(seed, dtype)
    labels, scores = masks.ravel(), maps.ravel()
    suite = metrics.pixel_metrics(masks, maps)
    assert suite["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert suite["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    for limit in (0.3, 0.05):
        assert metrics.aupro(masks, maps, limit) == pytest.approx(
            reference_aupro(masks, maps, limit), abs=1e-9)
    assert (suite["pixel_f1_max"], suite["pixel_f1_threshold"]) == pytest.approx(
        brute_force_f1(labels, scores.astype(np.float64)))
    assert metrics.pixel_auroc(masks, maps) == suite["pixel_auroc"]
    assert metrics.pixel_ap(masks, maps) == suite["pixel_ap"]
    # Rounding to float16 changes the figures: the full-precision path must not round.
    assert metrics.pixel_ap(masks, maps.astype(np.float16)) != pytest.approx(suite["pixel_ap"], abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_and_wide_ranges_give_the_same_figures(dtype: type, monkeypatch, tmp_path) -> None:
    masks, maps = full_precision_data(5, dtype, n=8)
    maps[2] *= -1e30  # keys spanning nearly the whole range: float32 keys packed in uint64,
    maps[3] *= 1e30  # float64 keys with no free bit sorted alone and binary-searched
    maps[4] *= 1e-30
    expected = {"pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
                "pixel_ap": average_precision_score(masks.ravel(), maps.ravel()),
                "pixel_aupro": reference_aupro(masks, maps)}
    whole = metrics.pixel_metrics(masks, maps)
    monkeypatch.setattr(metrics, "BLOCK_BYTES_MIN", 1)
    monkeypatch.setattr(metrics, "NEGATIVE_FRACTION", 0.2)  # blocks of a few chunks
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 3 * 20 * 20)  # 3 images per chunk
    stored = np.lib.format.open_memmap(tmp_path / "maps.npy", mode="w+", dtype=dtype, shape=maps.shape)
    stored[:] = maps
    for source in (maps, stored):
        sliced = metrics.pixel_metrics(masks, source)
        assert sliced == pytest.approx(whole, abs=1e-12)
        for key, value in expected.items():
            assert sliced[key] == pytest.approx(value, abs=1e-9)


def reference_aupro_legacy(masks: np.ndarray, maps: np.ndarray, num: int = 200,
                           fpr_limit: float = 0.3) -> float:
    """The 200-threshold variant computed directly on the pixels."""
    low, high = float(maps.min()), float(maps.max())
    regions = []
    for image, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == i) for i in range(1, count + 1)]
    fprs, pros = [], []
    for threshold in low + (high - low) / num * np.arange(num):
        predicted = maps > threshold
        fprs.append((predicted & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([predicted[image][region].mean() for image, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < fpr_limit
    fprs, pros = fprs[kept][::-1], pros[kept][::-1]
    fprs = (fprs - fprs[0]) / (fprs[-1] - fprs[0])
    return float(np.sum(np.diff(fprs) * (pros[1:] + pros[:-1]) / 2))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_aupro_legacy_matches_reference(dtype: type) -> None:
    masks, maps = blob_data(2, np.float64, n=5, size=32)
    maps = maps + 1e-3 * np.random.default_rng(0).random(maps.shape)  # no rounding ties
    maps = maps.astype(dtype)
    assert metrics.aupro_legacy(masks, maps) == pytest.approx(reference_aupro_legacy(masks, maps), abs=1e-9)


def test_infinite_scores_raise() -> None:
    masks, maps = random_data(0, np.float32)
    maps[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="inf"):
        metrics.pixel_metrics(masks, maps)
    with pytest.raises(ValueError, match="inf"):
        metrics.image_auroc([0, 1], [0.2, -np.inf])
