"""cli.py: the shared flags take their defaults from the model's dataclasses, evaluating scripts defer
to a checkpoint, and a checkpoint's backbone is never silently replaced."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import test_one_example
import train
from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import BackboneConfig
from CLIP.checkpoint import save_checkpoint
from cli import backbone_config, build_model
from tests.helpers import TINY_SIZE, test_script, tiny_config
from utils import InputError

MODEL_FLAGS = ("model_name", "pretrained", "image_size", "sigma")


def test_training_defaults_are_the_dataclass_defaults():
    args = train.parse_args([])
    config, backbone = MedVMADConfig(), BackboneConfig()
    assert (args.model_name, args.pretrained, args.image_size) == (backbone.model_name, backbone.pretrained,
                                                                  backbone.image_size)
    assert (args.sigma, args.n_ctx, args.depth, args.t_n_ctx, args.alpha) == (config.sigma, config.n_ctx, config.depth,
                                                                              config.t_n_ctx, config.alpha)
    assert train.model_config(args, "brain").backbone == backbone


@pytest.mark.parametrize("parse", [test_script.parse_args,
                                   lambda argv: test_one_example.parse_args(["--image_path", "x.png", *argv])])
def test_evaluating_scripts_defer_to_the_checkpoint_else_the_dataclass(parse):
    args = parse([])
    assert all(getattr(args, flag) is None for flag in MODEL_FLAGS)
    assert backbone_config(args) == BackboneConfig()
    given = backbone_config(parse(["--model_name", "tiny", "--pretrained", "none", "--image_size", "64",
                                   "--quick_gelu", "off"]))
    assert given == BackboneConfig("tiny", "none", 64, quick_gelu=False)


def test_a_model_name_other_than_the_checkpoints_is_refused_in_every_evaluating_script(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    save_checkpoint(checkpoint, MedVMAD(tiny_config()))
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.zeros((TINY_SIZE, TINY_SIZE), np.uint8))
    device = torch.device("cpu")
    message = f"--checkpoint_path {checkpoint} was trained on tiny, not --model_name ViT-B-16"
    with pytest.raises(InputError, match=message):
        build_model(test_script.parse_args(["--checkpoint_path", str(checkpoint), "--model_name", "ViT-B-16"]), device)
    with pytest.raises(InputError, match=message):
        test_one_example.main(["--image_path", str(image), "--checkpoint_path", str(checkpoint),
                               "--model_name", "ViT-B-16", "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    model, _ = build_model(test_script.parse_args(["--checkpoint_path", str(checkpoint), "--model_name", "tiny"]),
                           device)
    assert model.config.backbone.model_name == "tiny"



def test_features_list_other_than_the_checkpoints_is_refused(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    save_checkpoint(checkpoint, MedVMAD(tiny_config()))  # taps [1, 2, 3, 4]
    device = torch.device("cpu")
    with pytest.raises(InputError, match=r"taps layers \[1, 2, 3, 4\].*not --features_list 2 4"):
        build_model(test_script.parse_args(["--checkpoint_path", str(checkpoint), "--features_list", "2", "4"]), device)
    model, _ = build_model(test_script.parse_args(["--checkpoint_path", str(checkpoint), "--features_list",
                                                   "1", "2", "3", "4"]), device)
    assert model.features_list == [1, 2, 3, 4]


@pytest.mark.parametrize("parse", [train.parse_args, test_script.parse_args, test_one_example.parse_args])
def test_image_size_help_says_what_the_model_does_with_any_side(parse, capsys):
    """Sides that are not a multiple of the patch work with a warning, below one patch they are
    refused (both checked in test_bad_input.py): --help says so, not that sides must be multiples."""
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("A side that is not a multiple of the patch size (14 for ViT-L-14) works: the ViT drops the last "
            "partial patch, with a warning, and the map's edge is repeated over those pixels; below one patch it "
            "is refused") in text
