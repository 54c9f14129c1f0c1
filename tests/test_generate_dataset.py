"""generate_dataset/: converters on tiny NIfTI volumes in the official naming, folder index, demo set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset import list_samples, organ_name
from generate_dataset import brats2021, common, demo, folder, liverct
from scans.files import read_scan
from scans.framing import recorded_framing, scale_intensity
from tests.helpers import ROOT, SHAPE, brats_case, liver_volumes, reference_scale, save_nifti
from utils import InputError


def read(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def pngs(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


# ----------------------------------------------------------------------------- BraTS2021


@pytest.fixture
def brats_raw(tmp_path) -> tuple[Path, dict]:
    raw = tmp_path / "raw"
    cases = {f"{i:05d}": brats_case(raw, f"{i:05d}", i) for i in range(1, 7)}
    return raw, cases


def test_brats_conversion(tmp_path, brats_raw):
    """Patients split whole; each PNG is the percentile-scaled RAS slice shown anterior up, right on the left."""
    raw, cases = brats_raw
    out = tmp_path / "Brain"
    info = brats2021.convert(str(raw), str(out), slice_range=(3, 9), seed=1, split=(3, 1, 2))
    groups = {split: info[split] for split in ("train", "valid", "test")}
    assert sorted(sum(groups.values(), [])) == sorted(cases)  # every patient in exactly one split
    assert [len(g) for g in groups.values()] == [3, 1, 2]
    assert json.loads((out / "split.json").read_text())["train"] == groups["train"]
    # the framing a volume is scored with: whole axial slices of the range that hold brain, the percentile rule
    assert recorded_framing(str(out)).to_dict() == {"axis": 2, "window": None, "white_level": 1.0, "min_area": 0.0,
                                                    "size": None, "margin": 0.06, "slice_range": [3, 9],
                                                    "skip_empty": True, "masked": None}
    assert not (out / "train" / "Ungood").exists()
    for split, case_ids in groups.items():
        for path in pngs(out / split, "*/img/*.png"):
            case, z = path.stem.split("_")
            assert case in case_ids and 3 <= int(z) <= 9 and len(case) == 5
            volume, seg = cases[case]
            expected = reference_scale(volume)[:, :, int(z)].T[::-1, ::-1]
            np.testing.assert_array_equal(read(path), expected)
            lesion = seg[:, :, int(z)] > 0
            assert (path.parts[-3] == "Ungood") == lesion.any()
            if lesion.any():
                mask = read(out / split / "Ungood" / "anomaly_mask" / path.name)
                assert set(np.unique(mask)) == {0, 255}
                np.testing.assert_array_equal(mask > 0, lesion.T[::-1, ::-1])
        # every slice in range of a non-train patient is kept, normal or abnormal
        if split != "train":
            assert len(pngs(out / split, "*/img/*.png")) == 7 * len(case_ids)
        for cls in ("good", "Ungood"):
            assert info["counts"][f"{split}/{cls}"] == len(pngs(out / split / cls, "img/*.png"))
    assert sum(info["counts"].values()) > 0
    samples = list_samples(str(out), "test")
    assert all(s.mask_path is not None for s in samples if s.label)


def test_brats_orientation_of_stored_lps_volume(tmp_path):
    """BraTS files are stored LPS (affine diag(-1,-1,1)); their PNG is the stored slice transposed."""
    raw = tmp_path / "raw" / "BraTS2021_00042"
    volume = np.zeros(SHAPE, np.float32)
    volume[2:20, 3:17, :] = np.arange(18 * 14, dtype=np.float32).reshape(18, 14, 1) + 1
    save_nifti(raw / "BraTS2021_00042_flair.nii.gz", volume, np.diag([-1.0, -1.0, 1.0, 1.0]))
    save_nifti(raw / "BraTS2021_00042_seg.nii.gz", np.zeros(SHAPE, np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0]))
    brats2021.convert(str(tmp_path / "raw"), str(tmp_path / "out"), slice_range=(4, 4), split=(0, 0, 1))
    image = read(tmp_path / "out" / "test" / "good" / "img" / "00042_4.png")
    np.testing.assert_array_equal(image, reference_scale(volume)[:, :, 4].T)


def test_scale_intensity_hand_values():
    """Brain voxels 1..1000: percentiles 0.5 -> 5.995 and 99.5 -> 995.005 map to 0 and 255, rounded."""
    volume = np.zeros((12, 12, 12), np.float32)
    volume[1:11, 1:11, 1:11] = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    scaled = scale_intensity(volume)
    assert scaled.dtype == np.uint8 and (scaled[volume == 0] == 0).all()
    value = lambda v: int(scaled[volume == v][0])  # noqa: E731
    # (v - 5.995) / 989.01 * 255: 1 -> -1.3 (clipped), 6 -> 0.001, 100 -> 24.24, 700 -> 178.94,
    # 994 -> 254.74, 995 -> 254.999, 1000 -> 256.3 (clipped)
    assert [value(v) for v in (1, 6, 100, 700, 994, 995, 1000)] == [0, 0, 24, 179, 255, 255, 255]
    assert value(500) == 127 and value(5) == 0
    with pytest.raises(InputError, match="no brain"):
        scale_intensity(np.zeros((4, 4, 4), np.float32))


def test_split_counts():
    """Patient counts per split: largest-remainder fractions, or whole counts; impossible splits refused."""
    assert common.split_counts(10, (0.7, 0.1, 0.2)) == [7, 1, 2]
    assert sum(common.split_counts(11, (0.7, 0.1, 0.2))) == 11
    assert common.split_counts(10, (5, 2, 1)) == [5, 2, 1]
    with pytest.raises(InputError):
        common.split_counts(10, (8, 2, 2))


def test_brats_bad_input(tmp_path, brats_raw):
    """Missing folders, modality files or seg files and a non-empty target are errors naming the path."""
    raw, _ = brats_raw
    with pytest.raises(InputError, match="nope"):
        brats2021.convert(str(tmp_path / "nope"), str(tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=str(empty)):
        brats2021.convert(str(empty), str(tmp_path / "out"))
    with pytest.raises(InputError, match="BraTS2021_00001_t2.nii.gz"):
        brats2021.convert(str(raw), str(tmp_path / "out"), modality="t2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"")
    with pytest.raises(InputError, match="not empty"):
        brats2021.convert(str(raw), str(tmp_path / "full"))
    (raw / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").unlink()
    with pytest.raises(InputError, match="BraTS2021_00002_seg"):
        brats2021.convert(str(raw), str(tmp_path / "out"))


def test_brats_cli_reports_one_line(tmp_path):
    """The converter's command line exits 2 with one line naming the missing folder."""
    result = subprocess.run([sys.executable, "-m", "generate_dataset.brats2021",
                             "--raw_path", str(tmp_path / "missing"), "--save_path", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing" in result.stderr


# ----------------------------------------------------------------------------- Liver CT


def test_window_hu():
    """[-200, 250] HU -> 0..255 by hand: 25 HU -> 225/450*255 = 127.5 -> 128, 70 HU -> 153."""
    hu = np.array([-1000, -200, 25, 70, 250, 1000])
    np.testing.assert_array_equal(liverct.window_hu(hu, -200, 250), [0, 0, 128, 153, 255, 255])


# The window [-200, 250] by hand for the HU values liver_volumes draws from.
WINDOWED = {-1000: 0, -200: 0, 70: 153, 250: 255, 1000: 255}


def hand_window(ct: np.ndarray) -> np.ndarray:
    return np.vectorize(WINDOWED.__getitem__)(ct).astype(np.uint8)


def test_liver_conversion(tmp_path):
    """BTCV liver slices train, LiTS volumes split valid/test; images windowed, non-liver zeroed, mask = label 2."""
    btcv_path, lits_path, btcv, lits = liver_volumes(tmp_path)
    out = tmp_path / "Liver"
    info = liverct.convert(str(btcv_path), str(lits_path), str(out), seed=0, valid_fraction=0.4)
    assert len(info["valid"]) == 2 and sorted(info["valid"] + info["test"]) == sorted(lits)
    assert not set(info["valid"]) & set(info["test"])
    train = pngs(out / "train" / "good" / "img", "*.png")
    assert [p.name for p in train] == [f"{n}_{z}.png" for n in ("0001", "0002") for z in range(2, 6)]
    for path in train:
        number, z = path.stem.split("_")
        ct, label = btcv[number]
        liver = label[:, :, int(z)] == 6
        expected = np.where(liver, hand_window(ct[:, :, int(z)]), 0)
        np.testing.assert_array_equal(read(path), expected.T[::-1, ::-1])
    for split in ("valid", "test"):
        names = {p.stem for p in pngs(out / split, "*/img/*.png")}
        assert {n.split("_")[0] for n in names} == set(info[split])
        assert names == {f"{n}_{z}" for n in info[split] for z in range(1, 7)}  # every liver slice, no other
        for path in pngs(out / split, "*/img/*.png"):
            number, z = path.stem.split("_")
            ct, label = lits[number]
            seg = label[:, :, int(z)]
            assert seg.any() and (path.parts[-3] == "Ungood") == (seg == 2).any()
            image = read(path)
            assert (image[(seg == 0).T[::-1, ::-1]] == 0).all()  # outside the liver zeroed
            expected = np.where(seg >= 1, hand_window(ct[:, :, int(z)]), 0)
            np.testing.assert_array_equal(image, expected.T[::-1, ::-1])
            if path.parts[-3] == "Ungood":
                mask = read(out / split / "Ungood" / "anomaly_mask" / path.name)
                np.testing.assert_array_equal(mask, ((seg == 2) * 255).astype(np.uint8).T[::-1, ::-1])
    assert organ_name(str(out)) == "liver" and list_samples(str(out), "test")
    assert recorded_framing(str(out)).to_dict() == {"axis": 2, "window": [-200.0, 250.0], "white_level": 1.0,
                                                    "min_area": 0.0, "size": None, "margin": 0.06,
                                                    "slice_range": None, "skip_empty": False, "masked": "liver"}


def test_a_brats_volume_read_by_its_recorded_framing_gives_the_converters_slices(tmp_path, brats_raw):
    """read_scan with the split.json framing keeps exactly the slices the converter wrote (the range, no
    empty slice) and gives each one's PNG pixel for pixel."""
    raw, cases = brats_raw
    for case, (volume, _) in cases.items():  # slices 2 and 9 hold no brain
        volume[:, :, [2, 9]] = 0
        save_nifti(raw / f"BraTS2021_{case}" / f"BraTS2021_{case}_flair.nii.gz", volume)
    out = tmp_path / "Brain"
    info = brats2021.convert(str(raw), str(out), slice_range=(1, 10), seed=1, split=(3, 1, 2))
    framing = recorded_framing(str(out))
    for case in info["valid"] + info["test"]:  # both classes written there
        written = {int(path.stem.split("_")[1]): read(path) for path in pngs(out, f"*/*/img/{case}_*.png")}
        expected = [1, 3, 4, 5, 6, 7, 8, 10]
        assert sorted(written) == expected
        scan = read_scan(str(raw / f"BraTS2021_{case}" / f"BraTS2021_{case}_flair.nii.gz"), framing=framing)
        assert scan.slice_indices == expected
        for z, image in zip(scan.slice_indices, scan.slices):
            np.testing.assert_array_equal(np.rint(image[..., 0] * 255).astype(np.uint8), written[z])


def test_liver_bad_input(tmp_path):
    """Missing folders, a volume without segmentation and an inverted HU window are errors."""
    btcv_path, lits_path, _, _ = liver_volumes(tmp_path)
    with pytest.raises(InputError, match="nope"):
        liverct.convert(str(tmp_path / "nope"), str(lits_path), str(tmp_path / "out"))
    missing = lits_path / "Training Batch 2" / "segmentation-4.nii"
    missing.unlink()
    with pytest.raises(InputError, match="volume-4.nii"):
        liverct.convert(str(btcv_path), str(lits_path), str(tmp_path / "out"))
    with pytest.raises(InputError, match="HU window"):
        liverct.convert(str(btcv_path), str(lits_path), str(tmp_path / "out"), hu_window=(250, -200))


# ----------------------------------------------------------------------------- folder index

def test_folder_index(tmp_path):
    """meta.json paths are relative to its folder, masks pair by stem, splits update independently."""
    rng = np.random.default_rng(0)
    for name in ("normal", "abnormal", "masks"):
        (tmp_path / name).mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "normal" / f"n{i}.png"), rng.integers(0, 255, (12, 12), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / "abnormal" / f"a{i}.jpg"), rng.integers(0, 255, (12, 12), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / "masks" / f"a{i}.png"), np.full((12, 12), 255 * (i > 0), np.uint8))
    meta = tmp_path / "Brain_custom" / "meta.json"
    folder.build_index(str(meta), str(tmp_path / "normal"), str(tmp_path / "abnormal"),
                       str(tmp_path / "masks"), ("test",))
    entry = json.loads(meta.read_text())["test"]["brain"][-1]
    assert entry == dict(img_path="../abnormal/a2.jpg", mask_path="../masks/a2.png", cls_name="brain",
                         specie_name="abnormal", anomaly=1)
    samples = list_samples(str(meta.parent), "test")
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1] and all(s.mask_path for s in samples if s.label)
    # a second run adds the train split and keeps test
    folder.build_index(str(meta), str(tmp_path / "normal"), None, splits=("train",))
    assert len(list_samples(str(meta), "train")) == 3 and len(list_samples(str(meta), "test")) == 6
    (tmp_path / "masks" / "a1.png").unlink()
    with pytest.raises(InputError, match="a1.jpg"):
        folder.build_index(str(meta), None, str(tmp_path / "abnormal"), str(tmp_path / "masks"))
    cv2.imwrite(str(tmp_path / "masks" / "stray.png"), np.zeros((12, 12), np.uint8))
    with pytest.raises(InputError, match="stray.png"):
        folder.build_index(str(meta), None, str(tmp_path / "abnormal"), str(tmp_path / "masks"))


# ----------------------------------------------------------------------------- demo set

SMALL = dict(n_train=2, n_valid=(1, 2), n_test=(2, 3))


def files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*.png"))}


def test_demo_deterministic_and_readable(tmp_path):
    """Same seed, same bytes; another seed differs; a complete build is reused, not rebuilt."""
    root = demo.build_demo(str(tmp_path / "a"), seed=0, **SMALL)
    assert root == str(tmp_path / "a" / "Brain") and organ_name(root) == "brain"
    same = files(demo.build_demo(str(tmp_path / "b"), seed=0, **SMALL))
    other = files(demo.build_demo(str(tmp_path / "c"), seed=1, **SMALL))
    first = files(root)
    assert first == same and len(first) == 2 + 1 + 2 + 2 + 3 + 2 + 3
    assert first != other
    assert [s.label for s in list_samples(root, "test")] == [0, 0, 1, 1, 1]
    assert all(s.mask_path is not None for s in list_samples(root, "valid") if s.label)
    # ensure_demo reuses a complete set and rebuilds nothing
    stamp = os.path.getmtime(os.path.join(root, "demo.json"))
    assert demo.ensure_demo(str(tmp_path / "a")) == root
    assert os.path.getmtime(os.path.join(root, "demo.json")) == stamp
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".")]  # no leftover temp folder
    # an older build (other images) is rebuilt with its own seed and counts, not reused
    record = json.loads(Path(root, "demo.json").read_text())
    Path(root, "demo.json").write_text(json.dumps({**record, "build": 1}))
    Path(root, "train", "good", "img", "stale.png").write_bytes(b"old")
    assert demo.ensure_demo(str(tmp_path / "a")) == root
    assert files(root) == first and json.loads(Path(root, "demo.json").read_text())["build"] == record["build"]


def test_demo_masks_are_exactly_the_lesions(tmp_path):
    """Each written mask is exactly the pixels the lesion brightened, all inside the brain."""
    root = demo.build_demo(str(tmp_path), seed=5, **SMALL)
    images, masks, _ = demo.template_slices()
    for i, path in enumerate(sorted(Path(root, "test", "Ungood", "anomaly_mask").glob("*.png"))):
        rng = np.random.default_rng([5, 2, 1, i])  # the generator _write_split gives test/Ungood sample i
        image, brain, delta, _ = demo.make_sample(images, masks, True, rng)
        np.testing.assert_array_equal(read(path), (delta > 0).astype(np.uint8) * 255)
        np.testing.assert_array_equal(read(Path(root, "test", "Ungood", "img", path.name)), image)
        assert (delta > 0).any() and not (delta[~brain] > 0).any()  # lesions inside the brain only


def test_demo_lesions_vary_and_stay_in_brain():
    """Normal samples have no lesion; lesions stay in the brain and vary from small to large."""
    images, masks, _ = demo.template_slices()
    areas = []
    for i in range(30):
        rng = np.random.default_rng(i)
        _, brain, delta, _ = demo.make_sample(images, masks, bool(i % 3), rng)
        assert (not (i % 3)) == (not (delta > 0).any())  # normal samples have no lesion
        assert not (delta[~brain] > 0).any()
        if (delta > 0).any():
            areas.append(int((delta > 0).sum()))
    assert min(areas) < 150 and max(areas) > 1000  # small to large lesions


def test_demo_refuses_foreign_folder(tmp_path):
    """A Brain/ folder not built by the demo is never overwritten."""
    (tmp_path / "Brain").mkdir()
    (tmp_path / "Brain" / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="Brain"):
        demo.ensure_demo(str(tmp_path))
    assert (tmp_path / "Brain" / "mine.txt").exists()
