"""Medical anomaly-detection data: listing, loading, preprocessing and few-shot support sets.

Two ways to describe a data set, both read by ``list_samples(root, split)``:

1. **BMAD layout** (BMAD's own sets and MVFA's repack, which has no ``train/``)::

       root/train/good/img/*.png
       root/{valid,test}/good/img/*.png
       root/{valid,test}/Ungood/img/*.png
       root/{valid,test}/Ungood/anomaly_mask/*.png   (or label/)

   Class folders are matched case-insensitively; a class folder without ``img/`` holds its images
   directly (BMAD's image-level sets). Masks pair with images by file stem (extensions may differ).

2. **meta.json index** (AnomalyCLIP style, written by ``generate_dataset/folder.py``), either
   ``root/meta.json`` or ``root`` given as the path of a ``.json`` file. When ``root/meta.json``
   exists it wins over the folders. Schema::

       {"<split>": {"<cls_name>": [{"img_path": "rel/path.png",   # relative to the json's folder
                                    "mask_path": "rel/mask.png" or "",
                                    "cls_name": "brain",
                                    "specie_name": "good" | "<defect name>",
                                    "anomaly": 0 | 1}, ...], ...}, ...}

   with ``<split>`` in train/valid/test; all classes of a split are listed together.

Rules for both: normal images have an all-zero mask; abnormal images without a mask are allowed
only when no abnormal image of the split has one (classification-only data).

Mask reading rule (``load_mask``): a mask's value is the maximum over its colour channels (palette
images are decoded to their colours; where a varying alpha channel is 0, the value is 0). Then

a. a mask holding a 0 is lesion where the value is > 0 (0/1, 0/255, colormaps with a black
   background as BMAD's masks were saved, palette images whose background is black);
b. a mask with no 0 and several values was drawn through a colormap with a non-black
   background: its darkest value is background;
c. a mask of a single value is all lesion when that value is 1 or the type's maximum (255,
   65535); otherwise a palette image is read by its index (0 = background, else lesion) and any
   other image is refused (it could be an empty mask drawn in a non-black colour).

Images are returned in [0,1] RGB; the model normalises them with its own mean/std.

Support-set files (``save_support``): UTF-8 text, ``#`` lines are comments, one sample a line::

    <label 0|1><TAB><image path>[<TAB><mask path>]

with paths relative to the data root, ``/``-separated. ``read_support`` also reads MVFA's
``fewshot_seed/<Obj>/<k>-shot.txt`` files (lines ``n-<i>: name ...`` and ``a-<i>: name ...``
naming files of ``root/valid/good/img`` and ``root/valid/Ungood/img``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from utils import InputError, atomic_write_text, one_line, safe_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_FOLDERS = ("anomaly_mask", "label")
SPLITS = ("train", "valid", "test")
MAX_ANGLE = 15.0  # degrees of the small random rotation in augmentations
MAX_SHIFT = 0.1  # random translation, as a fraction of the image side

# keyword (start of a word of the folder name) -> organ name used in prompts and reports
ORGAN_KEYWORDS = {
    "brain": "brain", "brats": "brain",
    "liver": "liver", "lits": "liver", "btcv": "liver",
    "retina": "retina", "resc": "retina", "oct": "retina",
    "chest": "chest", "rsna": "chest", "cxr": "chest",
    "histopathology": "histopathology", "camelyon": "histopathology",
}

logger = logging.getLogger("medvmad")


@dataclass(frozen=True)
class Sample:
    """One image: its path, its mask path (None: normal, or abnormal without mask) and its label."""

    image_path: str
    mask_path: str | None
    label: int  # 0 normal, 1 abnormal


# ----------------------------------------------------------------------------- listing

def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files directly inside ``folder`` (hidden files skipped)."""
    names = sorted(name for name in os.listdir(folder)
                   if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(folder, name) for name in names]


def _by_stem(paths: list[str]) -> dict[str, str]:
    """Map file stem -> path; two files with one stem is an error."""
    stems: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise InputError(f"two files share the name {stem!r}: {stems[stem]} and {path}")
        stems[stem] = path
    return stems


def pair_masks(image_paths: list[str], mask_paths: list[str]) -> list[str | None]:
    """Mask path for each abnormal image, paired by stem; None for all when there are no masks.

    A mask without an image, or some images with a mask and others without, is an InputError.
    """
    images, masks = _by_stem(image_paths), _by_stem(mask_paths)
    for stem, path in masks.items():
        if stem not in images:
            raise InputError(f"mask {path} has no image with the same name")
    if not masks:
        return [None] * len(image_paths)
    for path in image_paths:
        if Path(path).stem not in masks:
            raise InputError(
                f"abnormal image {path} has no mask, but {len(masks)} others have one; add its mask "
                "(an empty one if no lesion shows) or remove all masks for classification only")
    return [masks[Path(path).stem] for path in image_paths]


def _child(folder: str, name: str) -> str | None:
    """The sub-folder of ``folder`` called ``name`` (case-insensitive), or None; two of them
    (``Good/`` and ``good/``) are an InputError: reading one would silently ignore the other."""
    found = [entry for entry in sorted(os.listdir(folder))
             if entry.lower() == name.lower() and os.path.isdir(os.path.join(folder, entry))]
    if len(found) > 1:
        raise InputError(f"{folder} holds both {' and '.join(f'{entry}/' for entry in found)}: folder names are "
                         f"matched case-insensitively; merge them into one")
    return os.path.join(folder, found[0]) if found else None


def _list_bmad(root: str, split: str) -> list[Sample]:
    """Samples of one split in the BMAD folder layout."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise InputError(f"split folder {split_dir} does not exist")
    samples: list[Sample] = []
    for class_name, label in (("good", 0), ("Ungood", 1)):
        class_dir = _child(split_dir, class_name)
        if class_dir is None:
            continue
        image_dir = _child(class_dir, "img") or class_dir
        images = list_images(image_dir)
        if label == 0:
            samples += [Sample(path, None, 0) for path in images]
            continue
        mask_dirs = [d for d in (_child(class_dir, name) for name in MASK_FOLDERS) if d is not None]
        if len(mask_dirs) > 1:
            logger.warning("both %s and %s exist; using %s", *mask_dirs, mask_dirs[0])
        masks = list_images(mask_dirs[0]) if mask_dirs else []
        samples += [Sample(path, mask, 1) for path, mask in zip(images, pair_masks(images, masks))]
    if not samples:
        raise InputError(f"split folder {split_dir} holds no images in good/ or Ungood/")
    seen: dict[str, str] = {}
    for sample in samples:  # a link to an image already listed would be scored twice
        first = seen.setdefault(os.path.realpath(sample.image_path), sample.image_path)
        if first != sample.image_path:
            raise InputError(f"{sample.image_path} and {first} are the same file; a split lists each image once")
    return samples


def _meta_entry(entry: object, base: str, where: str) -> Sample:
    """One meta.json entry as a Sample; any malformed field is an InputError naming ``where``."""
    if not isinstance(entry, dict):
        raise InputError(f"{where} is {type(entry).__name__}, not an object with img_path and anomaly")
    image, mask, label = entry.get("img_path"), entry.get("mask_path") or None, entry.get("anomaly")
    if not isinstance(image, str) or not image:
        raise InputError(f"{where}: img_path must be a non-empty string, got {image!r}")
    if mask is not None and not isinstance(mask, str):
        raise InputError(f"{where}: mask_path must be a string or empty, got {mask!r}")
    # Exactly 0 or 1: a 2, -1 or 0.9 is a mistake to report, never a label to round.
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 1):
        raise InputError(f"{where}: anomaly must be 0 (normal) or 1 (abnormal), got {label!r}")
    image, mask = os.path.join(base, image), os.path.join(base, mask) if mask else None
    for path in (image, mask):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{where} names {path}, which does not exist")
    if label == 0 and mask is not None and load_mask(mask).any():
        raise InputError(f"{where} is labelled normal (anomaly 0), but its mask {mask} marks a lesion; "
                         f"fix the label or the mask")
    return Sample(image, mask if label == 1 else None, int(label))


def _list_meta(meta_path: str, split: str) -> list[Sample]:
    """Samples of one split from a meta.json index (paths relative to its folder)."""
    base = os.path.dirname(meta_path)
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read index {meta_path}: {one_line(str(error))}") from None
    except RecursionError:
        raise InputError(f"cannot read index {meta_path}: nested too deeply to be a meta.json") from None
    if not isinstance(meta, dict) or split not in meta:
        raise InputError(f"index {meta_path} has no {split!r} split")
    if not isinstance(meta[split], dict) or not all(isinstance(v, list) for v in meta[split].values()):
        raise InputError(f"index {meta_path}: split {split!r} must map class names to lists of entries, "
                         f"got {json.dumps(meta[split])[:60]}")
    samples, seen = [], {}
    for cls_name, entries in meta[split].items():
        for index, entry in enumerate(entries):
            where = f"index {meta_path}: {split}/{cls_name}[{index}]"
            sample = _meta_entry(entry, base, where)
            key = os.path.realpath(sample.image_path)  # a link to a listed image is the same image
            if key in seen:  # a repeated entry would be counted twice in every metric
                raise InputError(f"{where} lists {sample.image_path} again (first at {seen[key]})")
            seen[key] = f"{split}/{cls_name}[{index}]"
            samples.append(sample)
    if not samples:
        raise InputError(f"index {meta_path} has no images in split {split!r}")
    abnormal = [s for s in samples if s.label == 1]
    with_mask = [s for s in abnormal if s.mask_path is not None]
    if with_mask and len(with_mask) < len(abnormal):
        first = next(s for s in abnormal if s.mask_path is None)
        raise InputError(f"abnormal image {first.image_path} has no mask in {meta_path}, but "
                         f"{len(with_mask)} others have one")
    return samples


def find_meta_index(root: str) -> str | None:
    """The meta.json index that describes ``root``, if any."""
    if root.lower().endswith(".json"):
        return root
    candidate = os.path.join(root, "meta.json")
    return candidate if os.path.isfile(candidate) else None


def list_samples(root: str, split: str) -> list[Sample]:
    """All samples of ``split`` (train/valid/test) under ``root``; logs a one-line summary."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, not {split!r}")
    if not os.path.exists(root):
        raise InputError(f"data path {root} does not exist")
    meta = find_meta_index(root)
    samples = _list_meta(meta, split) if meta else _list_bmad(root, split)
    logger.info(describe(samples, f"{table_name(root)}/{split}"))
    return samples


def describe(samples: list[Sample], name: str) -> str:
    """One line: images per class, abnormal images with an empty mask and without a mask."""
    abnormal = [s for s in samples if s.label == 1]
    empty = sum(1 for s in abnormal if s.mask_path is not None and not load_mask(s.mask_path).any())
    no_mask = sum(1 for s in abnormal if s.mask_path is None)
    return (f"{name}: {len(samples)} images ({len(samples) - len(abnormal)} normal, "
            f"{len(abnormal)} abnormal; {empty} abnormal with empty mask, {no_mask} without mask)")


def table_name(root: str) -> str:
    """The name a dataset root goes by in tables and logs: its folder's name ("Brain", "Liver")."""
    path = Path(os.path.abspath(root))
    return path.parent.name if path.suffix.lower() == ".json" else path.name


def dataset_names(roots: list[str], names: list[str] | None) -> list[str]:
    """Table names for dataset roots: the given ``--dataset`` names, else the folder names; distinct."""
    for name in names or []:  # output files are named after them
        safe_name(name, "--dataset")
    names = names or [table_name(root) for root in roots]
    if len(names) != len(roots):
        raise InputError(f"--dataset gives {len(names)} names for {len(roots)} dataset roots")
    if len(set(names)) != len(names):
        raise InputError(f"dataset names {names} repeat: give distinct names with --dataset")
    return names


def organ_name(root: str) -> str:
    """Organ name from the data folder's name ("BraTS2021" -> "brain"), else the lowercase name."""
    path = Path(os.path.abspath(root))
    if path.suffix.lower() == ".json":
        path = path.parent
    name = path.name.lower()
    for word in re.split(r"[^a-z0-9]+", name):
        for keyword, organ in ORGAN_KEYWORDS.items():
            if word.startswith(keyword):
                return organ
    return name


# ----------------------------------------------------------------------------- loading

def _read(path: str) -> np.ndarray:
    """Decode an image file as stored (any depth, channels BGR[A]); InputError if unreadable."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except (OSError, cv2.error) as error:
        raise InputError(f"cannot read image {path}: {error}") from error
    if image is None:
        raise InputError(f"cannot read image {path} (empty, corrupt or not an image)")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError(f"image {path} holds {int((~np.isfinite(image)).sum())} NaN or infinite value(s); "
                         f"fix or remove the file")
    return image


def load_image(path: str) -> np.ndarray:
    """Image as float32 [H,W,3] RGB in [0,1]; 8/16-bit, gray/colour/alpha (alpha dropped).

    Integers are divided by their type's maximum (255, 65535); float images outside [0,1] are
    min-max scaled.
    """
    image = _read(path)
    if image.dtype == np.uint8 or image.dtype == np.uint16:
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    elif image.dtype in (np.float32, np.float64):
        image = image.astype(np.float32)
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:
            image = (image - low) / max(high - low, 1e-12)
    else:
        raise InputError(f"image {path} has unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, 2::-1])  # BGR(A) -> RGB


def _palette_indices(path: str) -> np.ndarray | None:
    """The palette indices [H,W] of a palette ("P" mode) image, or None for any other image."""
    try:
        with Image.open(path) as image:
            return np.asarray(image) if image.mode == "P" else None
    except (OSError, UnidentifiedImageError):
        return None  # not for PIL: cv2 reads it (or says it is unreadable)


def load_mask(path: str) -> np.ndarray:
    """Mask as bool [H,W], by the mask reading rule in this module's docstring."""
    mask = _read(path)  # palette images come decoded to their colours
    if mask.ndim == 3:
        transparent = mask[:, :, 3] == 0 if mask.shape[2] == 4 and mask[:, :, 3].min() < mask[:, :, 3].max() \
            else None
        mask = mask[:, :, :3].max(axis=2)
        if transparent is not None:  # a varying alpha channel: fully transparent pixels are background
            mask = np.where(transparent, 0, mask)
    low, high = mask.min(), mask.max()
    if low == 0:
        return mask > 0
    if low < high:
        return mask > low  # colormap with a non-black background: the darkest value is background
    full = {1, np.iinfo(mask.dtype).max} if mask.dtype.kind in "ui" else {1}
    if low in full:
        return np.ones(mask.shape, dtype=bool)
    indices = _palette_indices(path)
    if indices is not None:  # one colour everywhere: its palette index says background (0) or lesion
        return indices > 0
    raise InputError(f"mask {path} holds the single value {low} everywhere: neither empty (0) "
                     f"nor all lesion (1 or {max(full)}); save it as 0/255")


def preprocess(image: np.ndarray, image_size: int) -> torch.Tensor:
    """[H,W,3] or [H,W] float in [0,1] -> FloatTensor [3,S,S] in [0,1].

    Bicubic with anti-aliasing (as CLIP's PIL resize): shrinking a 512 px slice keeps no moiré.
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(tensor, size=(image_size, image_size), mode="bicubic", align_corners=False,
                            antialias=True)
    return resized[0].clamp(0.0, 1.0).contiguous()


def _resize_mask(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """bool [H,W] -> FloatTensor [S,S] in {0,1}, nearest neighbour at pixel centres (as the image)."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=(image_size, image_size), mode="nearest-exact")[0, 0]


def _load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Image [H,W,3] float and mask [H,W] bool (zeros when absent); size mismatch -> InputError."""
    image = load_image(sample.image_path)
    if sample.mask_path is None:
        return image, np.zeros(image.shape[:2], dtype=bool)
    mask = load_mask(sample.mask_path)
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                         f"{sample.image_path} is {image.shape[1]}x{image.shape[0]} (width x height)")
    return image, mask


# ----------------------------------------------------------------------------- augmentation

def _random_transform(image: torch.Tensor, mask: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random 90° rotation, flips, small rotation and shift on image [3,S,S] and mask [S,S].

    The image is in [0,1]; uncovered borders are filled with black (0). Random numbers come
    from ``generator`` (CPU).
    """
    k = int(torch.randint(4, (1,), generator=generator))
    image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
    for dim in (-1, -2):
        if float(torch.rand(1, generator=generator)) < 0.5:
            image, mask = image.flip(dim), mask.flip(dim)
    angle = math.radians((float(torch.rand(1, generator=generator)) * 2 - 1) * MAX_ANGLE)
    shift = (torch.rand(2, generator=generator) * 2 - 1) * MAX_SHIFT * 2  # grid spans [-1, 1]
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), float(shift[0])],
                          [math.sin(angle), math.cos(angle), float(shift[1])]],
                         dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None], grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0, 0]
    return image, mask


def augment_support(images: torch.Tensor, masks: torch.Tensor, n_aug: int = 10,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals plus ``n_aug`` augmented copies (like MVFA's x11), seeded.

    images [K,3,S,S] in [0,1], masks [K,S,S] -> [K*(1+n_aug),3,S,S], [K*(1+n_aug),S,S];
    output row i comes from input row i % K, so labels repeat as ``labels.repeat(1 + n_aug)``.
    """
    generator = torch.Generator().manual_seed(seed)
    out_images, out_masks = [images], [masks.float()]
    for _ in range(n_aug):
        pairs = [_random_transform(image, mask.float(), generator) for image, mask in zip(images, masks)]
        out_images.append(torch.stack([image for image, _ in pairs]))
        out_masks.append(torch.stack([mask for _, mask in pairs]))
    return torch.cat(out_images), torch.cat(out_masks)


# ----------------------------------------------------------------------------- dataset

def has_masks(samples: list[Sample]) -> bool:
    """Whether a source has pixel ground truth: some abnormal sample comes with a mask."""
    return any(sample.label == 1 and sample.mask_path is not None for sample in samples)


class MedicalDataset(torch.utils.data.Dataset):
    """Samples -> dict(image [3,S,S] RGB in [0,1], mask [S,S] in {0,1}, label, has_mask, path).

    ``has_mask`` is True when the pixel ground truth is known: normal, or abnormal with a mask, of
    a source that has masks. ``masks_known`` None decides that from the samples (some abnormal
    sample has a mask); a source without masks gets no pixel truth at all, its normal images
    included, so it trains with the image loss alone (as MVFA-AD trains its maskless datasets).
    ``skip_bad`` reads every sample once up front and drops unreadable ones with a warning;
    otherwise a bad file raises InputError when it is loaded.
    """

    def __init__(self, samples: list[Sample], image_size: int, skip_bad: bool = False,
                 masks_known: bool | None = None) -> None:
        if skip_bad:
            samples = self._drop_bad(samples)
        if not samples:
            raise InputError("no samples to build a dataset from")
        self.samples = list(samples)
        self.image_size = image_size
        self.masks_known = has_masks(self.samples) if masks_known is None else masks_known

    @staticmethod
    def _drop_bad(samples: list[Sample]) -> list[Sample]:
        """Samples whose image and mask load and match; the rest are listed in one warning."""
        good, bad = [], []
        for sample in samples:
            try:
                _load_sample(sample)
                good.append(sample)
            except InputError as error:
                bad.append(str(error))
        if bad:
            logger.warning("skipped %d bad sample(s):\n  %s", len(bad), "\n  ".join(bad))
        return good

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, mask = _load_sample(sample)
        return dict(image=preprocess(image, self.image_size), mask=_resize_mask(mask, self.image_size),
                    label=sample.label, path=sample.image_path,
                    has_mask=self.masks_known and (sample.label == 0 or sample.mask_path is not None))


# ----------------------------------------------------------------------------- hold-out and few-shot

def patient_of(path: str) -> str:
    """Patient id of an image path from BMAD's ``<patient>_<slice>.png`` naming; the whole stem otherwise."""
    stem = Path(path).stem
    match = re.fullmatch(r"(.+)_\d+", stem)
    return match.group(1) if match else stem


def split_holdout(samples: list[Sample], fraction: float,
                  seed: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, held_out): about ``fraction`` of each class held out for model selection, seeded.

    Whole patients move together (``<patient>_<slice>`` names), so no patient is on both sides.
    """
    if fraction == 0:
        return list(samples), []
    if not 0 < fraction < 1:
        raise InputError(f"hold-out fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(patient_of(sample.image_path), []).append(sample)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target = {label: fraction * sum(s.label == label for s in samples) for label in (0, 1)}
    held = {0: 0, 1: 0}
    held_patients = set()
    for patient in order:
        labels = {s.label for s in groups[patient]}
        if any(held[label] < target[label] for label in labels):
            held_patients.add(patient)
            for sample in groups[patient]:
                held[sample.label] += 1
    kept = [s for s in samples if patient_of(s.image_path) not in held_patients]
    held_out = [s for s in samples if patient_of(s.image_path) in held_patients]
    if not kept:
        raise InputError(f"holding out {fraction} of {len(groups)} patient(s) leaves nothing to train on")
    return kept, held_out


def sample_support(samples: list[Sample], k: int, seed: int) -> list[Sample]:
    """k normal then k abnormal samples drawn with ``seed`` (independent of the input order)."""
    support = []
    for label, name in ((0, "normal"), (1, "abnormal")):
        pool = sorted((s for s in samples if s.label == label), key=lambda s: s.image_path)
        if len(pool) < k:
            raise InputError(f"{k}-shot support needs {k} {name} images, only {len(pool)} given")
        support += random.Random(f"{seed}-{label}").sample(pool, k)
    return support


def _folder(root: str) -> str:
    """The folder support paths are relative to: the root, or the folder of a meta.json root."""
    return os.path.dirname(root) if root.lower().endswith(".json") else root


def _relative(path: str, root: str) -> str:
    return Path(os.path.relpath(path, _folder(root))).as_posix()


def save_support(path: str, support: list[Sample], root: str) -> None:
    """Write a support set as ``label<TAB>image[<TAB>mask]`` lines, paths relative to ``root``."""
    lines = ["# medvmad support set: label<TAB>image[<TAB>mask], paths relative to the data root"]
    for sample in support:
        fields = [str(sample.label), _relative(sample.image_path, root)]
        if sample.mask_path is not None:
            fields.append(_relative(sample.mask_path, root))
        lines.append("\t".join(fields))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _read_mvfa(path: str, lines: list[str], root: str, iteration: int) -> list[Sample]:
    """Resolve MVFA's ``n-<i>: names`` / ``a-<i>: names`` lines against ``root/valid``."""
    valid = list_samples(root, "valid")
    support = []
    for label, tag in ((0, "n"), (1, "a")):
        by_name = {os.path.basename(s.image_path): s for s in valid if s.label == label}
        names = next((line.split()[1:] for line in lines if line.split()[0] == f"{tag}-{iteration}:"),
                     None)
        if names is None:
            raise InputError(f"support file {path} has no '{tag}-{iteration}:' line")
        for name in names:
            if name not in by_name:
                raise InputError(f"support file {path} names {name}, which is not among the "
                                 f"{'abnormal' if label else 'normal'} images of {root}/valid")
            support.append(by_name[name])
    return support


def read_support(path: str, root: str, iteration: int = 0) -> list[Sample]:
    """Read a support set written by ``save_support`` or an MVFA ``<k>-shot.txt`` file.

    ``iteration`` picks MVFA's ``n-<i>``/``a-<i>`` lines; our format holds one set.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    except OSError as error:
        raise InputError(f"cannot read support file {path}: {error}") from error
    if not lines:
        raise InputError(f"support file {path} is empty")
    if re.match(r"^[an]-\d+:", lines[0]):
        return _read_mvfa(path, lines, root, iteration)
    support = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) not in (2, 3) or fields[0] not in ("0", "1"):
            raise InputError(f"support file {path}, line {number}: expected "
                             f"'label<TAB>image[<TAB>mask]', got {line!r}")
        files = [os.path.join(_folder(root), *field.split("/")) for field in fields[1:]]
        for file in files:
            if not os.path.isfile(file):
                raise InputError(f"support file {path} names {file}, which does not exist")
        if any(s.image_path == files[0] for s in support):
            raise InputError(f"support file {path}, line {number}: {files[0]} is listed twice")
        support.append(Sample(files[0], files[1] if len(files) == 2 else None, int(fields[0])))
    return support


SUPPORT_FILES = "support_*shot_seed*.txt"  # what ``support_file_name`` names, as a glob


def support_file_name(k_shot: int, seed: int, dataset: str | None = None) -> str:
    """``support_<k>shot_seed<s>.txt`` (a training run's), or ``support_<dataset>_<k>shot_seed<s>.txt``
    (one dataset of an evaluation over several)."""
    return f"support_{dataset + '_' if dataset else ''}{k_shot}shot_seed{seed}.txt"


def resolve_support(root: str, k_shot: int, seed: int, support_file: str | None = None,
                    checkpoint_path: str | None = None) -> tuple[list[Sample], str]:
    """The few-shot support set of ``root`` and where it came from: ``support_file`` when given, else
    the file the training run wrote beside ``checkpoint_path`` (when there is one), else ``k_shot``
    normal + ``k_shot`` abnormal images of ``root``'s valid split sampled with ``seed``."""
    if support_file:
        return read_support(support_file, root), support_file
    if checkpoint_path:
        beside_checkpoint = Path(checkpoint_path).parent / support_file_name(k_shot, seed)
        if beside_checkpoint.is_file():
            return read_support(str(beside_checkpoint), root), str(beside_checkpoint)
    return sample_support(list_samples(root, "valid"), k_shot, seed), "sampled from valid"
