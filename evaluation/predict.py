"""Batched scoring of a dataset and its metrics; shared by test.py, train.py (validation) and benches."""
from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from CLIP.MedVMAD import MedVMAD
from dataset import MedicalDataset, Sample, augment_support
from distributed import SINGLE, Distributed, sharded_loader
from utils import DISK_FULL, InputError, autocast


@dataclass
class Predictions:
    paths: list[str]
    labels: np.ndarray            # int64 [N]
    scores: np.ndarray            # float64 [N]
    maps: np.ndarray | None       # float64 [N,H,W] (or --map_dtype float32/float16); np.memmap when streamed to disk
    masks: np.ndarray | None      # bool [N,H,W]; np.memmap beside the maps when streamed
    has_masks: bool               # every abnormal image has a ground-truth mask


MAPS_FILE, MASKS_FILE = "maps.npy", "masks.npy"
MAP_DTYPES = ("float32", "float16", "float64")


@torch.inference_mode()
def predict(model: MedVMAD, loader: DataLoader, device: torch.device, precision: str = "fp32",
            keep_maps: bool = True, desc: str = "test", map_dtype: str = "float64",
            maps_dir: str | os.PathLike | None = None, where: Distributed = SINGLE) -> Predictions | None:
    """Score every image of ``loader`` (batches of MedicalDataset items, in dataset order) in eval mode.

    Scores are kept as float64, the model's own; maps at ``map_dtype`` (float64 by default, the
    model's own output; float32 halves the memory but ties pixels within 6e-8 of 1, float16 quarters it).
    With ``maps_dir``, maps and masks are written batch by batch to ``maps_dir``/maps.npy and
    masks.npy (memory-mappable .npy files) instead of RAM, for test sets larger than memory.

    Under torchrun ``loader`` comes from ``distributed.sharded_loader``: each process scores its
    share of the batches, and process 0 gathers them round by round (one batch per process at a
    time, never a copy of every map per process) into dataset order; the others return None.
    """
    model.eval()
    n_images = len(loader.dataset)
    paths: list[str] = [""] * n_images
    labels, scores = np.zeros(n_images, dtype=np.int64), np.zeros(n_images, dtype=np.float64)
    maps = masks = None
    filled = np.zeros(n_images, dtype=bool)
    has_masks = True
    rounds = getattr(loader.batch_sampler, "rounds", len(loader))
    batches = zip(loader.batch_sampler, loader)
    for _ in tqdm(range(rounds), desc=desc, unit="batch", leave=False, disable=not where.is_main):
        indices, batch = next(batches, (None, None))  # a process may have one batch fewer than others
        part = None
        if batch is not None:
            with autocast(device, precision):
                output = model(batch["image"].to(device, non_blocking=True))
            part = dict(indices=np.asarray(indices), paths=list(batch["path"]), labels=batch["label"].numpy(),
                        scores=output.image_score.double().cpu().numpy(), has_masks=bool(batch["has_mask"].all()),
                        maps=output.anomaly_map.to(getattr(torch, map_dtype)).cpu().numpy() if keep_maps else None,
                        masks=batch["mask"].numpy() > 0.5 if keep_maps else None)
        for received in where.gather_to_main(part) or []:  # process 0: every process's part, in rank order
            if received is None:
                continue
            rows = received["indices"]
            for row, path in zip(rows, received["paths"]):
                paths[row] = path
            labels[rows], scores[rows], filled[rows] = received["labels"], received["scores"], True
            has_masks &= received["has_masks"]
            if keep_maps:
                if maps is None:
                    maps, masks = _map_storage((n_images, *received["maps"].shape[1:]), map_dtype, maps_dir)
                maps[rows], masks[rows] = received["maps"], received["masks"]
    if not where.is_main:
        return None
    if not filled.all():
        raise RuntimeError(f"{desc}: {int((~filled).sum())} of {n_images} images were not scored")
    if isinstance(maps, np.memmap):
        maps.flush()
        masks.flush()
    return Predictions(paths=paths, labels=labels, scores=scores, maps=maps, masks=masks, has_masks=has_masks)


def _map_storage(shape: tuple[int, ...], map_dtype: str, maps_dir: str | os.PathLike | None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Empty maps [N,H,W] of ``map_dtype`` and masks (bool): in RAM, or .npy memory maps."""
    if map_dtype not in MAP_DTYPES:
        raise InputError(f"map dtype must be one of {', '.join(MAP_DTYPES)}, not {map_dtype}")
    if maps_dir is None:
        return np.empty(shape, dtype=map_dtype), np.empty(shape, dtype=bool)
    Path(maps_dir).mkdir(parents=True, exist_ok=True)
    arrays = []
    for name, dtype in ((MAPS_FILE, map_dtype), (MASKS_FILE, bool)):
        array = np.lib.format.open_memmap(Path(maps_dir) / name, mode="w+", dtype=dtype, shape=shape)
        reserve_disk(Path(maps_dir) / name)
        arrays.append(array)
    return arrays[0], arrays[1]


def reserve_disk(path: Path) -> None:
    """Give the sparse file ``path`` its blocks now, so that a disk too small for the streamed maps
    stops the run before scoring with one line, not with a bus error when a page is first written."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno in DISK_FULL:
                raise InputError(f"no space left to stream the maps to {path.parent} "
                                 f"({os.fstat(handle.fileno()).st_size / 2 ** 30:.1f} GiB for {path.name}); free "
                                 f"space there, or halve the maps with --map_dtype float32") from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: as before
                raise


def maps_bytes(n_images: int, image_size: int, map_dtype: str = "float64") -> int:
    """Memory of the maps and masks of n_images square maps of image_size pixels."""
    return n_images * image_size ** 2 * (np.dtype(map_dtype).itemsize + 1)


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


def memory_bank_from_support(model: MedVMAD, support: list[Sample], seed: int, device: torch.device,
                             batch_size: int = 8) -> tuple[int, int]:
    """Build the model's few-shot bank from the normal images of ``support``, each with 10 seeded
    augmentations (MVFA's x11). Returns (normal images, copies of each)."""
    normal = MedicalDataset([s for s in support if s.label == 0], model.config.backbone.image_size)
    if len(normal) < 2:
        raise InputError("the memory bank needs at least 2 normal support images (--k_shot >= 2)")
    images = torch.stack([normal[i]["image"] for i in range(len(normal))])
    augmented, _ = augment_support(images, torch.zeros(images.shape[0], *images.shape[-2:]), seed=seed)
    copies = augmented.shape[0] // len(normal)
    groups = torch.arange(len(normal)).repeat(copies)  # augment_support: row i comes from image i % K
    model.build_memory_bank(augmented.to(device), groups.to(device), batch_size)
    return len(normal), copies


def support_predictions(model: MedVMAD, support: list[Sample], device: torch.device, batch_size: int = 8,
                        precision: str = "fp32", where: Distributed = SINGLE,
                        ) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Scores [S] (float64), labels [S] and paths of the few-shot support images, with the model's
    bank built from the normal ones (``memory_bank_from_support``): each normal image scored against
    the bank without it (``MemoryBank.left_out_scores``), each abnormal one as a test image is.
    Every process scores its share of the abnormal ones; process 0 returns the lot, the others None."""
    normal = [sample for sample in support if sample.label == 0]
    abnormal = [sample for sample in support if sample.label == 1]
    scores = np.zeros(0)
    if abnormal:
        loader = sharded_loader(MedicalDataset(abnormal, model.config.backbone.image_size), batch_size, 0, where)
        scored = predict(model, loader, device, precision, keep_maps=False, desc="support", where=where)
        scores = None if scored is None else scored.scores
    if not where.is_main:
        return None
    left_out = model.memory_bank.left_out_scores(model.config.fewshot_weight).cpu().numpy()
    return (np.concatenate([left_out, scores]), np.array([0] * len(normal) + [1] * len(abnormal)),
            [sample.image_path for sample in normal + abnormal])
