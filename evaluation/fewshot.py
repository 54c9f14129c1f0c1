"""The few-shot support set at test time: the model's memory bank built from its normal images
(x11 augmented), and its images scored for calibration (normal ones left out of the bank)."""
from __future__ import annotations

import numpy as np
import torch

from CLIP.MedVMAD import MedVMAD
from dataset import MedicalDataset, Sample, augment_support
from distributed import SINGLE, Distributed, sharded_loader
from evaluation.predict import predict
from utils import InputError


def memory_bank_from_support(model: MedVMAD, support: list[Sample], seed: int, device: torch.device,
                             batch_size: int = 8) -> tuple[int, int]:
    """Build the model's few-shot bank from the normal images of ``support``, each with 10 seeded
    augmentations (MVFA's x11). Returns (normal images, copies of each)."""
    normal = MedicalDataset([s for s in support if s.label == 0], model.config.backbone.image_size)
    if len(normal) < 2:
        raise InputError("the memory bank needs at least 2 normal support images (--k_shot >= 2)")
    images = torch.stack([normal[i]["image"] for i in range(len(normal))])
    augmented, _ = augment_support(images, torch.zeros(images.shape[0], *images.shape[-2:]), seed=seed)
    copies = augmented.shape[0] // len(normal)
    groups = torch.arange(len(normal)).repeat(copies)  # augment_support: row i comes from image i % K
    model.build_memory_bank(augmented.to(device), groups.to(device), batch_size)
    return len(normal), copies


def support_predictions(model: MedVMAD, support: list[Sample], device: torch.device, batch_size: int = 8,
                        precision: str = "fp32", where: Distributed = SINGLE,
                        ) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Scores [S] (float64), labels [S] and paths of the few-shot support images, with the model's
    bank built from the normal ones (``memory_bank_from_support``): each normal image scored against
    the bank without it (``MemoryBank.left_out_scores``), each abnormal one as a test image is.
    Every process scores its share of the abnormal ones; process 0 returns the lot, the others None."""
    normal = [sample for sample in support if sample.label == 0]
    abnormal = [sample for sample in support if sample.label == 1]
    scores = np.zeros(0)
    if abnormal:
        loader = sharded_loader(MedicalDataset(abnormal, model.config.backbone.image_size), batch_size, 0, where)
        scored = predict(model, loader, device, precision, keep_maps=False, desc="support", where=where)
        scores = None if scored is None else scored.scores
    if not where.is_main:
        return None
    left_out = model.memory_bank.left_out_scores(model.config.fewshot_weight).cpu().numpy()
    return (np.concatenate([left_out, scores]), np.array([0] * len(normal) + [1] * len(abnormal)),
            [sample.image_path for sample in normal + abnormal])
