"""Convert raw BraTS2021 cases into the BMAD layout (brain MRI anomaly detection).

Input: ``raw_path/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz`` (``.nii`` also
read), any volume size. Volumes are turned to RAS orientation; axial slices are the last axis and
are shown anterior up, patient's right on the left (radiological, as BraTS viewers show them).

Output (BMAD layout, read by ``dataset.list_samples``)::

    save_path/train/good/img/<case>_<slice>.png                 normal slices only
    save_path/{valid,test}/good/img/<case>_<slice>.png          slices without tumour
    save_path/{valid,test}/Ungood/img/<case>_<slice>.png        slices with tumour
    save_path/{valid,test}/Ungood/anomaly_mask/<case>_<slice>.png   seg > 0, saved 0/255
    save_path/split.json                                         patients per split, counts, settings

``<case>`` is the case number (``00124``), ``<slice>`` the axial index in RAS order (``60``; the
stored index for BraTS volumes, which are stored inferior to superior). Cases are split by
patient with a seed, so no patient is in two splits. Intensities are scaled per volume: the
0.5-99.5 percentiles of brain voxels (> 0) map to 0-255, background stays 0.

Usage: ``python generate_dataset/brats2021.py --raw_path BraTS2021 --save_path data/Brain``
"""
from __future__ import annotations

import logging
import os
import random
import re
import sys
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
from tqdm import tqdm

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import (ArgumentParser, InputError, atomic_write_json, non_negative_float, non_negative_int,  # noqa: E402
                   prepare_output_dir, run_cli, setup_logging)

MODALITIES = ("flair", "t1", "t1ce", "t2")
SPLITS = ("train", "valid", "test")
logger = logging.getLogger("medvmad")


# ----------------------------------------------------------------------------- shared helpers

def find_nifti(folder: str, stem: str) -> str:
    """Path of ``folder/stem.nii.gz`` or ``folder/stem.nii``; InputError naming it when absent."""
    for extension in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + extension)
        if os.path.isfile(path):
            return path
    raise InputError(f"missing {os.path.join(folder, stem)}.nii.gz")


def load_volume(path: str) -> np.ndarray:
    """NIfTI volume [X,Y,Z] in RAS orientation (Z = axial, inferior to superior), stored dtype.

    The stored dtype (scaled to float only when the file has a scale factor) keeps large CT
    volumes small in memory.
    """
    try:
        return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read volume {path}: {error}") from error


def display(slice_2d: np.ndarray) -> np.ndarray:
    """RAS axial slice [X,Y] -> image [rows,cols]: anterior up, patient's right on the left."""
    return np.ascontiguousarray(slice_2d.T[::-1, ::-1])


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


# ----------------------------------------------------------------------------- BraTS

def scale_intensity(volume: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """MRI volume -> uint8: brain voxels (> 0) percentiles [low, high] -> [0, 255]; background 0."""
    brain = volume > 0
    if not brain.any():
        raise InputError("volume holds no brain voxels (all <= 0)")
    low, high = np.percentile(volume[brain], [low_pct, high_pct])
    scaled = np.clip((volume - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.where(brain, np.rint(scaled), 0).astype(np.uint8)


def find_cases(raw_path: str, modality: str) -> dict[str, tuple[str, str]]:
    """Case number -> (modality volume, seg volume) for every case folder under ``raw_path``."""
    if not os.path.isdir(raw_path):
        raise InputError(f"raw BraTS folder {raw_path} does not exist")
    folders = sorted(name for name in os.listdir(raw_path)
                     if os.path.isdir(os.path.join(raw_path, name)) and not name.startswith("."))
    if not folders:
        raise InputError(f"raw BraTS folder {raw_path} holds no case folders (BraTS2021_XXXXX)")
    cases = {}
    for name in folders:
        folder = os.path.join(raw_path, name)
        match = re.search(r"(\d+)$", name)
        case = match.group(1) if match else name
        if case in cases:
            raise InputError(f"two case folders share the number {case}: {folder}")
        cases[case] = (find_nifti(folder, f"{name}_{modality}"), find_nifti(folder, f"{name}_seg"))
    return cases


def convert(raw_path: str, save_path: str, modality: str = "flair",
            slice_range: tuple[int, int] = (60, 99), seed: int = 0,
            split: tuple[float, ...] = (0.7, 0.1, 0.2)) -> dict:
    """Write the BMAD-layout slices of all cases; returns the content of ``split.json``."""
    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, not {modality!r}")
    first, last = slice_range
    if first > last or first < 0:
        raise InputError(f"bad slice range {slice_range}")
    check_empty_target(save_path)  # before any work
    cases = find_cases(raw_path, modality)
    groups = dict(zip(SPLITS, split_cases(list(cases), split, seed)))
    counts = {f"{name}/{cls}": 0 for name in SPLITS for cls in ("good", "Ungood")}
    for split_name, case_ids in groups.items():
        for case in tqdm(case_ids, desc=split_name, unit="case"):
            image_path, seg_path = cases[case]
            volume, seg = load_volume(image_path), load_volume(seg_path)
            if volume.shape != seg.shape:
                raise InputError(f"{image_path} is {volume.shape} but {seg_path} is {seg.shape}")
            try:
                scaled = scale_intensity(volume)
            except InputError as error:
                raise InputError(f"{image_path}: {error}") from error
            for z in range(first, min(last, volume.shape[2] - 1) + 1):
                if not scaled[:, :, z].any():
                    continue  # no brain in this slice
                lesion = seg[:, :, z] > 0
                cls = "Ungood" if lesion.any() else "good"
                if split_name == "train" and cls == "Ungood":
                    continue  # BMAD trains on normal slices only
                name = f"{case}_{z}.png"
                write_sample(save_path, split_name, cls, name, display(scaled[:, :, z]),
                             display(lesion) if cls == "Ungood" else None)
                counts[f"{split_name}/{cls}"] += 1
    info = dict(source="BraTS2021", modality=modality, slice_range=[first, last], seed=seed,
                split=list(split), counts=counts, **groups)
    return write_split_info(save_path, info)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw_path", required=True, help="folder of BraTS2021_XXXXX case folders")
    parser.add_argument("--save_path", required=True, help="new folder for the BMAD layout")
    parser.add_argument("--modality", default="flair", choices=MODALITIES)
    parser.add_argument("--slice_range", type=non_negative_int, nargs=2, default=(60, 99), metavar=("FIRST", "LAST"),
                        help="axial slices kept, both ends included (BMAD: 60 99)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the patient split")
    parser.add_argument("--split", type=non_negative_float, nargs=3, default=(0.7, 0.1, 0.2),
                        metavar=("TRAIN", "VALID", "TEST"),
                        help="patient fractions summing to 1, or patient counts")
    args = parser.parse_args(argv)
    setup_logging(None)
    convert(args.raw_path, args.save_path, args.modality, tuple(args.slice_range), args.seed,
            tuple(args.split))


if __name__ == "__main__":
    run_cli(main)
