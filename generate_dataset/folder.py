"""Index your own folders of normal and abnormal images as a meta.json that ``dataset.py`` reads.

    python -m generate_dataset.folder --normal my/normal --abnormal my/abnormal \
        --masks my/masks --save_path data/MyBrain/meta.json --split test

- Images are the image files directly inside each folder (png, jpg, jpeg, tif, tiff, bmp).
- Masks (optional) pair with abnormal images by file stem; either every abnormal image has a
  mask or none has (classification only). A mask without an image is an error.
- Paths in the index are relative to the folder of meta.json (schema: see ``dataset.py``).
- ``--split`` may name several splits (e.g. ``train test``); the same images go into each. When
  meta.json exists, the named splits are replaced and the others kept, so train and test can
  come from different folders in two runs.
- ``--cls_name`` (default: the organ name of meta.json's folder) fills ``cls_name``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dataset import SPLITS, Sample, organ_name, describe, list_images, pair_masks
from utils import ArgumentParser, InputError, atomic_write_json, prepare_output_dir, run_cli, setup_logging

logger = logging.getLogger("medvmad")


def _images(folder: str, role: str) -> list[str]:
    """Image files of ``folder``; InputError when it is missing or holds none."""
    if not os.path.isdir(folder):
        raise InputError(f"{role} folder {folder} does not exist")
    images = list_images(folder)
    if not images:
        raise InputError(f"{role} folder {folder} holds no images")
    return images


def build_index(save_path: str, normal: str | None, abnormal: str | None, masks: str | None = None,
                splits: tuple[str, ...] = ("test",), cls_name: str | None = None) -> dict:
    """Write (or update) the meta.json at ``save_path``; returns the whole index."""
    if not save_path.lower().endswith(".json"):
        raise InputError(f"save path {save_path} must name a .json file, e.g. data/MyBrain/meta.json")
    if normal is None and abnormal is None:
        raise InputError("give --normal, --abnormal or both")
    if masks is not None and abnormal is None:
        raise InputError("--masks needs --abnormal")
    for split in splits:
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, not {split!r}")
    base = os.path.dirname(os.path.abspath(save_path))
    prepare_output_dir(base, f"--save_path {save_path}: the folder", files=(os.path.basename(save_path),))
    cls_name = cls_name or organ_name(base)
    normal_images = _images(normal, "normal") if normal else []
    abnormal_images = _images(abnormal, "abnormal") if abnormal else []
    mask_paths = pair_masks(abnormal_images, _images(masks, "mask") if masks else [])
    samples = ([Sample(path, None, 0) for path in normal_images]
               + [Sample(path, mask, 1) for path, mask in zip(abnormal_images, mask_paths)])

    def relative(path: str | None) -> str:
        return Path(os.path.relpath(os.path.abspath(path), base)).as_posix() if path else ""

    entries = [dict(img_path=relative(s.image_path), mask_path=relative(s.mask_path),
                    cls_name=cls_name, specie_name="abnormal" if s.label else "good",
                    anomaly=s.label) for s in samples]
    index = {}
    if os.path.isfile(save_path):
        try:
            with open(save_path, encoding="utf-8") as handle:
                index = json.load(handle)
        except ValueError as error:
            raise InputError(f"existing index {save_path} is not valid JSON: {error}") from error
        except RecursionError:
            raise InputError(f"existing index {save_path} is nested too deeply to be a meta.json") from None
        if not isinstance(index, dict):
            raise InputError(f"existing index {save_path} holds a JSON {type(index).__name__}, not an object of "
                             f"splits; move it away or choose another --save_path")
        logger.info("updating %s: replacing split(s) %s", save_path, ", ".join(splits))
    for split in splits:
        index[split] = {cls_name: entries}
    atomic_write_json(save_path, index)
    logger.info(describe(samples, f"{cls_name} -> {save_path} ({', '.join(splits)})"))
    return index


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--normal", help="folder of normal images")
    parser.add_argument("--abnormal", help="folder of abnormal images")
    parser.add_argument("--masks", help="folder of masks for the abnormal images (paired by stem)")
    parser.add_argument("--save_path", required=True, help="meta.json to write, e.g. data/MyBrain/meta.json")
    parser.add_argument("--split", nargs="+", default=["test"], choices=SPLITS,
                        help="split(s) these images form")
    parser.add_argument("--cls_name", help="class name in the index (default: organ of the folder name)")
    args = parser.parse_args(argv)
    setup_logging(None)
    build_index(args.save_path, args.normal, args.abnormal, args.masks, tuple(args.split), args.cls_name)


if __name__ == "__main__":
    run_cli(main)
