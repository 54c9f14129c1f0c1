"""The Backbone interface on both families: open_clip's CLIP and a BiomedCLIP-shaped timm ViT +
Hugging Face BERT (built offline, random weights). References are the libraries' own public
passes (open_clip's encode_image/encode_text, timm's forward_intermediates) and a layer-by-layer
BERT run written out here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import test_one_example
import train
from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import BackboneConfig
from CLIP.backbone_clip import OpenCLIPBackbone
from CLIP.backbone_timm_hf import TimmHFBackbone
from CLIP.checkpoint import load_model, save_checkpoint
from CLIP.factory import build_backbone
from tests.helpers import TINY_SIZE, reference_score, test_script
from generate_dataset.demo import build_demo
from utils import InputError



@pytest.fixture(scope="module")
def biomedclip(biomedclip_name) -> TimmHFBackbone:
    return build_backbone(BackboneConfig(biomedclip_name, "none", TINY_SIZE))


@pytest.fixture(scope="module")
def clip_backbone() -> OpenCLIPBackbone:
    return build_backbone(BackboneConfig("tiny", "none", TINY_SIZE))


def test_the_implementation_follows_the_loaded_towers(biomedclip, clip_backbone):
    assert type(biomedclip) is TimmHFBackbone and type(clip_backbone) is OpenCLIPBackbone
    assert (biomedclip.width, biomedclip.num_layers, biomedclip.embed_dim) == (192, 12, 16)
    assert biomedclip.grid_size == (4, 4) and biomedclip.patch_size == (16, 16)
    assert (biomedclip.num_prefix_tokens, biomedclip.text_width, biomedclip.text_layers) == (1, 32, 2)


def test_timm_taps_are_the_named_layers_and_the_pooled_path_is_open_clips(biomedclip):
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding, tapped = biomedclip.encode_image(images, [3, 12])
        # timm's own intermediates: 0-based block indices, patch tokens [B,N,W] after each block
        reference = biomedclip.trunk.forward_intermediates(images, indices=[2, 11], norm=False,
                                                           output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(tapped[3][:, 1:], reference[0])
        torch.testing.assert_close(tapped[12][:, 1:], reference[1])
        torch.testing.assert_close(embedding, biomedclip.clip.encode_image(images))
        # the class token projected like an intermediate token is the pooled embedding
        torch.testing.assert_close(biomedclip.project_tokens(tapped[12][:, :1])[:, 0], embedding)


def test_clip_projection_of_the_class_token_is_the_pooled_embedding(clip_backbone):
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding, tapped = clip_backbone.encode_image(images, [4])
        torch.testing.assert_close(embedding, clip_backbone.clip.encode_image(images))
        torch.testing.assert_close(clip_backbone.project_tokens(tapped[4][:, :1])[:, 0], embedding)


def test_hook_output_continues_the_timm_stream(biomedclip):
    images = torch.rand(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        zeroed, _ = biomedclip.encode_image(images, [12], lambda layer, x: torch.zeros_like(x))
        plain, _ = biomedclip.encode_image(images, [12])
        trunk = biomedclip.trunk  # zero tokens after the last block: the head sees norm(0)
        reference = biomedclip.clip.visual.head(trunk.forward_head(trunk.norm(torch.zeros(1, 17, 192))))
    torch.testing.assert_close(zeroed, reference)
    assert not torch.allclose(zeroed, plain)


def bert_reference(backbone: TimmHFBackbone, ids: torch.Tensor, embeddings: torch.Tensor,
                   deep: torch.Tensor | None, slots: slice) -> torch.Tensor:
    """One prompt [1,L] without its padding, layer by layer: deep tokens written into ``slots``
    before layer i < D, [CLS] of the last hidden state, then open_clip's projection."""
    bert, length = backbone.clip.text.transformer, int((ids != 0).sum())
    x = bert.embeddings(inputs_embeds=embeddings[:, :length])
    for index, layer in enumerate(bert.encoder.layer):
        if deep is not None and index < len(deep):
            x = torch.cat([x[:, :slots.start], deep[index][None], x[:, slots.stop:]], dim=1)
        x = layer(x)
        x = x[0] if isinstance(x, tuple) else x
    return backbone.clip.text.proj(x[:, 0])


def test_bert_text_pass_matches_open_clip_and_a_layer_by_layer_run(biomedclip):
    with torch.no_grad():
        sentences = ["a brain mri image of a healthy brain.", "tumor"]
        frame = biomedclip.text_frame(sentences, 0, 0)
        plain = biomedclip.encode_text_embeddings(biomedclip.token_embedding(frame.token_ids), frame)
        torch.testing.assert_close(plain, biomedclip.encode_text(sentences))  # open_clip's HF forward
        frame = biomedclip.text_frame(sentences, 2, 3)
        assert frame.slots == slice(1, 3) and frame.context == slice(3, 6)
        embeddings = biomedclip.token_embedding(frame.token_ids)
        deep = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(1))
        deep_output = biomedclip.encode_text_embeddings(embeddings, frame, deep)
        for row in range(2):
            reference = bert_reference(biomedclip, frame.token_ids[row:row + 1], embeddings[row:row + 1],
                                       deep, slice(1, 3))
            torch.testing.assert_close(deep_output[row:row + 1], reference)
        assert not torch.allclose(deep_output, biomedclip.encode_text_embeddings(embeddings, frame))


def test_bert_prompt_frame_puts_the_context_after_cls(biomedclip, biomedclip_name):
    tokenizer_file = Path(biomedclip_name.split(":", 1)[1]) / "tokenizer.json"
    word = json.loads(tokenizer_file.read_text())["model"]["vocab"]  # WordPiece: token -> id
    frame = biomedclip.text_frame(["healthy brain."], 1, 2)
    ids = frame.token_ids[0].tolist()
    expected = [word["[CLS]"]] * 4 + [word["healthy"], word["brain"], word["."], word["[SEP]"]]
    assert ids[:8] == expected and set(ids[8:]) == {word["[PAD]"]}
    assert frame.slots == slice(1, 2) and frame.context == slice(2, 4) and frame.pooled_index is None
    prefix = biomedclip.word_embeddings("a brain MRI image of a")
    table = biomedclip.clip.text.transformer.get_input_embeddings().weight
    torch.testing.assert_close(prefix, table[[word[w] for w in ("a", "brain", "mri", "image", "of", "a")]])
    fits = 32 - 5  # the context holds 32 tokens; "[CLS] healthy brain . [SEP]" takes 5
    assert (biomedclip.text_frame(["healthy brain."], 2, fits - 2).token_ids[0] != word["[PAD]"]).all()
    with pytest.raises(InputError, match="too long"):
        biomedclip.text_frame(["healthy brain."], 2, fits - 1)


@pytest.mark.parametrize("wording, context, deep_layers", [("report", slice(1, 5), 1), ("medical", slice(3, 7), 2)])
def test_learnable_prompts_on_bert_reach_the_text_features(biomedclip, wording, context, deep_layers):
    """The seed's prompts (deep tokens over the first context positions, from the 2nd layer) and the
    medical option's (deep tokens in slots of their own before the context, from the 1st)."""
    torch.manual_seed(0)
    model = MedVMAD(MedVMADConfig(BackboneConfig(biomedclip.config.model_name, "none", TINY_SIZE), wording=wording,
                                  n_ctx=4, depth=2, t_n_ctx=2), backbone=biomedclip)
    prompts = model.prompts
    assert prompts.context_slice == context and prompts.frame.shape[:2] == (2, 32)
    assert prompts.deep.shape[0] == deep_layers and prompts.first_deep_layer == 2 - deep_layers
    features = prompts(biomedclip)
    (features[1] - features[0]).sum().backward()
    # every context vector and every deep token of both layers reaches the features
    assert (prompts.context.grad.abs().sum(dim=-1) > 0).all()
    assert (prompts.deep.grad.abs().sum(dim=-1) > 0).all()
    with pytest.raises(ValueError, match="exceeds the text tower's 2 layers"):
        MedVMAD(MedVMADConfig(biomedclip.config, depth=3), backbone=biomedclip)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=4, n_valid=(6, 6), n_test=(4, 4),
                      image_size=TINY_SIZE)


def test_biomedclip_trains_tests_and_scores_end_to_end(tmp_path, demo, biomedclip_name):
    common = ["--model_name", biomedclip_name, "--pretrained", "none", "--image_size", str(TINY_SIZE),
              "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
    prompts = ["--n_ctx", "4", "--depth", "2", "--t_n_ctx", "2"]
    train.main(["--train_data_path", demo, "--save_path", str(tmp_path / "run"), "--epoch", "1", *common, *prompts])
    checkpoint = tmp_path / "run" / "best.pth"
    stored = torch.load(checkpoint, weights_only=True)["config"]["backbone"]
    assert stored["model_name"] == biomedclip_name and stored["quick_gelu"] is False
    named = ["--model_name", biomedclip_name]  # a local-dir: backbone a checkpoint names is read only when named
    with pytest.raises(InputError, match=rf"its backbone is {biomedclip_name}, which is not read"):
        test_script.main(["--data_path", demo, "--checkpoint_path", str(checkpoint), "--save_path",
                          str(tmp_path / "test"), "--num_workers", "0", "--device", "cpu"])
    summary = test_script.main(["--data_path", demo, "--checkpoint_path", str(checkpoint), "--save_path",
                                str(tmp_path / "test"), "--num_workers", "0", "--device", "cpu", *named])
    assert 0 <= summary["datasets"]["Brain"]["pixel_auroc"] <= 1
    train.main(["--train_data_path", demo, "--save_path", str(tmp_path / "fewshot"), "--epoch", "1",
                "--k_shot", "2", *common, *prompts])
    fewshot = test_script.main(["--data_path", demo, "--checkpoint_path", str(tmp_path / "fewshot" / "best.pth"),
                                "--k_shot", "2", "--save_path", str(tmp_path / "fewshot_test"),
                                "--num_workers", "0", "--device", "cpu", *named])
    assert 0 <= fewshot["datasets"]["Brain"]["image_auroc"] <= 1
    image = next((Path(demo) / "test" / "Ungood" / "img").iterdir())
    results = test_one_example.main(["--image_path", str(image), "--checkpoint_path", str(checkpoint),
                                     "--save_path", str(tmp_path / "one"), "--device", "cpu", *named])
    model = load_model(checkpoint, torch.device("cpu"), model_name=biomedclip_name)[0].eval()
    assert results[0]["score"] == pytest.approx(reference_score(model, image)[0], abs=1e-6)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["args"]["model_name"] == biomedclip_name


def test_biomedclip_checkpoint_round_trip(tmp_path, biomedclip):
    torch.manual_seed(0)
    model = MedVMAD(MedVMADConfig(biomedclip.config, n_ctx=4, depth=2, t_n_ctx=2), backbone=biomedclip)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    save_checkpoint(tmp_path / "model.pth", model)
    loaded, _ = load_model(tmp_path / "model.pth", torch.device("cpu"), model_name=biomedclip.config.model_name)
    assert type(loaded.backbone) is TimmHFBackbone and loaded.config == model.config
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    model.eval(), loaded.eval()
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    np.testing.assert_allclose(got.anomaly_map.numpy(), expected.anomaly_map.numpy(), atol=1e-6)
    np.testing.assert_allclose(got.image_score.numpy(), expected.image_score.numpy(), atol=1e-6)


def test_siglip_style_models_are_refused(tmp_path):
    folder = tmp_path / "tiny-siglip"
    folder.mkdir()
    config = {"model_cfg": {
        "embed_dim": 16, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 64, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1,
                     "no_causal_mask": True, "pool_type": "last"}}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="SigLIP-style"):
        build_backbone(BackboneConfig(f"local-dir:{folder}", "none", 64))


def test_config_passed_in_is_not_changed(biomedclip_name):
    config = MedVMADConfig(BackboneConfig(biomedclip_name, "none", TINY_SIZE), n_ctx=4, depth=2, t_n_ctx=2)
    model = MedVMAD(config)
    assert config.features_list is None and config.backbone.quick_gelu is None and config.backbone.image_mean is None
    assert model.config.features_list == [3, 6, 9, 12] and model.config.backbone.quick_gelu is False
    assert model.config.backbone.image_std == (0.26862954, 0.26130258, 0.27577711)


def test_register_tokens_are_prefix_tokens(biomedclip_name):
    """A timm trunk with 4 register tokens: 5 tokens before the patches, everywhere."""
    import timm

    backbone = build_backbone(BackboneConfig(biomedclip_name, "none", TINY_SIZE))
    backbone.clip.visual.trunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                                   img_size=TINY_SIZE, reg_tokens=4).eval().requires_grad_(False)
    assert backbone.num_prefix_tokens == 5
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        _, tapped = backbone.encode_image(images, [6])
        reference = backbone.trunk.forward_intermediates(images, indices=[5], norm=False, output_fmt="NLC",
                                                         intermediates_only=True)
        torch.testing.assert_close(tapped[6][:, 5:], reference[0])
        for adapters in (True, False):
            model = MedVMAD(MedVMADConfig(backbone.config, adapters=adapters, n_ctx=4, depth=2, t_n_ctx=2),
                            backbone=backbone)
            output = model(images)
            assert output.layer_logits.shape == (2, 4, TINY_SIZE, TINY_SIZE)
            assert all(features.shape[1] == 16 for features in output.patch_features)


@pytest.mark.parametrize("pooler", ["mean_pooler", "cls_pooler"])
def test_other_bert_poolers_pool_as_open_clip_does(tmp_path, pooler):
    from bench.biomedclip_like import build

    name = build(tmp_path / pooler, vision="vit_tiny_patch16_224", text_width=32, text_layers=2, embed_dim=16,
                 context_length=32, pooler=pooler)
    backbone = build_backbone(BackboneConfig(name, "none", TINY_SIZE))
    sentences = ["a brain mri image of a healthy brain.", "tumor"]
    with torch.no_grad():
        frame = backbone.text_frame(sentences, 0, 0)
        ours = backbone.encode_text_embeddings(backbone.token_embedding(frame.token_ids), frame)
        torch.testing.assert_close(ours, backbone.encode_text(sentences))


def test_missing_transformers_is_one_line(monkeypatch, biomedclip_name):
    import open_clip.hf_model

    monkeypatch.setattr(open_clip.hf_model, "transformers", None)
    with pytest.raises(InputError, match="pip install transformers"):
        build_backbone(BackboneConfig(biomedclip_name, "none", TINY_SIZE))


def test_quick_gelu_on_is_refused_on_timm_towers(biomedclip_name):
    with pytest.raises(InputError, match="--quick_gelu on"):
        build_backbone(BackboneConfig(biomedclip_name, "none", TINY_SIZE, quick_gelu=True))


def test_a_backbone_other_than_the_config_names_is_refused(biomedclip):
    with pytest.raises(ValueError, match="model_name, image_size"):
        MedVMAD(MedVMADConfig(BackboneConfig("tiny", "none", 224)), backbone=biomedclip)
