"""Convert BTCV + LiTS abdomen CT into BMAD's Liver layout (liver CT anomaly detection).

Inputs:
- BTCV: ``btcv_path/img/img0001.nii.gz`` with ``btcv_path/label/label0001.nii.gz`` (liver = 6).
  Slices that contain liver become normal training slices.
- LiTS: ``volume-N.nii`` with ``segmentation-N.nii`` anywhere under ``lits_path`` (``.nii.gz``
  also read; labels 1 liver, 2 tumour). Volumes are split into valid/test with a seed; slices with
  tumour are abnormal (mask = label 2), liver slices without tumour are normal.

Every slice is HU-windowed to ``hu_window`` (default [-200, 250]) and scaled to 0-255, and
everything outside the liver (BTCV label 6, LiTS label >= 1) is zeroed. Volumes are turned to RAS;
slices are shown anterior up, patient's right on the left, at their native size (``split.json``
records this framing, less the liver zeroing, for scoring single scans). A NaN or infinite
HU inside the liver (it would be written black, a lesion-like hole) stops the conversion with one
line naming the file and the slices; outside the liver it is zeroed with the rest.

Output::

    save_path/train/good/img/<btcv number>_<slice>.png           e.g. 0001_80.png
    save_path/{valid,test}/good/img/<lits number>_<slice>.png    e.g. 6_391.png
    save_path/{valid,test}/Ungood/img/<lits number>_<slice>.png
    save_path/{valid,test}/Ungood/anomaly_mask/<lits number>_<slice>.png   label 2, saved 0/255
    save_path/split.json                                          volumes per split, counts, settings

Usage: ``python -m generate_dataset.liverct --btcv_path BTCV --lits_path LiTS --save_path data/Liver``
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from generate_dataset.common import (check_empty_target, check_finite_volume, load_volume, split_cases,
                                     write_sample, write_split_info)
from scans.framing import Framing, display, window_to_uint8
from utils import (ArgumentParser, InputError, finite_float, non_negative_int, run_cli,
                   setup_logging, unit_interval)

BTCV_LIVER = 6
LITS_LIVER, LITS_TUMOUR = 1, 2
logger = logging.getLogger("medvmad")


def window_hu(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """HU values -> uint8: [low, high] mapped linearly to [0, 255], clipped outside (the framing
    rule's window, ``scans.framing.window_to_uint8``)."""
    return window_to_uint8(hu, low, high)


def _numbered(folder: str, pattern: str, recursive: bool) -> dict[str, str]:
    """Number -> path for the NIfTI files under ``folder`` named ``pattern`` + number."""
    if not os.path.isdir(folder):
        raise InputError(f"folder {folder} does not exist")
    found: dict[str, str] = {}
    for path in sorted(Path(folder).rglob("*") if recursive else Path(folder).iterdir()):
        match = re.fullmatch(pattern + r"(\d+)\.nii(\.gz)?", path.name)
        if match is None:
            continue
        if match.group(1) in found:
            raise InputError(f"two files share the number {match.group(1)}: "
                             f"{found[match.group(1)]} and {path}")
        found[match.group(1)] = str(path)
    return found


def _pair(images: dict[str, str], labels: dict[str, str], where: str) -> dict[str, tuple[str, str]]:
    """Number -> (image, label); an image without a label, or no image at all, is an error."""
    if not images:
        raise InputError(f"no CT volumes found in {where}")
    for number, path in images.items():
        if number not in labels:
            raise InputError(f"{path} has no label volume in {where}")
    return {number: (path, labels[number]) for number, path in images.items()}


def find_btcv(btcv_path: str) -> dict[str, tuple[str, str]]:
    """BTCV number ("0001") -> (img/img0001.nii.gz, label/label0001.nii.gz)."""
    images = _numbered(os.path.join(btcv_path, "img"), "img", False)
    labels = _numbered(os.path.join(btcv_path, "label"), "label", False)
    return _pair(images, labels, btcv_path)


def find_lits(lits_path: str) -> dict[str, tuple[str, str]]:
    """LiTS number ("6") -> (volume-6.nii, segmentation-6.nii), searched recursively."""
    images = _numbered(lits_path, "volume-", True)
    labels = _numbered(lits_path, "segmentation-", True)
    return _pair(images, labels, lits_path)


def _load_pair(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
    """CT volume (HU) and integer label volume of equal shape."""
    volume, label = load_volume(image_path), load_volume(label_path)
    if volume.shape != label.shape:
        raise InputError(f"{image_path} is {volume.shape} but {label_path} is {label.shape}")
    return volume, np.rint(label).astype(np.int16)


def convert(btcv_path: str, lits_path: str, save_path: str,
            hu_window: tuple[float, float] = (-200, 250), seed: int = 0,
            valid_fraction: float = 0.1) -> dict:
    """Write the Liver BMAD layout; returns the content of ``split.json``."""
    low, high = hu_window
    if low >= high:
        raise InputError(f"bad HU window {hu_window}")
    if not 0 <= valid_fraction <= 1:
        raise InputError(f"valid fraction must be in [0, 1], got {valid_fraction}")
    check_empty_target(save_path)  # before any work
    btcv, lits = find_btcv(btcv_path), find_lits(lits_path)
    valid_ids, test_ids = split_cases(list(lits), (valid_fraction, 1 - valid_fraction), seed)
    counts = {"train/good": 0, "valid/good": 0, "valid/Ungood": 0, "test/good": 0, "test/Ungood": 0}

    for number in tqdm(sorted(btcv), desc="BTCV", unit="volume"):
        volume, label = _load_pair(*btcv[number])
        check_finite_volume(btcv[number][0], volume, label == BTCV_LIVER, "the liver")
        for z in range(volume.shape[2]):
            liver = label[:, :, z] == BTCV_LIVER
            if liver.any():
                image = np.where(liver, window_hu(volume[:, :, z], low, high), 0).astype(np.uint8)
                write_sample(save_path, "train", "good", f"{number}_{z}.png", display(image))
                counts["train/good"] += 1

    for split_name, numbers in (("valid", valid_ids), ("test", test_ids)):
        for number in tqdm(numbers, desc=f"LiTS {split_name}", unit="volume"):
            volume, label = _load_pair(*lits[number])
            check_finite_volume(lits[number][0], volume, label >= LITS_LIVER, "the liver")
            for z in range(volume.shape[2]):
                liver = label[:, :, z] >= LITS_LIVER
                if not liver.any():
                    continue
                tumour = label[:, :, z] == LITS_TUMOUR
                cls = "Ungood" if tumour.any() else "good"
                name = f"{number}_{z}.png"
                image = np.where(liver, window_hu(volume[:, :, z], low, high), 0).astype(np.uint8)
                write_sample(save_path, split_name, cls, name, display(image),
                             display(tumour) if cls == "Ungood" else None)
                counts[f"{split_name}/{cls}"] += 1

    # The framing a single scan can follow: whole axial slices in the HU window; zeroing all but the
    # liver needs its label, which a scan to score does not have: recorded as masked, scoring warns.
    info = dict(source="BTCV+LiTS", hu_window=[low, high], seed=seed, valid_fraction=valid_fraction,
                counts=counts, framing=Framing(window=(low, high), masked="liver").to_dict(), train=sorted(btcv),
                valid=valid_ids, test=test_ids)
    return write_split_info(save_path, info)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--btcv_path", required=True, help="BTCV folder holding img/ and label/")
    parser.add_argument("--lits_path", required=True, help="folder with LiTS volume-N / segmentation-N")
    parser.add_argument("--save_path", required=True, help="new folder for the BMAD layout")
    parser.add_argument("--hu_window", type=finite_float, nargs=2, default=(-200, 250), metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the LiTS valid/test split")
    parser.add_argument("--valid_fraction", type=unit_interval, default=0.1,
                        help="share of LiTS volumes in valid/ (the rest go to test/)")
    args = parser.parse_args(argv)
    setup_logging(None)
    convert(args.btcv_path, args.lits_path, args.save_path, tuple(args.hu_window), args.seed,
            args.valid_fraction)


if __name__ == "__main__":
    run_cli(main)
