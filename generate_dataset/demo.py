"""A small synthetic brain-MRI anomaly set, built offline, for smoke tests and first runs.

    python generate_dataset/demo.py --save_path data/demo --seed 0    # -> data/demo/Brain

What it is: axial slices of the MNI152 T1 template that ships with nilearn (1 mm, brain-masked
like the skull-stripped BraTS scans), shown like ``brats2021.py`` shows BraTS (anterior up), 240x240
8-bit PNG. Each sample differs: slice index, small rotation/scale/shift, left-right flip, gamma and
contrast, Gaussian noise. Abnormal samples get one or two synthetic tumour-like lesions drawn
inside the brain mask only: an irregular blob (warped ellipse, radius 4-32 px) with a hyperintense
core and a fainter oedema halo, of varied contrast. The mask is the whole lesion, core + halo,
exactly the pixels the lesion brightened (0/255).

Layout: BMAD, dataset root ``<save_path>/Brain`` (so ``dataset.organ_name`` gives "brain")::

    Brain/train/good/img/*.png                       40
    Brain/{valid,test}/good/img/*.png                40 each
    Brain/{valid,test}/Ungood/img/*.png              40 each
    Brain/{valid,test}/Ungood/anomaly_mask/*.png     0/255
    Brain/demo.json                                  seed and counts; marks a complete build

File names: ``<sample index>_<slice>.png``. The same seed gives byte-identical PNGs on one machine.
It is a smoke-test set (one template brain for every "patient"), not a benchmark. Builds in a few
seconds on a CPU; the folder appears only when complete.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate_dataset.common import display, write_sample  # noqa: E402
from utils import (ArgumentParser, InputError, atomic_write_json, non_negative_int, positive_int,  # noqa: E402
                   prepare_output_dir, run_cli, setup_logging)

VIEWS = {"axial": ("Brain", 2), "coronal": ("BrainCoronal", 1)}  # view -> (folder, RAS axis)
DEFAULT_PATH = str(Path(__file__).resolve().parents[1] / "data" / "demo")
MIN_AREA_SHARE = 0.75  # slices whose brain area is at least this share of the largest one
MIN_LESION_PIXELS = 12
MARGIN = 0.06  # border around the brain, as a share of its extent
logger = logging.getLogger("medvmad")


@lru_cache(maxsize=4)  # read-only arrays, reused by repeated builds in one process
def template_slices(image_size: int = 240, view: str = "axial") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain-masked MNI152 T1 slices of a view -> images [N,S,S] float in [0,1], masks [N,S,S] bool,
    and their slice indices [N]; only slices with a large brain area are kept."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template  # slow import

    axis = VIEWS[view][1]
    template = np.moveaxis(nib.as_closest_canonical(load_mni152_template(resolution=1)).get_fdata(), axis, 2)
    brain = np.moveaxis(nib.as_closest_canonical(load_mni152_brain_mask(resolution=1)).get_fdata() > 0, axis, 2)
    area = brain.sum(axis=(0, 1))
    z_kept = np.flatnonzero(area >= MIN_AREA_SHARE * area.max())
    footprint = display(brain.any(axis=2))  # crop every slice to the brain's extent
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    side = int(max(len(rows), len(cols)) * (1 + 2 * MARGIN))
    images, masks = [], []
    for z in z_kept:
        image, mask = display(template[:, :, z] * brain[:, :, z]), display(brain[:, :, z])
        image, mask = image[crop], mask[crop]
        pads = [((side - n) // 2, side - n - (side - n) // 2) for n in image.shape]
        image, mask = np.pad(image, pads), np.pad(mask, pads)
        images.append(cv2.resize(image.astype(np.float32), (image_size, image_size),
                                 interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(mask.astype(np.uint8), (image_size, image_size),
                                interpolation=cv2.INTER_NEAREST) > 0)
    images, masks = np.clip(np.stack(images), 0, 1), np.stack(masks)
    for array in (images, masks, z_kept):
        array.setflags(write=False)
    return images, masks, z_kept


def draw_lesion(brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity increase [H,W] (> 0 exactly on the lesion, 0 elsewhere) of one lesion in ``brain``.

    Shape: an ellipse of random size/orientation whose radius is warped by smooth noise, cut to the
    brain mask. Core (inner part) is brighter than the oedema halo around it.
    """
    height, width = brain.shape
    depth = cv2.distanceTransform(brain.astype(np.uint8), cv2.DIST_L2, 5)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(20):
        radius = math.exp(rng.uniform(math.log(4), math.log(32)))
        inside = np.argwhere(depth >= min(0.7 * radius, 0.8 * depth.max()))
        cy, cx = inside[rng.integers(len(inside))]
        angle = rng.uniform(0, math.pi)
        a, b = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.6, 1.1)
        dy, dx = rows - cy, cols - cx
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / a
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / b
        warp = gaussian_filter(rng.standard_normal((height, width)), sigma=max(radius / 3, 1.5))
        shape = np.sqrt(u * u + v * v) + 0.3 * warp / (warp.std() + 1e-8)
        lesion = (shape < 1) & brain
        if lesion.sum() >= MIN_LESION_PIXELS:
            break
    else:
        raise InputError("brain mask too small to hold a lesion")
    halo, core = rng.uniform(0.08, 0.25), rng.uniform(0.3, 0.6)
    core_share = rng.uniform(0.35, 0.7)
    texture = np.clip(0.85 + 0.15 * warp / (warp.std() + 1e-8), 0.6, 1.15)
    delta = np.where(shape < core_share, core, halo * np.clip(1.4 - shape, 0.4, 1.0)) * texture
    return np.where(lesion, delta, 0.0).astype(np.float32)


def make_sample(images: np.ndarray, masks: np.ndarray, abnormal: bool,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One varied slice: image uint8 [S,S], brain mask bool [S,S], lesion delta float [S,S]
    (all zero when normal; the lesion mask is ``delta > 0``) and the template slice position."""
    index = int(rng.integers(len(images)))
    image, brain = images[index], masks[index].astype(np.float32)
    size = image.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-8, 8), rng.uniform(0.93, 1.07))
    matrix[:, 2] += rng.uniform(-6, 6, size=2)
    image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR)
    brain = cv2.warpAffine(brain, matrix, (size, size), flags=cv2.INTER_LINEAR) > 0.5
    if rng.random() < 0.5:
        image, brain = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(brain[:, ::-1])
    image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25) * rng.uniform(0.55, 0.75)  # headroom for lesions
    delta = np.zeros_like(image)
    if abnormal:
        for _ in range(1 if rng.random() < 0.8 else 2):
            delta = np.maximum(delta, draw_lesion(brain, rng))
    noise = rng.normal(0, rng.uniform(0.01, 0.03), size=image.shape)
    image = np.clip(image + delta + noise, 0, 1) * brain
    return np.rint(image * 255).astype(np.uint8), brain, delta, index


def _write_split(root: str, split: str, cls: str, count: int, seed: int,
                 images: np.ndarray, masks: np.ndarray, z_kept: np.ndarray) -> None:
    """Write ``count`` samples of one split/class; each sample has its own seeded generator."""
    split_id, abnormal = ("train", "valid", "test").index(split), cls == "Ungood"
    for i in range(count):
        rng = np.random.default_rng([seed, split_id, int(abnormal), i])
        image, _, delta, index = make_sample(images, masks, abnormal, rng)
        name = f"{i:03d}_{z_kept[index]}.png"
        write_sample(root, split, cls, name, image, delta > 0 if abnormal else None)


def _is_complete(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "demo.json"))


def build_demo(save_path: str, seed: int = 0, n_train: int = 40, n_valid: tuple[int, int] = (40, 40),
               n_test: tuple[int, int] = (40, 40), image_size: int = 240, view: str = "axial") -> str:
    """Build the demo set at ``save_path/Brain`` (``BrainCoronal`` for the coronal view), replacing
    an earlier demo build; returns that root. ``n_valid``/``n_test`` are (normal, abnormal) counts.
    """
    name = VIEWS[view][0]
    root = os.path.join(save_path, name)
    if os.path.exists(root) and not _is_complete(root):
        raise InputError(f"{root} exists but is not a demo set built here; move it away first")
    os.makedirs(save_path, exist_ok=True)
    images, masks, z_kept = template_slices(image_size, view)
    building = tempfile.mkdtemp(dir=save_path, prefix=f".{name}.")
    try:
        counts = {"train/good": n_train, "valid/good": n_valid[0], "valid/Ungood": n_valid[1],
                  "test/good": n_test[0], "test/Ungood": n_test[1]}
        for key, count in counts.items():
            split, cls = key.split("/")
            _write_split(building, split, cls, count, seed, images, masks, z_kept)
        atomic_write_json(os.path.join(building, "demo.json"),
                          dict(source="MNI152 T1 template (nilearn) + synthetic lesions", seed=seed,
                               view=view, image_size=image_size, counts=counts))
        if _is_complete(root):
            shutil.rmtree(root)
        try:
            os.rename(building, root)
        except OSError:  # another process finished the same build first
            if not _is_complete(root):
                raise
    finally:
        if os.path.isdir(building):
            shutil.rmtree(building)
    logger.info("demo set written to %s (seed %d)", root, seed)
    return root


def ensure_demo(save_path: str = DEFAULT_PATH, view: str = "axial") -> str:
    """The demo set's root (``save_path/Brain``, or ``BrainCoronal``), built first when missing."""
    root = os.path.join(save_path, VIEWS[view][0])
    if _is_complete(root):
        with open(os.path.join(root, "demo.json"), encoding="utf-8") as handle:
            logger.info("using demo set %s (seed %s)", root, json.load(handle)["seed"])
        return root
    logger.info("no data path given: building the synthetic demo set at %s", root)
    return build_demo(save_path, view=view)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save_path", default=DEFAULT_PATH,
                        help="parent folder; the set goes to <save_path>/Brain")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    # Every count >= 1: a split without normal or abnormal images has no AUROC.
    parser.add_argument("--n_train", type=positive_int, default=40, help="normal training images")
    parser.add_argument("--n_valid", type=positive_int, nargs=2, default=(40, 40), metavar=("NORMAL", "ABNORMAL"))
    parser.add_argument("--n_test", type=positive_int, nargs=2, default=(40, 40), metavar=("NORMAL", "ABNORMAL"))
    parser.add_argument("--view", choices=sorted(VIEWS), default="axial",
                        help="axial (Brain/) or coronal (BrainCoronal/: a second domain for cross-domain demos)")
    args = parser.parse_args(argv)
    prepare_output_dir(args.save_path)
    setup_logging(None)
    build_demo(args.save_path, args.seed, args.n_train, tuple(args.n_valid), tuple(args.n_test), view=args.view)


if __name__ == "__main__":
    run_cli(main)
