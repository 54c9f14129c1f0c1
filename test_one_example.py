"""Score one image, DICOM file, NIfTI volume, or a folder of them, and show where the anomaly is.

    python test_one_example.py --image_path scan.nii.gz --checkpoint_path checkpoint/brain/best.pth

For each input it writes, in --save_path (default results/one_example), <name>.png (titled panels
image | anomaly map | overlay, the score above, a colour bar of the fixed 0-1 heat scale),
<name>.npy (the map, float16, at the input's size; [S,H,W] for a volume) and one JSON line
in predictions.jsonl: path, score, its calibrated probability, decision, threshold and operating
point (and per-slice scores for a volume, whose score is the maximum over slices, plus a montage
of its most anomalous slices). Probability and threshold are the checkpoint's (evaluation/calibration.py:
fitted and chosen on its validation images, at --operating_point; a volume is a patient, with
the patients' calibration and threshold); --threshold overrides the thresholds.
An input's files and its line are written as one unit: a line names only files written whole, and
no file is left without its line, even after a full disk or a kill.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import logging
import os
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

from cli import add_model_args, add_runtime_args, build_model
from CLIP.MedVMAD import MedVMAD
from dataset import preprocess
from evaluation.calibration import Decision, checkpoint_decision, operating_point_flag
from scans.files import MAX_VOXELS, Scan
from scans.framing import WINDOW_PRESETS, Framing, index_ranges
from scans.volumes import VOLUME_FORMATS, is_series_folder, list_inputs, read_input, write_maps
from utils import (STAGING, ArgumentParser, InputError, atomic_write_bytes, atomic_write_image, autocast, commit_staged,
                   discard_staged, finite_float, locked_folder, non_negative_int, one_line, positive_int,
                   prepare_output_dir, recover_staged, refuse_taken, resolve_device, run_cli, staging_folder,
                   strict_json, sync_file, unique_stems, unit_interval)
from visualization import montage, overlay_panel

PREDICTIONS = "predictions.jsonl"
logger = logging.getLogger("medvmad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_path", required=True, help="image, DICOM, NIfTI, or a folder of them")
    parser.add_argument("--checkpoint_path", help="trained MedVMAD checkpoint; omit for the zero-training baseline")
    parser.add_argument("--save_path", default="results/one_example",
                        help="output folder; the run prints it at the end (default: %(default)s)")
    parser.add_argument("--threshold", type=unit_interval, help="decision threshold (default: the checkpoint's)")
    parser.add_argument("--operating_point", type=operating_point_flag,
                        help="the rule that picks the threshold on the checkpoint's validation images: f1, youden, "
                             "sensitivity=X or specificity=X (default: the checkpoint's own)")
    parser.add_argument("--dataset", default="brain",
                        help="organ wording of the fixed prompt ensemble (the zero-training baseline, --variant mvfa)")
    parser.add_argument("--window", type=finite_float, nargs=2, metavar=("LOW", "HIGH"),
                        help="intensity window for DICOM/NIfTI (HU for CT)")
    parser.add_argument("--window_preset", choices=sorted(WINDOW_PRESETS), help="a named window")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2),
                        help="volume slicing axis (2: axial in RAS; default: the checkpoint's framing's, else 2)")
    parser.add_argument("--slices", type=non_negative_int, nargs=2, metavar=("FIRST", "LAST"),
                        help="volume slice range")
    parser.add_argument("--top_k", type=positive_int, default=8, help="slices in a volume's montage")
    parser.add_argument("--series_uid", help="the DICOM series to score when a folder holds several")
    parser.add_argument("--max_voxels", type=positive_int, default=MAX_VOXELS,
                        help=f"refuse an input of more voxels (pixels), from its header (default {MAX_VOXELS:,}: "
                             f"512 x 512 x 1024)")
    parser.add_argument("--volume_format", choices=sorted(VOLUME_FORMATS), default="nifti",
                        help="format of a volume's map and mask (nifti: .nii.gz, nrrd: .nrrd)")
    add_model_args(parser, checkpoint=True, features_list=False)
    add_runtime_args(parser, datasets=False)
    return parser.parse_args(argv)


def volume_framing(args: argparse.Namespace, checkpoint: dict | None) -> tuple[Framing, Framing | None]:
    """How volumes are framed: as the checkpoint's training slices were (whole slices and the
    percentile rule when it records none), with --axis and --window where given; and the framing it
    records (None when none). One warning line when the checkpoint records no framing or a flag
    contradicts the one it records."""
    stored = None if checkpoint is None else checkpoint.get("framing")
    try:
        trained = None if stored is None else Framing.from_dict(stored)
    except ValueError as error:
        raise InputError(f"--checkpoint_path {args.checkpoint_path}: {error}") from None
    window = tuple(args.window) if args.window else WINDOW_PRESETS.get(args.window_preset)
    framing = (trained or Framing()).overridden(window, args.axis)
    if checkpoint is not None and trained is None:
        logger.warning(f"--checkpoint_path {args.checkpoint_path} records no framing of its training slices; "
                       f"volumes are framed as {framing.describe()}")
    elif trained is not None and framing != trained:
        logger.warning(f"--checkpoint_path {args.checkpoint_path} was trained on {trained.describe()}; "
                       f"volumes are framed otherwise, as the flags ask: {', '.join(trained.differences(framing))}")
    if trained is not None and trained.masked:
        logger.warning(f"--checkpoint_path {args.checkpoint_path} was trained on slices of the {trained.masked} "
                       f"alone (its converter zeroed the rest with the label); a scan is scored whole, unlike them")
    return framing, trained


def build(args: argparse.Namespace, device: torch.device) -> tuple[MedVMAD, Decision, str]:
    """The model, how its scores are read (calibrated probabilities and thresholds at
    --operating_point: ``calibration.checkpoint_decision``) and where the thresholds came from;
    sets ``args.framing``, the framing volumes are read with, and ``args.trained_framing``, the
    checkpoint's (``volume_framing``)."""
    if args.operating_point and not args.checkpoint_path:
        raise InputError("--operating_point picks a threshold on a checkpoint's validation images: give "
                         "--checkpoint_path (the zero-training baseline has none; give --threshold)")
    model, checkpoint = build_model(args, device, organ=args.dataset)
    model.set_organ(args.dataset)  # the fixed prompt ensemble (baseline, mvfa) speaks of the scan's organ
    args.framing, args.trained_framing = volume_framing(args, checkpoint)
    decision = (Decision(None, None, "no operating point", chosen=False) if checkpoint is None
                else checkpoint_decision(checkpoint, args.checkpoint_path, args.operating_point))
    if args.threshold is not None:
        return model.eval(), dataclasses.replace(decision, threshold=args.threshold, patient_threshold=args.threshold,
                                                 rule=f"--threshold {args.threshold:g}", chosen=False), "--threshold"
    if decision.threshold is not None:
        return model.eval(), decision, "checkpoint"
    default = dataclasses.replace(decision, threshold=0.5, patient_threshold=0.5, rule="default 0.5",
                                  chosen=False)
    return model.eval(), default, "default 0.5 (no calibrated threshold)"


def read_one(path: str, args: argparse.Namespace, single_file: bool = False) -> Scan:
    """Read one input as the flags and ``args.framing`` (set by ``build``) say. A volume whose own
    display (a DICOM's window) frames it otherwise than the model was trained gets a warning line,
    also kept in its record."""
    scan = read_input(path, slice_range=tuple(args.slices) if args.slices else None, series_uid=args.series_uid,
                      max_voxels=args.max_voxels, single_file=single_file, framing=args.framing)
    if args.trained_framing is not None and scan.framing is not None and scan.framing != args.framing:
        warning = (f"{path}: its own display frames it otherwise than the model was trained: "
                   f"{', '.join(args.framing.differences(scan.framing))} (give --window to choose)")
        logger.warning(warning)
        scan.warnings.append(warning)
    return scan


@torch.inference_mode()
def score_slices(model: MedVMAD, slices: list[np.ndarray], device: torch.device, precision: str,
                 batch_size: int, path: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores [S] and maps (each [H,W] at its slice's own size) for RGB slices in [0,1] read from
    ``path``; a non-finite score is an ``InputError``: never a decision from a NaN."""
    size = model.config.backbone.image_size
    scores, maps = [], []
    for start in range(0, len(slices), batch_size):
        chunk = slices[start:start + batch_size]
        images = torch.stack([preprocess(image, size) for image in chunk]).to(device)
        with autocast(device, precision):
            output = model(images)
        scores.append(output.image_score.double().cpu().numpy())
        for image, heat in zip(chunk, output.anomaly_map.float().cpu().numpy()):
            maps.append(cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR))
    scores = np.concatenate(scores)
    if not np.isfinite(scores).all():
        raise InputError(f"{path}: the model gave a NaN score (are the checkpoint's weights finite?)")
    return scores, maps


def output_stem(path: str) -> str:
    name = os.path.basename(path.rstrip(os.sep))
    return name[:-7] if name.lower().endswith(".nii.gz") else os.path.splitext(name)[0]


def output_names(stem: str, volume_format: str = "nifti") -> list[str]:
    """Every file an input named ``stem`` may get: overlay, map array, and the 2-D or volume map and mask."""
    suffix = VOLUME_FORMATS[volume_format]
    return [f"{stem}.png", f"{stem}.npy", f"{stem}_map.png", f"{stem}_mask.png", f"{stem}_map{suffix}",
            f"{stem}_mask{suffix}"]


def recorded_stems(save_path: Path) -> dict[str, str]:
    """The output stem -> input (resolved path) of every record in ``save_path``'s predictions.jsonl."""
    owners = {}
    try:
        lines = (save_path / PREDICTIONS).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return owners
    for line in lines:
        try:
            record = json.loads(line)
            stem = Path(record["map_npy"]).stem if "map_npy" in record else output_stem(record["path"])
            owners[stem] = os.path.realpath(record["path"])
        except (ValueError, KeyError, TypeError):
            continue
    return owners


def output_stems(paths: list[str], save_path: Path) -> list[str]:
    """A name for each input's outputs: ``unique_stems`` (``x.png`` and ``x.jpg`` in one folder do not
    share files), moved on to ``<stem>-2``, ``-3``, ... where an earlier record in the folder names
    that stem's files for another input: one set of files describes one input."""
    owners, chosen = recorded_stems(save_path), []
    for path, stem in zip(paths, unique_stems(paths)):
        base, number, source = stem, 1, os.path.realpath(path)
        while owners.get(stem, source) != source or stem in chosen:
            number += 1
            stem = f"{base}-{number}"
        chosen.append(stem)
    return chosen


def check_written(path: Path, shown_as: Path) -> None:
    """A map or mask file that a library wrote by its path: whole (a PNG decodes; a gzip stream,
    such as a .nii.gz, ends with its checksum; SimpleITK writes a short .nii.gz without a word on
    a full disk) and synced; ``shown_as`` is its name in the output folder."""
    problem = None
    if not path.is_file() or path.stat().st_size == 0:
        problem = "it was not written"
    elif path.suffix == ".png" and cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
        problem = "it does not decode"
    elif path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 24):
                    pass
        except (OSError, EOFError, zlib.error):
            problem = "it is cut short"
    if problem:
        raise InputError(f"cannot write {shown_as}: {problem} (is the disk of {shown_as.parent} full?); "
                         f"nothing of this input was kept")
    sync_file(path)


def report(scan: Scan, scores: np.ndarray, maps: list[np.ndarray], decision: Decision, source: str,
           save_path: Path, top_k: int, volume_format: str = "nifti", stem: str | None = None) -> dict:
    """Write the overlay/montage PNG, the map (.npy) and the map and mask files of one input, and
    its JSON record in ``save_path``/predictions.jsonl, as one unit (``utils.commit_staged``, under
    the folder's lock); return the record. ``stem`` names the files (default: the input's).
    A 2-D input is an image; a volume a patient, read by its maximum slice score with the
    ``decision``'s patient calibration and threshold (its slices at the image threshold)."""
    stem = stem or output_stem(scan.path)
    staging = staging_folder(save_path)
    try:
        to_uint8 = lambda image: (image * 255).round().astype(np.uint8)  # noqa: E731
        shown = [scan.unframe(heat) for heat in maps]  # on the input's own slices
        array = io.BytesIO()
        np.save(array, np.stack(shown).astype(np.float16) if scan.slice_indices else shown[0].astype(np.float16))
        atomic_write_bytes(staging / f"{stem}.npy", array.getvalue())
        volume = scan.slice_indices is not None
        threshold = decision.threshold
        record = {"path": scan.path, "score": float(scores.max()),
                  "threshold": decision.patient_threshold if volume else threshold, "threshold_from": source}
        record["decision"] = "anomalous" if record["score"] >= record["threshold"] else "normal"
        record.update(probability=decision.probability(record["score"], patient=volume),
                      calibration=decision.calibration(patient=volume),
                      operating_point=decision.operating_point(patient=volume))
        stated = "uncalibrated" if record["probability"] is None else f"probability {record['probability']:.2f}"
        caption = f"score {record['score']:.3f} ({stated}) {record['decision']}"
        try:
            written = write_maps(scan, shown, threshold, staging, stem, volume_format)
        except (RuntimeError, OSError) as error:  # SimpleITK's writers raise RuntimeError
            raise InputError(f"cannot write the map of {scan.path} in {save_path} "
                             f"({one_line(str(error))[:200]})") from None
        for path in written.values():
            check_written(Path(path), save_path / Path(path).name)
        record.update({key: str(save_path / Path(path).name) for key, path in written.items()},
                      overlay=str(save_path / f"{stem}.png"), map_npy=str(save_path / f"{stem}.npy"),
                      warnings=getattr(scan, "warnings", []))
        if scan.slice_indices is None:
            atomic_write_image(staging / f"{stem}.png", overlay_panel(
                to_uint8(scan.slices[0]), maps[0], 0.0, 1.0, text=caption))
        else:
            order = np.argsort(-scores, kind="stable")[:top_k]
            panels = [overlay_panel(to_uint8(scan.slices[i]), maps[i], 0.0, 1.0,
                                    text=f"slice {scan.slice_indices[i]} score {scores[i]:.3f}") for i in order]
            atomic_write_image(staging / f"{stem}.png", montage(panels, columns=1))
            record.update(
                slice_threshold=threshold,
                slice_scores={str(index): float(score) for index, score in zip(scan.slice_indices, scores)},
                most_anomalous_slice=int(scan.slice_indices[int(order[0])]),
                slices_over_threshold=[int(i) for i, s in zip(scan.slice_indices, scores) if s >= threshold],
                slices_not_scored=index_ranges(sorted(set(range(scan.slice_count)) - set(scan.slice_indices))),
                framing=scan.framing.to_dict())
    except Exception:  # nothing of this input is kept (a kill leaves it to recover_staged)
        discard_staged(save_path)
        raise
    commit_staged(save_path, PREDICTIONS, strict_json(record, indent=None))
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.window and args.window_preset:
        raise InputError("give --window or --window_preset, not both")
    save_path = prepare_output_dir(args.save_path, files=(PREDICTIONS, ".lock"), folders=(STAGING,))
    if is_series_folder(args.image_path):  # a DICOM series: one volume
        paths, in_folder = [args.image_path], False
    elif os.path.isdir(args.image_path):
        paths, in_folder = list_inputs(args.image_path), True
        if not paths:
            raise InputError(f"{args.image_path}: no image, DICOM or NIfTI files in this folder")
    elif os.path.isfile(args.image_path):
        paths, in_folder = [args.image_path], False
    else:
        raise InputError(f"--image_path {args.image_path}: no such file or folder")

    records = []
    with locked_folder(save_path):  # one run at a time writes the folder's files and records
        recover_staged(save_path, PREDICTIONS)  # the input a killed run was committing: finished or dropped
        stems = output_stems(paths, save_path)
        refuse_taken(save_path, [name for stem in stems for name in output_names(stem, args.volume_format)])
        device = resolve_device(args.device)
        model, decision, source = build(args, device)
        for path, stem in zip(paths, stems):
            try:
                scan = read_one(path, args)
            except InputError as error:
                if not in_folder:
                    raise
                print(f"skipped: {one_line(str(error))}", file=sys.stderr)
                continue
            scores, maps = score_slices(model, scan.slices, device, args.precision, args.batch_size, path)
            record = report(scan, scores, maps, decision, source, save_path, args.top_k, args.volume_format, stem)
            print(json.dumps({k: record[k] for k in ("path", "score", "probability", "decision", "operating_point")}))
            records.append(record)
    if not records:
        raise InputError(f"{args.image_path}: no file could be read")
    print(f"outputs written to {save_path} (per input: <name>.png overlay, <name>.npy map, map and mask files; "
          f"{PREDICTIONS}: a line per input)", file=sys.stderr)
    return records


if __name__ == "__main__":
    run_cli(main)
