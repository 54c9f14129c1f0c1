"""Anomaly maps of several trained models side by side on the same test images (the report's
Figures 4, 5 and 7): one row per image, image | a heat map per model | ground truth mask, one heat
scale for the whole figure.

    python visualize_compare.py --checkpoint_path checkpoint/paper/{medvmad,text_only,anomalyclip,mvfa}/best.pth \\
        --data_path data/BMAD/Brain --save_path results/paper/figure_brain.png

Images are --image_paths (in that order), else picked without looking at any model: the
--n_abnormal abnormal images with the largest lesions (one per patient first, ties by path), then
--n_normal normal images drawn with --seed from the whole split. Columns are named by --names, else
by each checkpoint's variant (with its folder name when two share one). The colour scale runs
from the smallest to the largest value of all drawn maps; one colour bar shows it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from CLIP.checkpoint import checkpoint_config, read_checkpoint, refuse_stored_sources
from cli import add_model_args, add_runtime_args, build_model
from dataset import MedicalDataset, Sample, list_samples, load_mask, organ_name, patient_of
from evaluation.predict import predict
from evaluation.tables import distinct_names, variant_of
from utils import (ArgumentParser, InputError, atomic_write_bytes, non_negative_int,
                   prepare_output_dir, resolve_device, run_cli, seed_value)
from visualization import HEAT_CMAP, SCORE_LABEL, figure_bytes, to_display


MAX_ROWS, MAX_MODELS = 40, 12  # images and checkpoints of one figure: 40 x 14 panels is about 2600 x 7500 px


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", nargs="+", required=True,
                        help="trained checkpoints, one column each, in this order")
    parser.add_argument("--data_path", required=True, help="dataset root (BMAD layout or meta.json)")
    parser.add_argument("--split", default="test", help="split the images come from (default: test)")
    parser.add_argument("--names", nargs="+", help="column titles, one per checkpoint (default: each checkpoint's "
                                                   "variant, with its folder name when two share one)")
    parser.add_argument("--image_paths", nargs="+", help="draw these images of the split, in this order "
                                                         "(default: picked as the description says)")
    parser.add_argument("--n_abnormal", type=non_negative_int, default=3,
                        help="abnormal images to pick: the largest lesions, one per patient first (default 3)")
    parser.add_argument("--n_normal", type=non_negative_int, default=2,
                        help="normal images to pick, drawn from the split with --seed (default 2)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the normal images' draw")
    parser.add_argument("--save_path", default="results/compare.png", help="the PNG to write")
    add_model_args(parser, checkpoint=True, features_list=False)
    add_runtime_args(parser, datasets=False)
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.checkpoint_path):
        parser.error(f"--names gives {len(args.names)} names for {len(args.checkpoint_path)} --checkpoint_path files")
    if len(args.checkpoint_path) > MAX_MODELS:
        parser.error(f"--checkpoint_path: at most {MAX_MODELS} checkpoints in one figure, "
                     f"got {len(args.checkpoint_path)}")
    rows = len(args.image_paths) if args.image_paths else args.n_abnormal + args.n_normal
    if rows > MAX_ROWS:
        parser.error(f"{'--image_paths' if args.image_paths else '--n_abnormal + --n_normal'}: at most {MAX_ROWS} "
                     f"images in one figure, got {rows}")
    return args


# ----------------------------------------------------------------------------- which images

def pick_samples(samples: list[Sample], n_abnormal: int, n_normal: int, seed: int = 0) -> list[Sample]:
    """Abnormal images with the largest lesion area (mask pixels at the file's size; each patient's
    largest first, then the others; ties by path), then normal images drawn with ``seed``, in split
    order. Only paths, labels and masks decide: never a model's output."""
    abnormal = [s for s in samples if s.label == 1]
    area = {s.image_path: int(load_mask(s.mask_path).sum()) if s.mask_path else 0 for s in abnormal}
    first, rest, seen = [], [], set()
    for sample in sorted(abnormal, key=lambda s: (-area[s.image_path], s.image_path)):
        patient = patient_of(sample.image_path)
        (rest if patient in seen else first).append(sample)
        seen.add(patient)
    normal = sorted((s for s in samples if s.label == 0), key=lambda s: s.image_path)
    drawn = np.random.default_rng(seed).choice(len(normal), size=min(n_normal, len(normal)), replace=False)
    return (first + rest)[:n_abnormal] + [normal[i] for i in sorted(drawn)]


def find_samples(samples: list[Sample], image_paths: list[str], where: str) -> list[Sample]:
    """The samples of ``image_paths``, in their order; a path that is not one of them is refused."""
    by_path = {os.path.realpath(s.image_path): s for s in samples}
    found = []
    for path in image_paths:
        if not os.path.isfile(path):
            raise InputError(f"--image_paths {path}: no such file")
        if os.path.realpath(path) not in by_path:
            raise InputError(f"--image_paths {path}: not an image of {where}")
        if by_path[os.path.realpath(path)] in found:
            raise InputError(f"--image_paths {path}: given twice (or through a link); each image is one row")
        found.append(by_path[os.path.realpath(path)])
    return found


# ----------------------------------------------------------------------------- the figure

def comparison_figure(images: list[np.ndarray], maps: np.ndarray, masks: list[np.ndarray], names: list[str],
                      row_labels: list[str] | None = None, dpi: int = 100) -> Figure:
    """A row per image: image | maps[m] for each model m (column title ``names[m]``) | ground truth.

    images: uint8 RGB [H,W,3]; maps: [models, images, H, W]; masks: bool [H,W]. Every heat map is
    drawn with the same colour limits, the smallest and largest value of ``maps``, shown by one
    colour bar (the figure's last axes)."""
    n_models, n_rows = maps.shape[:2]
    if n_models != len(names) or n_rows != len(images) or n_rows != len(masks):
        raise ValueError(f"{n_models} x {n_rows} maps for {len(names)} names, {len(images)} images, {len(masks)} masks")
    vmin, vmax = float(maps.min()), float(maps.max())
    vmax = max(vmax, vmin + 1e-6)  # constant maps still get a valid scale
    titles = ["image", *names, "ground truth"]
    figure = Figure(figsize=(1.8 * len(titles) + 0.9, 1.8 * n_rows + 0.3), dpi=dpi, layout="constrained")
    axes = figure.subplots(n_rows, len(titles), squeeze=False)
    heat = None
    for row in range(n_rows):
        axes[row, 0].imshow(images[row])
        for model in range(n_models):
            heat = axes[row, model + 1].imshow(maps[model, row], cmap=HEAT_CMAP, vmin=vmin, vmax=vmax)
        axes[row, -1].imshow(masks[row], cmap="gray", vmin=0, vmax=1)
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column], fontsize=9)
        if row_labels:
            axes[row, 0].set_ylabel(row_labels[row], fontsize=7)
    figure.colorbar(heat, ax=axes, shrink=0.9, label=SCORE_LABEL)
    return figure


def figure_format(save_path: Path) -> str:
    """The image format --save_path's suffix names, refused unless matplotlib writes it."""
    file_format = save_path.suffix.lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if file_format not in supported:
        raise InputError(f"--save_path {save_path}: give a file name ending in one of "
                         f"{', '.join('.' + kind for kind in sorted(supported))} (the figure's format)")
    return file_format


def resized(maps: np.ndarray, size: int) -> np.ndarray:
    """Maps [N,S,S] resized bilinearly to [N,size,size] (models tested at different sizes)."""
    if maps.shape[-1] == size:
        return maps
    tensor = torch.from_numpy(np.asarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    save_path = Path(args.save_path)
    if save_path.is_dir():
        raise InputError(f"--save_path {save_path} is a folder; give a .png file name")
    file_format = figure_format(save_path)
    prepare_output_dir(save_path.parent, "--save_path")
    samples = list_samples(args.data_path, args.split)
    where = f"the {args.split} split of {args.data_path}"
    chosen = (find_samples(samples, args.image_paths, where) if args.image_paths
              else pick_samples(samples, args.n_abnormal, args.n_normal, args.seed))
    if not chosen:
        raise InputError(f"no images to draw from {where} (--n_abnormal and --n_normal are 0, or the split "
                         f"lacks those images)")
    payloads = [read_checkpoint(path) for path in args.checkpoint_path]  # every file checked before work
    for path, payload in zip(args.checkpoint_path, payloads):
        refuse_stored_sources(checkpoint_config(payload, path), path, args.pretrained, args.model_name)
    names = args.names or distinct_names([variant_of(payload["config"]) for payload in payloads],
                                         [Path(path).parent.name for path in args.checkpoint_path])
    device = resolve_device(args.device)
    maps = []
    for path, name in zip(args.checkpoint_path, names):
        model, _ = build_model(argparse.Namespace(**{**vars(args), "checkpoint_path": path}), device)
        model.set_organ(organ_name(args.data_path))
        dataset = MedicalDataset(chosen, model.config.backbone.image_size)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0)
        maps.append(predict(model, loader, device, args.precision, desc=name).maps)
        del model
    size = max(m.shape[-1] for m in maps)
    items = [MedicalDataset(chosen, size)[i] for i in range(len(chosen))]
    figure = comparison_figure([to_display(item["image"]) for item in items],
                               np.stack([resized(m, size) for m in maps]),
                               [item["mask"].numpy() > 0.5 for item in items], names,
                               [f"{Path(s.image_path).stem}\n{'abnormal' if s.label else 'normal'}" for s in chosen])
    atomic_write_bytes(save_path, figure_bytes(figure, file_format))
    print(save_path)
    return save_path


if __name__ == "__main__":
    run_cli(main)
