"""Speed and memory of our pixel metrics at Brain scale against scikit-learn's roc_auc_score.

Builds 3715 x 240 x 240 float16 maps with blob lesions on about 80% of the images (fixed seed),
times sklearn's roc_auc_score alone on the flattened pixels (float32) and our whole pixel suite
(metrics.pixel_metrics: AUROC + AP + AUPRO + F1-max), measures our peak extra memory with
tracemalloc, and ends with the line ``speedup X``. Targets: speedup >= 10, peak extra memory
< 3x the maps' size.

    python bench/metrics_speed.py [--n_images 3715] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import pixel_metrics  # noqa: E402

SIZE = 240


def make_data(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks bool [N,240,240] (1-3 overlapping discs on ~80% of images) and float16 maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, SIZE, SIZE), dtype=bool)
    maps = np.empty((n_images, SIZE, SIZE), dtype=np.float16)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_images", type=int, default=3715)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    masks, maps = make_data(args.n_images, args.seed)
    maps_mb = maps.nbytes / 2**20
    print(f"pixels {maps.size:,}  maps {maps_mb:.0f} MiB float16  "
          f"abnormal pixels {masks.mean():.2%}  lesioned images {masks.any(axis=(1, 2)).mean():.0%}")

    start = time.perf_counter()
    ours = pixel_metrics(masks, maps)
    ours_s = time.perf_counter() - start
    print(f"ours  pixel_metrics  {ours_s:.2f} s  " + "  ".join(f"{k} {v:.6f}" for k, v in ours.items()))

    tracemalloc.start()
    pixel_metrics(masks, maps)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"ours  peak extra memory {peak_mb:.0f} MiB = {peak_mb / maps_mb:.2f}x maps")

    labels, scores = masks.reshape(-1), maps.reshape(-1).astype(np.float32)
    start = time.perf_counter()
    reference = roc_auc_score(labels, scores)
    sklearn_s = time.perf_counter() - start
    print(f"sklearn roc_auc_score  {sklearn_s:.2f} s  auroc {reference:.6f}  "
          f"|ours - sklearn| {abs(ours['pixel_auroc'] - reference):.1e}")
    print(f"speedup {sklearn_s / ours_s:.1f}")


if __name__ == "__main__":
    main()
