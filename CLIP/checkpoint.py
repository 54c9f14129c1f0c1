"""MedVMAD checkpoints: trainable parameters + the config that rebuilds the model + versions.

A checkpoint is a plain dict of tensors, numbers and strings, so ``torch.load(weights_only=True)``
reads it. The frozen CLIP weights are not stored: ``config.backbone`` names where they come from
(``--pretrained`` can point somewhere else when the weights file has moved).
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import torch

from CLIP.MedVMAD import MedVMAD, MedVMADConfig, check_config, upgrade_config
from CLIP.backbone import BackboneConfig
from CLIP.factory import check_memory, reads_weights_file
from utils import InputError, atomic_torch_save, versions

FORMAT = "medvmad-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, model: MedVMAD, **extra: Any) -> None:
    """Atomically write the model's trainable state and config, plus ``extra`` entries."""
    payload = {"format": FORMAT, "config": model.config.to_dict(), "trainable": model.trainable_state_dict(),
               "versions": versions()}
    payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint_path") -> dict[str, Any]:
    """Read and check a checkpoint dict with ``weights_only=True``; anything else is a clear
    ``InputError`` that names ``flag`` (the option the path came from).

    Checked: the format marker, ``trainable`` (finite tensors by name) and ``config`` (see
    ``checkpoint_config``), so a caller can index them without a ``KeyError``.
    """
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise InputError(f"{flag} {path}: not a readable checkpoint ({type(error).__name__}); "
                         f"give a best.pth or epoch_<n>.pth written by train.py") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{flag} {path}: not a MedVMAD checkpoint (no '{FORMAT}' marker)")
    trainable = payload.get("trainable")
    if not isinstance(trainable, dict) or not all(isinstance(name, str) and isinstance(value, torch.Tensor)
                                                  for name, value in trainable.items()):
        raise InputError(f"{flag} {path}: holds no 'trainable' tensors by name; the file is damaged")
    broken = [name for name, value in trainable.items() if not torch.isfinite(value).all()]
    if broken:
        raise InputError(f"{flag} {path}: {len(broken)} tensor(s) hold NaN or inf (e.g. {broken[0]}); "
                         f"the run diverged before this file was written")
    checkpoint_config(payload, path, flag)
    return payload


def _fields(values: Any, schema: type, where: str, required: tuple[str, ...]) -> dict:
    """``values`` as a dict of ``schema``'s fields: unknown keys and missing ``required`` ones refused."""
    if not isinstance(values, dict):
        raise ValueError(f"'{where}' is {type(values).__name__}, not a dict")
    known = {field.name for field in fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown '{where}' key(s) {unknown} (written by another MedVMAD version?)")
    missing = [key for key in required if key not in values]
    if missing:
        raise ValueError(f"'{where}' lacks {missing}")
    return values


def checkpoint_config(payload: dict[str, Any], path: str | os.PathLike,
                      flag: str = "--checkpoint_path") -> MedVMADConfig:
    """The model config stored in a checkpoint, checked before anything is built. A key this
    version does not know is refused; a missing optional key takes its default (older files keep
    loading); the backbone's name, weights and image size are required. Every value must pass its
    flag's rule (``check_config``: no string where a number belongs, no negative count, integer
    layers), and the backbone must fit in memory at the stored image size."""
    try:
        stored = payload.get("config")
        values = dict(_fields(upgrade_config(stored) if isinstance(stored, dict) else stored,
                              MedVMADConfig, "config", ("backbone",)))
        values["backbone"] = _fields(values["backbone"], BackboneConfig, "config.backbone",
                                     ("model_name", "pretrained", "image_size"))
        config = MedVMADConfig.from_dict(values)
        try:
            check_config(config)
        except ValueError as error:
            raise ValueError(f"config.{error}") from None
        try:
            check_memory(config.backbone)
        except ValueError as error:
            raise ValueError(f"config.backbone.image_size {config.backbone.image_size}: {error}") from None
        return config
    except (ValueError, TypeError) as error:
        raise InputError(f"{flag} {path}: bad model config: {error}") from None


def refuse_stored_sources(config: MedVMADConfig, path: str | os.PathLike, pretrained: str | None,
                          model_name: str | None = None, flag: str = "--checkpoint_path") -> None:
    """A checkpoint is data, and a path it holds could be any file: a weights file its config names
    (rather than a tag or ``none``) is read only when the user names one (``pretrained``), and a
    ``local-dir:`` folder or ``hf-hub:`` repo it names only when the user names it (``model_name``).
    An ``InputError`` that says how to load it."""
    if pretrained is None and reads_weights_file(config.backbone):
        stored = config.backbone.pretrained
        raise InputError(f"{flag} {path}: its backbone weights are the file {stored}, which is not read because "
                         f"a checkpoint names it; to load that file, pass --pretrained {stored}")
    stored = config.backbone.model_name
    if model_name is not None and model_name != stored:
        raise InputError(f"{flag} {path} was trained on {stored}, not --model_name {model_name}")
    if model_name is None and stored.startswith(("local-dir:", "hf-hub:")):
        raise InputError(f"{flag} {path}: its backbone is {stored}, which is not read (or downloaded) because a "
                         f"checkpoint names it; to load it, pass --model_name {stored}")


def load_model(path: str | os.PathLike, device: torch.device, pretrained: str | None = None,
               image_size: int | None = None, sigma: float | None = None, flag: str = "--checkpoint_path",
               model_name: str | None = None, **backbone_overrides: Any) -> tuple[MedVMAD, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, on ``device``.

    ``pretrained`` overrides where the backbone weights are read from, ``image_size`` and
    ``sigma`` override the evaluation resolution and smoothing; ``backbone_overrides`` (e.g.
    ``image_mean``) replace other ``BackboneConfig`` fields when not None. Errors name ``flag``.

    A weights file, ``local-dir:`` folder or ``hf-hub:`` repo that the checkpoint names is read
    only when ``pretrained`` or ``model_name`` (the user's) names one (``refuse_stored_sources``).
    """
    payload = read_checkpoint(path, flag)
    config = checkpoint_config(payload, path, flag)
    refuse_stored_sources(config, path, pretrained, model_name, flag)
    overrides = dict(backbone_overrides, pretrained=pretrained, image_size=image_size)
    for key, value in overrides.items():
        if value is not None:
            setattr(config.backbone, key, value)
    if sigma is not None:
        config.sigma = sigma
    try:
        model = MedVMAD(config)
        model.load_trainable_state_dict(payload["trainable"])
    except (ValueError, TypeError, InputError) as error:  # what the stored config asks for names the file
        raise InputError(f"{flag} {path}: {error}") from None
    return model.to(device), payload
