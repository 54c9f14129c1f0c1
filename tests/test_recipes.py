"""Each row of the paper tables trained and scored as its own paper's code does: the recipes, the
seed's MedVMAD, MVFA-AD's ensemble and losses, AnomalyCLIP's global embedding, and scores that do
not tie by saturation. Expected values are typed from the papers' code, or computed by hand."""
from __future__ import annotations

import logging
import math
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation import metrics
import train
from CLIP.MedVMAD import MedVMAD, upgrade_config
from tests.helpers import ROOT, TINY_SIZE, tiny_config
from dataset import MedicalDataset, Sample
from loss import medvmad_loss
from prompt_ensemble import ensemble_text_features, ensemble_texts


# ----------------------------------------------------------------------------- recipes

# Read off each code (see recipes.json's "source"): deeptiguntur/MedVMAD train.py + the report;
# zqhang/AnomalyCLIP train.py/train.sh (2024); MVFA-AD train_zero.py / train_few.py / test_*.py.
PAPER_VALUES = {
    "medvmad": dict(image_size=336, epoch=10, batch_size=8, learning_rate=1e-3, adam_betas=(0.5, 0.999), n_ctx=12,
                    depth=9, t_n_ctx=4, alpha=0.1, sigma=4, keep="last", features_list=None, focal_weight=1,
                    dice_weight=1, normal_dice_weight=1),
    "text_only": dict(image_size=336, epoch=10, batch_size=8, learning_rate=1e-3, adam_betas=(0.5, 0.999),
                      sigma=4, keep="last", features_list=None, focal_weight=1, dice_weight=1, normal_dice_weight=1),
    # its code's four taps are all layer 24 (references updated in place): the last layer, pixel loss x 4
    "anomalyclip": dict(image_size=518, epoch=15, batch_size=8, learning_rate=1e-3, adam_betas=(0.5, 0.999), n_ctx=12,
                        depth=9, t_n_ctx=4, sigma=4, keep="last", features_list=[-1], focal_weight=4, dice_weight=4,
                        normal_dice_weight=4),
    "mvfa": dict(image_size=240, epoch=50, batch_size=1, learning_rate=1e-4, adam_betas=(0.5, 0.999), alpha=0.1,
                 sigma=0, keep="best", features_list=None, focal_weight=1, dice_weight=1, normal_dice_weight=0),
}


@pytest.mark.parametrize("variant", list(PAPER_VALUES))
def test_each_variant_trains_with_its_own_papers_recipe(variant):
    args = train.parse_args(["--variant", variant])
    for key, value in PAPER_VALUES[variant].items():
        assert getattr(args, key) == value, key
    assert args.recipe == variant and args.image_weight == 1
    fewshot = train.parse_args(["--variant", variant, "--k_shot", "2"])
    assert (fewshot.learning_rate, fewshot.epoch) == (1e-3, 50)  # MVFA's few-shot script; ours follows it


def test_given_flags_win_and_a_shared_recipe_trains_another_variant():
    args = train.parse_args(["--variant", "mvfa", "--epoch", "3", "--learning_rate", "0.01", "--sigma", "2"])
    assert (args.epoch, args.learning_rate, args.sigma, args.image_size) == (3, 0.01, 2, 240)
    assert "epoch" not in args.from_recipe and "image_size" in args.from_recipe
    shared = train.parse_args(["--variant", "anomalyclip", "--recipe", "mvfa"])
    assert (shared.variant, shared.recipe, shared.image_size, shared.batch_size, shared.epoch) == \
        ("anomalyclip", "mvfa", 240, 1, 50)


def test_the_optimizer_takes_the_recipes_learning_rate_and_betas():
    args = train.parse_args(["--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE),
                             "--depth", "2", "--n_ctx", "4", "--t_n_ctx", "2", "--device", "cpu"])
    records: list[str] = []
    logger = logging.getLogger("test_recipes")
    logger.addHandler(type("Collect", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    logger.setLevel(logging.INFO)
    _, optimizer, _ = train.build_model_and_optimizer(train.model_config(args, "brain"), args, torch.device("cpu"),
                                                      logger)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.5, 0.999)
    assert any("recipe medvmad" in line and "--learning_rate 0.001" in line for line in records)


def test_runs_from_before_the_recipes_resume_with_the_values_they_trained_with():
    """A run saved before adam_betas, keep and normal_dice_weight were flags used (0.5, 0.999), the
    best epoch, and the normal channel's dice for anomalyclip alone (at --dice_weight)."""
    for variant, normal in (("medvmad", 0.0), ("anomalyclip", 0.5)):
        old = {key: value for key, value in vars(train.parse_args(["--variant", variant])).items()
               if key not in ("adam_betas", "keep", "normal_dice_weight")}
        old["dice_weight"] = 0.5
        stored = train.stored_run_args(old)
        assert (stored["adam_betas"], stored["keep"], stored["normal_dice_weight"]) == ((0.5, 0.999), "best", normal)


def run_train_sh(tmp_path: Path, protocol: str, **env: str) -> list[str]:
    """The train.py command lines ``bash train.sh PROTOCOL`` would run (LAUNCH=echo), on a data root
    that looks like BMAD's (so no demo set is built)."""
    (tmp_path / "BMAD" / "Brain").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["bash", str(ROOT / "train.sh"), protocol], capture_output=True, text=True, check=True,
                            env={**os.environ, "DATA_ROOT": str(tmp_path / "BMAD"), "LAUNCH": "echo",
                                 "SAVE_ROOT": str(tmp_path / "ckpt"), **env})
    return [line for line in result.stdout.splitlines() if line.startswith("train.py")]


def test_train_sh_paper_leaves_each_rows_recipe_alone_unless_told(tmp_path):
    lines = run_train_sh(tmp_path, "paper")
    assert [line.split("--variant ")[1].split()[0] for line in lines] == ["medvmad", "text_only", "anomalyclip", "mvfa"]
    for line in lines:
        for flag in ("--epoch", "--image_size", "--batch_size", "--learning_rate", "--recipe"):
            assert flag not in line.split(), (flag, line)
    shared = run_train_sh(tmp_path, "paper", RECIPE="medvmad", EPOCH="3")
    assert all("--recipe medvmad" in line and "--epoch 3" in line and "/paper_recipe_medvmad/" in line
               for line in shared)
    indomain = run_train_sh(tmp_path, "indomain", IMAGE_SIZE="240")
    assert all("--image_size 240" in line and "--epoch" not in line.split() for line in indomain)


# ----------------------------------------------------------------------------- helpers

def text_axes(dim: int = 32) -> torch.Tensor:
    """Normal text along e0, abnormal along e1: a feature's logits are s * (its cosines with e0, e1)."""
    text = torch.zeros(2, dim)
    text[0, 0] = text[1, 1] = 1.0
    return text


def features_with_cosines(cos_normal: np.ndarray, cos_abnormal: np.ndarray, dim: int = 32) -> torch.Tensor:
    """Unit features [..., dim] whose cosines with e0 and e1 are the given ones (rest along e2)."""
    rest = np.sqrt(1 - cos_normal ** 2 - cos_abnormal ** 2)
    out = np.zeros(cos_normal.shape + (dim,))
    out[..., 0], out[..., 1], out[..., 2] = cos_normal, cos_abnormal, rest
    return torch.tensor(out, dtype=torch.float32)


def hand_mean_probabilities(det: list[torch.Tensor], scale: float) -> np.ndarray:
    """[B,L]: per layer the mean over patches of the abnormal softmax probability, in numpy."""
    out = []
    for features in det:
        f = features.double().numpy()
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        logits = scale * f[..., :2]
        out.append((np.exp(logits[..., 1]) / np.exp(logits).sum(axis=-1)).mean(axis=1))
    return np.stack(out, axis=1)


def random_features(batch: int, layers: int, patches: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, patches, 32, generator=generator) for _ in range(layers)]


def model_of(*flags: str) -> tuple[MedVMAD, object]:
    """The tiny model and loss weights train.py builds from these flags."""
    args = train.parse_args(["--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE),
                             "--depth", "2", "--n_ctx", "4", "--t_n_ctx", "2", *flags])
    torch.manual_seed(0)
    model = MedVMAD(train.model_config(args, "brain"))
    return model, train.loss_weights(args, model.config)


# ----------------------------------------------------------------------------- MedVMAD as the seed has it

def test_medvmad_prompts_are_the_reports_words_after_random_context():
    model, _ = model_of()
    prompts, backbone = model.prompts, model.backbone
    words = backbone.tokenizer(["normal brain.", "abnormal brain with lesion."])
    for row in range(2):  # SOS, 4 context placeholders, then the report's words
        n_words = int(words[row].argmax())
        assert torch.equal(prompts.token_ids[row, 5:5 + n_words], words[row, 1:1 + n_words])
    # random init N(0, 0.02), as the seed's prompt learner (no word embeddings in the context)
    assert float(prompts.context.std()) == pytest.approx(0.02, rel=0.25)
    # deep tokens over the first t_n_ctx context positions from text layer 2 (depth 2: one layer)
    assert prompts.slots == slice(1, 3) and prompts.first_deep_layer == 1 and prompts.deep.shape == (1, 2, 64)


@pytest.mark.parametrize("wording, states", [("report", ("normal brain.", "abnormal brain with lesion.")),
                                             ("seed_code", ("object.", "abnormal object.")),
                                             ("object", ("object.", "damaged object."))])
def test_prompts_write_deep_tokens_over_the_context_from_the_second_text_layer(wording, states):
    """The text pass written out with the tower's blocks: context after SOS, the deep tokens replace
    context positions 1..t_n_ctx before text layers 2..depth (1-based), pooled at the end token."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(wording=wording, n_ctx=4, depth=3, t_n_ctx=2))
    prompts, backbone = model.prompts, model.backbone
    ids = prompts.token_ids
    words = backbone.tokenizer(list(states))
    for row in range(2):
        n_words = int(words[row].argmax())
        assert torch.equal(ids[row, 5:5 + n_words], words[row, 1:1 + n_words])
    with torch.no_grad():
        features = prompts(backbone)
        text = backbone.clip
        x = torch.cat([prompts.frame[:, :1], prompts.context, prompts.frame[:, 5:]], dim=1) + text.positional_embedding
        for index, block in enumerate(text.transformer.resblocks):
            if 1 <= index < 3:
                x = torch.cat([x[:, :1], prompts.deep[index - 1].expand(2, -1, -1), x[:, 3:]], dim=1)
            x = block(x, attn_mask=text.attn_mask)
        reference = text.ln_final(x)[torch.arange(2), ids.argmax(dim=-1)] @ text.text_projection
    torch.testing.assert_close(features, reference / reference.norm(dim=-1, keepdim=True))


def test_medvmad_image_score_and_loss_are_the_seeds_per_layer_mean_patch_probability():
    """Score: mean over detection layers of the mean patch probability (the seed sums them: same
    ranking). Loss: one BCE per layer on that probability, summed over layers, plus focal and the
    dice of both channels (the seed's code)."""
    model, weights = model_of()
    det, seg = random_features(2, 4, 16, seed=1), random_features(2, 4, 16, seed=2)
    scale = float(model.backbone.logit_scale)
    output = model._score(torch.randn(2, 32), seg, det, text_axes(), torch.Size([64, 64]))
    m = hand_mean_probabilities(det, scale)
    np.testing.assert_allclose(output.image_score.numpy(), m.mean(axis=1), rtol=1e-6)
    labels = np.array([0, 1])
    masks = (torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(3)) > 0.8).float()
    parts = medvmad_loss(output, masks, torch.tensor(labels), torch.ones(2, dtype=torch.bool), weights)
    y = labels[:, None]
    expected_image = np.mean(np.sum(-(y * np.log(m) + (1 - y) * np.log(1 - m)), axis=1))
    assert float(parts["image"]) == pytest.approx(expected_image, rel=1e-5)
    # the maps come from the segmentation features: s * (cos(abnormal) - cos(normal)) per patch
    f = [s.double().numpy() / np.linalg.norm(s.double().numpy(), axis=-1, keepdims=True) for s in seg]
    gaps = torch.from_numpy(np.stack([scale * (x[..., 1] - x[..., 0]) for x in f], axis=1)).reshape(2, 4, 4, 4)
    expected_logits = torch.nn.functional.interpolate(gaps, size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(output.layer_logits.double().numpy(), expected_logits.numpy(), atol=1e-4)
    p = torch.sigmoid(expected_logits).numpy()
    t = masks.numpy()[:, None]
    dice = lambda q, g: np.mean([1 - (2 * (q[i] * g[i]).sum() + 1) / (q[i].sum() + g[i].sum() + 1)  # noqa: E731
                                 for i in range(2)])
    both = sum(dice(p[:, k], t[:, 0]) + dice(1 - p[:, k], 1 - t[:, 0]) for k in range(4))
    assert float(parts["dice"]) == pytest.approx(both, rel=1e-4)
    focal = sum(np.mean(-t[:, 0] * (1 - p[:, k]) ** 2 * np.log(p[:, k]) - (1 - t[:, 0]) * p[:, k] ** 2
                        * np.log(1 - p[:, k])) for k in range(4))
    assert float(parts["focal"]) == pytest.approx(focal, rel=1e-4)


def test_seed_code_flag_reproduces_the_seeds_similarity_loss_and_wording():
    """--seed_code: cosines without a logit scale, BCE *with logits* on the mean probability, and the
    seed code's 'object' / 'abnormal object' prompts."""
    model, weights = model_of("--seed_code")
    assert (model.config.seed_code, model.config.wording, weights.probability_as_logit) == (True, "seed_code", True)
    det, seg = random_features(2, 4, 16, seed=5), random_features(2, 4, 16, seed=8)
    output = model._score(torch.randn(2, 32), seg, det, text_axes(), torch.Size([64, 64]))
    m = hand_mean_probabilities(det, scale=1.0)                     # bare cosines, of the detection features
    np.testing.assert_allclose(output.image_score.numpy(), m.mean(axis=1), rtol=1e-6)
    labels = np.array([1, 0])
    parts = medvmad_loss(output, torch.zeros(2, 64, 64), torch.tensor(labels), torch.zeros(2, dtype=torch.bool),
                         weights)
    sigmoid_m = 1 / (1 + np.exp(-m))                                 # BCEWithLogitsLoss(m, y)
    y = labels[:, None]
    expected = np.mean(np.sum(-(y * np.log(sigmoid_m) + (1 - y) * np.log(1 - sigmoid_m)), axis=1))
    assert float(parts["image"]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(Exception, match="--seed_code"):
        train.parse_args(["--variant", "mvfa", "--seed_code"])


def test_the_earlier_rules_are_options_and_old_checkpoints_keep_them():
    model, weights = model_of("--wording", "medical", "--image_score", "max_patch", "--normal_dice_weight", "0")
    assert model.prompts.first_deep_layer == 0 and weights.normal_dice == 0 and weights.image_terms_mean
    assert model(torch.rand(1, 3, TINY_SIZE, TINY_SIZE)).image_logits.shape == (1, 5, 2)  # global + 4 max patches
    # a config stored before the fields existed rebuilds with the rules it was trained with
    for variant, rules in (("medvmad", ("medical", "max_patch")), ("text_only", ("medical", "max_patch")),
                           ("mvfa", ("medical", "mean_patch")), ("anomalyclip", ("object", "global_ln_post"))):
        old = {key: value for key, value in tiny_config(variant=variant, features_list=[2, 4]).to_dict().items()
               if key not in ("wording", "image_score", "seed_code", "logit_scale", "dpam_from", "blur_boundary")}
        upgraded = upgrade_config(old)
        assert (upgraded["wording"], upgraded["image_score"]) == rules, variant
        assert upgraded["logit_scale"] == "learned", variant  # not the variant's 100 or 1/0.07 of today
        assert upgraded["blur_boundary"] == "mirror", variant  # the maps were smoothed so
        assert upgraded.get("dpam_from") == (2 if variant == "anomalyclip" else None)  # DPAM from the first tap


# ----------------------------------------------------------------------------- MVFA-AD as its code has it

def test_mvfa_ensemble_is_mvfas_own_states_and_templates():
    normal, abnormal = ensemble_texts("brain", "mvfa")
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert normal[0] == "a bad photo of a Brain." and normal[-1] == "this is one Brain without damage in the scene."
    assert abnormal[0] == "a bad photo of a damaged Brain." and "a photo of the Liver with flaw." not in abnormal
    assert "a photo of the Liver with flaw." in ensemble_texts("liver", "mvfa")[1]
    assert ensemble_texts("chest", "mvfa")[0][14] == "a photo of the Chest X-ray film."
    model = MedVMAD(tiny_config(variant="mvfa", adapters=True, learnable_prompts=False))
    assert model.config.wording == "mvfa"
    with torch.no_grad():
        reference = []
        for sentences in (normal, abnormal):
            embedding = model.backbone.clip.encode_text(model.backbone.tokenizer(sentences))
            mean = (embedding / embedding.norm(dim=-1, keepdim=True)).mean(dim=0)
            reference.append(mean / mean.norm())
        torch.testing.assert_close(model.text_features(), torch.stack(reference))
        assert not torch.allclose(model.text_features(), ensemble_text_features(model.backbone, "brain", "medical"))


def test_mvfa_detection_loss_is_bce_with_logits_on_each_layers_mean_probability():
    """MVFA's code: loss_bce = BCEWithLogitsLoss(); det_loss += loss_bce(mean patch probability, label),
    per layer, summed; its map is not smoothed (recipe sigma 0)."""
    model, weights = model_of("--variant", "mvfa")
    assert model.config.sigma == 0 and weights.normal_dice == 0
    det, seg = random_features(2, 4, 16, seed=6), random_features(2, 4, 16, seed=7)
    output = model._score(torch.randn(2, 32), seg, det, text_axes(), torch.Size([64, 64]))
    m = hand_mean_probabilities(det, 100.0)                          # MVFA's code: 100.0 * features @ text
    assert model.config.logit_scale == 100.0 != float(model.backbone.logit_scale)
    np.testing.assert_allclose(output.image_score.numpy(), m.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(output.anomaly_map.numpy(),
                               torch.sigmoid(output.layer_logits.double()).mean(dim=1).numpy(), rtol=1e-12)
    labels = np.array([0, 1])
    parts = medvmad_loss(output, torch.zeros(2, 64, 64), torch.tensor(labels), torch.zeros(2, dtype=torch.bool),
                         weights)
    q = 1 / (1 + np.exp(-m))
    y = labels[:, None]
    expected = np.mean(np.sum(-(y * np.log(q) + (1 - y) * np.log(1 - q)), axis=1))
    assert float(parts["image"]) == pytest.approx(expected, rel=1e-5)


def test_a_source_without_masks_gets_no_segmentation_loss(tmp_path):
    """MVFA trains its maskless datasets with the detection loss alone: their normal images too."""
    image = tmp_path / "image.png"
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(image), np.full((8, 8), 100, np.uint8))
    cv2.imwrite(str(mask), np.eye(8, dtype=np.uint8) * 255)
    maskless = [Sample(str(image), None, 0), Sample(str(image), None, 1)]
    assert [item["has_mask"] for item in MedicalDataset(maskless, 16)] == [False, False]
    masked = [Sample(str(image), None, 0), Sample(str(image), str(mask), 1), Sample(str(image), None, 1)]
    assert [item["has_mask"] for item in MedicalDataset(masked, 16)] == [True, True, False]


def test_training_on_a_maskless_source_has_no_pixel_truth(tmp_path):
    """train.py's data, as BMAD's image-level sets (Chest, OCT2017) come: no masks at all. Neither the
    training images nor a few-shot support set of such a target carry pixel truth, normals included."""
    root = tmp_path / "Chest"
    for label, folder in ((0, "good"), (1, "Ungood")):
        for index in range(4):
            path = root / "valid" / folder / f"p{index}_{label}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.full((16, 16), 40 + 50 * label + index, np.uint8))
    logger = logging.getLogger("test_recipes")
    for extra in ([], ["--k_shot", "2"]):
        args = train.parse_args(["--train_data_path", str(root), "--image_size", "32", "--holdout_fraction", "0.25",
                                 "--save_path", str(tmp_path / "run"), *extra])
        dataset, _ = train.training_data(args, [str(root)], ["Chest"], logger)
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        has_mask = [bool(train.batch_tensors(batch)[3][i]) for i in range(len(dataset))]
        assert len(has_mask) > 0 and not any(has_mask), extra


# ----------------------------------------------------------------------------- AnomalyCLIP's global embedding

def test_anomalyclip_global_embedding_is_the_class_token_times_proj_without_ln_post():
    """AnomalyCLIP's VisionTransformer.forward returns x_ori[0] @ proj (no ln_post), and its code
    divides cosines by 0.07 (the backbone's own learned scale is set to OpenAI's 100 here)."""
    torch.manual_seed(0)
    model = MedVMAD(tiny_config(variant="anomalyclip", adapters=False, learnable_prompts=True))
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    model.eval()
    with torch.no_grad():
        model.backbone.clip.logit_scale.fill_(math.log(100.0))
        output = model(images)
        visual = model.backbone.clip.visual
        x = visual._embeds(model.backbone.normalize(images))
        for block in visual.transformer.resblocks:  # the original stream (DPAM's second stream is the maps')
            x = block(x)
        raw, normed = x[:, 0] @ visual.proj, visual.ln_post(x[:, 0]) @ visual.proj
        text = model.text_features()
    for embedding, same in ((raw, True), (normed, False)):
        cosines = (embedding / embedding.norm(dim=-1, keepdim=True)) @ text.t()
        logits = cosines / 0.07
        assert torch.allclose(output.image_logits[:, 0], logits, atol=1e-4) == same
        if same:
            torch.testing.assert_close(output.image_score, logits.double().softmax(dim=-1)[:, 1])


# ----------------------------------------------------------------------------- saturation

@pytest.mark.parametrize("variant", ["anomalyclip", "medvmad"])
def test_confident_scores_do_not_tie_by_saturation(variant):
    """Logit gaps of 17, 20 and 30 (cosine gaps of 0.17-0.30 at scale 100): a float32 sigmoid gives
    exactly 1.0 for all three; the scores and maps keep them apart."""
    config = tiny_config(variant="anomalyclip", adapters=False, learnable_prompts=True, logit_scale=100.0) \
        if variant == "anomalyclip" else tiny_config(logit_scale=100.0)
    torch.manual_seed(0)
    model = MedVMAD(config)
    gaps = np.array([17.0, 20.0, 30.0]) / 100.0
    cos_normal = np.full(3, 0.1)
    assert float(torch.sigmoid(torch.tensor(17.0))) == 1.0
    global_embedding = features_with_cosines(cos_normal, cos_normal + gaps)
    patches = [features_with_cosines(np.repeat(cos_normal[:, None], 16, 1),
                                     np.repeat((cos_normal + gaps)[:, None], 16, 1))
               for _ in range(4)]
    with torch.no_grad():
        output = model._score(global_embedding, patches, patches if variant == "medvmad" else [], text_axes(),
                              torch.Size([64, 64]))
    scores = output.image_score.numpy()
    assert scores[0] < scores[1] < scores[2]
    peak = output.anomaly_map.flatten(1).amax(dim=1).numpy()
    assert peak[0] < peak[1] < peak[2]


def test_scores_and_maps_are_stored_in_float64_and_stay_apart():
    """Through predict and the metrics: two images (and two pixels) whose probabilities differ below
    float32's resolution at 1 keep their order, so AUROC is 1, not 0.5 for a tie."""
    from CLIP.MedVMAD import MedVMADOutput
    from evaluation.predict import predict

    class Scores(torch.nn.Module):  # a "model" whose scores and maps differ within 1e-9 of 1
        def forward(self, images: torch.Tensor) -> MedVMADOutput:
            score = 1 - torch.tensor([1e-9, 1e-10], dtype=torch.float64)
            maps = torch.full((len(images), 4, 4), 1 - 1e-9, dtype=torch.float64)
            maps[1, 0, 0] = 1 - 1e-10                                  # the lesion pixel, above the rest
            return MedVMADOutput(score, maps, maps, maps, [], maps, None)

    assert np.float32(1 - 1e-9) == np.float32(1 - 1e-10) == 1.0
    masks = torch.zeros(2, 4, 4)
    masks[1, 0, 0] = 1
    items = [dict(image=torch.zeros(3, 4, 4), path=str(i), label=i, has_mask=True, mask=masks[i]) for i in range(2)]
    predictions = predict(Scores(), torch.utils.data.DataLoader(items, batch_size=2), torch.device("cpu"))
    assert predictions.scores.dtype == predictions.maps.dtype == np.float64
    assert metrics.image_auroc(predictions.labels, predictions.scores) == 1.0
    assert metrics.pixel_auroc(predictions.masks, predictions.maps) == 1.0


# ----------------------------------------------------------------------------- legacy AUPRO

def test_legacy_aupro_moves_under_a_monotone_recalibration_and_the_standard_one_does_not():
    """The documented caveat: the legacy metric's 200 thresholds are spaced evenly between the maps'
    min and max, so a monotone remapping of the same maps (same ranking) changes it."""
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), bool)
    masks[:3, 8:20, 8:20] = True
    maps = np.clip(rng.normal(0.3, 0.1, masks.shape) + 0.3 * masks, 0, 1).astype(np.float32)
    remapped = (maps ** 8).astype(np.float32)                       # monotone: the same ranking
    assert metrics.aupro(masks, remapped) == pytest.approx(metrics.aupro(masks, maps), abs=1e-9)
    assert abs(metrics.aupro_legacy(masks, remapped) - metrics.aupro_legacy(masks, maps)) > 0.05
