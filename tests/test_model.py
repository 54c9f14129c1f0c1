"""MedVMAD model tests on the tiny random-weight backbone (CPU, seconds)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy import ndimage

from CLIP.MedVMAD import MedVMAD, MedVMADConfig, MedVMADOutput, gaussian_blur
from CLIP.backbone import BackboneConfig, default_features_list
from CLIP.factory import build_backbone
from loss import LossWeights, dice_loss, focal_loss, medvmad_loss
from tests.helpers import ROOT, TINY_SIZE, tiny_config
from utils import InputError


def test_default_features_list_is_evenly_spaced_and_ends_at_last_layer():
    assert default_features_list(24) == [6, 12, 18, 24]
    assert default_features_list(12) == [3, 6, 9, 12]
    assert default_features_list(4) == [1, 2, 3, 4]


def test_sizes_are_read_from_the_model(tiny_model):
    backbone = tiny_model.backbone
    assert (backbone.width, backbone.num_layers, backbone.embed_dim) == (64, 4, 32)
    assert backbone.grid_size == (TINY_SIZE // 16, TINY_SIZE // 16)
    assert tiny_model.features_list == [1, 2, 3, 4]
    assert tiny_model.seg_adapters[0].down.weight.shape == (32, 64)


def test_output_shapes_and_ranges(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(torch.randn(3, 3, TINY_SIZE, TINY_SIZE))
    assert out.image_score.shape == (3,)
    assert out.anomaly_map.shape == (3, TINY_SIZE, TINY_SIZE)
    assert out.layer_logits.shape == (3, 4, TINY_SIZE, TINY_SIZE)
    assert out.image_logits.shape == (3, 4, 2)  # mean_patch: one term per detection layer
    assert len(out.patch_features) == 4 and out.patch_features[0].shape == (3, 16, 32)
    for tensor in (out.image_score, out.anomaly_map):
        assert tensor.dtype == torch.float64  # probabilities in float64: no ties by saturation
        assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1


def test_any_image_size_resizes_positional_embeddings():
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(backbone=BackboneConfig("tiny", "none", 96)))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))
    assert model.backbone.grid_size == (6, 6)
    assert out.anomaly_map.shape == (1, 96, 96)


def test_logits_are_clip_logit_scale_times_cosine():
    """Image and per-layer logits = exp(logit_scale) x cosine, for OpenAI's scale of 100 (not 1/0.07)."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(adapters=False, learnable_prompts=False)).eval()
    with torch.no_grad():
        model.backbone.clip.logit_scale.fill_(math.log(100.0))
        images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
        out = model(images)
        text = model.text_features()
        global_embedding = model.backbone.encode_image(model.backbone.normalize(images), [])[0]
    cosine = F.normalize(global_embedding, dim=-1) @ text.t()
    torch.testing.assert_close(out.image_logits[:, 0], 100.0 * cosine, atol=1e-4, rtol=1e-5)
    grid = TINY_SIZE // 16
    for layer, features in enumerate(out.patch_features):
        gap = 100.0 * (features @ text[1] - features @ text[0])                  # [B,N], row-major patches
        expected = F.interpolate(gap.reshape(2, 1, grid, grid), size=(TINY_SIZE, TINY_SIZE),
                                 mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(out.layer_logits[:, layer], expected, atol=1e-4, rtol=1e-5)
    expected_map = gaussian_blur(torch.sigmoid(out.layer_logits.double()).mean(dim=1), model.config.sigma)
    torch.testing.assert_close(out.anomaly_map, expected_map)


def test_backbone_frozen_prompts_and_adapters_learn(tiny_model):
    tiny_model.train()
    out = tiny_model(torch.randn(2, 3, TINY_SIZE, TINY_SIZE))
    (out.anomaly_map.sum() + out.image_score.sum()).backward()
    for name, parameter in tiny_model.backbone.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    trainable = dict(tiny_model.named_parameters())
    for name in ("prompts.context", "prompts.deep", "seg_adapters.0.down.weight",
                 "det_adapters.2.up.weight", "seg_adapters.3.down.weight", "det_adapters.3.down.weight"):
        grad = trainable[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_maps_of_different_layers_differ(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(torch.randn(2, 3, TINY_SIZE, TINY_SIZE))
    for i in range(4):
        for j in range(i + 1, 4):
            assert float((out.layer_logits[:, i] - out.layer_logits[:, j]).abs().max()) > 1e-3
            assert not torch.allclose(out.patch_features[i], out.patch_features[j])


def test_adapters_change_the_residual_stream():
    """alpha=0 leaves the last layer's CLS untouched; alpha=0.1 changes the global embedding (the
    max_patch rule's first image term)."""
    torch.manual_seed(0)
    tiny_model = MedVMAD(tiny_config(image_score="max_patch"))
    images = torch.randn(1, 3, TINY_SIZE, TINY_SIZE)
    tiny_model.eval()
    with torch.no_grad():
        adapted = tiny_model(images).image_logits[:, 0]
        tiny_model.config.alpha = 0.0
        plain = tiny_model(images).image_logits[:, 0]
        backbone = tiny_model.backbone
        bare = tiny_model._logits(backbone.encode_image(backbone.normalize(images), [])[0], tiny_model.text_features())
    assert torch.allclose(plain, bare, atol=1e-4)
    assert not torch.allclose(adapted, plain, atol=1e-3)


def test_image_scored_alone_equals_scored_in_batch(tiny_model):
    tiny_model.eval()
    images = torch.randn(4, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        batch = tiny_model(images)
        alone = tiny_model(images[2:3])
    assert torch.allclose(batch.image_score[2:3], alone.image_score, atol=1e-5)
    assert torch.allclose(batch.anomaly_map[2:3], alone.anomaly_map, atol=1e-5)


def test_text_features_cached_in_eval_and_recomputed_in_training(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        first = tiny_model.text_features()
        assert tiny_model.text_features() is first
    tiny_model.train()
    trained = tiny_model.text_features()
    assert trained.requires_grad and trained is not first
    assert torch.allclose(trained, first, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_round_trip_through_pretrained_path(tmp_path, suffix):
    source = build_backbone(BackboneConfig("tiny", "none", TINY_SIZE))
    with torch.no_grad():  # move away from the seeded random init: only loading can match it
        for parameter in source.clip.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.clip.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_backbone(BackboneConfig("tiny", str(path), TINY_SIZE))
    fresh = build_backbone(BackboneConfig("tiny", "none", TINY_SIZE))
    assert not torch.equal(loaded.clip.visual.proj, fresh.clip.visual.proj)
    images = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        assert torch.equal(source.encode_image(images, [2])[0], loaded.encode_image(images, [2])[0])
        assert torch.equal(source.encode_text(["a brain MRI"]), loaded.encode_text(["a brain MRI"]))


def test_weights_saved_at_another_size_are_resized(tmp_path):
    torch.manual_seed(0)
    source = build_backbone(BackboneConfig("tiny", "none", 224))
    path = tmp_path / "tiny224.pt"
    torch.save(source.clip.state_dict(), path)
    loaded = build_backbone(BackboneConfig("tiny", str(path), 96))
    assert loaded.clip.visual.positional_embedding.shape == (37, 64)


def test_random_init_is_rebuilt_identically_from_its_config():
    torch.manual_seed(123)
    first = build_backbone(BackboneConfig("tiny", "none", TINY_SIZE))
    torch.manual_seed(456)
    second = build_backbone(BackboneConfig("tiny", "none", TINY_SIZE))
    for (name, a), (_, b) in zip(first.clip.state_dict().items(), second.clip.state_dict().items()):
        assert torch.equal(a, b), name


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(InputError, match="does not fit tiny"):
        build_backbone(BackboneConfig("tiny", str(path), TINY_SIZE))
    with pytest.raises(InputError, match="no such weights file"):
        build_backbone(BackboneConfig("tiny", str(tmp_path / "missing.pt"), TINY_SIZE))
    with pytest.raises(InputError, match="unknown open_clip model"):
        build_backbone(BackboneConfig("ViT-Q-99", "none", TINY_SIZE))


def test_offline_openai_download_says_how_to_pass_local_weights():
    # conftest sets HF_HUB_OFFLINE=1: the download fails at once, as it does on a machine offline.
    with pytest.raises(InputError) as error:
        build_backbone(BackboneConfig("ViT-B-32", "openai", 224))
    message = str(error.value)
    assert "--pretrained /path/to/ViT-B-32.pt" in message and "\n" not in message


def test_trainable_state_dict_round_trip(tiny_model):
    state = tiny_model.trainable_state_dict()
    assert set(state) == {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("backbone.") for name in state)
    torch.manual_seed(5)
    other = MedVMAD(tiny_config(), backbone=tiny_model.backbone)
    images = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    other.eval(), tiny_model.eval()
    with torch.no_grad():
        assert not torch.allclose(other(images).anomaly_map, tiny_model(images).anomaly_map)
        other.load_trainable_state_dict(state)
        assert torch.equal(other(images).anomaly_map, tiny_model(images).anomaly_map)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_trainable_state_dict({"prompts.context": state["prompts.context"]})


def test_config_dict_round_trip():
    config = tiny_config(features_list=[2, 4], sigma=2.0)
    assert MedVMADConfig.from_dict(config.to_dict()) == config


def test_zero_training_baseline_uses_projected_tokens_and_ensemble():
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(adapters=False, learnable_prompts=False))
    assert not any(p.requires_grad for p in model.parameters())
    model.eval()
    images = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        out = model(images)
        global_embedding = model.backbone.encode_image(model.backbone.normalize(images), [])[0]
        global_probability = model._logits(global_embedding, model.text_features()).softmax(-1)[:, 1]
    expected = 0.5 * global_probability.double() + 0.5 * out.anomaly_map.flatten(1).max(dim=1).values
    assert torch.allclose(out.image_score, expected, atol=1e-5)
    assert (model.config.wording, model.config.image_score) == ("medical", "max_patch")
    assert out.image_logits.shape == (2, 1, 2)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 30.0])  # 30: a radius of 120, wider than the map (reflected again)
def test_gaussian_blur_matches_scipy(sigma):
    """The codes' ``gaussian_filter(map, sigma)``: scipy's defaults, mode "reflect", truncate 4."""
    maps = torch.rand(2, 40, 50, dtype=torch.float64)
    ours = gaussian_blur(maps, sigma).numpy()
    reference = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps.numpy()])
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    np.testing.assert_allclose(gaussian_blur(maps.float(), sigma).numpy(), reference, atol=1e-5)
    line = torch.rand(1, 1, 7, dtype=torch.float64)                      # a map one pixel high
    np.testing.assert_allclose(gaussian_blur(line, sigma).numpy()[0],
                               ndimage.gaussian_filter(line.numpy()[0], sigma), atol=1e-12)
    # checkpoints written before the codes' boundary was followed smooth as they did: mode "mirror"
    mirrored = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror") for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, sigma, "mirror").numpy(), mirrored, atol=1e-12)
    assert np.abs(mirrored - reference).max() > 1e-4


def test_focal_and_dice_hand_values():
    gap = torch.tensor([0.0, math.log(9.0)])           # p = 0.5 and 0.9
    y = torch.tensor([1.0, 0.0])
    expected_focal = (0.25 * np.log(2) + 0.81 * -np.log(0.1)) / 2
    assert float(focal_loss(gap[None], y[None])) == pytest.approx(expected_focal, rel=1e-5)
    assert float(dice_loss(gap[None], y[None])) == pytest.approx(1 - (2 * 0.5 + 1) / (1.4 + 1 + 1), rel=1e-6)
    # two images: each image's own focal and dice, not one over the batch
    per_image = [1 - (2 * 0.5 + 1) / (0.5 + 1 + 1), 1 - 1 / (0.9 + 0 + 1)]
    np.testing.assert_allclose(dice_loss(gap[:, None], y[:, None]).numpy(), per_image, rtol=1e-6)
    np.testing.assert_allclose(focal_loss(gap[:, None], y[:, None]).numpy(), [0.25 * np.log(2), 0.81 * -np.log(0.1)],
                               rtol=1e-5)


def _output(layer_logits: torch.Tensor, image_logits: torch.Tensor) -> MedVMADOutput:
    """A model output holding only what the loss reads."""
    empty = torch.zeros(0)
    return MedVMADOutput(empty, empty, layer_logits, image_logits, [], empty, None)


def test_loss_equals_hand_computation_at_moderate_gaps():
    """Focal + dice per layer on sigmoid(gap), BCE per image term, written out with numpy."""
    rng = np.random.default_rng(0)
    gaps = rng.uniform(-3, 3, (3, 2, 5, 6))                                   # [B,L,H,W]
    masks = (rng.random((3, 5, 6)) > 0.6).astype(np.float64)
    image_logits = rng.uniform(-3, 3, (3, 4, 2))
    labels = np.array([0, 1, 1])
    has_mask = np.array([True, False, True])
    output = _output(torch.tensor(gaps, dtype=torch.float32), torch.tensor(image_logits, dtype=torch.float32))
    parts = medvmad_loss(output, torch.tensor(masks), torch.tensor(labels), torch.tensor(has_mask),
                         LossWeights(2.0, 3.0, 0.5))
    p, y = 1 / (1 + np.exp(-gaps[has_mask])), masks[has_mask]
    focal = sum(np.mean(-y * (1 - p[:, k]) ** 2 * np.log(p[:, k]) - (1 - y) * p[:, k] ** 2 * np.log(1 - p[:, k]))
                for k in range(2))
    dice = sum(np.mean([1 - (2 * (p[i, k] * y[i]).sum() + 1) / (p[i, k].sum() + y[i].sum() + 1)
                        for i in range(len(y))]) for k in range(2))
    q = 1 / (1 + np.exp(-(image_logits[..., 1] - image_logits[..., 0])))
    bce = np.mean(np.sum(-(labels[:, None] * np.log(q) + (1 - labels[:, None]) * np.log(1 - q)), axis=1))
    assert float(parts["focal"]) == pytest.approx(focal, rel=1e-5)
    assert float(parts["dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(parts["image"]) == pytest.approx(bce, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(2 * focal + 3 * dice + 0.5 * bce, rel=1e-5)


def test_loss_of_a_batch_split_over_processes_averages_to_the_whole_batch():
    """DDP averages the processes' gradients, so the mean of the shards' losses must be the global
    batch's loss, also when the shards hold different numbers of images (2 and 2, 3 and 1) and of
    masked images:
    each shard divides its masked images' sum by the global count over the number of shards."""
    rng = np.random.default_rng(1)
    gaps = torch.tensor(rng.uniform(-3, 3, (4, 2, 5, 6)), dtype=torch.float32)
    image_logits = torch.tensor(rng.uniform(-3, 3, (4, 3, 2)), dtype=torch.float32)
    masks = torch.tensor((rng.random((4, 5, 6)) > 0.6).astype(np.float32))
    labels = torch.tensor([0, 1, 1, 1])
    weights = LossWeights(1.0, 2.0, 0.5, normal_dice=1.5)
    for known in ([True, True, False, True], [False, False, False, True]):  # 3 and 1 masked images
        has_mask = torch.tensor(known)
        whole = medvmad_loss(_output(gaps, image_logits), masks, labels, has_mask, weights)
        for parts in ((slice(0, 2), slice(2, 4)), (slice(0, 3), slice(3, 4))):  # equal and unequal shares
            shards = [medvmad_loss(_output(gaps[part], image_logits[part]), masks[part], labels[part], has_mask[part],
                                   weights, images=4 / 2, masked_images=sum(known) / 2) for part in parts]
            for key in ("loss", "focal", "dice", "image"):
                assert float(sum(s[key] for s in shards) / 2) == pytest.approx(float(whole[key]), rel=1e-6), \
                    (known, parts, key)
    # a shard whose images all lack masks still reaches the pixel logits (zero gradient, not none)
    unmasked = gaps[2:3].clone().requires_grad_()
    medvmad_loss(_output(unmasked, image_logits[2:3]), masks[2:3], labels[2:3], has_mask[2:3], weights,
                 masked_images=1.5)["loss"].backward()
    assert unmasked.grad is not None and float(unmasked.grad.abs().sum()) == 0


@pytest.mark.parametrize("label", [1, 0])
def test_confidently_wrong_pixel_and_image_still_get_gradient(label):
    """A logit gap of 40 the wrong way, for a lesion called normal and a normal image called abnormal:
    the old clamp at 1e-6 gave exactly zero gradient here."""
    wrong = -40.0 if label else 40.0
    layer_logits = torch.full((1, 1, 2, 2), wrong, requires_grad=True)
    image_logits = torch.tensor([[[0.0, wrong]]], requires_grad=True)
    masks = torch.full((1, 2, 2), float(label))
    parts = medvmad_loss(_output(layer_logits, image_logits), masks, torch.tensor([label]),
                         torch.tensor([True]), LossWeights())
    parts["loss"].backward()
    loss = parts["loss"].detach()
    assert torch.isfinite(loss) and float(loss) > 40
    pixel_grad, image_grad = layer_logits.grad, image_logits.grad
    assert torch.isfinite(pixel_grad).all() and torch.isfinite(image_grad).all()
    # d focal / d gap -> -/+1 per pixel, averaged over 4 pixels; d BCE / d gap -> -/+1
    sign = -1.0 if label else 1.0
    torch.testing.assert_close(pixel_grad, torch.full_like(pixel_grad, 0.25 * sign), atol=1e-3, rtol=0)
    torch.testing.assert_close(image_grad, torch.tensor([[[-sign, sign]]]), atol=1e-6, rtol=0)


def test_overfits_a_batch_with_a_lesion_mask(tiny_model):
    torch.manual_seed(0)
    images = torch.randn(4, 3, TINY_SIZE, TINY_SIZE) * 0.3
    masks = torch.zeros(4, TINY_SIZE, TINY_SIZE)
    images[2:, :, 16:40, 20:44] += 2.0
    masks[2:, 16:40, 20:44] = 1
    labels = torch.tensor([0, 0, 1, 1])
    has_mask = torch.ones(4, dtype=torch.bool)
    parameters = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-3, betas=(0.5, 0.999))
    tiny_model.train()
    losses = []
    for _ in range(50):
        parts = medvmad_loss(tiny_model(images), masks, labels, has_mask, LossWeights())
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_pixel_loss_skipped_without_masks(tiny_model):
    out = tiny_model(torch.randn(2, 3, TINY_SIZE, TINY_SIZE))
    parts = medvmad_loss(out, torch.zeros(2, TINY_SIZE, TINY_SIZE), torch.tensor([0, 1]),
                         torch.zeros(2, dtype=torch.bool), LossWeights())
    assert float(parts["focal"]) == 0 and float(parts["dice"]) == 0
    assert torch.allclose(parts["loss"], parts["image"])


def test_vit_l_14_336_architecture_and_defaults():
    """The default backbone's wiring at 240 px, random weights (no download)."""
    model = MedVMAD(MedVMADConfig(BackboneConfig("ViT-L-14-336", "none", 240), depth=1))
    backbone = model.backbone
    assert (backbone.width, backbone.embed_dim, backbone.num_layers) == (1024, 768, 24)
    assert backbone.grid_size == (17, 17) and model.features_list == [6, 12, 18, 24]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 240, 240))
    assert out.anomaly_map.shape == (1, 240, 240) and out.patch_features[0].shape == (1, 289, 768)


def test_openai_weights_get_quick_gelu(monkeypatch):
    seen = {}

    def fake_create_model(name, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("Failed to download weights (test)")

    monkeypatch.setattr("open_clip.create_model", fake_create_model)
    with pytest.raises(InputError, match="--pretrained /path/to/ViT-L-14-336.pt"):
        build_backbone(BackboneConfig())
    assert seen["name"] == "ViT-L-14-336" and seen["pretrained"] == "openai"
    assert seen["force_quick_gelu"] is True and seen["force_image_size"] == 336
    with pytest.raises(InputError):
        build_backbone(BackboneConfig("ViT-B-16", "none", 224))
    assert seen["force_quick_gelu"] is False and seen["pretrained"] is None


def test_local_dir_model_loads_config_and_weights(tmp_path):
    import json

    source = build_backbone(BackboneConfig("tiny", "none", 224))
    with torch.no_grad():
        source.clip.visual.proj.add_(1.0)
    folder = tmp_path / "tiny-local"
    folder.mkdir()
    config = json.loads((ROOT / "CLIP" / "model_configs" / "tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.save(source.clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    loaded = build_backbone(BackboneConfig(f"local-dir:{folder}", "none", 224))
    assert torch.equal(loaded.clip.visual.proj, source.clip.visual.proj)
    assert loaded.tokenizer(["a brain"]).shape == (1, 77)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript is deprecated, but OpenAI shipped it
def test_torchscript_archives_are_told_from_state_dicts(tmp_path):
    from CLIP.torchscript_weights import is_torchscript_archive

    scripted = tmp_path / "openai_style.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    state = tmp_path / "state.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state)
    assert is_torchscript_archive(str(scripted)) and not is_torchscript_archive(str(state))


def test_offline_hf_hub_model_is_a_clear_error():
    with pytest.raises(InputError, match="could not download"):
        build_backbone(BackboneConfig("hf-hub:timm/ViT-B-16-SigLIP", "none", 224))


def test_bf16_autocast_training_step_keeps_fp32_weights(tiny_model):
    from utils import autocast

    images = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with autocast(torch.device("cpu"), "bf16"):
        out = tiny_model(images)
    assert out.anomaly_map.dtype == torch.float64 and out.image_score.dtype == torch.float64  # no bf16 ties
    parts = medvmad_loss(out, torch.zeros(2, TINY_SIZE, TINY_SIZE), torch.tensor([0, 1]),
                         torch.ones(2, dtype=torch.bool), LossWeights())
    assert parts["loss"].dtype == torch.float32 and torch.isfinite(parts["loss"])
    parts["loss"].backward()
    weight = tiny_model.seg_adapters[0].down.weight
    assert weight.dtype == torch.float32 and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("organ", ["brain", "liver", "retina", "chest", "histopathology", "organ", "mydata"])
def test_learnable_prompts_build_for_every_organ_and_unknown_names(organ):
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(organ=organ))
    model.eval()
    with torch.no_grad():
        text = model.text_features()
    assert text.shape == (2, 32) and not torch.allclose(text[0], text[1])


def test_quick_gelu_is_resolved_into_the_config():
    backbone = build_backbone(BackboneConfig("tiny", "none", TINY_SIZE))
    assert backbone.config.quick_gelu is False


def test_duplicate_features_list_is_refused():
    with pytest.raises(ValueError, match="repeat"):
        MedVMAD(tiny_config(features_list=[2, 2]))


def test_set_grad_checkpointing_switches_recomputation_in_the_backbone_blocks():
    """On: the last image block runs again in the backward pass; off again: once, as by default."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config())
    images, masks = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.8).float()
    block = model.backbone.clip.visual.transformer.resblocks[-1]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    runs = []
    for enabled in (None, True, False):
        if enabled is not None:
            model.set_grad_checkpointing(enabled)
        calls.clear()
        medvmad_loss(model(images), masks, torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool),
                     LossWeights())["loss"].backward()
        runs.append((model.backbone.grad_checkpointing, len(calls)))
    assert runs == [(False, 1), (True, 2), (False, 1)]


@pytest.mark.parametrize("name", ["tiny", "biomedclip"])
def test_grad_checkpointing_recomputes_blocks_and_keeps_the_gradients(name, request):
    """Same loss and gradients; the last image block (behind a tapped adapter, so gradients flow
    through it) runs twice: forward, then recomputed in the backward pass."""
    if name == "biomedclip":
        config = tiny_config(backbone=BackboneConfig(request.getfixturevalue("biomedclip_name"), "none", 64))
    else:
        config = tiny_config()
    torch.manual_seed(0)
    model = MedVMAD(config)
    images, masks = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.8).float()
    blocks = model.backbone.clip.visual.transformer.resblocks if name == "tiny" else model.backbone.trunk.blocks
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        calls = []
        handle = blocks[-1].register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
        loss = medvmad_loss(model(images), masks, torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool),
                            LossWeights())["loss"]
        loss.backward()
        handle.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads, len(calls)))
    (plain_loss, plain_grads, plain_calls), (ckpt_loss, ckpt_grads, ckpt_calls) = results
    assert plain_calls == 1 and ckpt_calls == 2
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6) and plain_grads.keys() == ckpt_grads.keys()
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=1e-4, atol=1e-6)
