"""Speed and memory of our pixel metrics at Brain scale against scikit-learn's roc_auc_score.

Builds 3715 x 240 x 240 float32 maps with blob lesions on about 80% of the images (fixed seed),
and the same maps as float16 and float64. Per dtype it times our whole pixel suite
(metrics.pixel_metrics: AUROC + AP + AUPRO + F1-max, exact at the maps' own precision) and its
peak extra memory (tracemalloc); for float32 also the four public functions called one after
the other. Then it times scikit-learn's roc_auc_score alone on the float32 pixels, checks our
AUROC against it, and ends with the line ``speedup X`` (float32 suite vs roc_auc_score).
Targets: speedup >= 30, |ours - sklearn| <= 1e-6, peak extra memory < 1x the maps.

    python -m bench.metrics_speed [--n_images 3715] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from sklearn.metrics import roc_auc_score

from evaluation import metrics

SIZE = 240


def make_data(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks bool [N,240,240] (1-3 overlapping discs on ~80% of images) and float32 maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, SIZE, SIZE), dtype=bool)
    maps = np.empty((n_images, SIZE, SIZE), dtype=np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    for start in range(0, n_images, 64):
        chunk = slice(start, min(start + 64, n_images))
        n = chunk.stop - chunk.start
        lesioned = rng.random(n) < 0.8
        for disc in range(3):
            cy, cx = rng.uniform(40, SIZE - 40, (2, n, 1, 1)).astype(np.float32)
            radius = rng.uniform(4, 30, (n, 1, 1)).astype(np.float32)
            present = (lesioned & ((disc == 0) | (rng.random(n) < 0.5)))[:, None, None]
            masks[chunk] |= present & ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2)
        noise = rng.random((n, SIZE, SIZE), dtype=np.float32)
        maps[chunk] = 0.6 * noise + 0.4 * masks[chunk] * rng.random((n, 1, 1), dtype=np.float32)
    return masks, maps


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_images", type=int, default=3715)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    masks, maps32 = make_data(args.n_images, args.seed)
    print(f"pixels {maps32.size:,}  abnormal pixels {masks.mean():.2%}  "
          f"lesioned images {masks.any(axis=(1, 2)).mean():.0%}  "
          f"distinct float32 values {len(np.unique(maps32[:64])):,} in the first 64 maps")
    suites, seconds = {}, {}
    for dtype in (np.float16, np.float32, np.float64):
        maps = maps32.astype(dtype)
        name = np.dtype(dtype).name
        suites[name], seconds[name] = timed(metrics.pixel_metrics, masks, maps)
        tracemalloc.start()
        metrics.pixel_metrics(masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{name:8s} pixel_metrics {seconds[name]:6.2f} s  peak extra memory "
              f"{peak / 2**20:5.0f} MiB = {peak / maps.nbytes:.2f}x maps  "
              + "  ".join(f"{k} {v:.6f}" for k, v in suites[name].items()))
        if dtype == np.float32:
            total = 0.0
            for function in (metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro, metrics.f1_max):
                _, spent = timed(function, masks, maps)
                total += spent
                print(f"         {function.__name__:13s} {spent:6.2f} s")
            print(f"         four functions one after the other {total:.2f} s")
        del maps
    same = all(abs(suites["float32"][k] - suites["float64"][k]) <= 1e-9 for k in suites["float32"])
    print(f"float32 and float64 suites agree (same values, exact at both): {same}")

    labels, scores = masks.reshape(-1), maps32.reshape(-1)
    reference, sklearn_s = timed(roc_auc_score, labels, scores)
    print(f"sklearn roc_auc_score float32 {sklearn_s:.2f} s  auroc {reference:.8f}  "
          f"|ours - sklearn| {abs(suites['float32']['pixel_auroc'] - reference):.1e}")
    for name in ("float16", "float64"):
        print(f"{name} speedup {sklearn_s / seconds[name]:.1f}")
    print(f"speedup {sklearn_s / seconds['float32']:.1f}")


if __name__ == "__main__":
    main()
