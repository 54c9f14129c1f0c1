"""The open_clip CLIP family behind the Backbone interface: a ViT image tower (``VisionTransformer``)
and CLIP's causal text transformer, pooled at the end-of-text token.

This file and backbone_timm_hf.py are the only ones that touch library internals (transformer
blocks, class and positional embeddings, ``ln_post``/``proj``, token embedding,
``ln_final``/``text_projection``). Upstream renames and reorders these between releases.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from CLIP.backbone import Backbone, BackboneConfig, LayerHook, TextFrame, check_image_size
from utils import InputError


def _text_tower(clip: nn.Module) -> nn.Module:
    """The module holding the text transformer: CLIP keeps it on itself, CustomTextCLIP in ``text``."""
    return clip.text if isinstance(getattr(clip, "text", None), TextTransformer) else clip


def value_value_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DPAM's v-v self-attention branch of an open_clip ``ResidualAttentionBlock`` on tokens
    x [B,T,W]: queries, keys and values are all the value projection of ln_1(x), per head,
    softmax(v v^T / sqrt(d)) v, then the block's output projection and layer scale. [B,T,W]."""
    attention = block.attn
    batch, tokens, width = x.shape
    heads = attention.num_heads
    bias = attention.in_proj_bias[2 * width:] if attention.in_proj_bias is not None else None
    values = F.linear(block.ln_1(x), attention.in_proj_weight[2 * width:], bias)
    values = values.view(batch, tokens, heads, width // heads).transpose(1, 2)          # [B,h,T,d]
    mixed = F.scaled_dot_product_attention(values, values, values)
    return block.ls_1(attention.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width)))


class OpenCLIPBackbone(Backbone):
    """open_clip's CLIP (or CustomTextCLIP with a CLIP text transformer) with a ViT image tower."""

    @property
    def value_attention(self) -> bool:
        """DPAM's v-v path is written for open_clip's standard blocks (nn.MultiheadAttention)."""
        return all(isinstance(block.attn, nn.MultiheadAttention)
                   for block in self.clip.visual.transformer.resblocks)

    @staticmethod
    def fits(clip: nn.Module) -> bool:
        """A ViT image tower with a class token, and an argmax-pooled CLIP text transformer."""
        text = _text_tower(clip)
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
        return (isinstance(clip.visual, VisionTransformer) and getattr(clip.visual, "attn_pool", None) is None
                and hasattr(text, "token_embedding") and pool == "argmax"
                and getattr(text, "cls_emb", None) is None)

    def __init__(self, config: BackboneConfig, clip: nn.Module):
        super().__init__(config, clip)
        check_image_size(config.image_size, clip.visual.patch_size[0], config.model_name)

    @property
    def text(self) -> nn.Module:
        return _text_tower(self.clip)

    # ---- sizes, read from the model ----
    @property
    def width(self) -> int:
        """Vision transformer width (1024 for ViT-L)."""
        return self.clip.visual.transformer.width

    @property
    def num_layers(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        """Joint image-text embedding size (768 for ViT-L-14)."""
        return self.clip.visual.proj.shape[1]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def text_width(self) -> int:
        return self.text.token_embedding.weight.shape[1]

    @property
    def text_layers(self) -> int:
        return len(self.text.transformer.resblocks)

    # ---- image side ----
    def encode_image(self, images: torch.Tensor, taps: Sequence[int], after_layer: LayerHook | None = None,
                     vv_from: int | None = None,
                     global_norm: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        if vv_from is not None and after_layer is not None:
            raise ValueError("the v-v attention path takes no layer hook")
        visual = self.clip.visual
        transformer = visual.transformer
        x = visual._embeds(images)                       # [B,1+N,W]
        batch_first = getattr(transformer, "batch_first", True)
        taps = set(taps)
        tapped: dict[int, torch.Tensor] = {}
        value_stream = None                              # DPAM's second stream, from vv_from on
        for index, block in enumerate(transformer.resblocks, start=1):
            if vv_from is not None and index >= vv_from:
                value_stream = (x if value_stream is None else value_stream) + value_value_attention(block, x)
            x = self.run_block(block, x) if batch_first else self.run_block(block, x.transpose(0, 1)).transpose(0, 1)
            if index in taps:
                tapped[index] = x if value_stream is None else value_stream
                if after_layer is not None:
                    x = after_layer(index, x)
        pooled, _ = visual._pool(x) if global_norm else visual._global_pool(x)
        return pooled @ visual.proj, tapped

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post, then proj: what the class token goes through."""
        visual = self.clip.visual
        return visual.ln_post(tokens) @ visual.proj

    # ---- text side ----
    def word_embeddings(self, text: str) -> torch.Tensor:
        ids = self.tokenizer([text])[0].to(self.device)
        n_words = int(ids.argmax()) - 1  # between the start token and the end token (highest id)
        return self.text.token_embedding(ids[1:1 + n_words])

    def text_frame(self, texts: Sequence[str], n_slots: int, n_context: int) -> TextFrame:
        """"X" is one CLIP token: ``SOS X X ... X <text> EOT``; pooled at the end token (highest id)."""
        placeholder = " ".join(["X"] * (n_slots + n_context))
        ids = self.tokenizer([f"{placeholder} {text}" for text in texts]).to(self.device)
        end = ids.argmax(dim=-1)
        if int(end.max()) >= ids.shape[1] - 1:
            raise InputError("prompt too long for the text context; lower --n_ctx or --t_n_ctx")
        return TextFrame(ids, slice(1, 1 + n_slots), slice(1 + n_slots, 1 + n_slots + n_context), end)

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(token_ids)

    def encode_text_embeddings(self, embeddings: torch.Tensor, frame: TextFrame,
                               deep_prompts: torch.Tensor | None = None) -> torch.Tensor:
        text = self.text
        x = embeddings + text.positional_embedding.to(embeddings.dtype)
        transformer = text.transformer
        batch_first = getattr(transformer, "batch_first", True)
        depth = 0 if deep_prompts is None else deep_prompts.shape[0]
        first = frame.first_deep_layer
        for index, block in enumerate(transformer.resblocks):
            if first <= index < first + depth:
                prompt = deep_prompts[index - first].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
                x = torch.cat([x[:, :frame.slots.start], prompt, x[:, frame.slots.stop:]], dim=1)
            if batch_first:
                x = self.run_block(block, x, attn_mask=text.attn_mask)
            else:
                x = self.run_block(block, x.transpose(0, 1), attn_mask=text.attn_mask).transpose(0, 1)
        x = text.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), frame.pooled_index]
        projection = text.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
