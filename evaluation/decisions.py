"""A test run's decisions when its checkpoint stores none: the calibration and operating point fitted
on images the run never tests. Few-shot: its support set (normal images scored against the bank
without them, ``fewshot.support_predictions``); the zero-training baseline: the valid split. Never
the evaluated split: the run stays uncalibrated, with a warning, when that is the only choice."""
from __future__ import annotations

import logging

import torch

from CLIP.MedVMAD import MedVMAD
from dataset import MedicalDataset, Sample, list_samples, patient_of
from distributed import SINGLE, Distributed, sharded_loader
from evaluation.calibration import Calibration, Decision, OperatingPoint
from evaluation.fewshot import support_predictions
from evaluation.predict import predict
from utils import InputError


def fitted_decision(model: MedVMAD, root: str, name: str, support: list[Sample], point: OperatingPoint,
                    split: str, k_shot: int, device: torch.device, batch_size: int, num_workers: int,
                    precision: str, skip_bad: bool, logger: logging.Logger,
                    where: Distributed = SINGLE) -> Decision | None:
    """The calibration and operating point of dataset ``name`` (at ``root``, evaluated on ``split``)
    fitted on images the run never tests: with ``k_shot`` its ``support`` set, else the valid split
    (scored with ``batch_size``, ``num_workers``, ``precision``; ``skip_bad`` as the test split).
    Every process scores its share; the Decision on process 0 (uncalibrated when nothing unseen
    is there to fit on), None on the others."""
    uncalibrated = Decision(None, None, "no operating point", chosen=False) if where.is_main else None
    if k_shot and split == "valid":
        logger.warning(f"{name}: uncalibrated: --split valid holds the support images the few-shot run is "
                       f"calibrated on")
        return uncalibrated
    if k_shot:
        images, scored = "support images", support_predictions(model, support, device, batch_size, precision, where)
    else:
        images, samples = "valid split images", []
        if split == "valid":
            logger.warning(f"{name}: uncalibrated: --split valid is the split the baseline is calibrated on")
        else:
            try:
                samples = list_samples(root, "valid")
            except InputError as error:
                logger.warning(f"{name}: uncalibrated: no valid split to calibrate on ({error})")
        if not samples:
            return uncalibrated
        loader = sharded_loader(MedicalDataset(samples, model.config.backbone.image_size, skip_bad=skip_bad),
                                batch_size, num_workers, where)
        predictions = predict(model, loader, device, precision, keep_maps=False, desc=f"{name} valid", where=where)
        scored = None if predictions is None else (predictions.scores, predictions.labels, predictions.paths)
    if scored is None:
        return None
    scores, labels, paths = scored
    decision = Decision.chosen_by(Calibration.fitted(scores, labels, [patient_of(p) for p in paths], images),
                                  point)
    logger.info(f"{name}: probabilities {decision.calibration()}; decisions at {decision.operating_point()}")
    return decision
