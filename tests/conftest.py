"""Shared fixtures: the tiny offline model everything tests with."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
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


def reference_scale(volume: np.ndarray) -> np.ndarray:
    """The documented BraTS/NIfTI rule written out: 0.5/99.5 percentiles of the voxels > 0 -> 0/255,
    clipped and rounded, background 0 (an independent reference for ``brats2021.scale_intensity``)."""
    low, high = np.percentile(volume[volume > 0], [0.5, 99.5])
    scaled = np.round(np.clip((volume.astype(np.float64) - low) / (high - low), 0, 1) * 255)
    return np.where(volume > 0, scaled, 0).astype(np.uint8)


def make_tiny_biomedclip(folder: Path) -> str:
    """A BiomedCLIP-shaped open_clip model with random weights, built offline in ``folder``: a timm
    ViT (vit_tiny_patch16_224, class-token pooled, linear projection) and a 2-layer BERT with a
    WordPiece vocabulary of the prompt wording, [CLS]-pooled, MLP projection; tokenizer files,
    BERT config and ``open_clip_model.safetensors`` in the same folder. Returns its model name."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig, BertTokenizer

    from prompt_ensemble import ORGANS, TEMPLATES

    folder.mkdir(parents=True, exist_ok=True)
    wording = TEMPLATES + [str(value) for entry in ORGANS.values() for value in entry.values()]
    words = sorted({word for text in wording for word in re.findall(r"[a-z]+|[^a-z\s]", text.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizer(vocab={word: index for index, word in enumerate(vocab)}).save_pretrained(folder)
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, pad_token_id=0).save_pretrained(folder)
    config = {"model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def biomedclip_name(tmp_path_factory) -> str:
    """``local-dir:`` name of the tiny BiomedCLIP-shaped model (built once per test session)."""
    return make_tiny_biomedclip(tmp_path_factory.mktemp("models") / "tiny-biomedclip")
