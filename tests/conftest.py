"""Shared fixtures: the tiny offline model everything tests with."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from CLIP.MedVMAD import MedVMAD, MedVMADConfig  # noqa: E402
from CLIP.backbone import BackboneConfig  # noqa: E402

TINY_SIZE = 64  # 4x4 patches of 16 px: fast, and large enough to hold a lesion


def tiny_config(**overrides) -> MedVMADConfig:
    """A MedVMAD config on the random-weight ``tiny`` open_clip model."""
    values = dict(backbone=BackboneConfig("tiny", "none", TINY_SIZE), depth=2, n_ctx=4, t_n_ctx=2)
    values.update(overrides)
    return MedVMADConfig(**values)


@pytest.fixture
def tiny_model() -> MedVMAD:
    torch.manual_seed(0)
    return MedVMAD(tiny_config())
