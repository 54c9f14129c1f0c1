"""A small synthetic brain-MRI anomaly set, built offline, for smoke tests and first runs.

    python -m generate_dataset.demo --save_path data/demo --seed 0    # -> data/demo/Brain, data/demo/volumes

What it is: slices of the MNI152 T1 template that ships with nilearn (1 mm, brain-masked like the
skull-stripped BraTS scans), framed by the demo's framing rule (``scans.framing.Framing``, recorded in
demo.json): axial slices (coronal with ``--view coronal``) whose brain area is at least 75% of the
largest, the percentile rule with the 99.5th percentile at grey 0.65 (headroom for bright lesions),
cropped to the brain (+6%), padded square, 240x240 8-bit PNG. Each sample differs: slice, small
rotation/scale/shift, left-right flip, gamma and contrast (x0.85-1.15 around the rule's), Gaussian
noise. Abnormal samples get one or two synthetic tumour-like lesions drawn inside the brain mask
only: an irregular blob (warped ellipse, radius 4-32 px) with a hyperintense core and a fainter
oedema halo, of varied contrast. The mask is the whole lesion, core + halo, exactly the pixels the
lesion brightened (0/255).

Layout: BMAD, dataset root ``<save_path>/Brain`` (so ``dataset.organ_name`` gives "brain")::

    Brain/train/good/img/*.png                       40
    Brain/{valid,test}/good/img/*.png                40 each
    Brain/{valid,test}/Ungood/img/*.png              40 each
    Brain/{valid,test}/Ungood/anomaly_mask/*.png     0/255
    Brain/demo.json                                  seed, counts, framing; marks a complete build

File names: ``<case>_<slice>.png``, the case being the sample index (``007``); in valid/ and test/
the second half of the normal samples are patients without lesions, cased ``n<index>`` (``n027``),
so the patient-level figures have normal patients. The same seed gives byte-identical PNGs on one
machine. It is a smoke-test set (one template brain for every "patient"), not a benchmark. Builds in
a few seconds on a CPU; the folder appears only when complete.

Demo volumes (``<save_path>/volumes``, written by this script and by ``ensure_demo``): the template
volume the slices are framed from (``brain_normal.nii.gz``), the same with a 10 mm lesion drawn as
the slices' lesions are (``brain_lesion.nii.gz``) and that lesion's mask (``brain_lesion_seg.nii.gz``),
to score with test_one_example.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

from generate_dataset.common import write_sample
from scans.framing import Framing, display, frame_volume
from scans.volumes import write_volume
from utils import (ArgumentParser, InputError, atomic_write_json, non_negative_int, positive_int, prepare_output_dir,
                   run_cli, setup_logging)

VIEWS = {"axial": ("Brain", 2), "coronal": ("BrainCoronal", 1)}  # view -> (folder, RAS axis)
DEFAULT_PATH = str(Path(__file__).resolve().parents[1] / "data" / "demo")
MIN_AREA_SHARE = 0.75  # slices whose brain area is at least this share of the largest one
MIN_LESION_PIXELS = 12
MARGIN = 0.06  # border around the brain, as a share of its extent
WHITE_LEVEL = 0.65  # the grey level of the 99.5th percentile: headroom for lesions brighter than the brain
VOLUMES = "volumes"
BUILD = 2  # demo.json's "build": raise it when the images change, so an older build is rebuilt, not reused
VOLUME_NAMES = ("brain_normal.nii.gz", "brain_lesion.nii.gz", "brain_lesion_seg.nii.gz")
LESION_RADIUS_MM = 5.0  # the demo volume's lesion: about 10 mm across
logger = logging.getLogger("medvmad")


def demo_framing(image_size: int = 240, view: str = "axial") -> Framing:
    """The framing rule of the demo's slices (and of its volumes, scored by a demo-trained model)."""
    return Framing(axis=VIEWS[view][1], white_level=WHITE_LEVEL, min_area=MIN_AREA_SHARE, size=image_size,
                   margin=MARGIN)


@lru_cache(maxsize=1)  # read-only arrays, reused by repeated builds in one process
def template_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The brain-masked MNI152 T1 template in RAS: int16 [X,Y,Z] (its 8-bit grey levels, 0 outside
    the brain), the brain mask bool [X,Y,Z] and the affine [4,4]."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template  # slow import

    template = nib.as_closest_canonical(load_mni152_template(resolution=1))
    brain = nib.as_closest_canonical(load_mni152_brain_mask(resolution=1)).get_fdata() > 0
    volume = np.where(brain, np.rint(template.get_fdata() * 255), 0).astype(np.int16)  # stored as k/255
    for array in (volume, brain):
        array.setflags(write=False)
    return volume, brain, template.affine


@lru_cache(maxsize=4)
def template_slices(image_size: int = 240, view: str = "axial") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template volume framed by ``demo_framing``: images uint8 [N,S,S], brain masks bool
    [N,S,S] (framed alike) and their slice indices [N]."""
    volume, brain, _ = template_volume()
    framing = demo_framing(image_size, view)
    slices, indices, placement = frame_volume(volume.astype(np.float32), framing, "the MNI152 template")
    masks = [placement.frame(display(np.take(brain, index, axis=framing.axis)).astype(np.uint8) * 255) >= 128
             for index in indices]
    images, masks, indices = np.stack(slices), np.stack(masks), np.array(indices)
    for array in (images, masks, indices):
        array.setflags(write=False)
    return images, masks, indices


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
    """One varied slice of framed ``images`` uint8 [N,S,S] (brain ``masks`` [N,S,S]): image uint8
    [S,S], brain mask bool [S,S], lesion delta float [S,S] (all zero when normal; the lesion mask is
    ``delta > 0``) and the template slice position."""
    index = int(rng.integers(len(images)))
    image, brain = images[index].astype(np.float32) / 255, masks[index].astype(np.float32)
    size = image.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-8, 8), rng.uniform(0.93, 1.07))
    matrix[:, 2] += rng.uniform(-6, 6, size=2)
    image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR)
    brain = cv2.warpAffine(brain, matrix, (size, size), flags=cv2.INTER_LINEAR) > 0.5
    if rng.random() < 0.5:
        image, brain = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(brain[:, ::-1])
    gamma, contrast = rng.uniform(0.8, 1.25), rng.uniform(0.85, 1.15)  # around the framing's grey levels
    image = WHITE_LEVEL * (np.clip(image, 0, 1) / WHITE_LEVEL) ** gamma * contrast
    delta = np.zeros_like(image)
    if abnormal:
        for _ in range(1 if rng.random() < 0.8 else 2):
            delta = np.maximum(delta, draw_lesion(brain, rng))
    noise = rng.normal(0, rng.uniform(0.01, 0.03), size=image.shape)
    image = np.clip(image + delta + noise, 0, 1) * brain
    return np.rint(image * 255).astype(np.uint8), brain, delta, index


def case_id(split: str, abnormal: bool, index: int, count: int) -> str:
    """The case (patient) of sample ``index`` of ``count`` in a split/class: its index, and in valid/
    and test/ ``n<index>`` for the second half of the normal samples (patients without lesions)."""
    own = split != "train" and not abnormal and index >= count // 2
    return f"{'n' if own else ''}{index:03d}"


def volume_lesion(volume: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity increase int16 [X,Y,Z] (> 0 exactly on the lesion) of one lesion about 10 mm across
    in ``volume`` (1 mm voxels, brain mask ``brain``), drawn as ``draw_lesion`` draws the slices'
    lesions: a warped ellipsoid deep in the brain with a bright core and a fainter halo, textured, in
    the volume's units so that the demo's framing shows it at the slices' lesion contrast; all of it
    on axial slices the framing keeps."""
    reach = int(2 * LESION_RADIUS_MM)
    kept = template_slices()[2]
    centres = np.argwhere(distance_transform_edt(brain) >= 4 * LESION_RADIUS_MM)
    centres = centres[(centres[:, 2] >= kept[0] + reach) & (centres[:, 2] <= kept[-1] - reach)]
    centre = centres[rng.integers(len(centres))]
    box = tuple(slice(c - reach, c + reach + 1) for c in centre)
    offsets = np.mgrid[-reach:reach + 1, -reach:reach + 1, -reach:reach + 1].astype(np.float32)
    radii = LESION_RADIUS_MM * rng.uniform(0.8, 1.2, size=3)
    warp = gaussian_filter(rng.standard_normal(offsets.shape[1:]), sigma=LESION_RADIUS_MM / 3)
    warp /= warp.std() + 1e-8
    shape = np.sqrt(sum((offset / radius) ** 2 for offset, radius in zip(offsets, radii))) + 0.15 * warp
    core, halo, core_share = 0.45, 0.16, 0.55  # grey levels over the brain's, as draw_lesion's middle values
    grey = np.where(shape < core_share, core, halo * np.clip(1.4 - shape, 0.4, 1.0)) * np.clip(0.85 + 0.15 * warp,
                                                                                              0.6, 1.15)
    low, high = np.percentile(volume[brain], [0.5, 99.5])  # the framing's percentile rule: grey -> volume units
    delta = np.zeros(volume.shape, np.int16)
    delta[box] = np.where((shape < 1) & brain[box], np.rint(grey * (high - low) / WHITE_LEVEL), 0)
    return delta


def write_volumes(save_path: str, seed: int = 0) -> list[str]:
    """Write the demo volumes to ``save_path/volumes`` (``VOLUME_NAMES``: the template, the template
    with a lesion, the lesion mask 0/1, all on the template's 1 mm RAS grid); return their paths."""
    volume, brain, affine = template_volume()
    delta = volume_lesion(volume, brain, np.random.default_rng([seed, 3]))  # apart from the samples' streams
    folder = os.path.join(save_path, VOLUMES)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in VOLUME_NAMES]
    for path, data in zip(paths, (volume, volume + delta, (delta > 0).astype(np.uint8))):
        write_volume(path, data, affine)
    logger.info("demo volumes written to %s (a lesion on axial slices %d-%d)", folder,
                *np.flatnonzero(delta.any(axis=(0, 1)))[[0, -1]])
    return paths


def _write_split(root: str, split: str, cls: str, count: int, seed: int,
                 images: np.ndarray, masks: np.ndarray, z_kept: np.ndarray) -> None:
    """Write ``count`` samples of one split/class; each sample has its own seeded generator."""
    split_id, abnormal = ("train", "valid", "test").index(split), cls == "Ungood"
    for i in range(count):
        rng = np.random.default_rng([seed, split_id, int(abnormal), i])
        image, _, delta, index = make_sample(images, masks, abnormal, rng)
        name = f"{case_id(split, abnormal, i, count)}_{z_kept[index]}.png"
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
                          dict(source="MNI152 T1 template (nilearn) + synthetic lesions", build=BUILD, seed=seed,
                               view=view, image_size=image_size, counts=counts,
                               framing=demo_framing(image_size, view).to_dict()))
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
    """The demo set's root (``save_path/Brain``, or ``BrainCoronal``), built first when missing,
    as are the demo volumes."""
    root = os.path.join(save_path, VIEWS[view][0])
    if not all(os.path.isfile(os.path.join(save_path, VOLUMES, name)) for name in VOLUME_NAMES):
        write_volumes(save_path)
    if _is_complete(root):
        with open(os.path.join(root, "demo.json"), encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("build") == BUILD:
            logger.info("using demo set %s (seed %s)", root, record["seed"])
            return root
        logger.info("the demo set at %s is an older build (%s, now %d): rebuilding it", root,
                    record.get("build", 1), BUILD)
        counts = record["counts"]
        return build_demo(save_path, record["seed"], counts["train/good"],
                          (counts["valid/good"], counts["valid/Ungood"]),
                          (counts["test/good"], counts["test/Ungood"]), record.get("image_size", 240), view)
    logger.info("no data path given: building the synthetic demo set at %s", root)
    return build_demo(save_path, view=view)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save_path", default=DEFAULT_PATH,
                        help="parent folder; the set goes to <save_path>/Brain, the volumes to <save_path>/volumes")
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
    write_volumes(args.save_path, args.seed)


if __name__ == "__main__":
    run_cli(main)
