"""The frozen backbone's interface: its config, and what MedVMAD, the prompts and the memory bank use.

``CLIP.factory.build_backbone`` loads a model and wraps it in the implementation its towers call for
(backbone_clip.py, backbone_timm_hf.py). This file uses open_clip's public API only; the towers'
internals (blocks, embeddings, norms, projections) are touched only in those two files.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import open_clip
import torch
import torch.utils.checkpoint
from torch import nn

from utils import InputError

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]
logger = logging.getLogger("medvmad")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BackboneConfig:
    """What rebuilds a backbone: saved inside every MedVMAD checkpoint."""

    model_name: str = "ViT-L-14-336"  # open_clip name, ``hf-hub:org/repo`` or ``local-dir:/path``
    pretrained: str = "openai"        # open_clip tag, a local .pt/.bin/.safetensors file, or ``none``
    image_size: int = 336             # input side; positional embeddings are resized to it
    quick_gelu: bool | None = None    # None (auto): see ``quick_gelu_rule``; resolved at load
    image_mean: tuple[float, float, float] | None = None  # None: the model's preprocess config
    image_std: tuple[float, float, float] | None = None   # None: the model's preprocess config

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BackboneConfig":
        """Inverse of ``to_dict``. Checkpoints written before ``image_mean``/``image_std`` were
        stored were trained with OpenAI's constants, so those are what they rebuild with."""
        values = dict(values)
        for key, default in (("image_mean", OPENAI_MEAN), ("image_std", OPENAI_STD)):
            given = values.get(key)  # a list or tuple; anything else is kept for the checks to refuse
            values[key] = tuple(given) if isinstance(given, (list, tuple)) else \
                (default if key not in values else given)
        return cls(**values)


def default_features_list(num_layers: int, count: int = 4) -> list[int]:
    """Four evenly spaced 1-based layers ending at the last: 24 layers -> [6, 12, 18, 24]."""
    count = min(count, num_layers)
    return [round(num_layers * (i + 1) / count) for i in range(count)]


@dataclass
class TextFrame:
    """A tokenised prompt skeleton for learnable context. ``token_ids`` [T,L] hold placeholder
    tokens at ``slots`` (deep-prompt slots) and ``context`` (learnable context), right after the
    start token; their embeddings are replaced. ``pooled_index`` [T]: the token the text pass
    pools (CLIP: end of text), or None where the model's pooler decides (Hugging Face towers)."""

    token_ids: torch.Tensor
    slots: slice
    context: slice
    pooled_index: torch.Tensor | None
    first_deep_layer: int = 0  # deep prompts are written before text layers first_deep_layer, +1, ...


class Backbone(nn.Module, metaclass=abc.ABCMeta):
    """What MedVMAD, the prompts and the memory bank need from a frozen vision-language model.

    Implementations (one per model family, chosen from the loaded model by ``build_backbone``):
    ``CLIP.backbone_clip.OpenCLIPBackbone`` (open_clip's CLIP: ViT image tower, CLIP text
    transformer) and ``CLIP.backbone_timm_hf.TimmHFBackbone`` (a timm ViT trunk and a Hugging Face
    text encoder, as BiomedCLIP). This base uses only open_clip's public model API, common to both
    (``logit_scale``, ``encode_text``, ``get_tokenizer``); the towers' internals are touched only in
    the implementations. ``config`` is resolved (QuickGELU as built, the weights' mean/std).
    """

    value_attention: bool = False  # whether encode_image offers DPAM's v-v attention path (vv_from)
    grad_checkpointing: bool = False  # recompute blocks in the backward pass instead of keeping activations

    def __init__(self, config: BackboneConfig, clip: nn.Module):
        super().__init__()
        self.config = config
        self.clip = clip
        self.clip.eval()
        self.clip.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    @abc.abstractmethod
    def fits(clip: nn.Module) -> bool:
        """Whether this implementation handles the towers of the loaded open_clip model."""

    # ---- sizes, read from the model ----
    @property
    @abc.abstractmethod
    def width(self) -> int:
        """Width W of the image tokens."""

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Blocks of the image tower."""

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """Size E of the joint image-text space."""

    @property
    @abc.abstractmethod
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at the configured image size."""

    @property
    @abc.abstractmethod
    def patch_size(self) -> tuple[int, int]:
        """Patch side in pixels."""

    @property
    @abc.abstractmethod
    def num_prefix_tokens(self) -> int:
        """Class (and register) tokens before the patch tokens."""

    @property
    @abc.abstractmethod
    def text_width(self) -> int:
        """Width Dt of the text token embeddings."""

    @property
    @abc.abstractmethod
    def text_layers(self) -> int:
        """Blocks of the text tower (the most --depth can use)."""

    @property
    def context_length(self) -> int:
        """Tokens of a text (CLIP: 77), the most the prompts' context can take."""
        return self.tokenizer.context_length

    @property
    def device(self) -> torch.device:
        """Where the backbone's weights live."""
        return self.image_mean.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned inverse temperature, exp(logit_scale) (100 for OpenAI CLIP)."""
        return self.clip.logit_scale.exp()

    def train(self, mode: bool = True) -> "Backbone":
        """The backbone always stays in eval mode: it is frozen."""
        super().train(mode)
        self.clip.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> the mean/std normalisation the weights were trained with."""
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def run_block(self, block: nn.Module, *args: torch.Tensor, **kwargs) -> torch.Tensor:
        """``block(*args, **kwargs)``; with ``grad_checkpointing`` while gradients are on, its
        activations are recomputed in the backward pass instead of kept (memory for compute:
        gradients flow through the frozen blocks to the adapters and prompts)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Plain text embeddings [T,E] of sentences, with the model's own tokenizer."""
        return self.clip.encode_text(self.tokenizer(list(texts)).to(self.device))

    # ---- passes ----
    @abc.abstractmethod
    def encode_image(self, images: torch.Tensor, taps: Sequence[int], after_layer: LayerHook | None = None,
                     vv_from: int | None = None,
                     global_norm: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the image tower block by block.

        images [B,3,H,W] (normalised); taps: 1-based layers. ``after_layer(layer, x)`` is called
        after every tapped layer with the tokens x [B,P+N,W] (P prefix tokens, then N patches in
        row-major order) and returns the tokens that continue the stream. Returns the global image
        embedding [B,E] and {layer: tokens [B,P+N,W]} as seen by the hook. ``vv_from`` (where
        ``value_attention``; no hook then): from that layer on a second stream adds each block's
        v-v self-attention of the original stream, without MLP (AnomalyCLIP's DPAM); taps from
        that layer on return it, and the global embedding still comes from the original stream.
        ``global_norm`` False (where ``value_attention``): the global embedding skips the tower's
        final norm, the pooled token @ the projection, as AnomalyCLIP's code returns it.
        """

    @abc.abstractmethod
    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Intermediate tokens [B,N,W] -> the joint space [B,N,E], the way the pooled token goes."""

    @abc.abstractmethod
    def word_embeddings(self, text: str) -> torch.Tensor:
        """Token embeddings [n,Dt] of the words of ``text`` (no start, end or padding tokens)."""

    @abc.abstractmethod
    def text_frame(self, texts: Sequence[str], n_slots: int, n_context: int) -> TextFrame:
        """Tokenised ``texts`` with ``n_slots`` deep-prompt slots, then ``n_context`` context
        placeholders, right after the start token. InputError when a text no longer fits."""

    @abc.abstractmethod
    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T,L] ids -> [T,L,Dt] input embeddings (positions are added by the text pass)."""

    @abc.abstractmethod
    def encode_text_embeddings(self, embeddings: torch.Tensor, frame: TextFrame,
                               deep_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Text embedding [T,E] of token embeddings [T,L,Dt] of ``frame`` (learnable context
        already inside). deep_prompts [D,n,Dt]: tokens written into ``frame.slots`` (n slots)
        before each of the D text layers from ``frame.first_deep_layer`` (0-based) on."""


def check_image_size(image_size: int, patch: int, model_name: str) -> None:
    """Refuse sides below one patch; warn when the last partial patch is not seen."""
    if image_size < patch:
        raise InputError(f"--image_size {image_size} is smaller than {model_name}'s patch size "
                         f"{patch}; use at least {patch}")
    if image_size % patch:  # the ViT drops the last partial patch; MedVMAD._upsample keeps maps aligned
        logger.warning(f"--image_size {image_size} is not a multiple of the patch size {patch}: the last "
                       f"{image_size % patch} pixel rows/columns are not seen by the model (their map "
                       f"values repeat the edge); {image_size // patch * patch} would avoid that")
