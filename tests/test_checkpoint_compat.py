"""Checkpoints written by earlier versions keep loading and scoring the same.

``fixtures/format1_tiny.pth`` was saved on 2026-11-29 by the code of that day (format
``medvmad-checkpoint-1``, config key ``dataset`` for the organ wording) from the tiny random
backbone with seeded trainable weights; ``format1_tiny_expected.npz`` holds what that model output
for two seeded images. Any later change to the model code must still rebuild it exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from CLIP.checkpoint import load_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_format1_checkpoint_loads_and_scores_as_when_saved() -> None:
    model, payload = load_model(FIXTURES / "format1_tiny.pth", torch.device("cpu"))
    assert payload["format"] == "medvmad-checkpoint-1" and payload["epoch"] == 3
    assert model.config.features_list == [1, 2, 3, 4] and model.config.variant == "medvmad"
    expected = np.load(FIXTURES / "format1_tiny_expected.npz")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        output = model(images)
    np.testing.assert_allclose(output.image_score.numpy(), expected["image_score"], atol=1e-5)
    np.testing.assert_allclose(output.anomaly_map.numpy(), expected["anomaly_map"], atol=1e-5)
