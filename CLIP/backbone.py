"""The frozen CLIP backbone: loading from open_clip and the tapped, adaptable forward passes.

This is the only file that touches open_clip internals (vision/text transformer blocks, class and
positional embeddings, ``ln_post``/``proj``, token embedding, ``ln_final``/``text_projection``).
Upstream renames and reorders these between releases; keep every such access here.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from torch import nn

from utils import InputError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class BackboneConfig:
    """What rebuilds a backbone: saved inside every MedVMAD checkpoint."""

    model_name: str = "ViT-L-14-336"  # open_clip name, ``hf-hub:org/repo`` or ``local-dir:/path``
    pretrained: str = "openai"        # open_clip tag, a local .pt/.bin/.safetensors file, or ``none``
    image_size: int = 336             # input side; positional embeddings are resized to it
    quick_gelu: bool | None = None    # None: on for OpenAI weights (tag or TorchScript file); resolved at load

    def to_dict(self) -> dict:
        return asdict(self)


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI released its CLIP weights as TorchScript zip archives (they contain ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def default_features_list(num_layers: int, count: int = 4) -> list[int]:
    """Four evenly spaced 1-based layers ending at the last: 24 layers -> [6, 12, 18, 24]."""
    count = min(count, num_layers)
    return [round(num_layers * (i + 1) / count) for i in range(count)]


def _create_clip(config: BackboneConfig) -> nn.Module:
    """Build the open_clip model, turning every loading failure into one clear ``InputError``."""
    pretrained = config.pretrained
    use_file = pretrained.lower() != "none" and (os.sep in pretrained or os.path.splitext(pretrained)[1] != "")
    has_schema = config.model_name.startswith(("hf-hub:", "local-dir:"))
    if use_file and not os.path.isfile(pretrained):
        raise InputError(f"--pretrained {pretrained}: no such weights file")
    torchscript = use_file and _is_torchscript_archive(pretrained)
    if config.quick_gelu is None:  # resolved once and kept in the config, so checkpoints rebuild it
        config.quick_gelu = not has_schema and (pretrained.lower() == "openai" or torchscript)
    quick_gelu = config.quick_gelu
    kwargs = dict(
        pretrained=None if has_schema or pretrained.lower() == "none" else pretrained,
        force_quick_gelu=quick_gelu,
        force_image_size=config.image_size,
        weights_only=not torchscript,
    )
    try:
        # Seeded so that a random-init backbone (--pretrained none) is rebuilt identically from a
        # checkpoint's config (with the same library versions); loaded weights overwrite it anyway.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return open_clip.create_model(config.model_name, **kwargs)
    except RuntimeError as error:
        message = str(error)
        if "not found in built-ins" in message:
            raise InputError(f"--model_name {config.model_name}: unknown open_clip model "
                             f"(see open_clip.list_models(), or 'tiny' for the test model)") from None
        if "Failed to download" in message or "HF Hub" in message:
            raise InputError(
                f"could not download the '{pretrained}' weights of {config.model_name} (offline?); "
                f"pass a local weights file with --pretrained /path/to/{config.model_name}.pt "
                f"(.pt, .bin or .safetensors)") from None
        if "not a known tag" in message:
            raise InputError(f"--pretrained {pretrained}: neither a known tag of {config.model_name} "
                             f"({', '.join(open_clip.list_pretrained_tags_by_model(config.model_name))}) "
                             f"nor an existing file") from None
        if "Error(s) in loading state_dict" in message:
            raise InputError(f"--pretrained {pretrained} does not fit {config.model_name}: "
                             f"{message.splitlines()[1].strip() if len(message.splitlines()) > 1 else message}") from None
        raise
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"could not load {config.model_name}: {error}") from None


class Backbone(nn.Module):
    """A frozen open_clip CLIP with a tapped image pass and a prompt-embedding text pass."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.clip = _create_clip(config)
        self.clip.eval()
        self.clip.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        visual = self.clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise InputError(f"--model_name {config.model_name}: MedVMAD needs a ViT image tower")

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
    def text_width(self) -> int:
        return self.clip.token_embedding.weight.shape[1]

    @property
    def text_layers(self) -> int:
        return len(self.clip.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned inverse temperature, exp(logit_scale) (100 for OpenAI CLIP)."""
        return self.clip.logit_scale.exp()

    def train(self, mode: bool = True) -> "Backbone":
        """The backbone always stays in eval mode: it is frozen."""
        super().train(mode)
        self.clip.eval()
        return self

    # ---- image side ----
    def encode_image(self, images: torch.Tensor, taps: Sequence[int],
                     after_layer: LayerHook | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the ViT block by block.

        images [B,3,H,W]; taps: 1-based layers. ``after_layer(layer, x)`` is called after every
        tapped layer with the tokens x [B,1+N,W] and returns the tokens that continue the stream.
        Returns the global image embedding [B,E] and {layer: tokens [B,1+N,W]} as seen by the hook.
        """
        visual = self.clip.visual
        transformer = visual.transformer
        x = visual._embeds(images)                       # [B,1+N,W]
        batch_first = getattr(transformer, "batch_first", True)
        taps = set(taps)
        tapped: dict[int, torch.Tensor] = {}
        for index, block in enumerate(transformer.resblocks, start=1):
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if index in taps:
                tapped[index] = x
                if after_layer is not None:
                    x = after_layer(index, x)
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj, tapped

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map intermediate tokens [B,N,W] into the joint space [B,N,E] with ln_post and proj."""
        visual = self.clip.visual
        return visual.ln_post(tokens) @ visual.proj

    # ---- text side ----
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [T, context_length]."""
        return self.tokenizer(list(texts))

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T,L] ids -> [T,L,Dt] embeddings."""
        return self.clip.token_embedding(token_ids)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Plain CLIP text embedding [T,E] of token ids [T,L]."""
        return self.clip.encode_text(token_ids)

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot_index: torch.Tensor,
                               deep_prompts: torch.Tensor | None = None,
                               deep_positions: slice | None = None) -> torch.Tensor:
        """Text embedding [T,E] of token embeddings [T,L,Dt] (learnable context already inside).

        eot_index [T]: position of the end-of-text token. deep_prompts [D,n,Dt]: tokens written into
        ``deep_positions`` (n reserved slots) before each of the first D text layers.
        """
        clip = self.clip
        x = embeddings + clip.positional_embedding.to(embeddings.dtype)
        transformer = clip.transformer
        batch_first = getattr(transformer, "batch_first", True)
        depth = 0 if deep_prompts is None else deep_prompts.shape[0]
        for index, block in enumerate(transformer.resblocks):
            if index < depth:
                prompt = deep_prompts[index].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
                x = torch.cat([x[:, :deep_positions.start], prompt, x[:, deep_positions.stop:]], dim=1)
            if batch_first:
                x = block(x, attn_mask=clip.attn_mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=clip.attn_mask).transpose(0, 1)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        projection = clip.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

