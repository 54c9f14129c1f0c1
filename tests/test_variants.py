"""The paper's model variants (train.py --variant): each trains, evaluates and rebuilds from its
checkpoint; MVFA's image score and loss against hand computations on fixed logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CLIP.MedVMAD import VARIANTS, MedVMAD
from CLIP.checkpoint import load_model, save_checkpoint
from conftest import tiny_config
from loss import LossWeights, medvmad_loss
from test_pipeline import TINY, test_script
from generate_dataset.demo import build_demo

import train


def mvfa_model() -> MedVMAD:
    torch.manual_seed(0)
    return MedVMAD(tiny_config(variant="mvfa", **VARIANTS["mvfa"]))


def fixed_inputs(batch: int = 2, layers: int = 4, patches: int = 16, seed: int = 0):
    """Text (normal = e0, abnormal = e1) and detection features whose logits are s * (cos0, cos1)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(2, 32)
    text[0, 0] = text[1, 1] = 1.0
    det = [torch.randn(batch, patches, 32, generator=generator) for _ in range(layers)]
    seg = [torch.randn(batch, patches, 32, generator=generator) for _ in range(layers)]
    return text, seg, det


def hand_mean_probabilities(det: list[torch.Tensor], scale: float) -> np.ndarray:
    """[B,L]: per layer the mean over patches of the abnormal softmax probability, by hand."""
    out = []
    for features in det:
        f = features.numpy().astype(np.float64)
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        logits = scale * f[..., :2]                                   # cosine with e0, e1
        p_abnormal = np.exp(logits[..., 1]) / np.exp(logits).sum(axis=-1)
        out.append(p_abnormal.mean(axis=1))
    return np.stack(out, axis=1)


def test_mvfa_image_score_is_the_mean_over_layers_of_the_mean_patch_probability():
    model = mvfa_model()
    text, seg, det = fixed_inputs()
    scale = float(model.backbone.logit_scale)
    with torch.no_grad():
        output = model._score(torch.randn(2, 32), seg, det, text, torch.Size([64, 64]))
    expected = hand_mean_probabilities(det, scale)
    np.testing.assert_allclose(output.image_logits.softmax(dim=-1)[..., 1].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(output.image_score.numpy(), expected.mean(axis=1), rtol=1e-5)


def test_mvfa_image_loss_is_bce_on_each_layers_mean_probability():
    model = mvfa_model()
    text, seg, det = fixed_inputs(seed=1)
    output = model._score(torch.randn(2, 32), seg, det, text, torch.Size([64, 64]))
    labels = torch.tensor([0, 1])
    parts = medvmad_loss(output, torch.zeros(2, 64, 64), labels, torch.zeros(2, dtype=torch.bool), LossWeights())
    p = hand_mean_probabilities(det, float(model.backbone.logit_scale))
    y = labels.numpy()[:, None]
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert float(parts["image"]) == pytest.approx(expected, rel=1e-5)


def test_a_variant_needing_adapters_is_refused_without_them():
    with pytest.raises(ValueError, match="adapters must be on"):
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
