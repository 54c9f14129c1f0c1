"""Evaluate MedVMAD (or the zero-training baseline) on BMAD-layout datasets and write paper tables.

    python test.py --data_path data/BMAD/Brain data/BMAD/Liver --checkpoint_path checkpoint/brain/best.pth

Without --data_path the demo set is built (once) and used. Without --checkpoint_path the
zero-training baseline is evaluated: fixed prompt ensemble on CLIP's projected patch tokens.
Scores become probabilities and decisions as evaluation/calibration.py fits them on images never tested on:
the checkpoint's validation images, the support set (few-shot), or the valid split (baseline).
Writes results.json, results.csv, results_calibration.csv, scores.csv, reliability_<dataset>.png
(and overlays/curves with --visualize) to --save_path.

    torchrun --nproc_per_node 4 test.py ...      (sharded: the same results, written by process 0)
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from CLIP.MedVMAD import MedVMAD
from cli import MODEL, add_distributed_args, add_fewshot_args, add_model_args, add_runtime_args, build_model
from dataset import (MedicalDataset, Sample, dataset_names, list_samples, organ_name, resolve_support, save_support,
                     support_file_name)
from distributed import SINGLE, Distributed, distributed, sharded_loader
from evaluation import bootstrap, metrics
from evaluation.calibration import (Calibration, Decision, assess, checkpoint_decision, operating_point,
                                    operating_point_flag, reliability_figure)
from evaluation.maps_io import save_maps
from evaluation.predict import (MAP_DTYPES, Predictions, compute_metrics, maps_bytes, memory_bank_from_support,
                                predict, support_predictions)
from evaluation.tables import (CALIBRATION_COLUMNS, csv_rows, csv_text, format_table, patient_columns, pipe_table,
                               table_columns)
from generate_dataset.demo import ensure_demo
from medical_io import framing_mismatch
from utils import (MANIFEST, ArgumentParser, InputError, atomic_write_bytes, atomic_write_image,
                   locked_folder, non_negative_float, non_negative_int, prepare_output_dir, refuse_taken, run_cli,
                   seed_everything, seed_value, setup_logging, strict_json, unique_stems, unit_interval, versions,
                   write_result_files)
from visualization import figure_bytes, overlay_panel, pro_figure, roc_figure, to_display

# Written together, manifest last (utils.write_result_files); checked free before the run.
RESULT_FILES = ("results.json", "results.csv", "results_patient.csv", "results_per_class.csv",
                "results_calibration.csv", "scores.csv", MANIFEST)
MAPS_TEMP = ".maps-"  # prefix of the folders maps are streamed to (maps_dir_for)
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
                                      "(read back with maps_io.load_maps)")
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


def fitted_decision(args: argparse.Namespace, model: MedVMAD, root: str, name: str, support: list[Sample],
                    device, logger, where: Distributed = SINGLE) -> Decision | None:
    """The calibration and operating point of a run without stored ones, fitted on ``name``'s
    images it never tests: few-shot on its support set (normal images scored against the bank
    without them), the baseline on the valid split (uncalibrated, with a warning, when there is
    none or it is the evaluated split). Every process scores its share; None on the others."""
    point = operating_point(args.operating_point or "f1")
    if args.k_shot and args.split == "valid":
        logger.warning(f"{name}: uncalibrated: --split valid holds the support images the few-shot run is "
                       f"calibrated on")
        return Decision(None, None, "no operating point", chosen=False) if where.is_main else None
    if args.k_shot:
        images, scored = "support images", support_predictions(model, support, device, args.batch_size,
                                                                args.precision, where)
    else:
        images, samples = "valid split images", []
        if args.split == "valid":
            logger.warning(f"{name}: uncalibrated: --split valid is the split the baseline is calibrated on")
        else:
            try:
                samples = list_samples(root, "valid")
            except InputError as error:
                logger.warning(f"{name}: uncalibrated: no valid split to calibrate on ({error})")
        if not samples:
            return Decision(None, None, "no operating point", chosen=False) if where.is_main else None
        loader = sharded_loader(MedicalDataset(samples, model.config.backbone.image_size, skip_bad=args.skip_bad),
                                args.batch_size, args.num_workers, where)
        predictions = predict(model, loader, device, args.precision, keep_maps=False, desc=f"{name} valid",
                              where=where)
        scored = None if predictions is None else (predictions.scores, predictions.labels, predictions.paths)
    if scored is None:
        return None
    scores, labels, paths = scored
    decision = Decision.chosen_by(Calibration.fitted(scores, labels, [bootstrap.patient_of(p) for p in paths], images),
                               point)
    logger.info(f"{name}: probabilities {decision.calibration()}; decisions at {decision.operating_point()}")
    return decision


def ram_budget_gb(args: argparse.Namespace) -> float:
    """--max_ram_maps_gb, by default half the memory available now."""
    if args.max_ram_maps_gb is not None:
        return args.max_ram_maps_gb
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 / 2**30


def maps_dir_for(args: argparse.Namespace, n_images: int, image_size: int, name: str, save_path: Path,
                 logger) -> Path | None:
    """A temporary folder in save_path to stream the maps to, when they would not fit in RAM."""
    budget = ram_budget_gb(args)
    need = maps_bytes(n_images, image_size, args.map_dtype)
    if need <= budget * 2**30:
        return None
    logger.info(f"{name}: maps and masks take {need / 2**30:.1f} GB, over {budget:.1f} GB: streamed to "
                f"memory-mapped files in {save_path}")
    save_path.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=save_path, prefix=f"{MAPS_TEMP}{name}-"))


def evaluate_dataset(args: argparse.Namespace, name: str, root: str, predictions: Predictions,
                     want_pixel: bool, want_image: bool, decision: Decision | None,
                     logger) -> tuple[dict, dict | None, dict, dict | None]:
    """Metrics of one dataset (with intervals under --bootstrap), its patient-level figures
    (None without case ids), its per-class metrics ({} unless meta.json has several classes) and
    what its ``decision`` gives: Brier, ECE and the four rates at the operating point among the
    metrics (image and patient level), and their description with the reliability bins (None
    without image metrics). Ranking metrics are always those of the scores."""
    values = bootstrap.quietly(compute_metrics, predictions, want_pixel, want_image, args.aupro)
    bootstrap.note_undefined(logger, name, {name: (values, predictions.labels)})
    groups, patients = bootstrap.groups_of(predictions.paths)
    counts = bootstrap.resample_counts(len(patients), args.bootstrap, args.bootstrap_seed) if args.bootstrap else None
    if args.bootstrap:
        replicates = {}
        if want_image:
            replicates.update(bootstrap.image_replicates(predictions.labels, predictions.scores, groups, counts))
        if want_pixel and predictions.has_masks and predictions.maps is not None:  # as compute_metrics
            histograms = bootstrap.group_histograms(predictions.masks, predictions.maps, groups, len(patients))
            replicates.update(bootstrap.pixel_replicates(histograms, counts))
            if args.aupro == "legacy":  # intervals are of the standard AUPRO only
                del replicates["pixel_aupro"]
        values.update({f"{key}_ci": bootstrap.interval(samples) for key, samples in replicates.items()})
    patient_values, own = None, np.arange(len(patients))
    labels, scores = bootstrap.patient_level(predictions.labels, predictions.scores, groups, len(patients))
    if want_image and len(patients) < len(predictions.paths):
        patient_values = {f"patient_{key[6:]}": value
                          for key, value in bootstrap.quietly(metrics.image_metrics, labels, scores).items()}
        bootstrap.note_undefined(logger, f"{name} patient level", {name: (patient_values, labels)}, "patient")
        patient_values.update(n_patients=len(patients), n_abnormal=int(labels.sum()))
        if args.bootstrap:
            replicates = bootstrap.image_replicates(labels, scores, own, counts)
            patient_values.update({f"patient_{key[6:]}_ci": bootstrap.interval(samples)
                                   for key, samples in replicates.items()})
    described = None
    if want_image and decision is not None:
        figures, bins = assess(predictions.labels, predictions.scores, decision.image, decision.threshold, groups,
                               counts)
        values.update(figures)
        described = {"operating_point": decision.operating_point(), "threshold": decision.threshold,
                     "calibration": decision.calibration(), "fit": decision.image, "reliability": bins}
        if patient_values is not None:  # a patient: its slices' maximum score, calibrated on patients
            figures, bins = assess(labels, scores, decision.patient, decision.patient_threshold, own, counts)
            patient_values.update({f"patient_{key}": value for key, value in figures.items()})
            described["patients"] = {"operating_point": decision.operating_point(patient=True),
                                     "threshold": decision.patient_threshold,
                                     "calibration": decision.calibration(patient=True), "fit": decision.patient,
                                     "reliability": bins}
    classes = bootstrap.meta_classes(root, args.split)
    per_class, labelled = {}, {}
    names = [classes.get(path) for path in predictions.paths]
    if len(set(names) - {None}) > 1:
        for class_name in sorted(set(names) - {None}):
            chosen = np.flatnonzero([n == class_name for n in names])
            subset = Predictions([predictions.paths[i] for i in chosen], predictions.labels[chosen],
                                 predictions.scores[chosen],
                                 None if predictions.maps is None else predictions.maps[chosen],
                                 None if predictions.masks is None else predictions.masks[chosen],
                                 predictions.has_masks)
            per_class[class_name] = bootstrap.quietly(compute_metrics, subset, want_pixel, want_image, args.aupro)
            labelled[class_name] = (per_class[class_name], subset.labels)
        bootstrap.note_undefined(logger, f"{name} per class", labelled)
        logger.info(f"\n{name} per class\n" + pipe_table(format_table(per_class),
                                                        ["class"] + [title for _, title in table_columns()]))
    return values, patient_values, per_class, described


VISUAL_KINDS = ((0, "normal"), (1, "abnormal"))
CURVE_FILES = ("roc_image.png", "pro_pixel.png")
RELIABILITY = "reliability_{}.png"  # per dataset, in --save_path


def drawn_overlays(samples: list[Sample], count: int) -> list[tuple[int, str]]:
    """(index, visualization/NAME/ name) of the overlays ``write_visuals`` draws: the first
    ``count`` normal and abnormal images, named by their stems, made unique (``unique_stems``)."""
    stems = unique_stems([sample.image_path for sample in samples])
    labels = np.array([sample.label for sample in samples])
    return [(int(index), f"{kind}/{stems[index]}.png") for label, kind in VISUAL_KINDS
            for index in np.flatnonzero(labels == label)[:count]]


def write_visuals(folder: Path, name: str, dataset: MedicalDataset, predictions: Predictions, count: int) -> None:
    """Overlays for ``count`` normal and abnormal images (one heat scale per dataset) and curves."""
    maps = predictions.maps
    sample = maps[:: max(1, len(maps) // 256)].astype(np.float32)  # a display scale needs no exact quantile
    vmin, vmax = float(np.percentile(sample, 1)), float(np.percentile(sample, 99.9))
    for index, file_name in drawn_overlays(dataset.samples, count):
        item = dataset[index]
        panel = overlay_panel(to_display(item["image"]), maps[index].astype(np.float32), vmin, vmax,
                              predictions.masks[index], f"score {predictions.scores[index]:.3f}")
        atomic_write_image(folder / name / file_name, panel)
    figures = {}
    if len(set(predictions.labels.tolist())) == 2:
        figures[CURVE_FILES[0]] = roc_figure(predictions.labels, predictions.scores, f"{name} image ROC")
    if predictions.has_masks and predictions.masks.any():
        figures[CURVE_FILES[1]] = pro_figure(predictions.masks, predictions.maps, f"{name} PRO")
    for file_name, figure in figures.items():
        atomic_write_bytes(folder / name / file_name, figure_bytes(figure))


def check_before_work(args: argparse.Namespace, save_path: Path, listed: dict[str, list[Sample]],
                      image_size: int, keep_maps: bool) -> None:
    """Refuse, before any image is scored, what would fail after it: an output name of a dataset
    taken (a file where a folder goes, or the reverse), bootstrap resamples that do not fit in
    memory, and maps to put on disk (--save_maps, or streamed) that do not fit on it."""
    disk_kept, disk_streamed = 0, 0
    for name, samples in listed.items():
        files, folders = [RELIABILITY.format(name)], []
        if args.k_shot:
            files.append(support_file_name(args.k_shot, args.fewshot_seed, name))
        if args.save_maps:
            folders.append("maps")
            files += [f"maps/{name}.npy", f"maps/{name}_masks.npy", f"maps/{name}.json"]
        if args.visualize:
            folders += ["visualization", f"visualization/{name}"] + [f"visualization/{name}/{kind}"
                                                                     for _, kind in VISUAL_KINDS]
            files += [f"visualization/{name}/{file_name}" for file_name in CURVE_FILES]
            files += [f"visualization/{name}/{file_name}" for _, file_name in drawn_overlays(samples, args.visualize)]
        refuse_taken(save_path, files, folders)
        if args.bootstrap:
            n_patients = len(bootstrap.groups_of([sample.image_path for sample in samples])[1])
            need = args.bootstrap * n_patients * 16  # the draws and counts of every resample, int64
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if need > available / 2:
                raise InputError(f"--bootstrap {args.bootstrap}: {n_patients} patients of {name} need "
                                 f"{need / 2**30:.1f} GiB for the resamples, over half the available memory "
                                 f"({available / 2**30:.1f} GiB); use at most "
                                 f"{int(available / 2 // (n_patients * 16))} resamples")
        if keep_maps:
            need = maps_bytes(len(samples), image_size, args.map_dtype)
            if args.save_maps:
                disk_kept += need
            elif need > ram_budget_gb(args) * 2**30:  # streamed to a temp folder (maps_dir_for)
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
        check_before_work(args, save_path, listed, image_size, keep_maps)
    if args.bootstrap:
        logger.info(f"bootstrap: {args.bootstrap} resamples of patients, seed {args.bootstrap_seed}")
    run = RunResults(args, checkpoint, started, len(names))
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
        decision = stored or (fitted_decision(args, model, root, name, support, device, logger, where)
                              if want_image else None)
        maps_dir = (maps_dir_for(args, len(dataset), image_size, name, save_path, logger)
                    if keep_maps and where.is_main else None)
        try:
            predictions = predict(model, loader, device, args.precision, keep_maps=keep_maps, desc=name,
                                  map_dtype=args.map_dtype, maps_dir=maps_dir, where=where)
            if predictions is None:  # not process 0: its share is scored and sent
                continue
            values, patient_values, per_class, described = evaluate_dataset(args, name, root, predictions, want_pixel,
                                                                            want_image, decision, logger)
            if want_pixel and not predictions.has_masks:
                logger.info(f"{name}: no masks for abnormal images, pixel metrics skipped")
            run.add(name, predictions, values, patient_values, per_class, described)
            run.write(save_path, logger)  # what is done is kept before the optional extras
            panels = [(f"{name} {level}: Brier {figures[prefix + 'brier']:.3f}, ECE {figures[prefix + 'ece']:.3f}",
                       level, part["reliability"]) for level, part, figures, prefix in
                      (("images", described or {}, values, ""),
                       ("patients", (described or {}).get("patients") or {}, patient_values, "patient_"))
                      if part.get("reliability")]
            if panels:
                atomic_write_bytes(save_path / RELIABILITY.format(name), figure_bytes(reliability_figure(panels)))
            if args.visualize > 0:
                write_visuals(save_path / "visualization", name, dataset, predictions, args.visualize)
                logger.info(f"{name}: overlays and ROC/PRO curves written to {save_path / 'visualization' / name}")
            if args.save_maps:
                save_maps(save_path / "maps", name, predictions)
                logger.info(f"{name}: maps written to {save_path / 'maps'} (maps_io.load_maps)")
        finally:
            if maps_dir is not None:
                shutil.rmtree(maps_dir, ignore_errors=True)
    if not where.is_main:
        return {}
    return run.summary


class RunResults:
    """The figures of the datasets evaluated so far and the results files they make."""

    def __init__(self, args: argparse.Namespace, checkpoint: dict | None, started: float, n_datasets: int) -> None:
        self.args, self.checkpoint, self.started, self.n_datasets = args, checkpoint, started, n_datasets
        self.results: dict[str, dict] = {}
        self.patient_results: dict[str, dict] = {}
        self.calibration: dict[str, dict] = {}  # per dataset: operating point, calibration, reliability bins
        self.support_sources: dict[str, str] = {}
        self.score_rows = [["dataset", "path", "label", "score"]]
        self.summary: dict = {}

    def add(self, name: str, predictions: Predictions, values: dict, patient_values: dict | None,
            per_class: dict, described: dict | None = None) -> None:
        values.update(n_images=len(predictions.labels), n_abnormal=int(predictions.labels.sum()))
        if per_class:
            values["classes"] = per_class
        self.results[name] = values
        if patient_values is not None:
            self.patient_results[name] = patient_values
        if described is not None:
            self.calibration[name] = described
        self.score_rows += [[name, path, int(label), f"{score:.6f}"]
                            for path, label, score in zip(predictions.paths, predictions.labels, predictions.scores)]

    def write(self, save_path: Path, logger) -> None:
        """Write the results files of the datasets so far as one unit (``write_result_files``)."""
        args, results, patient_results = self.args, self.results, self.patient_results
        complete = len(results) == self.n_datasets
        headers = ["dataset"] + [title for _, title in table_columns()]
        rows = format_table(results)
        aupro_note = "AUPRO: FPR<=0.3, /0.3" if args.aupro == "standard" else "AUPRO: legacy 200-threshold variant"
        interval_note = (f"; [95% interval over {args.bootstrap} patient resamples, seed {args.bootstrap_seed}]"
                         if args.bootstrap else "")
        if complete:
            logger.info(f"\n{pipe_table(rows, headers)}\n({aupro_note}; values x100{interval_note})")
        files = {"results.csv": csv_text(csv_rows(results))}
        if patient_results:
            shown = {f"{name} ({v['n_patients']} patients, {v['n_abnormal']} abnormal)": v
                     for name, v in patient_results.items()}
            patient_table = pipe_table(format_table(shown, patient_columns())[:-1],
                                       ["dataset"] + [title for _, title in patient_columns()])
            if complete:
                logger.info(f"\npatient level (a patient is abnormal if any slice is; score: max over its slices)\n"
                            f"{patient_table}")
            files["results_patient.csv"] = csv_text(csv_rows(patient_results, patient_columns()))
        if self.calibration:
            calibrated = {}
            for name, described in self.calibration.items():
                calibrated[name] = results[name]
                if name in patient_results:
                    calibrated[f"{name} patients"] = {key[8:]: value for key, value in patient_results[name].items()
                                                        if key.startswith("patient_")}
            files["results_calibration.csv"] = csv_text(csv_rows(calibrated, CALIBRATION_COLUMNS, mean_row=False))
            if complete:
                notes = "\n".join(f"{name}: probabilities {d['calibration']}; decisions at {d['operating_point']}, "
                                  f"score >= {d['threshold']:.6g}" if d["threshold"] is not None else
                                  f"{name}: probabilities {d['calibration']}; no operating point"
                                  for name, d in self.calibration.items())
                logger.info("\ncalibration and decisions (patients: their slices' maximum score, calibrated and "
                            "thresholded on patients)\n" + pipe_table(
                                format_table(calibrated, CALIBRATION_COLUMNS, mean_row=False),
                                ["dataset"] + [title for _, title in CALIBRATION_COLUMNS]) + f"\n{notes}")
        per_class = {f"{name}/{class_name}": class_values for name, values in results.items()
                     for class_name, class_values in values.get("classes", {}).items()}
        if per_class:
            files["results_per_class.csv"] = csv_text(csv_rows(per_class, first="dataset/class"))
        files["scores.csv"] = csv_text(self.score_rows)
        checkpoint = self.checkpoint
        self.summary = {
            "datasets": results,
            "patients": patient_results,
            "complete": complete,  # false: a failure stopped the run before its last dataset
            "aupro": args.aupro,
            "map_dtype": args.map_dtype,
            "bootstrap": {"replicates": args.bootstrap, "seed": args.bootstrap_seed, "unit": "patient",
                          "interval": "95% percentile"} if args.bootstrap else None,
            "support_files": self.support_sources,
            "calibration": self.calibration,
            # few-shot scores and maps are the memory bank's z values (CLIP/memory_bank.py), on another
            # scale than the checkpoint's threshold, which was chosen on probabilities without a bank
            "score_scale": "z" if args.k_shot else "probability",
            "args": vars(args),
            "checkpoint": None if checkpoint is None else {
                "path": os.path.abspath(args.checkpoint_path), "epoch": checkpoint.get("epoch"),
                "config": checkpoint["config"], "threshold": None if args.k_shot else checkpoint.get("threshold")},
            "versions": versions(),
            "seconds": round(time.time() - self.started, 2),
        }
        files["results.json"] = strict_json(self.summary) + "\n"  # undefined metrics as null
        write_result_files(save_path, files, stale=RESULT_FILES)  # all or nothing: a killed run leaves no manifest
        logger.info(f"results {'' if complete else 'so far '}written to {save_path} ({', '.join(files)}, {MANIFEST})")


if __name__ == "__main__":
    run_cli(main)
