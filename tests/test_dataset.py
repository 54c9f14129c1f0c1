"""dataset.py: layouts, loading, errors, support sets and augmentation, on tiny files in tmp_path."""
from __future__ import annotations

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (MedicalDataset, _resize_mask, Sample, augment_support, organ_name,
                     describe, list_samples, load_image, load_mask, preprocess, read_support,
                     resolve_support, sample_support, save_support, split_holdout, support_file_name)
from utils import InputError

SIZE = 32


def write(path, array) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return str(path)


def square_image(rng, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noisy dark image [SIZE,SIZE] uint8 and its lesion mask (a bright square) when abnormal."""
    image = rng.integers(0, 60, (SIZE, SIZE), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if lesion:
        mask[8:18, 10:22] = 255
        image[mask > 0] = 230
    return image, mask


def make_bmad(root, mask_folder: str = "anomaly_mask", with_train: bool = True) -> str:
    """BMAD layout: train 3 normal; valid/test 3 normal + 3 abnormal; masks saved as .tif."""
    rng = np.random.default_rng(0)
    splits = ["valid", "test"] + (["train"] if with_train else [])
    for split in splits:
        for i in range(3):
            write(root / split / "good" / "img" / f"n{i}.png", square_image(rng, False)[0])
            if split == "train":
                continue
            image, mask = square_image(rng, True)
            write(root / split / "Ungood" / "img" / f"a{i}.png", image)
            write(root / split / "Ungood" / mask_folder / f"a{i}.tif", mask)
    return str(root)


@pytest.fixture
def brain(tmp_path) -> str:
    return make_bmad(tmp_path / "Brain")


@pytest.mark.parametrize("mask_folder", ["anomaly_mask", "label"])
def test_bmad_layout(tmp_path, mask_folder):
    root = make_bmad(tmp_path / "Brain", mask_folder)
    train = list_samples(root, "train")
    assert [s.label for s in train] == [0, 0, 0] and all(s.mask_path is None for s in train)
    test = list_samples(root, "test")
    assert sorted(s.label for s in test) == [0, 0, 0, 1, 1, 1]
    for s in test:
        if s.label:
            assert os.path.basename(s.mask_path) == os.path.basename(s.image_path)[:-4] + ".tif"
            assert os.path.basename(os.path.dirname(s.mask_path)) == mask_folder
    data = MedicalDataset(test, image_size=48)
    for item in data:
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (48, 48) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["has_mask"] and (item["mask"].sum() > 0) == bool(item["label"])


def test_mvfa_repack_has_no_train(tmp_path):
    root = make_bmad(tmp_path / "Brain_AD", with_train=False)
    assert len(list_samples(root, "valid")) == 6
    with pytest.raises(InputError, match="train"):
        list_samples(root, "train")


def test_classification_only(tmp_path):
    root = tmp_path / "Chest"
    # no img/ folder, as in BMAD's image-level sets
    write(root / "test" / "good" / "n.png", np.zeros((8, 8), np.uint8))
    write(root / "test" / "Ungood" / "a.png", np.full((8, 8), 9, np.uint8))
    samples = list_samples(str(root), "test")
    assert [(s.label, s.mask_path) for s in samples] == [(0, None), (1, None)]
    data = MedicalDataset(samples, 16)
    # a source without masks has no pixel truth, its normal images included (image loss only, as MVFA)
    assert not data[1]["has_mask"] and not data[0]["has_mask"]


def test_meta_json(tmp_path, brain):
    images = [f"test/Ungood/img/a{i}.png" for i in range(3)] + ["test/good/img/n0.png"]
    masks = [p.replace("img/", "anomaly_mask/").replace(".png", ".tif") if "Ungood" in p else "" for p in images]
    entries = [dict(img_path=p, mask_path=m, cls_name="brain", specie_name="x", anomaly=int(bool(m)))
               for p, m in zip(images, masks)]
    with open(os.path.join(brain, "meta.json"), "w") as handle:
        json.dump({"test": {"brain": entries[:2], "other": entries[2:]}}, handle)
    for root in (brain, os.path.join(brain, "meta.json")):
        samples = list_samples(root, "test")  # meta.json wins over the folders
        assert [s.label for s in samples] == [1, 1, 1, 0]
        assert samples[0] == Sample(os.path.join(brain, images[0]), os.path.join(brain, masks[0]), 1)
    with pytest.raises(InputError, match="valid"):
        list_samples(brain, "valid")


def test_describe_counts_empty_masks(brain):
    write(os.path.join(brain, "test", "Ungood", "anomaly_mask", "a0.tif"), np.zeros((SIZE, SIZE), np.uint8))
    line = describe(list_samples(brain, "test"), "brain/test")
    assert line == ("brain/test: 6 images (3 normal, 3 abnormal; 1 abnormal with empty mask, "
                    "0 without mask)")


# ----------------------------------------------------------------------------- errors

def _break(brain: str, how: str) -> tuple[str, str, bool]:
    """Damage the layout; returns (split to list, path the error must name, raised on load)."""
    test = os.path.join(brain, "test")
    if how == "missing root":
        return "test", os.path.join(brain, "nope"), False
    if how == "missing split":
        os.rename(test, test + "_old")
        return "test", test, False
    if how == "empty split":
        for folder in ("good", "Ungood"):
            for name in os.listdir(os.path.join(test, folder, "img")):
                os.remove(os.path.join(test, folder, "img", name))
        return "test", test, False
    if how == "mask without image":
        stray = os.path.join(test, "Ungood", "anomaly_mask", "zzz.png")
        return "test", write(stray, np.zeros((4, 4), np.uint8)), False
    if how == "mixed masks":
        os.remove(os.path.join(test, "Ungood", "anomaly_mask", "a1.tif"))
        return "test", os.path.join(test, "Ungood", "img", "a1.png"), False
    if how == "size mismatch":
        small = os.path.join(test, "Ungood", "anomaly_mask", "a1.tif")
        return "test", write(small, np.zeros((16, 20), np.uint8)), True
    if how == "corrupt image":
        path = os.path.join(test, "Ungood", "img", "a1.png")
        with open(path, "r+b") as handle:
            handle.truncate(60)
        return "test", path, True
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing root", "missing split", "empty split", "mask without image",
                                 "mixed masks", "size mismatch", "corrupt image"])
def test_errors_name_the_path(brain, how):
    split, path, on_load = _break(brain, how)
    root = os.path.join(brain, "nope") if how == "missing root" else brain
    with pytest.raises(InputError) as error:
        samples = list_samples(root, split)
        if on_load:
            data = MedicalDataset(samples, SIZE)
            for i in range(len(data)):
                data[i]
    assert path in str(error.value) and "\n" not in str(error.value)
    if how == "size mismatch":
        assert "20x16" in str(error.value) and f"{SIZE}x{SIZE}" in str(error.value)


def test_skip_bad_keeps_the_rest(brain, caplog):
    _, bad, _ = _break(brain, "corrupt image")
    samples = list_samples(brain, "test")
    with caplog.at_level(logging.WARNING, logger="medvmad"):
        data = MedicalDataset(samples, SIZE, skip_bad=True)
    assert len(data) == len(samples) - 1 and bad not in [s.image_path for s in data.samples]
    assert bad in caplog.text
    assert all(item["image"].shape == (3, SIZE, SIZE) for item in data)


# ----------------------------------------------------------------------------- loading

def test_16bit_gray_png(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], np.uint16)
    image = load_image(write(tmp_path / "g16.png", values))
    assert image.dtype == np.float32 and image.shape == (2, 2, 3)
    np.testing.assert_allclose(image[..., 0], values / 65535, rtol=1e-6)
    assert (image[..., 0] == image[..., 2]).all()


def test_colour_and_alpha_to_rgb(tmp_path):
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[0, 0] = (0, 0, 255, 128)  # red, half transparent
    image = load_image(write(tmp_path / "c.png", bgra))
    np.testing.assert_array_equal(image[0, 0], [1, 0, 0])
    assert image.shape == (2, 2, 3)


def test_colormap_masks(tmp_path):
    index = np.zeros((6, 6), np.uint8)
    index[1:3, 2:5] = 1
    # saved through a gray colormap as RGBA (matplotlib imsave style): background black
    rgba = np.dstack([index * 255] * 3 + [np.full((6, 6), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "gray.png")), index > 0)
    # saved through a palette whose background colour is not black (viridis-like)
    palette = Image.fromarray(index, "P")
    palette.putpalette([68, 1, 84, 253, 231, 37] + [0] * 762)
    palette.save(tmp_path / "viridis.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "viridis.png")), index > 0)
    # an empty mask through that palette stays empty
    empty = Image.fromarray(np.zeros((6, 6), np.uint8), "P")
    empty.putpalette([68, 1, 84, 253, 231, 37] + [0] * 762)
    empty.save(tmp_path / "empty.png")
    assert not load_mask(str(tmp_path / "empty.png")).any()
    # a full-lesion mask through that palette is all lesion, though drawn in one colour
    full = Image.fromarray(np.ones((6, 6), np.uint8), "P")
    full.putpalette([68, 1, 84, 253, 231, 37] + [0] * 762)
    full.save(tmp_path / "full.png")
    assert load_mask(str(tmp_path / "full.png")).all()
    # a palette whose index 0 is white (PIL's quantize does this): read by colour, not by index
    quantized = Image.fromarray(index * 255, "L").convert("RGB").quantize(2)
    assert quantized.getpalette()[:3] == [255, 255, 255]                 # white is index 0
    quantized.save(tmp_path / "quantized.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "quantized.png")), index > 0)
    # white lesion on a fully transparent white background: transparency is background
    rgba = np.dstack([np.full((6, 6), 255, np.uint8)] * 3 + [(index * 255).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "transparent.png")), index > 0)
    # the same picture flattened to RGB (no palette): the darkest colour is background
    rgb = np.where(index[..., None] > 0, [37, 231, 253], [84, 1, 68]).astype(np.uint8)  # BGR
    np.testing.assert_array_equal(load_mask(write(tmp_path / "viridis_rgb.png", rgb)), index > 0)


@pytest.mark.parametrize("dtype, lesion", [(np.uint8, 1), (np.uint8, 255), (np.uint16, 1), (np.uint16, 65535)])
def test_masks_read_as_saved(tmp_path, dtype, lesion):
    """0/1, 0/255 (8- and 16-bit) read as they are; a mask that is lesion everywhere is all lesion."""
    values = np.zeros((5, 7), dtype)
    values[1:4, 4:6] = lesion
    np.testing.assert_array_equal(load_mask(write(tmp_path / "m.png", values)), values > 0)
    full = load_mask(write(tmp_path / "full.png", np.full((5, 7), lesion, dtype)))
    assert full.shape == (5, 7) and full.all()
    assert not load_mask(write(tmp_path / "empty.png", np.zeros((5, 7), dtype))).any()


def test_uniform_mask_of_another_value_is_refused(tmp_path):
    path = write(tmp_path / "grey.png", np.full((4, 4), 84, np.uint8))
    with pytest.raises(InputError, match="grey.png"):
        load_mask(path)


def test_preprocess_keeps_values_in_unit_range_and_orientation():
    image = np.zeros((10, 14), np.float32)
    image[:5, 7:] = 1.0                                  # top-right quarter bright
    tensor = preprocess(image, 8)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    torch.testing.assert_close(tensor[:, 1, 6], torch.ones(3))   # still top-right, not transposed
    torch.testing.assert_close(tensor[:, 6, 1], torch.zeros(3))
    flat = preprocess(np.full((10, 14), 0.5, np.float32), 8)
    torch.testing.assert_close(flat, torch.full((3, 8, 8), 0.5))


def test_downsampling_is_anti_aliased_like_pil_bicubic():
    """A 1-pixel stripe pattern shrunk 512 -> 240 averages to grey (no moiré), as PIL's bicubic does."""
    stripes = np.zeros((512, 512), np.float32)
    stripes[:, ::2] = 1.0
    ours = preprocess(stripes, 240)[0].numpy()
    reference = np.asarray(Image.fromarray(stripes, "F").resize((240, 240), Image.BICUBIC))
    interior = (slice(4, -4), slice(4, -4))
    assert abs(float(ours[interior].mean()) - 0.5) < 0.01 and float(ours[interior].std()) < 0.02
    np.testing.assert_allclose(ours[interior], reference[interior], atol=0.02)
    aliased = cv2.resize(stripes, (240, 240), interpolation=cv2.INTER_CUBIC)
    assert float(aliased[interior].std()) > 0.1  # what the plain cubic resize did
    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.random((300, 200)).astype(np.float32), (0, 0), 3)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    reference = np.asarray(Image.fromarray(smooth, "F").resize((64, 64), Image.BICUBIC))
    np.testing.assert_allclose(preprocess(smooth, 64)[0].numpy(), np.clip(reference, 0, 1), atol=0.02)


def test_masks_resize_by_nearest_pixel_centre():
    mask = np.zeros((512, 512), bool)
    mask[100:228, 300:428] = True
    resized = _resize_mask(mask, 64)
    expected = np.zeros((64, 64), np.float32)
    expected[12:28, 37:53] = 1                          # [100, 228) / 8 and [300, 428) / 8
    np.testing.assert_array_equal(resized.numpy(), expected)


def test_organ_name():
    for path, name in [("/d/Brain", "brain"), ("/d/BraTS2021/", "brain"), ("Liver_AD", "liver"),
                       ("x/Retina_RESC", "retina"), ("x/Retina_OCT2017", "retina"),
                       ("x/Chest/meta.json", "chest"),
                       ("x/Histopathology_AD", "histopathology"), ("x/MyKnees", "myknees")]:
        assert organ_name(path) == name


# ----------------------------------------------------------------------------- few-shot support

def test_support_round_trip(tmp_path, brain):
    valid = list_samples(brain, "valid")
    support = sample_support(valid, 2, seed=3)
    assert [s.label for s in support] == [0, 0, 1, 1]
    assert support == sample_support(valid[::-1], 2, seed=3)  # independent of the listing order
    path = str(tmp_path / "support" / "2-shot.txt")
    save_support(path, support, brain)
    assert read_support(path, brain) == support
    with pytest.raises(InputError, match="4 normal"):
        sample_support(valid, 4, seed=0)


def test_resolve_support_prefers_the_given_file_then_the_one_beside_the_checkpoint(tmp_path, brain):
    valid = list_samples(brain, "valid")
    sampled, source = resolve_support(brain, 2, 3)
    assert sampled == sample_support(valid, 2, seed=3) and source == "sampled from valid"
    checkpoint = tmp_path / "run" / "best.pth"
    assert resolve_support(brain, 2, 3, checkpoint_path=str(checkpoint)) == (sampled, "sampled from valid")
    beside = checkpoint.parent / support_file_name(2, 3)
    assert beside.name == "support_2shot_seed3.txt"
    assert support_file_name(2, 3, "Brain") == "support_Brain_2shot_seed3.txt"
    other = sample_support(valid, 2, seed=4)
    save_support(str(beside), other, brain)
    assert resolve_support(brain, 2, 3, checkpoint_path=str(checkpoint)) == (other, str(beside))
    given = str(tmp_path / "given.txt")
    save_support(given, sampled, brain)
    assert resolve_support(brain, 2, 3, given, str(checkpoint)) == (sampled, given)


def test_mvfa_support_format(tmp_path, brain):
    path = tmp_path / "4-shot.txt"
    path.write_text("a-0: a2.png a0.png\nn-0: n1.png n2.png\na-1: a1.png a2.png\nn-1: n0.png n1.png")
    support = read_support(str(path), brain)
    valid_dir = os.path.join(brain, "valid")
    assert [os.path.relpath(s.image_path, valid_dir) for s in support] == [
        "good/img/n1.png", "good/img/n2.png", "Ungood/img/a2.png", "Ungood/img/a0.png"]
    assert support[2].mask_path == os.path.join(valid_dir, "Ungood", "anomaly_mask", "a2.tif")
    assert [s.label for s in read_support(str(path), brain, iteration=1)] == [0, 0, 1, 1]
    path.write_text("a-0: a9.png\nn-0: n1.png")
    with pytest.raises(InputError, match="a9.png"):
        read_support(str(path), brain)


def _bright_square_batch(k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1)
    images, masks = [], []
    for _ in range(k):
        image, mask = square_image(rng, True)
        images.append(preprocess(image.astype(np.float32) / 255, SIZE))
        masks.append(torch.from_numpy(mask > 0).float())
    return torch.stack(images), torch.stack(masks)


def _bright(images: torch.Tensor) -> torch.Tensor:
    """Pixels of a [0,1] batch that are brighter than 0.5."""
    return images[:, 0] > 0.5


def test_augment_support_keeps_alignment():
    images, masks = _bright_square_batch()
    out_images, out_masks = augment_support(images, masks, n_aug=10, seed=0)
    assert out_images.shape == (33, 3, SIZE, SIZE) and out_masks.shape == (33, SIZE, SIZE)
    assert torch.equal(out_images[:3], images) and torch.equal(out_masks[:3], masks)
    bright, lesion = _bright(out_images), out_masks > 0.5
    iou = (bright & lesion).sum((1, 2)) / (bright | lesion).sum((1, 2))
    assert iou.min() > 0.85
    assert not torch.equal(out_masks[3:6], out_masks[6:9])  # copies differ
    again = augment_support(images, masks, n_aug=10, seed=0)
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)


def test_split_holdout_by_patient():
    samples = [Sample(f"/d/{p:03d}_{z}.png", None, int(p % 3 == 0))
               for p in range(20) for z in range(60, 64)]
    kept, held = split_holdout(samples, 0.2, seed=0)
    assert sorted(kept + held, key=lambda s: s.image_path) == sorted(samples, key=lambda s: s.image_path)
    def patients(part: list[Sample]) -> set[str]:
        return {os.path.basename(s.image_path).split("_")[0] for s in part}
    assert not patients(kept) & patients(held)
    assert {s.label for s in held} == {0, 1} and 0.15 < len(held) / len(samples) < 0.35
    assert split_holdout(samples, 0.2, seed=0) == (kept, held)
    assert split_holdout(samples, 0, seed=0) == (samples, [])


def test_support_file_round_trip_with_a_meta_json_root(tmp_path):
    from generate_dataset.demo import build_demo
    from generate_dataset.folder import build_index

    root = build_demo(str(tmp_path / "d"), n_train=1, n_valid=(2, 2), n_test=(1, 1), image_size=32)
    meta = tmp_path / "mine" / "meta.json"
    build_index(str(meta), f"{root}/valid/good/img", f"{root}/valid/Ungood/img",
                masks=f"{root}/valid/Ungood/anomaly_mask", splits=("valid",))
    samples = list_samples(str(meta), "valid")
    support = sample_support(samples, 2, seed=1)
    save_support(str(tmp_path / "s.txt"), support, str(meta))
    assert read_support(str(tmp_path / "s.txt"), str(meta)) == support
