"""Peak memory of evaluating maps streamed to disk (test.py above --max_ram_maps_gb).

Writes N maps of SIZE x SIZE (float32, blob lesions as in metrics_speed.py) and their masks to
memory-mapped .npy files, as evaluation.predict.predict does with maps_dir, then runs the whole pixel
suite (metrics.pixel_metrics) on the memory maps. Prints the maps' size, the peak anonymous
memory (RssAnon, sampled every 20 ms: what the evaluation itself holds; file pages of the
memory maps are cache the kernel can drop) and the peak total RSS (getrusage).

    python -m bench.eval_memory [--n_images 3715] [--size 336] [--folder /tmp]
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from evaluation import metrics
from bench.metrics_speed import make_data


def rss_anon_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_images", type=int, default=3715)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        shape = (args.n_images, args.size, args.size)
        maps = np.lib.format.open_memmap(Path(folder) / "maps.npy", mode="w+", dtype=np.float32, shape=shape)
        masks = np.lib.format.open_memmap(Path(folder) / "masks.npy", mode="w+", dtype=bool, shape=shape)
        for start in range(0, args.n_images, 64):  # written batch by batch, as predict does
            chunk_masks, chunk_maps = make_data(min(64, args.n_images - start), start)
            pad = ((0, 0), (0, args.size - 240), (0, args.size - 240))
            masks[start:start + 64] = np.pad(chunk_masks, pad, mode="wrap")
            maps[start:start + 64] = np.pad(chunk_maps, pad, mode="wrap")
        maps.flush()
        masks.flush()
        del maps, masks
        maps = np.load(Path(folder) / "maps.npy", mmap_mode="r")
        masks = np.load(Path(folder) / "masks.npy", mmap_mode="r")
        base, peak, done = rss_anon_mib(), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon_mib())
                time.sleep(0.02)
        thread = threading.Thread(target=sample)
        thread.start()
        start = time.perf_counter()
        result = metrics.pixel_metrics(masks, maps)
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
        maps_mib = maps.nbytes / 2**20
        print(f"maps {shape} float32 {maps_mib:.0f} MiB + masks {masks.nbytes / 2**20:.0f} MiB, memory-mapped")
        print(f"pixel_metrics {seconds:.1f} s  pixel_auroc {result['pixel_auroc']:.6f}")
        print(f"peak anonymous memory of the evaluation {peak[0] - base:.0f} MiB = "
              f"{(peak[0] - base) / maps_mib:.2f}x maps; peak RSS (incl. mapped file pages) "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
