"""Write a BiomedCLIP-shaped open_clip model with random weights into a ``local-dir:`` folder, offline.

Same layout as ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: a timm ViT
(class-token pooled, linear projection) and a BERT text encoder ([CLS] of the last hidden state,
MLP projection), with a WordPiece vocabulary made of the prompt wording. Sizes are BiomedCLIP's by
default (ViT-B/16, 12-layer 768-wide BERT, 512-d joint space); the tests build a tiny one.

    python -m bench.biomedclip_like /tmp/biomedclip-like
    python -m bench.train_step --model_name local-dir:/tmp/biomedclip-like --image_size 224
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from prompt_ensemble import ORGANS, TEMPLATES


def build(folder: Path, vision: str = "vit_base_patch16_224", text_width: int = 768, text_layers: int = 12,
          embed_dim: int = 512, context_length: int = 256, pooler: str = "cls_last_hidden_state_pooler") -> str:
    """Write the model into ``folder`` (created); returns its ``local-dir:`` model name. ``pooler``:
    open_clip's name of the text pooler (BiomedCLIP's is the default)."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    wording = TEMPLATES + [str(value) for entry in ORGANS.values() for value in entry.values()]
    words = sorted({word for text in wording for word in re.findall(r"[a-z]+|[^a-z\s]", text.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizer(vocab={word: index for index, word in enumerate(vocab)}).save_pretrained(folder)
    BertConfig(vocab_size=len(vocab), hidden_size=text_width, num_hidden_layers=text_layers,
               num_attention_heads=text_width // 64 or 2,  # 64-wide heads, as BERT
               intermediate_size=4 * text_width, max_position_embeddings=max(64, context_length),
               pad_token_id=0).save_pretrained(folder)
    config = {"model_cfg": {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": vision, "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "mlp",
                     "hf_pooler_type": pooler, "context_length": context_length}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    print(build(parser.parse_args().folder))
