"""What real weights and real data depend on, pinned on the tiny model: QuickGELU, normalisation,
safe weights loading, map orientation end to end, and per-source model selection."""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score
from torch.utils.data import DataLoader

import test_one_example
import train
import visualization
from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import OPENAI_MEAN, OPENAI_STD, BackboneConfig
from CLIP.checkpoint import load_model, save_checkpoint
from CLIP.factory import build_backbone, quick_gelu_rule
from cli import build_model
from dataset import MedicalDataset, Sample, list_samples, split_holdout
from generate_dataset.demo import build_demo
from evaluation.predict import predict
from evaluation.selection import selection_summary
from tests.helpers import ROOT, TINY_SIZE, tiny_config
from utils import InputError
from visualization import to_display


def tiny_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Weights of the tiny CLIP, moved away from its seeded init so that only loading can match them."""
    source = build_backbone(BackboneConfig("tiny", "none", 224))
    generator = torch.Generator().manual_seed(seed)
    return {key: (value + 0.01 * torch.randn(value.shape, generator=generator)).contiguous()
            if value.is_floating_point() else value for key, value in source.clip.state_dict().items()}


def activations(backbone) -> set[str]:
    return {type(module).__name__ for module in backbone.modules() if type(module).__name__ in ("GELU", "QuickGELU")}


# ----------------------------------------------------------------------------- QuickGELU

@pytest.mark.parametrize("model_name, pretrained, torchscript, expected", [
    ("ViT-L-14-336", "openai", False, True),
    ("ViT-L-14-336", "none", True, True),
    ("ViT-B-32-quickgelu", "laion400m_e32", False, True),
    ("ViT-B-32", "laion400m_e32", False, True),                     # open_clip's tag was trained with it
    ("hf-hub:timm/vit_large_patch14_clip_336.openai", "none", False, True),
    ("local-dir:/models/vit_large_patch14_clip_336.openai", "none", False, True),
    ("ViT-L-14-336", "/weights/vit_large_patch14_clip_336.openai/open_clip_model.safetensors", False, True),
    ("ViT-L-14", "laion2b_s32b_b82k", False, False),
    ("ViT-L-14-336", "/weights/ViT-L-14-336.safetensors", False, False),
    ("ViT-L-14-336", "/home/openai_runs/laion/laion2b.safetensors", False, False),  # a folder far up
    ("ViT-L-14-336", "/hf/models--timm--vit_large_patch14_clip_336.openai/snapshots/1a/model.safetensors",
     False, True),
    ("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "none", False, False),
    ("tiny", "none", False, False),
])
def test_quick_gelu_auto_rule(model_name, pretrained, torchscript, expected):
    assert (quick_gelu_rule(model_name, pretrained, torchscript) is not None) is expected


def test_quick_gelu_for_weights_files_by_name_and_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("medvmad"), "propagate", True)  # setup_logging turns it off
    state = tiny_state()
    openai_file = tmp_path / "vit_tiny.openai.safetensors"
    other_file = tmp_path / "vit_tiny.safetensors"
    save_file(state, str(openai_file))
    save_file(state, str(other_file))
    with caplog.at_level(logging.INFO, logger="medvmad"):
        on = build_backbone(BackboneConfig("tiny", str(openai_file), TINY_SIZE))
    assert on.config.quick_gelu is True and activations(on) == {"QuickGELU"}
    assert "QuickGELU on" in caplog.text and "says openai" in caplog.text
    off = build_backbone(BackboneConfig("tiny", str(other_file), TINY_SIZE))
    assert off.config.quick_gelu is False and activations(off) == {"GELU"}
    forced_off = build_backbone(BackboneConfig("tiny", str(openai_file), TINY_SIZE, quick_gelu=False))
    assert activations(forced_off) == {"GELU"}
    images = torch.rand(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():  # same weights, different activation: different features
        assert not torch.allclose(on.encode_image(images, [])[0], forced_off.encode_image(images, [])[0])
    # the resolved value is what a checkpoint stores, and what rebuilds the model
    path = tmp_path / "model.pth"
    save_checkpoint(path, MedVMAD(tiny_config(backbone=BackboneConfig("tiny", str(openai_file), TINY_SIZE))))
    assert torch.load(path, weights_only=True)["config"]["backbone"]["quick_gelu"] is True
    rebuilt, _ = load_model(path, torch.device("cpu"), pretrained=str(openai_file))  # a stored file is named again
    assert activations(rebuilt.backbone) == {"QuickGELU"}


def test_quick_gelu_for_a_local_dir_by_name(tmp_path):
    folder = tmp_path / "vit_tiny.openai"
    folder.mkdir()
    config = json.loads((ROOT / "CLIP" / "model_configs" / "tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file(tiny_state(), str(folder / "open_clip_model.safetensors"))
    backbone = build_backbone(BackboneConfig(f"local-dir:{folder}", "none", TINY_SIZE))
    assert backbone.config.quick_gelu is True and activations(backbone) == {"QuickGELU"}


def test_model_config_that_sets_quick_gelu_is_what_is_stored_and_off_is_refused(tmp_path):
    folder = tmp_path / "tiny-qg"
    folder.mkdir()
    config = json.loads((ROOT / "CLIP" / "model_configs" / "tiny.json").read_text())
    config["quick_gelu"] = True
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file(tiny_state(), str(folder / "open_clip_model.safetensors"))
    backbone = build_backbone(BackboneConfig(f"local-dir:{folder}", "none", TINY_SIZE))
    assert backbone.config.quick_gelu is True and activations(backbone) == {"QuickGELU"}
    with pytest.raises(InputError, match="--quick_gelu off"):
        build_backbone(BackboneConfig(f"local-dir:{folder}", "none", TINY_SIZE, quick_gelu=False))


def test_quick_gelu_flag_reaches_the_config():
    args = train.parse_args(["--quick_gelu", "on", "--model_name", "tiny", "--pretrained", "none"])
    assert train.model_config(args, "brain").backbone.quick_gelu is True
    args = train.parse_args(["--model_name", "tiny", "--pretrained", "none"])
    assert train.model_config(args, "brain").backbone.quick_gelu is None  # auto: resolved at load


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript is deprecated, but OpenAI shipped it
def test_torchscript_archive_loads_its_weights_with_quick_gelu(tmp_path):
    import open_clip

    source = open_clip.create_model("tiny", pretrained=None, force_image_size=224)
    source.load_state_dict(tiny_state())
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(source), str(path))
    loaded = build_backbone(BackboneConfig("tiny", str(path), TINY_SIZE))
    assert loaded.config.quick_gelu is True
    assert torch.equal(loaded.clip.visual.proj, source.visual.proj)
    assert torch.equal(loaded.clip.token_embedding.weight, source.token_embedding.weight)


# ----------------------------------------------------------------------------- safe loading

class _WritesMarker:
    """Unpickling this creates the marker file: the sign that a weights file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(marker, pickle that writes it as a .pt, the same inside a zip that looks like TorchScript)."""
    marker = tmp_path / "code_ran"
    plain = tmp_path / "crafted.pt"
    torch.save({"visual.proj": _WritesMarker(marker)}, plain)
    looks_scripted = tmp_path / "crafted_torchscript.pt"
    torch.save({"visual.proj": _WritesMarker(marker)}, looks_scripted)
    with zipfile.ZipFile(looks_scripted, "a") as archive:
        archive.writestr("crafted_torchscript/code/__torch__.py", "")
    return marker, plain, looks_scripted


def test_crafted_weights_files_never_run_code(tmp_path):
    marker, plain, looks_scripted = crafted_files(tmp_path)
    with pytest.raises(InputError, match="TorchScript"):
        build_backbone(BackboneConfig("tiny", str(looks_scripted), TINY_SIZE))
    with pytest.raises(InputError, match="refusing to unpickle"):
        build_backbone(BackboneConfig("tiny", str(plain), TINY_SIZE))
    assert not marker.exists()


def test_checkpoint_naming_a_crafted_weights_file_never_runs_code(tmp_path):
    marker, plain, looks_scripted = crafted_files(tmp_path)
    torch.manual_seed(0)
    model = MedVMAD(tiny_config())
    for crafted in (looks_scripted, plain):
        model.config.backbone.pretrained = str(crafted)
        path = tmp_path / f"from_{crafted.stem}.pth"
        save_checkpoint(path, model)
        with pytest.raises(InputError, match=crafted.name):
            load_model(path, torch.device("cpu"))
    assert not marker.exists()


# ----------------------------------------------------------------------------- normalisation

def local_dir_model(tmp_path: Path, preprocess: dict) -> str:
    folder = tmp_path / "tiny-local"
    folder.mkdir(exist_ok=True)
    config = json.loads((ROOT / "CLIP" / "model_configs" / "tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    save_file(tiny_state(), str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def test_normalisation_comes_from_the_model_config(tmp_path):
    """A local-dir config saying mean = std = 0.5 is what the model normalises with."""
    name = local_dir_model(tmp_path, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    model = MedVMAD(tiny_config(backbone=BackboneConfig(name, "none", TINY_SIZE), adapters=False,
                                learnable_prompts=False)).eval()
    assert model.config.backbone.image_mean == (0.5, 0.5, 0.5) and model.config.backbone.image_std == (0.5, 0.5, 0.5)
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        out = model(images)
        text = model.text_features()
        by_hand = model.backbone.encode_image((images - 0.5) / 0.5, [])[0]
        with_openai = model.backbone.encode_image(
            (images - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1), [])[0]
    scale = float(model.backbone.logit_scale)
    torch.testing.assert_close(out.image_logits[:, 0], scale * F.normalize(by_hand, dim=-1) @ text.t())
    assert not torch.allclose(out.image_logits[:, 0], scale * F.normalize(with_openai, dim=-1) @ text.t(), atol=1e-3)

    overridden = build_backbone(BackboneConfig(name, "none", TINY_SIZE, image_mean=(0.2, 0.3, 0.4),
                                         image_std=(0.1, 0.2, 0.3)))
    x = torch.full((1, 3, 2, 2), 0.6)
    torch.testing.assert_close(overridden.normalize(x)[0, :, 0, 0], torch.tensor([4.0, 1.5, 2 / 3]))


def test_default_normalisation_for_files_and_old_checkpoints(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state(), str(path))
    assert build_backbone(BackboneConfig("tiny", str(path), TINY_SIZE)).config.image_mean == OPENAI_MEAN
    name = local_dir_model(tmp_path, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "new.pth", MedVMAD(tiny_config(backbone=BackboneConfig(name, "none", TINY_SIZE))))
    stored = torch.load(tmp_path / "new.pth", weights_only=True)
    assert tuple(stored["config"]["backbone"]["image_mean"]) == (0.5,) * 3
    loaded, *_ = load_model(tmp_path / "new.pth", torch.device("cpu"), model_name=name)
    assert loaded.config.backbone.image_std == (0.5,) * 3
    # a checkpoint written before image_mean/std were stored was trained with OpenAI's constants,
    # even on a model whose own config now says 0.5
    for key in ("image_mean", "image_std"):
        del stored["config"]["backbone"][key]
    torch.save(stored, tmp_path / "old.pth")
    old, _ = load_model(tmp_path / "old.pth", torch.device("cpu"), model_name=name)
    assert old.config.backbone.image_mean == OPENAI_MEAN and old.config.backbone.image_std == OPENAI_STD


def test_normalisation_flags_reach_the_model_in_every_script(tmp_path):
    """--image_mean/--image_std through test.py, test_one_example.py and a checkpoint's load."""
    from tests.helpers import test_script

    flags = ["--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE), "--device", "cpu",
             "--image_mean", "0.1", "0.2", "0.3", "--image_std", "0.4", "0.5", "0.6"]
    device = torch.device("cpu")
    baseline, _ = build_model(test_script.parse_args(flags), device)
    single, _, _ = test_one_example.build(test_one_example.parse_args(["--image_path", "x.png", *flags]), device)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck.pth", MedVMAD(tiny_config()))
    from_checkpoint, _ = build_model(
        test_script.parse_args(["--checkpoint_path", str(tmp_path / "ck.pth"), *flags[6:]]), device)
    x = torch.full((1, 3, 1, 1), 0.5)
    for model in (baseline, single, from_checkpoint):
        assert model.config.backbone.image_mean == (0.1, 0.2, 0.3)
        torch.testing.assert_close(model.backbone.normalize(x).flatten(), torch.tensor([1.0, 0.6, 1 / 3]))


def test_to_display_draws_model_input_as_it_is():
    image = torch.tensor([[[0.0, 0.5]], [[1.0, 0.25]], [[0.2, 1.2]]])           # [3,1,2] RGB
    np.testing.assert_array_equal(to_display(image), [[[0, 255, 51], [128, 64, 255]]])


# ----------------------------------------------------------------------------- orientation

def controlled_weights(tmp_path: Path) -> str:
    """Tiny CLIP weights whose vision blocks are identities and whose projected patch tokens carry
    the patch's mean brightness on embedding axis 0 (against a constant on axis 1)."""
    state = build_backbone(BackboneConfig("tiny", "none", TINY_SIZE)).clip.state_dict()
    for key, value in state.items():
        if key.startswith("visual.transformer.") and key.endswith(("out_proj.weight", "out_proj.bias",
                                                                   "c_proj.weight", "c_proj.bias")):
            value.zero_()                               # residual branches off: every block is the identity
    state["visual.conv1.weight"].zero_()
    state["visual.conv1.weight"][0] = 1.0 / (3 * 16 * 16)  # channel 0 = mean brightness of the patch
    state["visual.positional_embedding"].zero_()
    state["visual.positional_embedding"][:, 1] = 0.5        # channel 1 = a constant reference
    state["visual.class_embedding"].zero_()
    state["visual.proj"].zero_()
    state["visual.proj"][0, 0] = state["visual.proj"][1, 1] = 1.0
    path = tmp_path / "controlled.pt"
    torch.save(state, path)
    return str(path)


TEXT = torch.zeros(2, 32)
TEXT[0, 1] = TEXT[1, 0] = 1.0  # normal = embedding axis 1, abnormal = axis 0 (brightness)


def lesion_image(tmp_path: Path) -> tuple[str, str]:
    """A 96 x 128 (rows x columns) black image with a bright lesion filling its top-right corner, and its mask."""
    image = np.zeros((96, 128), np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    image[:28, 96:] = mask[:28, 96:] = 255
    image_path, mask_path = str(tmp_path / "lesion.png"), str(tmp_path / "lesion_mask.png")
    cv2.imwrite(image_path, image)
    cv2.imwrite(mask_path, mask)
    return image_path, mask_path


def test_lesion_in_a_corner_peaks_there_dataset_to_map(tmp_path, monkeypatch):
    monkeypatch.setattr(MedVMAD, "text_features", lambda self: TEXT)
    image_path, mask_path = lesion_image(tmp_path)
    backbone = BackboneConfig("tiny", controlled_weights(tmp_path), TINY_SIZE, quick_gelu=False,
                              image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    model = MedVMAD(MedVMADConfig(backbone, adapters=False, learnable_prompts=False, sigma=1.0))
    loader = DataLoader(MedicalDataset([Sample(image_path, mask_path, 1)], TINY_SIZE), batch_size=1)
    predictions = predict(model, loader, torch.device("cpu"))
    heat, mask = predictions.maps[0].astype(np.float32), predictions.masks[0]
    row, column = np.unravel_index(np.argmax(heat), heat.shape)
    assert row < TINY_SIZE // 3 and column > 2 * TINY_SIZE // 3, (row, column)   # top-right, not transposed
    assert mask[row, column]                                                     # on the lesion itself
    rows, columns = np.nonzero(mask)
    assert rows.max() < TINY_SIZE // 3 and columns.min() > 2 * TINY_SIZE // 3    # the mask went along


def test_lesion_in_a_corner_peaks_there_single_example(tmp_path, monkeypatch):
    monkeypatch.setattr(MedVMAD, "text_features", lambda self: TEXT)
    figures, real = [], visualization.overlay_figure
    monkeypatch.setattr(visualization, "overlay_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    image_path, _ = lesion_image(tmp_path)
    out = tmp_path / "out"
    test_one_example.main(["--image_path", image_path, "--model_name", "tiny", "--pretrained",
                           controlled_weights(tmp_path), "--image_size", str(TINY_SIZE), "--quick_gelu", "off",
                           "--image_mean", "0", "0", "0", "--image_std", "1", "1", "1", "--sigma", "1",
                           "--save_path", str(out), "--device", "cpu"])
    heat = np.load(out / "lesion.npy").astype(np.float32)
    assert heat.shape == (96, 128)
    row, column = np.unravel_index(np.argmax(heat), heat.shape)
    assert row < 28 and column >= 96, (row, column)
    [figure] = figures
    image_panel, heat_panel = (axis.images[0].get_array() for axis in figure.axes[:2])  # as drawn
    assert image_panel.shape == (96, 128, 3) and heat_panel.shape == (96, 128)
    bright_rows, bright_columns = np.nonzero(image_panel.sum(axis=2) > 600)
    assert bright_rows.max() < 28 and bright_columns.min() >= 96                  # the lesion where it was drawn
    row, column = np.unravel_index(np.argmax(heat_panel), heat_panel.shape)
    assert row < 40 and column > 80, (row, column)                                # and the map's peak with it


# ----------------------------------------------------------------------------- model selection

def test_selection_summary_hand_values():
    per_source = {"Brain": {"image_auroc": 0.8, "pixel_auroc": 0.9}, "Chest": {"image_auroc": 0.6},
                  "Retina": {"image_auroc": float("nan"), "pixel_auroc": float("nan")}}   # one class only
    score, summary = selection_summary(per_source)
    assert summary["image_auroc"] == pytest.approx(0.7) and summary["pixel_auroc"] == pytest.approx(0.9)
    assert score == pytest.approx(0.8)
    assert summary["Brain/pixel_auroc"] == 0.9 and summary["Chest/image_auroc"] == 0.6


def test_selection_is_per_source_with_one_masked_and_one_maskless_source(tmp_path):
    """Brain has masks, BrainCoronal has none: pixel AUROC still counts, image AUROCs are not pooled."""
    size = TINY_SIZE
    data = tmp_path / "data"
    brain = build_demo(str(data), n_train=2, n_valid=(8, 8), n_test=(2, 2), image_size=size)
    coronal = build_demo(str(data), n_train=2, n_valid=(8, 8), n_test=(2, 2), image_size=size, view="coronal")
    for mask in (Path(coronal) / "valid" / "Ungood" / "anomaly_mask").iterdir():
        mask.unlink()
    os.rmdir(Path(coronal) / "valid" / "Ungood" / "anomaly_mask")
    run = tmp_path / "run"
    train.main(["--train_data_path", brain, coronal, "--save_path", str(run), "--epoch", "1", "--model_name",
                "tiny", "--pretrained", "none", "--image_size", str(size), "--n_ctx", "4", "--depth", "2",
                "--t_n_ctx", "2", "--batch_size", "4", "--num_workers", "0", "--device", "cpu"])
    saved = torch.load(run / "epoch_1.pth", weights_only=True)
    values = saved["selection_metrics"]
    assert "BrainCoronal/pixel_auroc" not in values and "pixel_auroc" in values

    model, _ = load_model(run / "epoch_1.pth", torch.device("cpu"))
    reference, labels, scores = {}, [], []
    for root, name in ((brain, "Brain"), (coronal, "BrainCoronal")):
        _, held_out = split_holdout(list_samples(root, "valid"), 0.2, 111)
        predictions = predict(model, DataLoader(MedicalDataset(held_out, size), batch_size=4), torch.device("cpu"))
        reference[name] = roc_auc_score(predictions.labels, predictions.scores)
        labels.append(predictions.labels)
        scores.append(predictions.scores)
        if name == "Brain":
            reference["pixel"] = roc_auc_score(predictions.masks.ravel(), predictions.maps.astype(np.float64).ravel())
    assert values["Brain/image_auroc"] == pytest.approx(reference["Brain"], abs=1e-6)
    assert values["BrainCoronal/image_auroc"] == pytest.approx(reference["BrainCoronal"], abs=1e-6)
    assert values["image_auroc"] == pytest.approx((reference["Brain"] + reference["BrainCoronal"]) / 2, abs=1e-6)
    assert values["pixel_auroc"] == pytest.approx(reference["pixel"], abs=1e-4)
    assert saved["best"]["score"] == pytest.approx((values["image_auroc"] + values["pixel_auroc"]) / 2)
    # one decision threshold: F1-max over both sources' selection images together
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    best_f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert f1_score(labels, scores >= saved["threshold"]) == pytest.approx(best_f1, abs=1e-6)
    log = (run / "train_log.txt").read_text()
    assert "Brain/pixel_auroc" in log and "BrainCoronal/image_auroc" in log
