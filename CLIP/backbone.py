"""The frozen backbone: its config, loading through open_clip, and the interface MedVMAD uses.

``build_backbone`` loads any open_clip model (tag, weights file, ``hf-hub:`` or ``local-dir:``)
and wraps it in the implementation its towers call for (backbone_clip.py, backbone_timm_hf.py).
This file uses open_clip's public API only; the towers' internals (blocks, embeddings, norms,
projections) are touched only in those two files.
"""
from __future__ import annotations

import abc
import logging
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.utils.checkpoint
from torch import nn

from utils import InputError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

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
            values[key] = tuple(values[key]) if values.get(key) is not None else \
                (default if key not in values else None)
        return cls(**values)


def _names_in_path(path: str) -> list[str]:
    """The names that say what a weights file is: its file name, its folder, and the repo name of a
    Hugging Face cache path (``models--org--repo``), lower case."""
    parts = Path(path.lower()).parts
    return list(parts[-2:]) + [part for part in parts if part.startswith("models--")]


def quick_gelu_rule(model_name: str, pretrained: str, torchscript: bool) -> str | None:
    """Why QuickGELU-trained weights are assumed, or None when they are not.

    QuickGELU is on for the ``openai`` tag and open_clip tags trained with it (e.g. ViT-B-32
    ``laion400m_e32``), OpenAI's TorchScript archives, ``*-quickgelu`` model names, and weights
    files or hub/local repos whose name says ``openai`` (e.g. open_clip's
    ``timm/vit_large_patch14_clip_336.openai``).
    """
    name, weights = model_name.lower(), pretrained.lower()
    if weights == "openai":
        return "--pretrained openai"
    if not name.startswith(("hf-hub:", "local-dir:")) and weights != "none":
        tag = open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag:
            return f"the tag {pretrained} was trained with it" if tag.get("quick_gelu") else None
    if torchscript:
        return "OpenAI TorchScript archive"
    if name.endswith("-quickgelu"):
        return "a -quickgelu model name"
    if any("openai" in part for part in _names_in_path(name.split(":", 1)[-1])):
        return f"the model name {model_name} says openai"
    if weights != "none" and any("openai" in part for part in _names_in_path(weights)):
        return f"the weights file {pretrained} says openai"
    return None


def _uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the built model runs QuickGELU (its config may turn it on whatever was asked)."""
    return any(type(module).__name__ == "QuickGELU" for module in model.modules())


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


def _torchscript_state_dict(path: str, folder: str) -> str:
    """Save the state dict of an OpenAI TorchScript archive as a plain tensor file in ``folder``.

    The archive is read with ``torch.jit.load`` only (never unpickled as a checkpoint), so a file
    that merely looks like an archive cannot run code; the copy is then read with ``weights_only``.
    """
    try:
        state = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as error:  # torch raises many types for a damaged or crafted archive
        raise InputError(f"--pretrained {path}: not a loadable TorchScript archive "
                         f"({type(error).__name__})") from None
    # OpenAI's extra entries, and the causal mask (a derived buffer that scripting keeps)
    for key in [key for key in state if key.split(".")[-1] in ("input_resolution", "context_length",
                                                                 "vocab_size", "attn_mask")]:
        del state[key]
    plain = os.path.join(folder, "openai_state_dict.pt")
    torch.save({key: value.detach().clone() for key, value in state.items()}, plain)
    return plain


def _create_clip(config: BackboneConfig) -> tuple[nn.Module, bool]:
    """Build the open_clip model, turning every loading failure into one clear ``InputError``.

    Returns it and whether it runs QuickGELU (``config.quick_gelu`` None: auto), and logs why.
    """
    pretrained = config.pretrained
    use_file = pretrained.lower() != "none" and (os.sep in pretrained or os.path.splitext(pretrained)[1] != "")
    has_schema = config.model_name.startswith(("hf-hub:", "local-dir:"))
    if use_file and not os.path.isfile(pretrained):
        raise InputError(f"--pretrained {pretrained}: no such weights file")
    torchscript = use_file and not has_schema and _is_torchscript_archive(pretrained)  # schema: ignored
    asked = config.quick_gelu
    reason = quick_gelu_rule(config.model_name, "none" if has_schema else pretrained, torchscript) \
        if asked is None else "set explicitly"
    with tempfile.TemporaryDirectory(prefix="medvmad_weights_") as folder:
        weights = _torchscript_state_dict(pretrained, folder) if torchscript else pretrained
        kwargs = dict(
            pretrained=None if has_schema or pretrained.lower() == "none" else weights,
            force_quick_gelu=bool(asked) if asked is not None else reason is not None,
            force_image_size=config.image_size,
            weights_only=True,  # never unpickle code from a weights file
        )
        model = _call_open_clip(config, kwargs)
    # Read from the built model and kept in the resolved config, so checkpoints rebuild it.
    quick_gelu = _uses_quick_gelu(model)
    if asked is False and quick_gelu:
        raise InputError(f"--quick_gelu off: the model config of {config.model_name} turns QuickGELU on")
    if asked is True and not quick_gelu:
        raise InputError(f"--quick_gelu on: {config.model_name} has no QuickGELU to turn on (timm and "
                         f"Hugging Face towers keep their own activations)")
    if asked is None and quick_gelu and reason is None:
        reason = "the model config sets it"
    logger.info(f"QuickGELU {'on' if quick_gelu else 'off'} "
                f"({reason if asked is not None else '--quick_gelu auto: ' + (reason or 'no sign of QuickGELU weights')})")
    return model, quick_gelu


def _call_open_clip(config: BackboneConfig, kwargs: dict) -> nn.Module:
    """``open_clip.create_model`` with its failures turned into one-line ``InputError``s."""
    pretrained = config.pretrained
    try:
        # Seeded so that a random-init backbone (--pretrained none) is rebuilt identically from a
        # checkpoint's config (with the same library versions); loaded weights overwrite it anyway.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return open_clip.create_model(config.model_name, **kwargs)
    except RuntimeError as error:
        message = str(error)
        if "pip install transformers" in message:
            raise InputError(f"--model_name {config.model_name} has a Hugging Face text tower: "
                             f"pip install transformers") from None
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
        if os.path.isfile(pretrained):
            raise _unreadable_weights(pretrained, error) from None
        raise
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # a pickle that names code, not only tensors
            raise InputError(f"--pretrained {pretrained}: holds more than tensors; refusing to unpickle it, "
                             f"since that could run code (save the weights as .safetensors)") from None
        raise _unreadable_weights(pretrained, error) from None
    except (FileNotFoundError, ValueError) as error:  # UnicodeDecodeError too, for random bytes
        if os.path.isfile(pretrained):
            raise _unreadable_weights(pretrained, error) from None
        raise InputError(f"could not load {config.model_name}: {error}") from None
    except Exception as error:  # safetensors, zip and pickle readers raise many types for a damaged file
        if os.path.isfile(pretrained):
            raise _unreadable_weights(pretrained, error) from None
        raise


def _unreadable_weights(path: str, error: Exception) -> InputError:
    """The error for a weights file that no reader understands (random bytes, text, truncated)."""
    return InputError(f"--pretrained {path}: not a readable weights file ({type(error).__name__}); expected "
                      f"a state dict (.pt/.bin), OpenAI's TorchScript .pt, or .safetensors")


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
                     vv_from: int | None = None, global_norm: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
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


def _resolve_normalisation(config: BackboneConfig, preprocess: dict) -> dict:
    """image_mean/image_std: the config's, else the model's preprocess config; 3 values, std > 0."""
    resolved = {}
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        given = getattr(config, key)
        values = tuple(float(v) for v in (given if given is not None else preprocess.get(name, ())))
        if len(values) == 1:
            values = values * 3
        if len(values) != 3 or (key == "image_std" and min(values) <= 0):
            raise InputError(f"--{key} {list(values)}: give 3 values (std > 0)")
        resolved[key] = values
    return resolved


def build_backbone(config: BackboneConfig) -> Backbone:
    """Load the model ``config`` names and wrap it in the implementation its towers call for.

    ``config`` is not changed: the backbone keeps a resolved copy (QuickGELU as built, the
    normalisation of the weights), which checkpoints store.
    """
    from CLIP.backbone_clip import OpenCLIPBackbone
    from CLIP.backbone_timm_hf import TimmHFBackbone

    clip, quick_gelu = _create_clip(config)
    if getattr(clip, "logit_bias", None) is not None:
        raise InputError(f"--model_name {config.model_name}: SigLIP-style models (sigmoid loss with a logit "
                         f"bias) are not supported; use a CLIP-style model (softmax over prompts)")
    family = next((family for family in (OpenCLIPBackbone, TimmHFBackbone) if family.fits(clip)), None)
    if family is None:
        raise InputError(f"--model_name {config.model_name}: MedVMAD needs a ViT image tower with a CLIP text "
                         f"transformer (open_clip CLIP) or a timm ViT with a Hugging Face text encoder "
                         f"(BiomedCLIP); got {type(clip.visual).__name__} + "
                         f"{type(getattr(clip, 'text', clip)).__name__}")
    resolved = replace(config, quick_gelu=quick_gelu,
                       **_resolve_normalisation(config, getattr(clip.visual, "preprocess_cfg", {})))
    logger.info(f"{family.__name__}; image normalisation mean {resolved.image_mean} std {resolved.image_std}")
    return family(resolved, clip)


def check_image_size(image_size: int, patch: int, model_name: str) -> None:
    """Refuse sides below one patch; warn when the last partial patch is not seen."""
    if image_size < patch:
        raise InputError(f"--image_size {image_size} is smaller than {model_name}'s patch size "
                         f"{patch}; use at least {patch}")
    if image_size % patch:  # the ViT drops the last partial patch; MedVMAD._upsample keeps maps aligned
        logger.warning(f"--image_size {image_size} is not a multiple of the patch size {patch}: the last "
                       f"{image_size % patch} pixel rows/columns are not seen by the model (their map "
                       f"values repeat the edge); {image_size // patch * patch} would avoid that")
