"""Few-shot memory bank: distances, leave-one-out statistics and the combine rule, each against a
brute-force loop or hand-computed numbers, and independence from other test images."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from CLIP.MedVMAD import MedVMAD
from CLIP.memory_bank import MemoryBank
from dataset import MedicalDataset, Sample
from evaluation.fewshot import memory_bank_from_support
from tests.helpers import TINY_SIZE, tiny_config
from utils import InputError


def support_images(count: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, TINY_SIZE, TINY_SIZE, generator=generator)


def unit(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def brute_force_distances(banks: list[torch.Tensor], groups: torch.Tensor, queries: list[torch.Tensor],
                          exclude: list[int] | None = None) -> torch.Tensor:
    """1 - max cosine over the bank rows whose group differs from the query image's, one patch at a
    time: [B,L,N]."""
    batch, patches, _ = queries[0].shape
    out = torch.zeros(batch, len(banks), patches)
    for b in range(batch):
        for layer, (bank, query) in enumerate(zip(banks, queries)):
            for n in range(patches):
                best = -math.inf
                for m in range(bank.shape[0]):
                    if exclude is not None and int(groups[m]) == exclude[b]:
                        continue
                    cosine = float(query[b, n] @ bank[m]) / float(query[b, n].norm() * bank[m].norm())
                    best = max(best, cosine)
                out[b, layer, n] = 1 - best
    return out


def upsampled_mean(distances: torch.Tensor) -> torch.Tensor:
    """Bank map without smoothing: per-layer patch grids [B,L,g,g] bilinearly upsampled, then averaged."""
    batch, layers, patches = distances.shape
    side = int(round(patches ** 0.5))
    grid = distances.reshape(batch, layers, side, side)
    return F.interpolate(grid, size=(TINY_SIZE, TINY_SIZE), mode="bilinear", align_corners=False).mean(dim=1)


# ----------------------------------------------------------------------------- distances

def test_distances_match_a_brute_force_cosine_loop():
    """Per layer, per patch: 1 - best cosine to that layer's bank, skipping the excluded image's rows."""
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 1, 3, 0, 3, 1, 2])
    banks = [unit(12, 6, seed=1), unit(12, 6, seed=2)]  # two layers with different banks
    queries = [unit(3, 5, 6, seed=3), unit(3, 5, 6, seed=4)]
    bank = MemoryBank(banks, groups)
    np.testing.assert_allclose(bank.distances(queries).numpy(),
                               brute_force_distances(banks, groups, queries).numpy(), atol=1e-6)
    exclude = [2, 0, 3]  # a different image left out per query image
    np.testing.assert_allclose(bank.distances(queries, exclude=torch.tensor(exclude)).numpy(),
                               brute_force_distances(banks, groups, queries, exclude).numpy(), atol=1e-6)


def test_distances_are_the_same_in_small_similarity_blocks(monkeypatch):
    """Blocked evaluation (a bounded similarity matrix) gives the brute-force distances too."""
    groups = torch.arange(40) // 10
    features = unit(40, 8, seed=5)
    queries = unit(3, 7, 8, seed=6)
    monkeypatch.setattr("CLIP.memory_bank.SIMILARITY_BLOCK", 40 * 2)  # two query rows per block
    bank = MemoryBank([features], groups)
    np.testing.assert_allclose(bank.distances([queries], exclude=torch.tensor([0, 1, 3])).numpy(),
                               brute_force_distances([features], groups, [queries], [0, 1, 3]).numpy(),
                               atol=1e-6)


def test_image_in_the_bank_has_zero_distance_everywhere(tiny_model):
    """A support image's own patches are in the bank, so its distances are 0 unless it is left out."""
    images = support_images()
    tiny_model.build_memory_bank(images, torch.arange(4))
    with torch.no_grad():
        features = tiny_model(images[1:2]).patch_features
    distances = tiny_model.memory_bank.distances(features)
    assert distances.shape == (1, 4, 16)
    assert float(distances.abs().max()) < 1e-5
    held_out = tiny_model.memory_bank.distances(features, exclude=torch.tensor([1]))
    assert float(held_out.min()) > 1e-4


# ----------------------------------------------------------------------------- combine rule

def test_combine_rule_by_hand():
    """(1-w) z_text + w z_bank with support statistics, kept as z; the image uses the bank map's maximum."""
    bank = MemoryBank([unit(2, 4, seed=0)], torch.zeros(2, dtype=torch.long))
    # (mean, std) of text map, bank map, text image score, bank image score
    bank.statistics.copy_(torch.tensor([[0.2, 0.1], [0.5, 0.25], [0.4, 0.2], [0.6, 0.3]]))
    text_map = torch.tensor([[[0.4, 0.2]]])        # z_text = 2, 0
    bank_map = torch.tensor([[[0.0, 1.2]]])        # z_bank = -2, 2.8; max 1.2 -> bank image z = 2
    text_score = torch.tensor([0.8])               # z = 2
    pixel, image = bank.combine(text_map, bank_map, text_score, weight=0.25)
    # pixel 0: 0.75 * 2 + 0.25 * -2 = 1.0; pixel 1: 0.75 * 0 + 0.25 * 2.8 = 0.7; image: 0.75 * 2 + 0.25 * 2 = 2
    np.testing.assert_allclose(pixel.numpy(), [[[1.0, 0.7]]], rtol=1e-4)  # up to EPS in the stds
    np.testing.assert_allclose(image.numpy(), [2.0], rtol=1e-4)
    assert pixel.dtype == image.dtype == torch.float64


def test_combined_scores_far_beyond_sigmoid_saturation_stay_distinct():
    """z of 17, 20 and 40 (a text score 17, 20 and 40 standard deviations above the support's mean, as
    statistics of k = 2 images easily give): a float32 sigmoid returns exactly 1.0 for all three,
    a float64 one for the last; the kept z ranks them."""
    bank = MemoryBank([unit(2, 4, seed=0)], torch.zeros(2, dtype=torch.long))
    bank.statistics.copy_(torch.tensor([[0.0, 0.01], [0.0, 1.0], [0.0, 0.01], [0.0, 1.0]]))
    text_score = torch.tensor([0.17, 0.20, 0.40])
    text_map = text_score.view(3, 1, 1).expand(3, 1, 2).clone()
    pixel, image = bank.combine(text_map, torch.zeros(3, 1, 2), text_score, weight=0.0)
    assert float(torch.sigmoid(torch.tensor(17.0))) == float(torch.sigmoid(torch.tensor(40.0))) == 1.0
    np.testing.assert_allclose(image.numpy(), [17.0, 20.0, 40.0], rtol=2e-4)  # up to EPS in the std
    assert image[0] < image[1] < image[2] and pixel[0, 0, 0] < pixel[1, 0, 0] < pixel[2, 0, 0]


# ----------------------------------------------------------------------------- statistics and forward

@pytest.fixture
def unsmoothed_model() -> MedVMAD:
    """sigma 0: the bank map is the plain upsampled mean, so a test can rebuild it from distances."""
    torch.manual_seed(0)
    return MedVMAD(tiny_config(sigma=0.0))


def test_statistics_come_from_a_naive_leave_one_image_out_loop(unsmoothed_model):
    """Each support image (with its augmented copy) is scored against a bank of the other images only."""
    model = unsmoothed_model
    originals = support_images(3)
    noise = torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(9))
    images = torch.cat([originals, originals + 0.05 * noise])  # an "augmented" copy of each
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    model.eval()
    with torch.no_grad():
        plain = model(images)  # no bank yet: the text path alone
    model.build_memory_bank(images, groups, batch_size=4)
    features = plain.patch_features
    bank_maps = []
    for i in range(len(images)):
        others = groups != groups[i]  # bank without image i and without its copy
        banks = [f[others].reshape(-1, f.shape[-1]) for f in features]
        distances = brute_force_distances(banks, torch.zeros(len(banks[0])), [f[i:i + 1] for f in features])
        bank_maps.append(upsampled_mean(distances)[0])
    bank_maps = torch.stack(bank_maps).numpy()
    bank_scores = bank_maps.reshape(len(images), -1).max(axis=1)
    text_maps, text_scores = plain.text_map.numpy(), plain.image_score.numpy()
    expected = [[values.mean(), values.std(ddof=1)] for values in (text_maps, bank_maps, text_scores, bank_scores)]
    np.testing.assert_allclose(model.memory_bank.statistics.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_left_out_support_scores_come_from_a_naive_leave_one_image_out_loop(unsmoothed_model):
    """What the support set is calibrated on: each original support image's combined image score,
    from its text score and the maximum of its map against the other images' patches (not its own
    copy's), combined by the documented rule with the bank's statistics."""
    model = unsmoothed_model
    originals = support_images(3)
    noise = torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(9))
    images = torch.cat([originals, originals + 0.05 * noise])  # an "augmented" copy of each, after them
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    model.eval()
    with torch.no_grad():
        plain = model(images)
    model.build_memory_bank(images, groups, batch_size=4)
    _, _, (ms, ss), (mbs, sbs) = model.memory_bank.statistics.tolist()
    expected = []
    for i in range(3):
        others = groups != groups[i]
        banks = [f[others].reshape(-1, f.shape[-1]) for f in plain.patch_features]
        distances = brute_force_distances(banks, torch.zeros(len(banks[0])), [f[i:i + 1] for f in plain.patch_features])
        bank_score = float(upsampled_mean(distances).max())
        expected.append(0.7 * (float(plain.image_score[i]) - ms) / ss + 0.3 * (bank_score - mbs) / sbs)
    np.testing.assert_allclose(model.memory_bank.left_out_scores(0.3).numpy(), expected, rtol=1e-4)


def test_forward_with_a_bank_combines_brute_force_distances_by_the_documented_rule(unsmoothed_model):
    """Test map = (1-w) z_text + w z_bank, bank map from brute-force distances to all support patches."""
    model = unsmoothed_model
    model.set_fewshot_weight(0.3)
    images = support_images(3)
    model.eval()
    with torch.no_grad():
        support = model(images).patch_features
        queries = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(4))
        plain = model(queries)
    model.build_memory_bank(images, torch.arange(3))
    with torch.no_grad():
        out = model(queries)
    banks = [f.reshape(-1, f.shape[-1]) for f in support]
    bank_map = upsampled_mean(brute_force_distances(banks, torch.zeros(len(banks[0])), plain.patch_features))
    np.testing.assert_allclose(out.bank_map.numpy(), bank_map.numpy(), atol=1e-5)
    (mt, st), (mb, sb), (ms, ss), (mbs, sbs) = model.memory_bank.statistics.tolist()
    z_text, z_bank = (plain.text_map - mt) / st, (bank_map - mb) / sb
    np.testing.assert_allclose(out.anomaly_map.numpy(), (0.7 * z_text + 0.3 * z_bank).numpy(), rtol=1e-4, atol=1e-4)
    z_image = 0.7 * (plain.image_score - ms) / ss + 0.3 * (bank_map.flatten(1).max(dim=1).values - mbs) / sbs
    np.testing.assert_allclose(out.image_score.numpy(), z_image.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.text_map.numpy(), plain.text_map.numpy(), atol=1e-6)


def test_set_fewshot_weight_mixes_the_text_and_bank_terms_by_hand(unsmoothed_model):
    """At weight w the combined map and score are (1-w) times those at 0 plus w times those at 1;
    a weight outside [0, 1] is refused and leaves the model's weight as it was."""
    model = unsmoothed_model
    model.eval()
    model.build_memory_bank(support_images(3), torch.arange(3))
    queries = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(4))
    outputs = {}
    for weight in (0.0, 1.0, 0.3):
        model.set_fewshot_weight(weight)
        with torch.no_grad():
            outputs[weight] = model(queries)
    text, bank, mixed = outputs[0.0], outputs[1.0], outputs[0.3]
    assert model.config.fewshot_weight == 0.3
    assert not torch.allclose(text.anomaly_map, bank.anomaly_map)
    torch.testing.assert_close(mixed.anomaly_map, 0.7 * text.anomaly_map + 0.3 * bank.anomaly_map)
    torch.testing.assert_close(mixed.image_score, 0.7 * text.image_score + 0.3 * bank.image_score)
    for bad in (-0.1, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="fewshot_weight"):
            model.set_fewshot_weight(bad)
    assert model.config.fewshot_weight == 0.3


def test_combined_scores_ignore_other_test_images(tiny_model):
    """A test image's map and score do not depend on which other test images share its batch."""
    tiny_model.build_memory_bank(support_images(), torch.tensor([0, 0, 1, 1]))
    statistics = tiny_model.memory_bank.statistics.clone()
    tests = torch.randn(5, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        together = tiny_model(tests)
        alone = tiny_model(tests[3:4])
        subset = tiny_model(tests[2:4])
    assert torch.allclose(together.image_score[3], alone.image_score[0], atol=1e-5)
    assert torch.allclose(together.anomaly_map[3], subset.anomaly_map[1], atol=1e-5)
    assert torch.equal(tiny_model.memory_bank.statistics, statistics)  # scoring never updates them


# ----------------------------------------------------------------------------- support files -> bank

def test_bank_from_support_files_groups_each_augmented_copy_with_its_image(tmp_path, tiny_model):
    """Only normal support images enter the bank, and leaving image g out removes all of its copies."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        path = tmp_path / f"n{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (TINY_SIZE, TINY_SIZE), dtype=np.uint8))
        samples.append(Sample(str(path), None, 0))
    abnormal = tmp_path / "a0.png"
    cv2.imwrite(str(abnormal), np.full((TINY_SIZE, TINY_SIZE), 255, np.uint8))
    samples.insert(1, Sample(str(abnormal), None, 1))
    count, copies = memory_bank_from_support(tiny_model, samples, seed=0, device=torch.device("cpu"))
    assert (count, copies) == (3, 11)
    bank = tiny_model.memory_bank
    assert bank.layer(0).shape[0] == 3 * 11 * 16 and torch.bincount(bank.groups).tolist() == [11 * 16] * 3
    normals = MedicalDataset([s for s in samples if s.label == 0], TINY_SIZE)
    with torch.no_grad():
        features = tiny_model(torch.stack([normals[i]["image"] for i in range(3)])).patch_features
    for g in range(3):
        own = [f[g:g + 1] for f in features]
        assert float(bank.distances(own, exclude=torch.tensor([(g + 1) % 3])).abs().max()) < 1e-5
        assert float(bank.distances(own, exclude=torch.tensor([g])).min()) > 1e-4


def test_the_bank_needs_two_normal_support_images_and_abnormal_ones_do_not_count(tmp_path, tiny_model):
    """One normal image (whatever the abnormal ones) is refused, leaving no bank; exactly two build one."""
    rng = np.random.default_rng(1)
    paths = []
    for name in ("n0", "n1", "a0", "a1"):
        paths.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 255, (TINY_SIZE, TINY_SIZE), dtype=np.uint8))
    one_normal = [Sample(str(paths[0]), None, 0), Sample(str(paths[2]), None, 1), Sample(str(paths[3]), None, 1)]
    with pytest.raises(InputError, match=r"needs at least 2 normal support images \(--k_shot >= 2\)"):
        memory_bank_from_support(tiny_model, one_normal, seed=0, device=torch.device("cpu"))
    assert tiny_model.memory_bank is None
    two_normal = [*one_normal, Sample(str(paths[1]), None, 0)]
    assert memory_bank_from_support(tiny_model, two_normal, seed=0, device=torch.device("cpu")) == (2, 11)
    assert torch.bincount(tiny_model.memory_bank.groups).tolist() == [11 * 16] * 2  # 4x4 patches per copy
