"""Prediction over a dataset: ``predict`` scores it in batches into ``Predictions`` (paths, labels,
scores [N], maps and masks [N,H,W]), its maps kept in RAM or streamed to memory-mapped files
(``maps_dir_for``); shared by test.py, train.py (selection), the few-shot support scoring and benches."""
from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from CLIP.MedVMAD import MedVMAD
from distributed import SINGLE, Distributed
from utils import DISK_FULL, InputError, autocast, available_memory


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


MAPS_TEMP = ".maps-"  # prefix of the folders maps are streamed to (maps_dir_for); a killed run's are stale


def ram_budget_gb(max_ram_maps_gb: float | None) -> float:
    """The RAM maps may take (--max_ram_maps_gb), by default half the memory available now."""
    if max_ram_maps_gb is not None:
        return max_ram_maps_gb
    return available_memory() / 2 / 2**30


def streams_maps(need: int, max_ram_maps_gb: float | None) -> bool:
    """Whether maps and masks of ``need`` bytes (``maps_bytes``) go to disk (``maps_dir_for``)."""
    return need > ram_budget_gb(max_ram_maps_gb) * 2**30


def maps_dir_for(n_images: int, image_size: int, map_dtype: str, max_ram_maps_gb: float | None, name: str,
                 save_path: Path, logger) -> Path | None:
    """A temporary folder in save_path to stream the maps to (``predict``'s maps_dir), when they
    would not fit in ``ram_budget_gb`` (``streams_maps``); None when they do."""
    need = maps_bytes(n_images, image_size, map_dtype)
    if not streams_maps(need, max_ram_maps_gb):
        return None
    budget = ram_budget_gb(max_ram_maps_gb)
    logger.info(f"{name}: maps and masks take {need / 2**30:.1f} GB, over {budget:.1f} GB: streamed to "
                f"memory-mapped files in {save_path}")
    save_path.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=save_path, prefix=f"{MAPS_TEMP}{name}-"))
