"""Few-shot memory bank: distances, leave-one-out statistics and independence from other test images."""
from __future__ import annotations

import torch

from CLIP.memory_bank import MemoryBank
from tests.conftest import TINY_SIZE


def support_images(count: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, TINY_SIZE, TINY_SIZE, generator=generator)


def test_image_in_the_bank_has_zero_distance_everywhere(tiny_model):
    images = support_images()
    tiny_model.build_memory_bank(images, torch.arange(4))
    with torch.no_grad():
        features = tiny_model(images[1:2]).patch_features
    distances = tiny_model.memory_bank.distances(features)
    assert distances.shape == (1, 4, 16)
    assert float(distances.abs().max()) < 1e-5


def test_leave_one_out_ignores_the_image_own_rows(tiny_model):
    images = support_images()
    tiny_model.build_memory_bank(images, torch.arange(4))
    with torch.no_grad():
        features = tiny_model(images[1:2]).patch_features
    held_out = tiny_model.memory_bank.distances(features, exclude=torch.tensor([1]))
    assert float(held_out.min()) > 1e-4


def test_a_changed_patch_scores_higher_than_a_copied_one():
    bank_features = torch.nn.functional.normalize(torch.randn(1, 50, 8), dim=-1)
    bank = MemoryBank([bank_features[0]], torch.zeros(50, dtype=torch.long))
    queries = bank_features[:, :2].clone()
    queries[0, 1] = torch.nn.functional.normalize(-bank_features[0].mean(0), dim=-1)  # far from all
    distances = bank.distances([queries])[0, 0]
    assert float(distances[0]) < 1e-6 < float(distances[1])
    expected = 1 - (queries[0, 1] @ bank_features[0].t()).max()
    assert torch.isclose(distances[1], expected, atol=1e-6)


def test_distances_are_the_same_in_small_similarity_blocks(monkeypatch):
    features = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    bank = MemoryBank([features], torch.arange(40) // 10)
    queries = torch.nn.functional.normalize(torch.randn(3, 7, 8), dim=-1)
    whole = bank.distances([queries], exclude=torch.tensor([0, 1, 3]))
    monkeypatch.setattr("CLIP.memory_bank.SIMILARITY_BLOCK", 40 * 2)  # two query rows per block
    assert torch.allclose(bank.distances([queries], exclude=torch.tensor([0, 1, 3])), whole)


def test_combined_scores_ignore_other_test_images(tiny_model):
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
    assert together.bank_map is not None and float(together.anomaly_map.min()) >= 0
    assert float(together.anomaly_map.max()) <= 1


def test_statistics_come_from_leave_one_out_support_maps(tiny_model):
    images = support_images()
    groups = torch.tensor([0, 0, 1, 1])
    tiny_model.build_memory_bank(images, groups)
    bank = tiny_model.memory_bank
    with torch.no_grad():
        out = tiny_model(images)  # with the bank: bank maps are 0 for support images themselves
        loo = tiny_model._bank_map(bank.distances(out.patch_features, exclude=groups), (TINY_SIZE, TINY_SIZE))
    assert float(out.bank_map.abs().max()) < 1e-4
    assert torch.allclose(bank.statistics[1], torch.stack([loo.mean(), loo.std()]), atol=1e-5)
    assert torch.allclose(bank.statistics[0], torch.stack([out.text_map.mean(), out.text_map.std()]), atol=1e-5)
