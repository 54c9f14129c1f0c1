"""Evaluate MedVMAD (or the zero-training baseline) on BMAD-layout datasets and write paper tables.

    python test.py --data_path data/BMAD/Brain data/BMAD/Liver --checkpoint_path checkpoint/brain/best.pth

Without --data_path the demo set is built (once) and used. Without --checkpoint_path the
zero-training baseline is evaluated: fixed prompt ensemble on CLIP's projected patch tokens.
Scores become probabilities and decisions as evaluation/calibration.py fits them on images never tested on:
the checkpoint's validation images, the support set (few-shot), or the valid split (baseline).
Writes results.json, results.csv, results_calibration.csv, scores.csv, reliability_<dataset>.png
(and overlays/curves with --visualize) to --save_path; the figures and results files are
evaluation/results.py's and evaluation/figures.py's: this script parses, loads and calls.

    torchrun --nproc_per_node 4 test.py ...      (sharded: the same results, written by process 0)
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from CLIP.MedVMAD import MedVMAD
from cli import MODEL, add_distributed_args, add_fewshot_args, add_model_args, add_runtime_args, build_model
from dataset import (MedicalDataset, Sample, dataset_names, list_samples, organ_name, resolve_support, save_support,
                     support_file_name)
from distributed import SINGLE, Distributed, distributed, sharded_loader
from evaluation import bootstrap
from evaluation.calibration import checkpoint_decision, operating_point, operating_point_flag
from evaluation.decisions import fitted_decision
from evaluation.fewshot import memory_bank_from_support
from evaluation.figures import figure_paths, write_reliability, write_visuals
from evaluation.maps_io import map_files, save_maps
from evaluation.predict import MAP_DTYPES, MAPS_TEMP, maps_bytes, maps_dir_for, predict, ram_budget_gb, streams_maps
from evaluation.results import RESULT_FILES, EvaluationSettings, RunResults, evaluate_dataset
from generate_dataset.demo import ensure_demo
from scans.framing import framing_mismatch
from utils import (ArgumentParser, InputError, locked_folder, non_negative_float, non_negative_int, prepare_output_dir,
                   refuse_taken, run_cli, seed_everything, seed_value, setup_logging, unit_interval)

MAX_BOOTSTRAP = 100_000  # resamples: a 95% interval is stable from a few thousand; more only costs time


def bootstrap_count(text: str) -> int:
    """--bootstrap: 0 (off) to MAX_BOOTSTRAP resamples."""
    value = non_negative_int(text)
    if value > MAX_BOOTSTRAP:
        raise argparse.ArgumentTypeError(f"at most {MAX_BOOTSTRAP} resamples (intervals settle within a few "
                                         f"thousand), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", nargs="+",
                        help="dataset roots (BMAD layout or meta.json); default: the demo set")
    parser.add_argument("--dataset", nargs="+", help="a name per root for the table rows (default: folder names); "
                        "the organ in it (brain, liver, ...) picks the baseline's prompt wording")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip unreadable images and image/mask size mismatches (listed in the log) "
                        "instead of stopping")
    parser.add_argument("--checkpoint_path", help="trained MedVMAD checkpoint; omit for the zero-training baseline")
    parser.add_argument("--save_path", default="results/test", help="folder for results files")
    parser.add_argument("--metrics", default="image-pixel-level",
                        choices=["image-level", "pixel-level", "image-pixel-level"])
    parser.add_argument("--aupro", default="standard", choices=["standard", "legacy"],
                        help="standard: integrate PRO to FPR 0.3 and divide by 0.3; legacy: the 200-threshold "
                             "rescaled variant of several papers (comparison only)")
    add_model_args(parser, checkpoint=True)
    add_runtime_args(parser)
    add_distributed_args(parser)
    parser.add_argument("--visualize", type=non_negative_int, default=0, metavar="N",
                        help="write overlays for N normal and N abnormal images per dataset, and ROC/PRO curves")
    evaluation_args = parser.add_argument_group("evaluation")
    evaluation_args.add_argument("--map_dtype", default="float64", choices=list(MAP_DTYPES),
                                 help="precision of the stored maps, whose metrics are exact at it: float64 (the "
                                      "model's own); float32 (half the memory; pixels within 6e-8 of 1 round to 1 "
                                      "and tie); float16 (a quarter; metrics describe the rounded maps)")
    evaluation_args.add_argument("--max_ram_maps_gb", type=non_negative_float,
                                 help="keep a dataset's maps and masks in RAM up to this size, else stream them to "
                                      "memory-mapped files in --save_path (default: half the available memory)")
    evaluation_args.add_argument("--save_maps", action="store_true",
                                 help="write the maps, masks, paths, labels and scores to SAVE_PATH/maps/ "
                                      "(read back with evaluation.maps_io.load_maps)")
    evaluation_args.add_argument("--bootstrap", type=bootstrap_count, default=0, metavar="N",
                                 help=f"95%% intervals from N resamples of patients (case ids of <case>_<slice> "
                                      f"names, else images), at most {MAX_BOOTSTRAP}; 0 = off")
    evaluation_args.add_argument("--bootstrap_seed", type=seed_value, default=0)
    evaluation_args.add_argument("--operating_point", type=operating_point_flag,
                                 help="the rule that picks the decision threshold on the images calibrated on (the "
                                      "checkpoint's validation images, the support set, the baseline's valid split): "
                                      "f1, youden, sensitivity=X or specificity=X (default: the checkpoint's, else f1)")
    fewshot = parser.add_argument_group("few-shot (memory bank of normal support patches)")
    add_fewshot_args(fewshot)
    fewshot.add_argument("--fewshot_weight", type=unit_interval,
                         help=f"weight of the memory-bank map (default: the checkpoint's, else {MODEL.fewshot_weight})")
    return parser.parse_args(argv)


def build_memory_bank(args: argparse.Namespace, model: MedVMAD, root: str, name: str, save_path: Path,
                      device, logger, where: Distributed = SINGLE) -> tuple[str, list[Sample]]:
    """Build the few-shot bank from the normal support images (x11 augmented), on every process;
    process 0 writes the support file. Returns where the support set came from, and the set."""
    support, source = resolve_support(root, args.k_shot, args.fewshot_seed, args.support_file, args.checkpoint_path)
    written = save_path / support_file_name(args.k_shot, args.fewshot_seed, name)
    if where.is_main:
        save_support(str(written), support, root)
    count, copies = memory_bank_from_support(model, support, args.fewshot_seed, device, args.batch_size)
    logger.info(f"{name}: memory bank from {count} normal support images x{copies} ({source}; written to {written})")
    return source, support


def evaluation_settings(args: argparse.Namespace) -> EvaluationSettings:
    """What evaluation/results.py reads of the command line, and the command line to record."""
    return EvaluationSettings(split=args.split, aupro=args.aupro, bootstrap=args.bootstrap,
                              bootstrap_seed=args.bootstrap_seed, map_dtype=args.map_dtype, k_shot=args.k_shot,
                              checkpoint_path=args.checkpoint_path, arguments=vars(args))


def check_before_work(args: argparse.Namespace, save_path: Path, listed: dict[str, list[Sample]],
                      image_size: int, keep_maps: bool, want_pixel: bool) -> None:
    """Refuse, before any image is scored, what would fail after it: an output name of a dataset
    taken (a file where a folder goes, or the reverse), bootstrap resamples that do not fit in
    memory (a declared pixel metric without a histogram curve resamples a copy of the maps), and
    maps to put on disk (--save_maps, or streamed) that do not fit on it."""
    disk_kept, disk_streamed = 0, 0
    for name, samples in listed.items():
        files, folders = figure_paths(name, samples, args.visualize)
        if args.k_shot:
            files.append(support_file_name(args.k_shot, args.fewshot_seed, name))
        if args.save_maps:
            folders.append("maps")
            files += [f"maps/{file_name}" for file_name in map_files(name)]
        refuse_taken(save_path, files, folders)
        need = maps_bytes(len(samples), image_size, args.map_dtype)
        if args.bootstrap:
            n_patients = len(bootstrap.groups_of([sample.image_path for sample in samples])[1])
            bootstrap.check_memory(name, n_patients, args.bootstrap, need if want_pixel else 0,
                                   ram_budget_gb(args.max_ram_maps_gb) * 2**30)
        if keep_maps:
            if args.save_maps:
                disk_kept += need
            elif streams_maps(need, args.max_ram_maps_gb):  # to a temp folder in save_path (maps_dir_for)
                disk_streamed = max(disk_streamed, need)
    need, free = disk_kept + disk_streamed, shutil.disk_usage(save_path).free
    if need > free:
        raise InputError(f"--save_path {save_path}: the maps to write there take {need / 2**30:.1f} GiB, but only "
                         f"{free / 2**30:.1f} GiB are free; free some space"
                         + ("" if args.save_maps else " or raise --max_ram_maps_gb"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with distributed(args.device, args.dist_timeout) as (where, device):
        if not where.is_main:  # process 0 alone checks, locks and writes the folder
            return evaluate(args, device, where)
        save_path = prepare_output_dir(args.save_path, files=RESULT_FILES + ("test_log.txt", ".lock"),
                                       folders=("maps",) * args.save_maps + ("visualization",) * bool(args.visualize))
        with locked_folder(save_path):  # two evaluations into one folder would mix their results files
            for stale in save_path.glob(f"{MAPS_TEMP}*"):  # maps streamed by a killed run: no live run owns them
                shutil.rmtree(stale, ignore_errors=True)
            return evaluate(args, device, where)


def evaluate(args: argparse.Namespace, device, where: Distributed = SINGLE) -> dict:
    """The evaluation itself, writing into ``args.save_path`` (checked and locked by ``main``).
    Under torchrun every process scores its share of each dataset; process 0 gathers the maps and
    scores in dataset order, computes every figure and writes every file (the others return {}).
    The results files are rewritten after each dataset's figures, before its optional overlays
    and maps, so a failure there keeps every figure computed (``complete`` false until the last)."""
    started = time.time()
    save_path = Path(args.save_path)
    logger = setup_logging(save_path if where.is_main else None, "test_log.txt", rank=where.rank)
    seed_everything(args.seed)
    roots = args.data_path or [where.on_main(ensure_demo)]  # built once
    names = dataset_names(roots, args.dataset)
    listed = {name: list_samples(root, args.split) for root, name in zip(roots, names)}  # logs the counts per class

    model, checkpoint = build_model(args, device)
    # a checkpoint's stored calibration and operating point (few-shot scores are z: fitted per dataset instead)
    stored = None if checkpoint is None or args.k_shot else checkpoint_decision(checkpoint, args.checkpoint_path,
                                                                                args.operating_point)
    if args.fewshot_weight is not None:
        model.set_fewshot_weight(args.fewshot_weight)
    image_size = model.config.backbone.image_size
    logger.info(f"model {model.config.backbone.model_name} ({model.config.backbone.pretrained}) "
                f"image_size {image_size} layers {model.features_list} "
                f"{'checkpoint ' + args.checkpoint_path if checkpoint else 'zero-training baseline'}")

    want_image = args.metrics in ("image-level", "image-pixel-level")
    want_pixel = args.metrics in ("pixel-level", "image-pixel-level")
    keep_maps = want_pixel or args.visualize > 0 or args.save_maps
    if where.is_main:
        check_before_work(args, save_path, listed, image_size, keep_maps, want_pixel)
    if args.bootstrap:
        logger.info(f"bootstrap: {args.bootstrap} resamples of patients, seed {args.bootstrap_seed}")
    settings = evaluation_settings(args)
    run = RunResults(settings, checkpoint, started, len(names))
    for root, name in zip(roots, names):
        dataset = MedicalDataset(listed[name], image_size, skip_bad=args.skip_bad)
        loader = sharded_loader(dataset, args.batch_size, args.num_workers, where)
        model.set_organ(organ_name(name))
        mismatch = None if checkpoint is None else framing_mismatch(checkpoint.get("framing"), root)
        if mismatch:
            logger.warning(f"{name}: {mismatch}")
        support = []
        if args.k_shot:
            run.support_sources[name], support = build_memory_bank(args, model, root, name, save_path, device,
                                                                   logger, where)
        decision = stored or (fitted_decision(model, root, name, support, operating_point(args.operating_point or "f1"),
                                              args.split, args.k_shot, device, args.batch_size, args.num_workers,
                                              args.precision, args.skip_bad, logger, where)
                              if want_image else None)
        maps_dir = (maps_dir_for(len(dataset), image_size, args.map_dtype, args.max_ram_maps_gb, name, save_path,
                                 logger)
                    if keep_maps and where.is_main else None)
        try:
            predictions = predict(model, loader, device, args.precision, keep_maps=keep_maps, desc=name,
                                  map_dtype=args.map_dtype, maps_dir=maps_dir, where=where)
            if predictions is None:  # not process 0: its share is scored and sent
                continue
            values, patient_values, per_class, described = evaluate_dataset(settings, name, root, predictions,
                                                                            want_pixel, want_image, decision, logger)
            if want_pixel and not predictions.has_masks:
                logger.info(f"{name}: no masks for abnormal images, pixel metrics skipped")
            run.add(name, predictions, values, patient_values, per_class, described)
            run.write(save_path, logger)  # what is done is kept before the optional extras
            write_reliability(save_path, name, values, patient_values, described)
            if args.visualize > 0:
                write_visuals(save_path / "visualization", name, dataset, predictions, args.visualize)
                logger.info(f"{name}: overlays and ROC/PRO curves written to {save_path / 'visualization' / name}")
            if args.save_maps:
                save_maps(save_path / "maps", name, predictions)
                logger.info(f"{name}: maps written to {save_path / 'maps'} (evaluation.maps_io.load_maps)")
        finally:
            if maps_dir is not None:
                shutil.rmtree(maps_dir, ignore_errors=True)
    if not where.is_main:
        return {}
    return run.summary


if __name__ == "__main__":
    run_cli(main)
