"""The paper's model variants (train.py --variant): each trains, evaluates and rebuilds from its
checkpoint; MVFA's image score and loss against hand computations on fixed logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CLIP.MedVMAD import VARIANTS, MedVMAD
from CLIP.checkpoint import load_model, save_checkpoint
from tests.helpers import TINY, test_script, tiny_config
from loss import LossWeights, medvmad_loss
from generate_dataset.demo import build_demo

import train


def fixed_inputs(batch: int = 2, layers: int = 4, patches: int = 16, seed: int = 0):
    """Text (normal = e0, abnormal = e1) and detection features whose logits are s * (cos0, cos1)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(2, 32)
    text[0, 0] = text[1, 1] = 1.0
    det = [torch.randn(batch, patches, 32, generator=generator) for _ in range(layers)]
    seg = [torch.randn(batch, patches, 32, generator=generator) for _ in range(layers)]
    return text, seg, det


def test_a_variant_without_its_parts_or_unknown_is_refused():
    with pytest.raises(ValueError, match="--variant mvfa is"):
        MedVMAD(tiny_config(variant="mvfa", adapters=False))
    with pytest.raises(ValueError, match="--variant dpam"):
        MedVMAD(tiny_config(variant="dpam"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=4, n_valid=(4, 4), n_test=(4, 4), image_size=64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_evaluates_and_rebuilds(tmp_path, demo, variant):
    train.main(["--train_data_path", demo, "--save_path", str(tmp_path / "run"), "--epoch", "1",
                "--variant", variant, *TINY])
    checkpoint = tmp_path / "run" / "best.pth"
    model, payload = load_model(checkpoint, torch.device("cpu"))
    assert payload["config"]["variant"] == variant and model.config.variant == variant
    assert (model.seg_adapters is not None) == VARIANTS[variant]["adapters"]
    assert (model.prompts is not None) == VARIANTS[variant]["learnable_prompts"]
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(checkpoint), "--save_path",
                                str(tmp_path / "test"), "--num_workers", "0", "--device", "cpu"])
    assert 0 <= summary["datasets"]["Brain"]["image_auroc"] <= 1
    # round trip: the rebuilt model scores as the one saved
    save_checkpoint(tmp_path / "again.pth", model)
    again, _ = load_model(tmp_path / "again.pth", torch.device("cpu"))
    images = torch.rand(2, 3, 64, 64)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images).image_score, model(images).image_score)


# ----------------------------------------------------------------------------- AnomalyCLIP

def test_value_value_attention_is_the_direct_computation():
    """q = k = v = the value projection of ln_1(x), per head, softmax(v v^T / sqrt(d)) v, out_proj."""
    from CLIP.backbone_clip import value_value_attention

    model = MedVMAD(tiny_config())
    block = model.backbone.clip.visual.transformer.resblocks[2]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = value_value_attention(block, x).numpy()
        normed = block.ln_1(x).double().numpy()
    attention = block.attn
    w_v = attention.in_proj_weight[128:].double().numpy()
    b_v = attention.in_proj_bias[128:].double().numpy()
    values = normed @ w_v.T + b_v                                                   # [2,5,64]
    heads = []
    for head in range(attention.num_heads):                                          # 2 heads of 32
        v = values[..., head * 32:(head + 1) * 32]
        scores = v @ v.transpose(0, 2, 1) / np.sqrt(32)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        heads.append(weights @ v)
    mixed = np.concatenate(heads, axis=-1)
    expected = mixed @ attention.out_proj.weight.double().numpy().T + attention.out_proj.bias.double().numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_dpam_stream_feeds_the_taps_and_the_original_stream_the_global_embedding():
    from CLIP.backbone_clip import value_value_attention

    backbone = MedVMAD(tiny_config()).backbone
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        embedding, tapped = backbone.encode_image(images, [1, 2, 4], vv_from=2)
        visual = backbone.clip.visual
        x, stream, expected = visual._embeds(images), None, {}
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            if index >= 2:  # the v-v stream starts from the original tokens, adds each block's v-v branch
                stream = (x if stream is None else stream) + value_value_attention(block, x)
            x = block(x)
            expected[index] = x if stream is None else stream
        for layer in (1, 2, 4):
            torch.testing.assert_close(tapped[layer], expected[layer])
        torch.testing.assert_close(embedding, backbone.clip.encode_image(images))


def test_anomalyclip_map_and_image_score_on_fixed_logits():
    from scipy import ndimage

    torch.manual_seed(0)
    model = MedVMAD(tiny_config(variant="anomalyclip", **VARIANTS["anomalyclip"]))
    text, seg, _ = fixed_inputs(seed=2)
    global_embedding = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    scale = float(model.backbone.logit_scale)
    with torch.no_grad():
        output = model._score(global_embedding, seg, [], text, torch.Size([64, 64]))
    g = global_embedding.double().numpy()
    logits = scale * g[:, :2] / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(output.image_score.numpy(), 1 / (1 + np.exp(logits[:, 0] - logits[:, 1])), rtol=1e-5)
    gap = output.layer_logits.double().numpy()                                     # [B,L,H,W]
    p_abnormal, p_normal = 1 / (1 + np.exp(-gap)), 1 / (1 + np.exp(gap))
    expected = ((p_abnormal + 1 - p_normal) / 2).mean(axis=1)
    expected = np.stack([ndimage.gaussian_filter(m, 4.0) for m in expected])  # its test.py: scipy defaults
    np.testing.assert_allclose(output.anomaly_map.numpy(), expected, atol=1e-5)


def test_anomalyclip_loss_adds_the_dice_of_the_normal_channel():
    gap = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.7).float()

    class Output:  # the two fields medvmad_loss reads
        layer_logits, image_logits = gap, torch.zeros(2, 1, 2)

    plain = medvmad_loss(Output, masks, torch.tensor([1, 1]), torch.ones(2, dtype=torch.bool),
                         LossWeights(focal=0, image=0))
    both = medvmad_loss(Output, masks, torch.tensor([1, 1]), torch.ones(2, dtype=torch.bool),
                        LossWeights(focal=0, image=0, normal_dice=1.0))
    p_normal, target = 1 / (1 + np.exp(gap.numpy())), 1 - masks.numpy()
    normal = sum(np.mean([1 - (2 * (p_normal[i, layer] * target[i]).sum() + 1)
                          / (p_normal[i, layer].sum() + target[i].sum() + 1) for i in range(2)])
                 for layer in range(4))
    assert float(both["loss"] - plain["loss"]) == pytest.approx(normal, rel=1e-5)


def test_object_agnostic_prompts_write_deep_tokens_from_the_second_text_layer():
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(variant="anomalyclip", **VARIANTS["anomalyclip"], n_ctx=4, depth=3, t_n_ctx=2))
    prompts, backbone = model.prompts, model.backbone
    assert prompts.slots == slice(1, 3) and prompts.context_slice == slice(1, 5) and prompts.first_deep_layer == 1
    assert prompts.deep.shape == (2, 2, 64)
    words = backbone.tokenizer(["object.", "damaged object."])
    ids = prompts.token_ids
    for row in range(2):  # SOS, 4 placeholders, then the words of "object." / "damaged object."
        n_words = int(words[row].argmax())
        assert torch.equal(ids[row, 5:5 + n_words], words[row, 1:1 + n_words])
    with torch.no_grad():
        features = prompts(backbone)
        text = backbone.clip
        context = torch.cat([prompts.frame[:, :1], prompts.context, prompts.frame[:, 5:]], dim=1)
        x = context + text.positional_embedding
        for index, block in enumerate(text.transformer.resblocks):
            if 1 <= index < 3:  # text layers 2 and 3 (1-based) get the deep tokens over context 1..2
                x = torch.cat([x[:, :1], prompts.deep[index - 1].expand(2, -1, -1), x[:, 3:]], dim=1)
            x = block(x, attn_mask=text.attn_mask)
        x = text.ln_final(x)
        reference = x[torch.arange(2), ids.argmax(dim=-1)] @ text.text_projection
        reference = reference / reference.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(features, reference)


def test_anomalyclip_needs_an_open_clip_vision_tower(biomedclip_name):
    from CLIP.backbone import BackboneConfig

    with pytest.raises(ValueError, match="anomalyclip"):
        MedVMAD(tiny_config(backbone=BackboneConfig(biomedclip_name, "none", 64), variant="anomalyclip",
                            **VARIANTS["anomalyclip"]))


def test_each_variant_trains_with_its_codes_normal_channel_dice():
    """The seed's and AnomalyCLIP's code add the dice of the normal channel (AnomalyCLIP's, like its
    whole pixel loss, x 4); MVFA's does not."""
    for variant, normal in (("anomalyclip", 4.0), ("medvmad", 1.0), ("text_only", 1.0), ("mvfa", 0.0)):
        args = train.parse_args(["--variant", variant])
        config = train.model_config(args, "brain")
        assert train.loss_weights(args, config).normal_dice == normal


@pytest.mark.parametrize("dpam_from, other", [(None, 2), (2, 1)])
def test_anomalyclip_maps_read_the_value_stream_from_dpams_first_layer_whatever_the_taps(dpam_from, other):
    """DPAM starts where AnomalyCLIP's DPAM_layer=20 puts it (the last 19 blocks: layer 1 of the tiny
    model's 4, layer 6 of ViT-L's 24), not at the first tapped layer; dpam_from moves it."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(variant="anomalyclip", adapters=False, learnable_prompts=True, features_list=[2, 4],
                                dpam_from=dpam_from))
    start = 1 if dpam_from is None else dpam_from
    assert model.config.dpam_from == start
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        output = model(images)
        normalised = model.backbone.normalize(images)
        for vv_from, same in ((start, True), (other, False), (None, False)):
            _, tapped = model.backbone.encode_image(normalised, [2, 4], vv_from=vv_from)
            projected = model.backbone.project_tokens(tapped[4][:, 1:])
            projected = projected / projected.norm(dim=-1, keepdim=True)
            assert torch.allclose(output.patch_features[1], projected, atol=1e-5) == same, vv_from


def test_anomalyclip_layer_logits_from_hand_computed_patch_gaps():
    """The gap per patch is s * (cos(f, abnormal) - cos(f, normal)), upsampled bilinearly."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(variant="anomalyclip", **VARIANTS["anomalyclip"]))
    text, seg, _ = fixed_inputs(seed=4)
    with torch.no_grad():
        output = model._score(torch.randn(2, 32), seg, [], text, torch.Size([64, 64]))
    scale = float(model.backbone.logit_scale)
    gaps = []
    for features in seg:
        f = features.double().numpy()
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        gaps.append(scale * (f[..., 1] - f[..., 0]))                                 # [B,16]
    grid = torch.from_numpy(np.stack(gaps, axis=1)).reshape(2, 4, 4, 4)
    expected = torch.nn.functional.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(output.layer_logits.double().numpy(), expected.numpy(), atol=1e-4)


def test_a_variant_with_other_parts_is_refused():
    with pytest.raises(ValueError, match="--variant text_only is"):
        MedVMAD(tiny_config(variant="text_only"))  # adapters on


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trains_every_weight_says_which_variants_leave_weights_without_gradient(variant):
    """DDP is told to look for unused weights exactly when a backward pass leaves some without a
    gradient: the last adapter up-projections of the mean_patch rule with adapters (medvmad, mvfa;
    tapped at the last block, and at an inner one)."""
    for layers in ([1, 2, 3, 4], [1, 2]):
        torch.manual_seed(0)
        model = MedVMAD(tiny_config(variant=variant, features_list=layers, **VARIANTS[variant]))
        output = model(torch.rand(2, 3, 64, 64))
        medvmad_loss(output, (torch.rand(2, 64, 64) > 0.7).float(), torch.tensor([0, 1]), torch.tensor([True, True]),
                     LossWeights(normal_dice=1.0))["loss"].backward()
        unused = sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)
        expected = [f"{kind}_adapters.{len(layers) - 1}.up.weight" for kind in ("det", "seg")] \
            if variant in ("mvfa", "medvmad") else []
        assert unused == expected and model.trains_every_weight == (not expected), (layers, unused)
