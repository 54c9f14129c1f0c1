"""Evaluate MedVMAD (or the zero-training baseline) on BMAD-layout datasets and write paper tables.

    python test.py --data_path data/BMAD/Brain data/BMAD/Liver --checkpoint_path checkpoint/brain/best.pth

Without --data_path the demo set is built (once) and used. Without --checkpoint_path the
zero-training baseline is evaluated: fixed prompt ensemble on CLIP's projected patch tokens.
Writes results.json, results.csv, scores.csv (and overlays/curves with --visualize) to --save_path.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from tabulate import tabulate
from torch.utils.data import DataLoader

import metrics
from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import BackboneConfig
from CLIP.checkpoint import load_model
from dataset import (MedicalDataset, dataset_name, list_samples, read_support, sample_support,
                     save_support, dataset_names)
from generate_dataset.demo import ensure_demo
from inference import Predictions, compute_metrics, memory_bank_from_support, predict
from utils import (MANIFEST, ArgumentParser, InputError, add_backbone_override_args, atomic_write_json,
                   atomic_write_text, backbone_overrides, device_name, locked_folder, non_negative_float,
                   non_negative_int, positive_int, prepare_output_dir, resolve_device, run_cli, seed_everything,
                   setup_logging, unit_interval, versions)
from visualization import overlay_panel, save_curve, save_png, to_display

RESULT_FILES = ("results.json", "results.csv", "scores.csv", MANIFEST)  # checked free before the run
TABLE_COLUMNS = [("image_auroc", "image AUROC"), ("image_ap", "image AP"),
                 ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", nargs="+", help="dataset roots (BMAD layout or meta.json); default: the demo set")
    parser.add_argument("--dataset", nargs="+", help="a name per root for the table rows (default: folder names); "
                        "the organ in it (brain, liver, ...) picks the baseline's prompt wording")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip unreadable images and image/mask size mismatches (listed in the log) instead of stopping")
    parser.add_argument("--checkpoint_path", help="trained MedVMAD checkpoint; omit for the zero-training baseline")
    parser.add_argument("--save_path", default="results/test", help="folder for results files")
    parser.add_argument("--metrics", default="image-pixel-level",
                        choices=["image-level", "pixel-level", "image-pixel-level"])
    parser.add_argument("--aupro", default="standard", choices=["standard", "legacy"],
                        help="standard: integrate PRO to FPR 0.3 and divide by 0.3; legacy: the 200-threshold "
                             "rescaled variant of several papers (comparison only)")
    parser.add_argument("--model_name", help="baseline backbone (default ViT-L-14-336); a checkpoint names its own")
    parser.add_argument("--pretrained", default=None,
                        help="backbone weights: open_clip tag, local file, or none (default: openai for the "
                             "baseline, the checkpoint's own otherwise)")
    add_backbone_override_args(parser)
    parser.add_argument("--features_list", type=positive_int, nargs="+", help="baseline tapped layers, 1-based")
    parser.add_argument("--image_size", type=positive_int, help="default: the checkpoint's, or 336 for the baseline; "
                        "a multiple of the backbone's patch size")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--sigma", type=non_negative_float,
                        help="Gaussian smoothing of the maps in pixels (default: 4 or the checkpoint's)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "bf16"])
    parser.add_argument("--num_workers", type=non_negative_int, default=2)
    parser.add_argument("--visualize", type=non_negative_int, default=0, metavar="N",
                        help="write overlays for N normal and N abnormal images per dataset, and ROC/PRO curves")
    parser.add_argument("--seed", type=non_negative_int, default=111)
    fewshot = parser.add_argument_group("few-shot (memory bank of normal support patches)")
    fewshot.add_argument("--k_shot", type=non_negative_int, default=0, help="k normal + k abnormal support images; 0 = off")
    fewshot.add_argument("--fewshot_seed", type=non_negative_int, default=1)
    fewshot.add_argument("--support_file", help="support set file (default: the one beside the checkpoint, "
                         "else sampled from the dataset's valid split with --fewshot_seed)")
    fewshot.add_argument("--fewshot_weight", type=unit_interval, help="weight of the memory-bank map (default 0.5)")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, device) -> tuple[MedVMAD, dict | None]:
    """The checkpoint's model, or the zero-training baseline."""
    if args.checkpoint_path:
        model, checkpoint = load_model(args.checkpoint_path, device, args.pretrained, args.image_size, args.sigma,
                                       **backbone_overrides(args))
        trained_on = model.config.backbone.model_name
        if args.model_name and args.model_name != trained_on:
            raise InputError(f"--checkpoint_path {args.checkpoint_path} was trained on {trained_on}, "
                             f"not --model_name {args.model_name}")
        return model, checkpoint
    backbone = BackboneConfig(args.model_name or "ViT-L-14-336", args.pretrained or "openai", args.image_size or 336,
                              **backbone_overrides(args))
    config = MedVMADConfig(backbone=backbone, features_list=args.features_list, adapters=False,
                           learnable_prompts=False, sigma=4.0 if args.sigma is None else args.sigma)
    try:
        return MedVMAD(config).to(device), None
    except ValueError as error:
        raise InputError(str(error)) from None


def build_memory_bank(args: argparse.Namespace, model: MedVMAD, root: str, name: str, save_path: Path,
                      device, logger) -> str:
    """Build the few-shot bank from the normal support images (x11 augmented); returns the support file."""
    beside_checkpoint = (Path(args.checkpoint_path).parent / f"support_{args.k_shot}shot_seed{args.fewshot_seed}.txt"
                         if args.checkpoint_path else None)
    if args.support_file:
        source, support = args.support_file, read_support(args.support_file, root)
    elif beside_checkpoint is not None and beside_checkpoint.is_file():
        source, support = str(beside_checkpoint), read_support(str(beside_checkpoint), root)
    else:
        source = "sampled from valid"
        support = sample_support(list_samples(root, "valid"), args.k_shot, args.fewshot_seed)
    written = save_path / f"support_{name}_{args.k_shot}shot_seed{args.fewshot_seed}.txt"
    save_support(str(written), support, root)
    count, copies = memory_bank_from_support(model, support, args.fewshot_seed, device, args.batch_size)
    logger.info(f"{name}: memory bank from {count} normal support images x{copies} ({source}; written to {written})")
    return source


def format_table(results: dict[str, dict[str, float]]) -> list[list[str]]:
    """Rows per dataset plus a mean row, metric values x100 with one decimal ('-' when absent)."""
    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    rows = [[name] + [cell(values.get(key)) for key, _ in TABLE_COLUMNS] for name, values in results.items()]
    means = []
    for key, _ in TABLE_COLUMNS:
        present = [values[key] for values in results.values() if key in values and not math.isnan(values[key])]
        means.append(cell(float(np.mean(present)) if present else None))
    return rows + [["mean"] + means]


def write_visuals(folder: Path, name: str, dataset: MedicalDataset, predictions: Predictions, count: int) -> None:
    """Overlays for ``count`` normal and abnormal images (one heat scale per dataset) and curves."""
    maps = predictions.maps
    sample = maps[:: max(1, len(maps) // 256)].astype(np.float32)  # a display scale needs no exact quantile
    vmin, vmax = float(np.percentile(sample, 1)), float(np.percentile(sample, 99.9))
    for label, kind in ((0, "normal"), (1, "abnormal")):
        for index in np.flatnonzero(predictions.labels == label)[:count]:
            item = dataset[int(index)]
            panel = overlay_panel(to_display(item["image"]), maps[index].astype(np.float32), vmin, vmax,
                                  predictions.masks[index], f"score {predictions.scores[index]:.3f}")
            save_png(folder / name / kind / f"{Path(predictions.paths[index]).stem}.png", panel)
    if len(set(predictions.labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(predictions.labels, predictions.scores)
        save_curve(folder / name / "roc_image.png", fpr, tpr, "FPR", "TPR", f"{name} image ROC")
    if predictions.has_masks and predictions.masks.any():
        fpr, pro = metrics.pro_curve(predictions.masks, predictions.maps)
        save_curve(folder / name / "pro_pixel.png", fpr, pro, "FPR", "PRO", f"{name} PRO", xlim=0.3)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    save_path = prepare_output_dir(args.save_path, files=RESULT_FILES)  # before any work is done
    with locked_folder(save_path):  # two evaluations into one folder would mix their results files
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> dict:
    """The evaluation itself, writing into ``args.save_path`` (checked and locked by ``main``)."""
    started = time.time()
    save_path = Path(args.save_path)
    logger = setup_logging(save_path, "test_log.txt")
    seed_everything(args.seed)
    device = resolve_device(args.device)
    roots = args.data_path or [ensure_demo()]
    names = dataset_names(roots, args.dataset)

    model, checkpoint = build_model(args, device)
    if args.fewshot_weight is not None:
        model.config.fewshot_weight = args.fewshot_weight
    image_size = model.config.backbone.image_size
    logger.info(f"model {model.config.backbone.model_name} ({model.config.backbone.pretrained}) "
                f"image_size {image_size} layers {model.features_list} "
                f"{'checkpoint ' + args.checkpoint_path if checkpoint else 'zero-training baseline'}")

    want_image = args.metrics in ("image-level", "image-pixel-level")
    want_pixel = args.metrics in ("pixel-level", "image-pixel-level")
    results: dict[str, dict[str, float]] = {}
    score_rows = [["dataset", "path", "label", "score"]]
    support_sources: dict[str, str] = {}
    for root, name in zip(roots, names):
        samples = list_samples(root, args.split)  # logs the counts per class
        dataset = MedicalDataset(samples, image_size, skip_bad=args.skip_bad)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
        model.set_dataset(dataset_name(name))
        if args.k_shot:
            support_sources[name] = build_memory_bank(args, model, root, name, save_path, device, logger)
        predictions = predict(model, loader, device, args.precision, keep_maps=want_pixel or args.visualize > 0,
                              desc=name)
        values = compute_metrics(predictions, pixel=want_pixel, image=want_image, aupro_variant=args.aupro)
        if want_pixel and not predictions.has_masks:
            logger.info(f"{name}: no masks for abnormal images, pixel metrics skipped")
        values.update(n_images=len(predictions.labels), n_abnormal=int(predictions.labels.sum()))
        results[name] = values
        score_rows += [[name, path, int(label), f"{score:.6f}"]
                       for path, label, score in zip(predictions.paths, predictions.labels, predictions.scores)]
        if args.visualize > 0:
            write_visuals(save_path / "visualization", name, dataset, predictions, args.visualize)

    headers = ["dataset"] + [title for _, title in TABLE_COLUMNS]
    rows = format_table(results)
    aupro_note = "AUPRO: FPR<=0.3, /0.3" if args.aupro == "standard" else "AUPRO: legacy 200-threshold variant"
    table = tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)
    logger.info(f"\n{table}\n({aupro_note}; values x100)")

    buffer = io.StringIO()
    csv.writer(buffer).writerows([headers] + rows)
    atomic_write_text(save_path / "results.csv", buffer.getvalue())
    buffer = io.StringIO()
    csv.writer(buffer).writerows(score_rows)
    atomic_write_text(save_path / "scores.csv", buffer.getvalue())
    summary = {
        "datasets": results,
        "aupro": args.aupro,
        "support_files": support_sources,
        "args": vars(args),
        "checkpoint": None if checkpoint is None else {
            "path": os.path.abspath(args.checkpoint_path), "epoch": checkpoint.get("epoch"),
            "config": checkpoint["config"], "threshold": checkpoint.get("threshold")},
        "versions": versions(),
        "seconds": round(time.time() - started, 2),
    }
    atomic_write_json(save_path / "results.json", summary)
    logger.info(f"results written to {save_path}")
    return summary


if __name__ == "__main__":
    run_cli(main)
