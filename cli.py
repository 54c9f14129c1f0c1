"""Command-line flags shared by train.py, test.py and test_one_example.py (app.py takes the latter's),
declared once, with defaults read from the model's dataclasses, and the model they describe.

Scripts that train build a new model: its flags default to ``BackboneConfig``/``MedVMADConfig``.
Scripts that evaluate may load a checkpoint, which names its own backbone: their model flags
default to None, meaning "the checkpoint's, else the dataclass default" (the zero-training
baseline), and a --model_name that differs from the checkpoint's is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import BackboneConfig
from CLIP.checkpoint import load_model
from utils import (InputError, device_name, finite_float, non_negative_int, positive_float, positive_int, seed_value,
                   sigma_value)

MODEL = MedVMADConfig()  # its field values are the flags' defaults
BACKBONE = MODEL.backbone
QUICK_GELU = {"auto": None, "on": True, "off": False}

# Each variant's training recipe (the values its own paper and code train and score with), as data.
RECIPE_FILE = Path(__file__).resolve().parent / "recipes.json"
# The train.py flags a recipe sets when they are not given; with --k_shot, epoch and learning_rate
# come from the recipe's fewshot_epoch and fewshot_learning_rate.
RECIPE_KEYS = ("image_size", "epoch", "batch_size", "learning_rate", "adam_betas", "keep", "features_list", "n_ctx",
               "depth", "t_n_ctx", "alpha", "sigma", "focal_weight", "dice_weight", "normal_dice_weight",
               "image_weight")


def load_recipes() -> dict[str, dict[str, Any]]:
    """recipes.json: {name: {flag: value, ..., "source": where the values come from}}; a
    ``features_list`` of null is the model's default (4 evenly spaced), -1 its last layer."""
    recipes = json.loads(RECIPE_FILE.read_text())
    for name, recipe in recipes.items():
        missing = [key for key in RECIPE_KEYS + ("fewshot_epoch", "fewshot_learning_rate") if key not in recipe]
        if missing:
            raise InputError(f"{RECIPE_FILE}: recipe {name} lacks {', '.join(missing)}")
    return recipes


def apply_recipe(args: argparse.Namespace) -> list[str]:
    """Fill the training flags left unset (None) from the recipe ``--recipe`` names (default: the
    ``--variant``'s own); sets ``args.recipe`` to its name and returns the flags it filled."""
    args.recipe = args.recipe or args.variant
    recipe = load_recipes()[args.recipe]
    fewshot = {"epoch": "fewshot_epoch", "learning_rate": "fewshot_learning_rate"} if args.k_shot else {}
    filled = [key for key in RECIPE_KEYS if getattr(args, key) is None]
    for key in filled:
        setattr(args, key, recipe[fewshot.get(key, key)])
    args.adam_betas = tuple(args.adam_betas)  # the same type whether given or from the recipe (resume compares)
    return filled


def add_model_args(parser, checkpoint: bool, features_list: bool = True) -> None:
    """--model_name --pretrained --image_size --quick_gelu --image_mean --image_std --sigma, and
    --features_list unless ``features_list`` is False.

    ``checkpoint``: the script may load a checkpoint, so each flag defaults to None (the
    checkpoint's value, else the dataclass default); otherwise (train.py) each defaults to the
    dataclass's, but --image_size and --sigma to None: the recipe's (``apply_recipe``).
    """
    def default(value: Any) -> tuple[Any, str]:
        return (None, f"default: the checkpoint's, else {value}") if checkpoint else (value, f"default {value}")

    def recipe_default(value: Any) -> tuple[Any, str]:  # train.py: the recipe's value when not given
        return default(value) if checkpoint else (None, "default: the recipe's, see --recipe")

    value, note = default(BACKBONE.model_name)
    parser.add_argument("--model_name", default=value, help=f"open_clip backbone name ({note})")
    value, note = default(BACKBONE.pretrained)
    parser.add_argument("--pretrained", default=value,
                        help=f"backbone weights: open_clip tag, local weights file, or none ({note})")
    value, note = recipe_default(BACKBONE.image_size)
    parser.add_argument("--image_size", type=positive_int, default=value,
                        help=f"input side in pixels; CLIP's positional embeddings are resized to it. A side that is "
                             f"not a multiple of the patch size (14 for ViT-L-14) works: the ViT drops the last "
                             f"partial patch, with a warning, and the map's edge is repeated over those pixels; "
                             f"below one patch it is refused ({note})")
    parser.add_argument("--quick_gelu", choices=sorted(QUICK_GELU), default="auto",
                        help="QuickGELU activation; auto: on for OpenAI weights (the openai tag, TorchScript "
                             "archives, *-quickgelu names, files or repos whose name says openai)")
    parser.add_argument("--image_mean", type=finite_float, nargs=3, metavar=("R", "G", "B"),
                        help="image normalisation mean (default: the weights' own preprocess config)")
    parser.add_argument("--image_std", type=positive_float, nargs=3, metavar=("R", "G", "B"),
                        help="image normalisation std (default: the weights' own preprocess config)")
    if features_list:
        parser.add_argument("--features_list", type=positive_int, nargs="+",
                            help="tapped layers, 1-based (default: 4 evenly spaced)" + (
                                "; a checkpoint keeps its own, and other layers are refused" if checkpoint else ""))
    value, note = recipe_default(MODEL.sigma)
    parser.add_argument("--sigma", type=sigma_value, default=value,
                        help=f"Gaussian smoothing of the maps, pixels ({note})")


def add_runtime_args(parser, datasets: bool = True, batch_size: int | None = 8) -> None:
    """--batch_size (``batch_size`` None: the recipe's) --device --precision and, for scripts that
    read datasets, --num_workers --seed."""
    parser.add_argument("--batch_size", type=positive_int, default=batch_size,
                        help=f"default {batch_size}" if batch_size else "default: the recipe's, see --recipe")
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "bf16"],
                        help="autocast for the forward pass; learnable weights stay fp32")
    if datasets:
        parser.add_argument("--num_workers", type=non_negative_int, default=2)
        parser.add_argument("--seed", type=seed_value, default=111)


def add_distributed_args(parser) -> None:
    """--dist_timeout, for runs launched with torchrun (``distributed.distributed``)."""
    parser.add_argument("--dist_timeout", type=positive_int, default=1800, metavar="SECONDS",
                        help="under torchrun, how long a process waits for the others at a collective before the "
                             "run stops (covers process 0's metric computation while the others wait)")


def add_fewshot_args(parser) -> None:
    """--k_shot --fewshot_seed --support_file (resolved by ``dataset.resolve_support``)."""
    parser.add_argument("--k_shot", type=non_negative_int, default=0,
                        help="few-shot: k normal + k abnormal support images of the valid split (train.py trains "
                             "on them, augmented x11, with one training root; test.py banks the normal ones' "
                             "patches); 0 = off")
    parser.add_argument("--fewshot_seed", type=seed_value, default=1, help="seed of the sampled support set")
    parser.add_argument("--support_file", help="read the support set from this file (default: the one beside "
                        "--checkpoint_path when there is one, else sampled from the valid split with --fewshot_seed)")


def backbone_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """BackboneConfig fields from the --quick_gelu/--image_mean/--image_std flags (None: not overridden)."""
    return {"quick_gelu": QUICK_GELU[args.quick_gelu],
            "image_mean": tuple(args.image_mean) if args.image_mean else None,
            "image_std": tuple(args.image_std) if args.image_std else None}


def backbone_config(args: argparse.Namespace) -> BackboneConfig:
    """The backbone the model flags name; a flag left at None takes ``BackboneConfig``'s default."""
    given = dict(model_name=args.model_name, pretrained=args.pretrained, image_size=args.image_size,
                 **backbone_overrides(args))
    return BackboneConfig(**{key: value for key, value in given.items() if value is not None})


def build_model(args: argparse.Namespace, device: torch.device,
                organ: str = MODEL.organ) -> tuple[MedVMAD, dict | None]:
    """The model an evaluating script's flags describe, on ``device``, and its checkpoint (None for
    the zero-training baseline: fixed prompt ensemble with ``organ``'s wording, no adapters)."""
    if args.checkpoint_path:
        model, checkpoint = load_model(args.checkpoint_path, device, args.pretrained, args.image_size, args.sigma,
                                       model_name=args.model_name, **backbone_overrides(args))
        asked_layers = vars(args).get("features_list")
        if asked_layers and list(asked_layers) != model.features_list:
            raise InputError(f"--checkpoint_path {args.checkpoint_path} taps layers {model.features_list} (its "
                             f"adapters were trained there), not --features_list {' '.join(map(str, asked_layers))}")
        return model, checkpoint
    config = MedVMADConfig(backbone=backbone_config(args), organ=organ, features_list=vars(args).get("features_list"),
                           adapters=False, learnable_prompts=False,
                           sigma=MODEL.sigma if args.sigma is None else args.sigma)
    try:
        return MedVMAD(config).to(device), None
    except ValueError as error:
        raise InputError(str(error)) from None
