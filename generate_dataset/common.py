"""Helpers the dataset converters share: NIfTI reading in RAS, BMAD-layout writing and the seeded
patient split. How slices are shown and scaled (the framing rule) is the runtime readers' own
(``scans.framing``), so that scans are read the way the converters write them."""
from __future__ import annotations

import logging
import os
import random

import cv2
import nibabel as nib
import numpy as np

from utils import InputError, atomic_write_json, prepare_output_dir

logger = logging.getLogger("medvmad")


def load_volume(path: str) -> np.ndarray:
    """NIfTI volume [X,Y,Z] in RAS orientation (Z = axial, inferior to superior), stored dtype.

    The stored dtype (scaled to float only when the file has a scale factor) keeps large CT
    volumes small in memory. Anything but a 3-D volume (a 2-D slice, a 4-D series; a trailing
    length-1 axis is dropped) is refused naming the file, from its header.
    """
    try:
        image = nib.load(path)
        shape = tuple(image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise InputError(f"{path}: a {len(shape)}-D volume of shape {image.shape}; a 3-D volume is expected")
        volume = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    except InputError:
        raise
    except Exception as error:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read volume {path}: {error}") from error
    return volume.reshape(volume.shape[:3])


def check_finite_volume(path: str, volume: np.ndarray, region: np.ndarray | None = None,
                        region_name: str = "") -> None:
    """Refuse a volume holding NaN or infinite voxels (only those inside ``region``, named
    ``region_name``, when given), naming the file and their axial slices: written as PNG they would
    turn black, a lesion-like hole, or empty a slice that is then dropped without a word."""
    bad = ~np.isfinite(volume)
    if region is not None:
        bad &= region
    if bad.any():
        slices = [int(z) for z in np.flatnonzero(bad.any(axis=(0, 1)))]
        shown = ", ".join(map(str, slices[:10])) + (" ..." if len(slices) > 10 else "")
        where = f" in {region_name}" if region_name else ""
        raise InputError(f"{path}: {int(bad.sum())} NaN or infinite voxel(s){where} in axial slice(s) {shown}; "
                         f"fix or mask them first")


def write_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 array as PNG, creating folders; InputError if it cannot be written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, image):
        raise InputError(f"cannot write {path}")


def write_sample(root: str, split: str, cls: str, name: str, image: np.ndarray,
                 lesion: np.ndarray | None = None) -> None:
    """Write one BMAD sample: ``split/cls/img/name`` (uint8 [H,W]) and, for a lesion mask (bool
    [H,W]), ``split/cls/anomaly_mask/name`` as 0/255."""
    write_png(os.path.join(root, split, cls, "img", name), image)
    if lesion is not None:
        write_png(os.path.join(root, split, cls, "anomaly_mask", name), lesion.astype(np.uint8) * 255)


def write_split_info(save_path: str, info: dict) -> dict:
    """Write ``split.json`` (sources, split and counts) beside the data, log the counts, return ``info``."""
    atomic_write_json(os.path.join(save_path, "split.json"), info)
    logger.info("wrote %s: %s", save_path, ", ".join(f"{k} {v}" for k, v in info["counts"].items()))
    return info


def check_empty_target(save_path: str) -> None:
    """Create the output folder; refuse a non-empty one (old slices of another split would leak)."""
    if any(prepare_output_dir(save_path).iterdir()):
        raise InputError(f"save path {save_path} is not empty; choose a new folder")


def split_counts(n: int, split: tuple[float, ...]) -> list[int]:
    """Cases per split: fractions summing to 1 (largest remainder), or whole counts (sum <= n)."""
    if any(value < 0 for value in split):
        raise InputError(f"split values must be >= 0, got {split}")
    if abs(sum(split) - 1) < 1e-6:
        exact = [value * n for value in split]
        counts = [int(value) for value in exact]
        by_remainder = sorted(range(len(split)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        return counts
    if all(float(value).is_integer() for value in split) and sum(split) <= n:
        return [int(value) for value in split]
    raise InputError(f"split {split} is neither fractions summing to 1 nor case counts "
                     f"summing to at most {n}")


def split_cases(cases: list[str], split: tuple[float, ...], seed: int) -> list[list[str]]:
    """Shuffle sorted case ids with ``seed`` and cut them into consecutive groups."""
    shuffled = sorted(cases)
    random.Random(seed).shuffle(shuffled)
    groups, start = [], 0
    for count in split_counts(len(cases), split):
        groups.append(sorted(shuffled[start:start + count]))
        start += count
    return groups
