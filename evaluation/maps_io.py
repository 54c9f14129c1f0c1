"""Saved test maps (test.py --save_maps): re-score a run, or compare it with other methods,
without running the model again.

One dataset ``NAME`` of a run is three files in ``<save_path>/maps/``:

    NAME.npy         float64 [N,H,W] anomaly maps (or float32/float16 with --map_dtype)
    NAME_masks.npy   bool [N,H,W] ground-truth masks (all False for normal images)
    NAME.json        {"paths": [N], "labels": [N], "scores": [N], "has_masks": bool}, row order
                     of the arrays; written last

Reading back (memory-mapped: a set larger than RAM is read chunk by chunk by evaluation/metrics.py)::

    from evaluation.maps_io import load_maps
    saved = load_maps("results/test/maps", "Brain")
    metrics.pixel_metrics(saved.masks, saved.maps)

Each file is written to a temporary name in the same folder and renamed into place, so an
existing file is either kept whole or replaced whole, never left half-written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from evaluation.predict import Predictions
from utils import InputError, atomic_write, atomic_write_json, write_error


def map_files(name: str) -> tuple[str, str, str]:
    """The files of dataset ``name`` in a maps folder: maps, masks, index (written last)."""
    return f"{name}.npy", f"{name}_masks.npy", f"{name}.json"


def save_maps(folder: str | os.PathLike, name: str, predictions: Predictions) -> None:
    """Write the maps, masks, paths, labels and scores of ``predictions`` as ``folder``/NAME.*.
    Maps streamed to a .npy memory map (evaluation.predict.predict with maps_dir) are moved, not copied."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    maps_file, masks_file, index_file = map_files(name)
    for array, target in ((predictions.maps, folder / maps_file), (predictions.masks, folder / masks_file)):
        source = getattr(array, "filename", None)
        if source is not None and Path(source).parent.stat().st_dev == folder.stat().st_dev:
            array.flush()
            try:
                os.replace(source, target)  # the whole file was written before the rename
            except OSError as error:
                raise write_error(target, error) from None
        else:
            # written through the handle, chunk by chunk: a memory map is never loaded whole, and
            # a full disk raises (a memory-mapped target would kill the process with SIGBUS)
            atomic_write(target, lambda handle, array=array: np.lib.format.write_array(handle, array,
                                                                                      allow_pickle=False))
    atomic_write_json(folder / index_file, {
        "paths": list(predictions.paths), "labels": predictions.labels.tolist(),
        "scores": predictions.scores.tolist(), "has_masks": bool(predictions.has_masks)})


def load_maps(folder: str | os.PathLike, name: str, mmap: bool = True) -> Predictions:
    """The saved ``name`` of ``folder`` as Predictions (maps and masks memory-mapped unless
    ``mmap`` is False). InputError when the files are missing or disagree."""
    folder = Path(folder)
    maps_file, masks_file, index_file = map_files(name)
    try:
        index = json.loads((folder / index_file).read_text())
        mode = "r" if mmap else None
        maps = np.load(folder / maps_file, mmap_mode=mode)
        masks = np.load(folder / masks_file, mmap_mode=mode)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read saved maps {name} in {folder}: {error}") from None
    if not (len(index["paths"]) == len(maps) == len(masks)) or maps.shape != masks.shape:
        raise InputError(f"saved maps {name} in {folder}: {len(index['paths'])} paths, maps "
                         f"{maps.shape} and masks {masks.shape} do not match")
    return Predictions(paths=index["paths"], labels=np.asarray(index["labels"], dtype=np.int64),
                       scores=np.asarray(index["scores"], dtype=np.float64), maps=maps, masks=masks,
                       has_masks=bool(index["has_masks"]))
