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
0.5-99.5 percentiles of brain voxels (> 0) map to 0-255, background stays 0 (``scans.framing``'s
framing rule with whole slices; ``split.json`` records it as "framing"). A volume that is not
3-D, or holds NaN or infinite voxels (whose slices would otherwise look empty and be dropped), stops
the conversion with one line naming the file (and the slices).

Usage: ``python -m generate_dataset.brats2021 --raw_path BraTS2021 --save_path data/Brain``
"""
from __future__ import annotations

import os
import re

from tqdm import tqdm

from generate_dataset.common import (check_empty_target, check_finite_volume, load_volume, split_cases,
                                     write_sample, write_split_info)
from dataset import SPLITS
from scans.framing import Framing, display, frame_volume
from utils import ArgumentParser, InputError, non_negative_float, non_negative_int, run_cli, setup_logging

MODALITIES = ("flair", "t1", "t1ce", "t2")


def find_nifti(folder: str, stem: str) -> str:
    """Path of ``folder/stem.nii.gz`` or ``folder/stem.nii``; InputError naming it when absent."""
    for extension in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + extension)
        if os.path.isfile(path):
            return path
    raise InputError(f"missing {os.path.join(folder, stem)}.nii.gz")


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
    # Whole axial slices of the range that hold some brain, the percentile rule: test_one_example frames
    # a BraTS volume by this record as these slices were written.
    framing = Framing(slice_range=(first, last), skip_empty=True)
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
            check_finite_volume(image_path, volume)
            slices, indices, _ = frame_volume(volume, framing, image_path)
            for image, z in zip(slices, indices):
                lesion = seg[:, :, z] > 0
                cls = "Ungood" if lesion.any() else "good"
                if split_name == "train" and cls == "Ungood":
                    continue  # BMAD trains on normal slices only
                name = f"{case}_{z}.png"
                write_sample(save_path, split_name, cls, name, image, display(lesion) if cls == "Ungood" else None)
                counts[f"{split_name}/{cls}"] += 1
    info = dict(source="BraTS2021", modality=modality, slice_range=[first, last], seed=seed,
                split=list(split), counts=counts, framing=framing.to_dict(), **groups)
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
