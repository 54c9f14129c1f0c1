"""A timm ViT image tower with a Hugging Face text encoder behind the Backbone interface: the
layout of BiomedCLIP (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).

Image side: open_clip's ``TimmModel`` holds a timm ``VisionTransformer`` trunk (``patch_embed``,
``blocks``, ``norm``, class-token pooling) and a projection head. Text side: open_clip's
``HFTextEncoder`` holds a BERT-style encoder fed ``inputs_embeds``, the pooler its config names
(BiomedCLIP: the [CLS] token of the last hidden state) and a projection. Learnable prompts sit
right after [CLS]; deep tokens are written before each of the first layers by forward pre-hooks
on the encoder layers, so the encoder runs through its own public forward. transformers is
needed only for such models: open_clip imports it when it builds one.
"""
from __future__ import annotations

from typing import Sequence

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from CLIP.backbone import Backbone, BackboneConfig, LayerHook, TextFrame, check_image_size
from utils import InputError


class TimmHFBackbone(Backbone):
    """timm ViT trunk + Hugging Face (BERT-style) text encoder, as open_clip builds BiomedCLIP."""

    @staticmethod
    def fits(clip: nn.Module) -> bool:
        """A timm ``VisionTransformer`` trunk pooled by token or mean (no attention pool), and an HF
        encoder with ``encoder.layer``."""
        visual, text = clip.visual, getattr(clip, "text", None)
        if not isinstance(visual, TimmModel) or not isinstance(text, HFTextEncoder):
            return False
        return (isinstance(visual.trunk, VisionTransformer) and visual.trunk.attn_pool is None
                and "pool" not in dict(visual.head.named_children())
                and hasattr(getattr(text.transformer, "encoder", None), "layer"))

    def __init__(self, config: BackboneConfig, clip: nn.Module):
        super().__init__(config, clip)
        check_image_size(config.image_size, self.patch_size[0], config.model_name)
        built = tuple(self.trunk.patch_embed.img_size)
        if built != (config.image_size, config.image_size):  # open_clip resizes timm trunks after loading
            raise InputError(f"--image_size {config.image_size}: the timm trunk of {config.model_name} was built "
                             f"for {built[0]}x{built[1]} and could not be resized")
        self.pad_id = self.clip.text.config.pad_token_id

    # ---- sizes, read from the model ----
    @property
    def trunk(self) -> nn.Module:
        return self.clip.visual.trunk

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    @property
    def num_layers(self) -> int:
        return len(self.trunk.blocks)

    @property
    def embed_dim(self) -> int:
        return self.clip.text.output_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    @property
    def text_width(self) -> int:
        return self.clip.text.transformer.get_input_embeddings().weight.shape[1]

    @property
    def text_layers(self) -> int:
        return len(self.clip.text.transformer.encoder.layer)

    # ---- image side ----
    def encode_image(self, images: torch.Tensor, taps: Sequence[int], after_layer: LayerHook | None = None,
                     vv_from: int | None = None,
                     global_norm: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        if vv_from is not None or not global_norm:
            raise ValueError("the v-v attention path (DPAM) and the un-normalised global embedding (AnomalyCLIP) "
                             "are implemented for open_clip CLIP image towers only")
        trunk = self.trunk
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))  # [B,P+N,W]
        taps = set(taps)
        tapped: dict[int, torch.Tensor] = {}
        for index, block in enumerate(trunk.blocks, start=1):
            x = self.run_block(block, x)
            if index in taps:
                tapped[index] = x
                if after_layer is not None:
                    x = after_layer(index, x)
        return self.clip.visual.head(trunk.forward_head(trunk.norm(x))), tapped

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """norm, fc_norm, the trunk's head and open_clip's projection: what the pooled token goes through."""
        trunk = self.trunk
        return self.clip.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(trunk.norm(tokens)))))

    # ---- text side ----
    def word_embeddings(self, text: str) -> torch.Tensor:
        ids = self.tokenizer([text])[0].to(self.device)
        n_words = int((ids != self.pad_id).sum()) - 2  # between [CLS] and [SEP]
        return self.token_embedding(ids[1:1 + n_words])

    def text_frame(self, texts: Sequence[str], n_slots: int, n_context: int) -> TextFrame:
        """``[CLS] <slots> <context> <text> [SEP] [PAD]...`` with the model's tokenizer; the
        placeholders repeat the [CLS] id (any non-padding id: their embeddings are replaced).
        Pooled by the model's own pooler."""
        ids = self.tokenizer(list(texts)).to(self.device)
        length, n_placeholders = ids.shape[1], n_slots + n_context
        if int((ids != self.pad_id).sum(dim=1).max()) + n_placeholders > length:
            raise InputError("prompt too long for the text context; lower --n_ctx or --t_n_ctx")
        placeholders = ids[:, :1].expand(-1, n_placeholders)
        framed = torch.cat([ids[:, :1], placeholders, ids[:, 1:length - n_placeholders]], dim=1)
        return TextFrame(framed, slice(1, 1 + n_slots), slice(1 + n_slots, 1 + n_placeholders), None)

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.text.transformer.get_input_embeddings()(token_ids)

    def encode_text_embeddings(self, embeddings: torch.Tensor, frame: TextFrame,
                               deep_prompts: torch.Tensor | None = None) -> torch.Tensor:
        text = self.clip.text
        attention_mask = (frame.token_ids != self.pad_id).long()
        handles = []

        def write_deep(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                x = args[0] if args else kwargs.pop("hidden_states")
                prompt = deep_prompts[index].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
                x = torch.cat([x[:, :frame.slots.start], prompt, x[:, frame.slots.stop:]], dim=1)
                return (x, *args[1:]), kwargs
            return hook

        layers = text.transformer.encoder.layer
        for index in range(0 if deep_prompts is None else deep_prompts.shape[0]):
            layer = layers[frame.first_deep_layer + index]
            handles.append(layer.register_forward_pre_hook(write_deep(index), with_kwargs=True))
        try:
            out = text.transformer(inputs_embeds=embeddings, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return text.proj(text.pooler(out, attention_mask))
