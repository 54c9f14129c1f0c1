"""The backbone factory: ``build_backbone`` loads any open_clip model (tag, weights file, ``hf-hub:``
or ``local-dir:``) and wraps it in the ``Backbone`` implementation its towers call for.

Loading resolves what the config leaves open (QuickGELU, the weights' normalisation), reads OpenAI's
TorchScript archives without running them, and turns every failure into one clear ``InputError``.
This file uses open_clip's public API only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import huggingface_hub
import open_clip
import torch
from torch import nn

from CLIP.backbone import Backbone, BackboneConfig
from CLIP.backbone_clip import OpenCLIPBackbone
from CLIP.backbone_timm_hf import TimmHFBackbone
from CLIP.torchscript_weights import ArchiveError, is_torchscript_archive, read_torchscript_state_dict
from utils import InputError, atomic_torch_save

logger = logging.getLogger("medvmad")
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

SCHEMAS = ("hf-hub:", "local-dir:")  # model names whose weights come with them: ``pretrained`` is ignored
LOCAL_DIR = "local-dir:"
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth")  # the files open_clip loads from a local-dir: folder
HUB_TIMEOUT = 5.0  # seconds the Hugging Face Hub has to answer before a download is given up as offline
OFFLINE_HINTS = ("or try the pipeline offline with the tiny test model (--model_name tiny --pretrained none; "
                 "bash train.sh indomain does so on the demo set)")


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


def reads_weights_file(config: BackboneConfig) -> bool:
    """Whether building ``config`` reads ``pretrained`` as a weights file: anything but ``none`` and
    open_clip's tags of the model (``hf-hub:`` and ``local-dir:`` models ignore ``pretrained``)."""
    if config.model_name.startswith(SCHEMAS) or config.pretrained.lower() == "none":
        return False
    return not open_clip.get_pretrained_cfg(config.model_name, config.pretrained)


def downloads_weights(config: BackboneConfig) -> bool:
    """Whether building ``config`` may fetch files from the Hugging Face Hub: an ``hf-hub:`` name,
    or one of open_clip's weight tags (a file path, ``none`` and ``local-dir:`` fetch nothing)."""
    name = config.model_name
    if name.startswith(SCHEMAS):
        return not name.startswith(LOCAL_DIR)
    return config.pretrained.lower() != "none" and not reads_weights_file(config)


def hub_unreachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hugging Face Hub cannot be asked for files (``HF_HUB_OFFLINE`` set, or no answer
    from its endpoint within ``timeout`` seconds), or None when it answers."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        huggingface_hub.get_session().head(endpoint, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - no route, no DNS, refused, timed out: whatever the HTTP client raises
        return f"{endpoint} did not answer within {timeout:g} s ({type(error).__name__})"
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode (as ``HF_HUB_OFFLINE=1`` sets it): cached files are read
    without asking the network, and a file missing from the cache fails at once instead of after a
    minute of retries."""
    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _physical_memory() -> int | None:
    """Bytes of memory of this machine, None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def _size(sizes: dict, key: str, default: float | None = None) -> float | None:
    """A non-negative number of a model config's tower sizes (None when absent or not a number)."""
    value = sizes.get(key, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _least_bytes(model_name: str, image_size: int) -> float | None:
    """A lower bound of the memory the model needs at ``image_size``: its transformer blocks' and
    token embedding's weights and one image's tokens (positions and stream), float32; None for
    models whose config is not at hand (``hf-hub:``, unknown names) or names no tower sizes."""
    if model_name.startswith("hf-hub:"):
        return None  # its config is downloaded while building
    try:
        model_config = open_clip.get_model_config(model_name)
    except Exception:  # noqa: BLE001 - a local-dir: config missing or damaged: building the model says so
        return None
    values = 0.0
    for tower in ("vision_cfg", "text_cfg"):
        sizes = model_config.get(tower) if isinstance(model_config, dict) else None
        sizes = sizes if isinstance(sizes, dict) else {}
        width, layers, ratio = _size(sizes, "width"), _size(sizes, "layers"), _size(sizes, "mlp_ratio", 4.0)
        if width is None or layers is None or ratio is None:
            continue  # timm and Hugging Face towers name their sizes elsewhere
        values += layers * (4 + 2 * ratio) * width ** 2            # attention and MLP weights per block
        if tower == "text_cfg":
            values += (_size(sizes, "vocab_size") or 0) * width
        elif _size(sizes, "patch_size"):
            values += 2 * ((image_size // _size(sizes, "patch_size")) ** 2 + 1) * width
    return 4 * values or None


def check_memory(config: BackboneConfig) -> None:
    """Refuse (``ValueError``) a model whose tensors cannot fit in this machine's memory at the
    config's image size, before anything is built."""
    needed, available = _least_bytes(config.model_name, config.image_size), _physical_memory()
    if needed is not None and available is not None and needed > available:
        raise ValueError(f"{config.model_name} at image size {config.image_size} needs at least "
                         f"{needed / 2 ** 30:,.0f} GiB for its weights and one image's tokens, more than this "
                         f"machine's {available / 2 ** 30:,.0f} GiB of memory")


def _torchscript_state_dict(path: str, folder: str, source: str) -> str:
    """Save the tensors of an OpenAI TorchScript archive as a plain tensor file in ``folder``
    (then read with ``weights_only``). The archive is read by ``read_torchscript_state_dict``,
    which runs none of its code; ``source`` (the flag that named it) starts its errors."""
    try:
        state = read_torchscript_state_dict(path)
    except ArchiveError as error:
        raise InputError(f"{source}: refusing this TorchScript archive: {error}; only the tensors of a "
                         f"scripted model are read from one, and none of its code runs") from None
    if not state:  # its modules keep their tensors in their own __getstate__, which only its code reads
        raise InputError(f"{source}: refusing this TorchScript archive: it holds no weights by name (only its "
                         f"code could read them, and none of its code runs)")
    # OpenAI's extra entries, and the causal mask (a derived buffer that scripting keeps)
    for key in [key for key in state if key.split(".")[-1] in ("input_resolution", "context_length",
                                                                 "vocab_size", "attn_mask")]:
        del state[key]
    plain = os.path.join(folder, "open_clip_pytorch_model.bin")
    atomic_torch_save(state, plain)
    return plain


def _local_dir_weights(model_name: str) -> list[str]:
    """The weights files of a ``local-dir:`` folder (those open_clip chooses from), refused when
    one of several is a TorchScript archive (which one open_clip reads is then unclear)."""
    folder = Path(model_name[len(LOCAL_DIR):])
    try:
        found = sorted(str(path) for path in folder.iterdir() if path.suffix in WEIGHTS_SUFFIXES and path.is_file())
    except OSError:  # no such folder, or unreadable: open_clip says which
        return []
    scripted = [path for path in found if is_torchscript_archive(path)]
    if scripted and len(found) > 1:
        raise InputError(f"--model_name {model_name}: the folder holds several weights files "
                         f"({', '.join(Path(path).name for path in found)}), {Path(scripted[0]).name} a TorchScript "
                         f"archive; keep only the one to load")
    return found


def _missing_weights(config: BackboneConfig) -> InputError:
    """The error for a ``pretrained`` that is neither one of the model's tags nor an existing file."""
    pretrained = config.pretrained
    if os.sep in pretrained or os.path.splitext(pretrained)[1]:
        return InputError(f"--pretrained {pretrained}: no such weights file")
    tags = open_clip.list_pretrained_tags_by_model(config.model_name)
    return InputError(f"--pretrained {pretrained}: neither a known tag of {config.model_name} "
                      f"({', '.join(tags) or 'it has none'}) nor an existing file")


def _create_clip(config: BackboneConfig, offline: str | None = None) -> tuple[nn.Module, bool]:
    """Build the open_clip model, turning every loading failure into one clear ``InputError``
    (``offline``: why the Hugging Face Hub is not asked, named in a failed download's error).

    Returns it and whether it runs QuickGELU (``config.quick_gelu`` None: auto), and logs why.
    The weights are read with ``weights_only`` (tensors only); OpenAI's TorchScript archives, given
    with ``--pretrained`` or as a ``local-dir:`` folder's weights file, through
    ``read_torchscript_state_dict``, which runs none of their code.
    """
    name, pretrained = config.model_name, config.pretrained
    if not name.startswith(SCHEMAS) and open_clip.get_model_config(name.replace("/", "-")) is None:
        raise InputError(f"--model_name {name}: unknown open_clip model "
                         f"(see open_clip.list_models(), or 'tiny' for the test model)")
    try:
        check_memory(config)
    except ValueError as error:
        raise InputError(f"--image_size {config.image_size}: {error}") from None
    if reads_weights_file(config) and not os.path.isfile(pretrained):
        raise _missing_weights(config)
    local_dir = name.startswith(LOCAL_DIR)
    folder_weights = _local_dir_weights(name) if local_dir else []
    weights_file = (folder_weights[0] if len(folder_weights) == 1 else None) if local_dir else \
        pretrained if reads_weights_file(config) else None
    source = f"--model_name {name}" if name.startswith(SCHEMAS) else f"--pretrained {pretrained}"
    if local_dir and weights_file is not None:
        source += f" (weights file {weights_file})"
    torchscript = weights_file is not None and is_torchscript_archive(weights_file)
    asked = config.quick_gelu
    reason = quick_gelu_rule(name, "none" if name.startswith(SCHEMAS) else pretrained, torchscript) \
        if asked is None else "set explicitly"
    with tempfile.TemporaryDirectory(prefix="medvmad_weights_") as folder:
        # open_clip's pretrained: a tag or a file; None for random weights and hf-hub:/local-dir: models
        built_name = name
        weights = None if name.startswith(SCHEMAS) or pretrained.lower() == "none" else pretrained
        if torchscript:
            weights = _torchscript_state_dict(weights_file, folder, source)
        model_config = Path(name[len(LOCAL_DIR):]) / "open_clip_config.json"
        if torchscript and local_dir and model_config.is_file():  # the config beside the archive's tensors
            shutil.copy(model_config, folder)
            built_name, weights = f"{LOCAL_DIR}{folder}", None
        kwargs = dict(
            pretrained=weights,
            force_quick_gelu=bool(asked) if asked is not None else reason is not None,
            force_image_size=config.image_size,
            weights_only=True,  # never unpickle code from a weights file
        )
        model = _call_open_clip(config, built_name, kwargs, source, weights_file, offline)
    if local_dir and not folder_weights:
        logger.warning(f"--model_name {name}: the folder holds no weights file ({', '.join(WEIGHTS_SUFFIXES)}); "
                       f"the model has random weights")
    # Read from the built model and kept in the resolved config, so checkpoints rebuild it.
    quick_gelu = _uses_quick_gelu(model)
    if asked is False and quick_gelu:
        raise InputError(f"--quick_gelu off: the model config of {name} turns QuickGELU on")
    if asked is True and not quick_gelu:
        raise InputError(f"--quick_gelu on: {name} has no QuickGELU to turn on (timm and "
                         f"Hugging Face towers keep their own activations)")
    if asked is None and quick_gelu and reason is None:
        reason = "the model config sets it"
    why = reason if asked is not None else "--quick_gelu auto: " + (reason or "no sign of QuickGELU weights")
    logger.info(f"QuickGELU {'on' if quick_gelu else 'off'} ({why})")
    return model, quick_gelu


def _call_open_clip(config: BackboneConfig, built_name: str, kwargs: dict, source: str,
                    weights_file: str | None, offline: str | None = None) -> nn.Module:
    """``open_clip.create_model(built_name, **kwargs)`` with its failures turned into one-line
    ``InputError``s (see ``_explain``; ``offline``: why the Hub is not asked, None when it is)."""
    try:
        # Seeded so that a random-init backbone (--pretrained none) is rebuilt identically from a
        # checkpoint's config (with the same library versions); loaded weights overwrite it anyway.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return open_clip.create_model(built_name, **kwargs)
    except Exception as error:  # open_clip, torch, safetensors and zip readers raise many types
        explained = _explain(error, config, built_name, kwargs, source, weights_file, offline)
        if explained is None:
            raise
        raise explained from None


def _first_line(error: Exception) -> str:
    """The error's type and the first line of its message, at most 300 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


def _builds_without_weights(built_name: str, kwargs: dict) -> bool:
    """Whether open_clip builds the model from its config alone (tells a bad folder config from bad weights)."""
    try:
        open_clip.create_model(built_name, **{**kwargs, "load_weights": False})
        return True
    except Exception:  # noqa: BLE001 - whatever the config makes open_clip raise
        return False


def _explain(error: Exception, config: BackboneConfig, built_name: str, kwargs: dict, source: str,
             weights_file: str | None, offline: str | None = None) -> InputError | None:
    """The one-line error for what ``open_clip.create_model`` raised (None: not the input's fault).
    ``source`` names what the user gave for the weights (``--pretrained X``, or ``--model_name
    local-dir:X`` and its weights file), ``weights_file`` the file read, where known, ``offline``
    why the Hub was not asked (None: it was)."""
    name, message = config.model_name, str(error)
    why = f"offline: {offline}, and not in the Hugging Face cache" if offline else "offline?"
    if "pip install transformers" in message:
        return InputError(f"--model_name {name} has a Hugging Face text tower: pip install transformers")
    if name.startswith("hf-hub:") and ("Failed" in message or "HF Hub" in message):
        return InputError(f"--model_name {name}: could not download it from the Hugging Face Hub ({why}); "
                          f"give a downloaded copy as --model_name local-dir:/path, {OFFLINE_HINTS}")
    if "Failed to download" in message:
        return InputError(f"could not download the '{config.pretrained}' weights of {name} ({why}); pass a local "
                          f"weights file with --pretrained /path/to/{name}.pt (.pt, .bin or .safetensors), "
                          f"{OFFLINE_HINTS}")
    if "Error(s) in loading state_dict" in message:
        lines = message.splitlines()
        detail = lines[1].strip() if len(lines) > 1 else message
        return InputError(f"{source} does not fit {name}: {detail if len(detail) <= 300 else detail[:300] + ' ...'}")
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in message:  # names code, not tensors
        return InputError(f"{source}: holds more than tensors; refusing to unpickle it, since that could run code "
                          f"(save the weights as .safetensors)")
    if name.startswith(LOCAL_DIR) and not _builds_without_weights(built_name, kwargs):
        return InputError(f"--model_name {name}: open_clip builds no model from the folder ({_first_line(error)})")
    if weights_file is not None and os.path.isfile(weights_file):
        return _unreadable_weights(source, error)
    if isinstance(error, (FileNotFoundError, ValueError)):
        return InputError(f"could not load --model_name {name}: {_first_line(error)}")
    return None


def _unreadable_weights(source: str, error: Exception) -> InputError:
    """The error for a weights file that no reader understands (random bytes, text, truncated)."""
    return InputError(f"{source}: not a readable weights file ({type(error).__name__}); expected "
                      f"a state dict (.pt/.bin), OpenAI's TorchScript .pt, or .safetensors")


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
    normalisation of the weights), which checkpoints store. Hub files are fetched only when the
    Hub answers (``hub_unreachable``); otherwise they are read from its cache, or the build stops at
    once naming the offline ways.
    """
    offline = hub_unreachable() if downloads_weights(config) else None
    if offline is None:
        return _wrap(config, *_create_clip(config))
    logger.info(f"Hugging Face Hub offline ({offline}): only its local cache is read")
    with hub_offline():  # the weights, and for hf-hub: models the config and tokenizer, from the cache
        return _wrap(config, *_create_clip(config, offline))


def _wrap(config: BackboneConfig, clip: nn.Module, quick_gelu: bool) -> Backbone:
    """The built open_clip model in the ``Backbone`` implementation its towers call for."""
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
