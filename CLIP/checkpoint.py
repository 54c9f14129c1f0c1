"""MedVMAD checkpoints: trainable parameters + the config that rebuilds the model + versions.

A checkpoint is a plain dict of tensors, numbers and strings, so ``torch.load(weights_only=True)``
reads it. The frozen CLIP weights are not stored: ``config.backbone`` names where they come from
(``--pretrained`` can point somewhere else when the weights file has moved).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from utils import InputError, atomic_torch_save, versions

FORMAT = "medvmad-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, model: MedVMAD, **extra: Any) -> None:
    """Atomically write the model's trainable state and config, plus ``extra`` entries."""
    payload = {"format": FORMAT, "config": model.config.to_dict(), "trainable": model.trainable_state_dict(),
               "versions": versions()}
    payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True``; anything else is a clear ``InputError``."""
    if not os.path.isfile(path):
        raise InputError(f"--checkpoint_path {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"--checkpoint_path {path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"--checkpoint_path {path}: not a MedVMAD checkpoint (no '{FORMAT}' marker)")
    return payload


def load_model(path: str | os.PathLike, device: torch.device, pretrained: str | None = None,
               image_size: int | None = None, sigma: float | None = None,
               **backbone_overrides: Any) -> tuple[MedVMAD, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, on ``device``.

    ``pretrained`` overrides where the backbone weights are read from, ``image_size`` and
    ``sigma`` override the evaluation resolution and smoothing; ``backbone_overrides`` (e.g.
    ``image_mean``) replace other ``BackboneConfig`` fields when not None.
    """
    payload = read_checkpoint(path)
    config = MedVMADConfig.from_dict(payload["config"])
    overrides = dict(backbone_overrides, pretrained=pretrained, image_size=image_size)
    for key, value in overrides.items():
        if value is not None:
            setattr(config.backbone, key, value)
    if sigma is not None:
        config.sigma = sigma
    model = MedVMAD(config)
    try:
        model.load_trainable_state_dict(payload["trainable"])
    except ValueError as error:
        raise InputError(f"--checkpoint_path {path}: {error}") from None
    return model.to(device), payload
