"""test.py's results: the figures of one dataset from its predictions (metrics, bootstrap intervals,
patient level, per-class metrics, calibration and decisions) and the results files of a run
(results.json, results.csv, results_patient.csv, results_per_class.csv, results_calibration.csv,
scores.csv and the manifest), written together as one unit."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import bootstrap, metrics
from evaluation.calibration import Decision, assess
from evaluation.predict import Predictions
from evaluation.tables import (CALIBRATION_COLUMNS, csv_rows, csv_text, format_table, patient_columns, pipe_table,
                               table_columns)
from utils import MANIFEST, strict_json, versions, write_result_files

# Written together, manifest last (utils.write_result_files); checked free before the run.
RESULT_FILES = ("results.json", "results.csv", "results_patient.csv", "results_per_class.csv",
                "results_calibration.csv", "scores.csv", MANIFEST)


@dataclass(frozen=True)
class EvaluationSettings:
    """What the figures and results files depend on beyond the predictions: test.py builds it
    once from its command line (``evaluation_settings``)."""
    split: str  # the split evaluated: its meta.json entries give the per-class metrics
    aupro: str  # "standard" or "legacy": the pixel_aupro reported (intervals are of the standard only)
    bootstrap: int  # patient resamples of the 95% intervals; 0: no intervals
    bootstrap_seed: int  # seed of the resamples (``bootstrap.resample_counts``)
    map_dtype: str  # the precision the maps were stored at, "float64", "float32" or "float16"
    k_shot: int  # support images of the few-shot memory bank; 0: none (scores are probabilities)
    checkpoint_path: str | None  # the checkpoint evaluated; None: the zero-training baseline
    arguments: dict[str, Any] = field(default_factory=dict, compare=False)  # the command line, results.json "args"


def evaluate_dataset(settings: EvaluationSettings, name: str, root: str, predictions: Predictions,
                     want_pixel: bool, want_image: bool, decision: Decision | None,
                     logger) -> tuple[dict, dict | None, dict, dict | None]:
    """Metrics of one dataset's ``predictions`` (labels, scores [N]; maps, masks [N,H,W] for pixel
    metrics; with ``<metric>_ci`` intervals when ``settings.bootstrap``), its patient-level figures
    (None without case ids), its per-class metrics ({} unless meta.json under ``root`` has several
    classes in ``settings.split``) and what its ``decision`` gives: Brier, ECE and the four rates at
    the operating point among the metrics (image and patient level), and their description with
    the reliability bins (None without image metrics). Ranking metrics are always those of the
    scores. ``want_pixel``/``want_image``: the metric levels asked for."""
    values = bootstrap.quietly(metrics.compute_metrics, predictions, want_pixel, want_image, settings.aupro)
    bootstrap.note_undefined(logger, name, {name: (values, predictions.labels)})
    groups, patients = bootstrap.groups_of(predictions.paths)
    counts = (bootstrap.resample_counts(len(patients), settings.bootstrap, settings.bootstrap_seed)
              if settings.bootstrap else None)
    if settings.bootstrap:
        replicates = {}
        if want_image:
            replicates.update(bootstrap.image_replicates(predictions.labels, predictions.scores, groups, counts))
        if want_pixel and predictions.has_masks and predictions.maps is not None:  # as compute_metrics
            histograms = bootstrap.group_histograms(predictions.masks, predictions.maps, groups, len(patients))
            replicates.update(bootstrap.pixel_replicates(histograms, counts))
            replicates.update(bootstrap.own_replicates(predictions.masks, predictions.maps, groups, counts,
                                                       needs_masks=True))
            if settings.aupro == "legacy":  # intervals are of the standard AUPRO only
                del replicates["pixel_aupro"]
        values.update({f"{key}_ci": bootstrap.interval(samples) for key, samples in replicates.items()})
    patient_values, own = None, np.arange(len(patients))
    labels, scores = bootstrap.patient_level(predictions.labels, predictions.scores, groups, len(patients))
    if want_image and len(patients) < len(predictions.paths):
        patient_values = {f"patient_{key[6:]}": value
                          for key, value in bootstrap.quietly(metrics.image_metrics, labels, scores).items()}
        bootstrap.note_undefined(logger, f"{name} patient level", {name: (patient_values, labels)}, "patient")
        patient_values.update(n_patients=len(patients), n_abnormal=int(labels.sum()))
        if settings.bootstrap:
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
    classes = bootstrap.meta_classes(root, settings.split)
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
            per_class[class_name] = bootstrap.quietly(metrics.compute_metrics, subset, want_pixel, want_image,
                                                      settings.aupro)
            labelled[class_name] = (per_class[class_name], subset.labels)
        bootstrap.note_undefined(logger, f"{name} per class", labelled)
        logger.info(f"\n{name} per class\n" + pipe_table(format_table(per_class),
                                                        ["class"] + [title for _, title in table_columns()]))
    return values, patient_values, per_class, described


class RunResults:
    """The figures of the datasets evaluated so far and the results files they make: ``settings``
    of the run, its ``checkpoint`` (as read: config, epoch, threshold; None for the baseline), when
    it ``started`` (time.time()) and how many datasets it evaluates."""

    def __init__(self, settings: EvaluationSettings, checkpoint: dict | None, started: float,
                 n_datasets: int) -> None:
        self.settings, self.checkpoint, self.started, self.n_datasets = settings, checkpoint, started, n_datasets
        self.results: dict[str, dict] = {}
        self.patient_results: dict[str, dict] = {}
        self.calibration: dict[str, dict] = {}  # per dataset: operating point, calibration, reliability bins
        self.support_sources: dict[str, str] = {}
        self.score_rows = [["dataset", "path", "label", "score"]]
        self.summary: dict = {}

    def add(self, name: str, predictions: Predictions, values: dict, patient_values: dict | None,
            per_class: dict, described: dict | None = None) -> None:
        """Keep dataset ``name``'s figures (``evaluate_dataset``'s four results) and its scores [N]."""
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
        settings, results, patient_results = self.settings, self.results, self.patient_results
        complete = len(results) == self.n_datasets
        headers = ["dataset"] + [title for _, title in table_columns()]
        rows = format_table(results)
        aupro_note = ("AUPRO: FPR<=0.3, /0.3" if settings.aupro == "standard" else
                      "AUPRO: legacy 200-threshold variant")
        interval_note = (f"; [95% interval over {settings.bootstrap} patient resamples, seed {settings.bootstrap_seed}]"
                         if settings.bootstrap else "")
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
            "aupro": settings.aupro,
            "map_dtype": settings.map_dtype,
            "bootstrap": {"replicates": settings.bootstrap, "seed": settings.bootstrap_seed, "unit": "patient",
                          "interval": "95% percentile"} if settings.bootstrap else None,
            "support_files": self.support_sources,
            "calibration": self.calibration,
            # few-shot scores and maps are the memory bank's z values (CLIP/memory_bank.py), on another
            # scale than the checkpoint's threshold, which was chosen on probabilities without a bank
            "score_scale": "z" if settings.k_shot else "probability",
            "args": settings.arguments,
            "checkpoint": None if checkpoint is None else {
                "path": os.path.abspath(settings.checkpoint_path), "epoch": checkpoint.get("epoch"),
                "config": checkpoint["config"], "threshold": None if settings.k_shot else checkpoint.get("threshold")},
            "versions": versions(),
            "seconds": round(time.time() - self.started, 2),
        }
        files["results.json"] = strict_json(self.summary) + "\n"  # undefined metrics as null
        write_result_files(save_path, files, stale=RESULT_FILES)  # all or nothing: a killed run leaves no manifest
        logger.info(f"results {'' if complete else 'so far '}written to {save_path} ({', '.join(files)}, {MANIFEST})")
