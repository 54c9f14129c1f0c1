"""The framing rule (issue #22, items 1 and 7): one rule turns a volume into the slices a model sees,
shared by the converters and test_one_example.py; maps go back on the input's grid; the demo volumes
and the demo's patients.

References are independent of the code under test: crop boxes, pads and kept slices worked out by hand
for hand-built volumes, OpenCV's own resize of the hand-cut slices, the PNG slices the demo converter
writes scored one by one, voxel indices chosen by hand, the nilearn template read directly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pytest
import torch

import test_one_example
from CLIP.MedVMAD import MedVMAD
from CLIP.checkpoint import save_checkpoint
from dataset import patient_of
from generate_dataset import demo
from scans.framing import Framing, Placement, frame_volume, recorded_framing, training_framing
from tests.helpers import tiny_config, write_series
from utils import InputError

DEMO_FRAMING = {"axis": 2, "window": None, "white_level": 0.65, "min_area": 0.75, "size": 240, "margin": 0.06,
                "slice_range": None, "skip_empty": False, "masked": None}


def tiny_checkpoint(path: Path, framing: dict | None) -> str:
    """The seeded tiny model saved with ``framing`` as train.py stores it (None: an older checkpoint)."""
    torch.manual_seed(0)
    extra = {} if framing is None else {"framing": framing}
    save_checkpoint(path, MedVMAD(tiny_config()).eval(), threshold=0.5, epoch=1, **extra)
    return str(path)


def run(tmp_path: Path, image: Path | str, checkpoint: str, *extra: str, out: str = "out") -> list[dict]:
    return test_one_example.main(["--image_path", str(image), "--checkpoint_path", checkpoint, "--save_path",
                                  str(tmp_path / out), "--device", "cpu", *extra])


def shown(image: np.ndarray) -> np.ndarray:
    """A RAS slice [X,Y] as the converters show it, written out: rows = Y from top (anterior) down,
    columns = X from right to left."""
    rows, cols = image.shape[1], image.shape[0]
    return np.array([[image[cols - 1 - c, rows - 1 - r] for c in range(cols)] for r in range(rows)])


# ----------------------------------------------------------------------------- the rule, by hand

def hand_volume() -> np.ndarray:
    """RAS [X=30, Y=24, Z=10]: a box x 5..19, y 4..15 on slices 2..7 (180 px), a smaller one on
    slice 8 (x 5..19, y 4..13: 150 px) and a 3x3 patch on slice 1 (9 px); values 10..189."""
    volume = np.zeros((30, 24, 10), np.float32)
    values = np.arange(10, 190, dtype=np.float32).reshape(15, 12)
    volume[5:20, 4:16, 2:8] = values[:, :, None] + np.arange(6)[None, None, :]
    volume[5:20, 4:14, 8] = values[:, :10]
    volume[10:13, 10:13, 1] = 50
    return volume


def test_frame_volume_by_hand():
    """Kept slices, crop box, pads, intensity and resize, each worked out by hand."""
    volume = hand_volume()
    framing = Framing(white_level=0.5, min_area=0.75, size=32)
    slices, indices, placement = frame_volume(volume, framing, "v")
    assert indices == [2, 3, 4, 5, 6, 7, 8]  # 180 px each, 150 >= 0.75 * 180 = 135; 9 px and empty slices dropped
    # displayed rows are Y reversed (23 - y: 8..19), columns X reversed (29 - x: 10..24): a 12 x 15 box,
    # padded to int(15 * 1.12) = 16: rows by (2, 2), columns by (0, 1)
    assert (placement.top, placement.left, placement.height, placement.width, placement.side) == (8, 10, 12, 15, 16)
    assert placement.pads == [(2, 2), (0, 1)] and placement.shape == (24, 30)
    brain = volume[volume > 0]
    low, high = np.percentile(brain, [0.5, 99.5])
    grey = np.where(volume > 0, np.rint(np.clip((volume - low) / (high - low) * 0.5, 0, 1) * 255), 0).astype(np.uint8)
    for index, image in zip(indices, slices):
        cut = shown(grey[:, :, index])[8:20, 10:25]
        expected = cv2.resize(np.pad(cut, ((2, 2), (0, 1))), (32, 32), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(image, expected)
    assert slices[0].dtype == np.uint8 and max(s.max() for s in slices) < 140  # the brightest near grey 0.5
    # --slices narrows what is scored, never the crop; slices the rule drops are refused by name
    narrowed, chosen, same = frame_volume(volume, framing, "v", (0, 3))
    assert chosen == [2, 3] and same == placement
    np.testing.assert_array_equal(narrowed[1], slices[1])
    with pytest.raises(InputError, match=r"--slices 0 1: the framing keeps none of them \(it keeps slices 2-8\)"):
        frame_volume(volume, framing, "v", (0, 1))
    # the old rule: every slice, whole, percentile-scaled to white
    whole, every, none = frame_volume(volume, Framing(), "v")
    assert every == list(range(10)) and none is None
    scaled = np.where(volume > 0, np.rint(np.clip((volume - low) / (high - low), 0, 1) * 255), 0)
    np.testing.assert_array_equal(whole[4], shown(scaled[:, :, 4]))


def test_window_rule_and_other_axes():
    """A window goes to [0, white_level] in 8-bit grey levels; axis 1 slices along Y."""
    volume = hand_volume()
    slices, indices, _ = frame_volume(volume, Framing(axis=1, window=(0.0, 200.0)), "v")
    assert indices == list(range(24))
    grey = np.rint(np.clip(volume / 200, 0, 1) * 255)
    np.testing.assert_array_equal(slices[9], shown(grey[:, 9, :]))
    half, _, _ = frame_volume(volume, Framing(window=(0.0, 200.0), white_level=0.5), "v")
    np.testing.assert_array_equal(half[5], shown(np.rint(np.clip(volume / 400, 0, 1) * 255)[:, :, 5]))


def test_unframe_places_each_pixel_back_by_hand():
    """A framed map pixel goes back to the displayed pixel it was cut from: top/left plus the offset
    past the pads, exactly when nothing is resized, and as the 2x2 block mean at twice the size."""
    placement = Placement(shape=(24, 30), top=8, left=10, height=12, width=15, side=16, size=16)
    heat = np.zeros((16, 16), np.float32)
    heat[2 + 5, 0 + 11] = 1  # box pixel (5, 11) after the (2, 0) pads
    back = placement.unframe(heat)
    assert back.shape == (24, 30) and back[8 + 5, 10 + 11] == 1 and back.sum() == 1
    double = Placement(shape=(24, 30), top=8, left=10, height=12, width=15, side=16, size=32)
    big = np.zeros((32, 32), np.float32)
    big[2 * 7:2 * 7 + 2, 2 * 3:2 * 3 + 2] = 1  # framed pixel (7, 3) at twice the size: box pixel (5, 3)
    back = double.unframe(big)
    assert back[13, 13] == pytest.approx(1) and np.argmax(back) == np.ravel_multi_index((13, 13), (24, 30))
    assert not back[:8].any() and not back[:, :10].any()  # outside the box: 0


def test_framing_records_are_checked():
    """A stored framing is read back as written; a bad value is refused naming its key."""
    framing = Framing(axis=1, window=(-200.0, 250.0), white_level=0.8, min_area=0.5, size=128, margin=0.1,
                      slice_range=(60, 99), skip_empty=True, masked="liver")
    assert Framing.from_dict(json.loads(json.dumps(framing.to_dict()))) == framing
    assert Framing.from_dict({"axis": 2}) == Framing()  # a record from before slice_range/skip_empty/masked
    for bad, key in (({"axis": 3}, "axis"), ({"window": [5, 5]}, "window"), ({"size": "240"}, "size"),
                     ({"white_level": 0}, "white_level"), ({"min_area": 1.5}, "min_area"), ({"crop": 1}, "crop"),
                     ({"slice_range": [9, 3]}, "slice_range"), ({"slice_range": [1.5, 3]}, "slice_range"),
                     ({"skip_empty": 1}, "skip_empty"), ({"masked": 7}, "masked")):
        with pytest.raises(ValueError, match=key):
            Framing.from_dict(bad)


# ----------------------------------------------------------------------------- test_one_example on volumes

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A demo set (240 px, as shipped) and its volumes."""
    parent = tmp_path_factory.mktemp("demo")
    demo.build_demo(str(parent), n_train=1, n_valid=(1, 1), n_test=(4, 3))
    demo.write_volumes(str(parent))
    return parent


def test_demo_volume_scores_as_the_converters_pngs_slice_by_slice(tmp_path, demo_root):
    """The demo volume scored by test_one_example with a checkpoint that records the demo's framing
    (from demo.json, as train.py stores it) equals the demo converter's framed slices written as
    PNG and scored one by one: same slices, same scores; slices the rule drops are reported."""
    framing = recorded_framing(str(demo_root / "Brain"))
    assert framing.to_dict() == DEMO_FRAMING
    checkpoint = tiny_checkpoint(tmp_path / "demo.pth", framing.to_dict())
    [volume] = run(tmp_path, demo_root / "volumes" / "brain_normal.nii.gz", checkpoint)
    images, _, indices = demo.template_slices()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for index, image in zip(indices, images):
        cv2.imwrite(str(pngs / f"{index:03d}.png"), image)
    one_by_one = run(tmp_path, pngs, checkpoint, out="pngs_out")
    expected = {str(int(Path(r["path"]).stem)): r["score"] for r in one_by_one}
    assert list(volume["slice_scores"]) == [str(i) for i in indices]
    assert volume["slice_scores"] == pytest.approx(expected, abs=1e-6)
    assert volume["slices_not_scored"] == [[0, int(indices[0]) - 1], [int(indices[-1]) + 1, 188]]  # 189 slices
    assert volume["framing"] == DEMO_FRAMING and volume["warnings"] == []
    maps = np.load(tmp_path / "out" / "brain_normal.npy")
    assert maps.shape == (len(indices), 233, 197)  # the displayed slices of the 197 x 233 x 189 template


def test_map_volume_lands_on_the_bright_voxels(tmp_path, monkeypatch):
    """A model whose map is its input slice: the written map volume (input's affine, size) peaks on
    the hand-placed bright voxels of a stored-LPS volume, framed with a crop; unscored slices are 0."""
    volume = np.zeros((40, 36, 12), np.float32)
    volume[8:30, 6:28, 2:10] = np.random.default_rng(0).uniform(100, 200, (22, 22, 8))
    volume[20:23, 9:12, 5] = 2000  # the spot: stored voxels i 20..22, j 9..11, k 5
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = (12, -7, 3)
    nibabel.save(nibabel.Nifti1Image(volume, lps), str(tmp_path / "v.nii.gz"))
    framing = {"axis": 2, "window": None, "white_level": 0.65, "min_area": 0.5, "size": 48, "margin": 0.06}
    checkpoint = tiny_checkpoint(tmp_path / "ck.pth", framing)

    def echo(model, slices, device, precision, batch_size, path):
        return np.array([float(s.mean()) for s in slices]), [s[..., 0].copy() for s in slices]

    monkeypatch.setattr(test_one_example, "score_slices", echo)
    [record] = run(tmp_path, tmp_path / "v.nii.gz", checkpoint, "--slices", "3", "11")
    written = nibabel.load(record["map_volume"])
    np.testing.assert_array_equal(written.affine, lps)
    heat = written.get_fdata()
    assert heat.shape == volume.shape
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert 20 <= peak[0] <= 22 and 9 <= peak[1] <= 11 and peak[2] == 5
    assert heat[21, 10, 5] > 0.95 and heat[15, 15, 5] < 0.7  # a white spot, the brain at most grey 0.65
    assert not heat[..., [0, 1, 2, 10, 11]].any()  # slices 0, 1, 10, 11 have no brain; 2 is outside --slices
    assert record["slices_not_scored"] == [[0, 2], [10, 11]]
    assert list(record["slice_scores"]) == [str(k) for k in range(3, 10)]
    assert not heat[:8].any() and not heat[30:].any()  # outside the brain's box: 0


def test_a_framing_other_than_the_trained_one_is_warned_of(tmp_path, caplog):
    """One warning line when a flag contradicts the checkpoint's framing, when a checkpoint records
    none, or when an input's own display does (a DICOM series' window); none when all agree."""
    volume = np.zeros((20, 18, 6), np.float32)
    volume[3:17, 4:15, :] = np.random.default_rng(1).uniform(10, 90, (14, 11, 6))
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    framing = {"axis": 2, "window": None, "white_level": 0.65, "min_area": 0.0, "size": 32, "margin": 0.06}
    framed = tiny_checkpoint(tmp_path / "framed.pth", framing)
    with caplog.at_level(logging.WARNING, logger="medvmad"):
        run(tmp_path, tmp_path / "v.nii.gz", framed)
        assert not [r for r in caplog.records if "fram" in r.getMessage()]
        [record] = run(tmp_path, tmp_path / "v.nii.gz", framed, "--axis", "1", out="axis")
        [line] = [r.getMessage() for r in caplog.records if "fram" in r.getMessage()]
        assert "was trained on axial slices" in line and "axis 2 -> 1" in line and "\n" not in line
        assert record["framing"]["axis"] == 1 and len(record["slice_scores"]) == 18  # the flag is obeyed
        caplog.clear()
        old = tiny_checkpoint(tmp_path / "old.pth", None)
        [record] = run(tmp_path, tmp_path / "v.nii.gz", old, out="old")
        [line] = [r.getMessage() for r in caplog.records if "fram" in r.getMessage()]
        assert "records no framing" in line and record["framing"] == Framing().to_dict()
        caplog.clear()
        write_series(tmp_path / "series", np.random.default_rng(2).integers(900, 1300, (4, 12, 10)))
        [record] = run(tmp_path, tmp_path / "series", framed, out="dicom")
        [line] = [r.getMessage() for r in caplog.records if "fram" in r.getMessage()]
        assert "window percentile -> [-160, 240]" in line and record["warnings"] == [line]
        caplog.clear()
        liver = tiny_checkpoint(tmp_path / "liver.pth", {**framing, "masked": "liver"})
        run(tmp_path, tmp_path / "v.nii.gz", liver, out="liver")
        [line] = [r.getMessage() for r in caplog.records if "alone" in r.getMessage()]
        assert "slices of the liver alone" in line and "\n" not in line
    bad = tmp_path / "bad.pth"
    tiny_checkpoint(bad, {**framing, "size": -4})
    with pytest.raises(InputError, match=rf"--checkpoint_path {bad}: framing.size -4"):
        run(tmp_path, tmp_path / "v.nii.gz", str(bad), out="bad")


def test_old_checkpoints_score_volumes_as_before(tmp_path):
    """A checkpoint without a framing scores every whole slice, percentile-scaled, as it always did."""
    volume = np.random.default_rng(3).uniform(1, 100, (14, 12, 5)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    [record] = run(tmp_path, tmp_path / "v.nii.gz", tiny_checkpoint(tmp_path / "old.pth", None))
    assert list(record["slice_scores"]) == ["0", "1", "2", "3", "4"] and record["slices_not_scored"] == []
    assert np.load(tmp_path / "out" / "v.npy").shape == (5, 12, 14)


# ----------------------------------------------------------------------------- the demo's volumes and patients

def test_demo_volumes(demo_root):
    """The normal volume is the brain-masked template (nilearn's, read here directly); the lesion
    volume adds a blob about 10 mm across, brighter exactly on its mask, inside the brain and on
    slices the demo's framing scores."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    folder = demo_root / "volumes"
    normal, lesion, mask = (nibabel.load(str(folder / name)) for name in
                            ("brain_normal.nii.gz", "brain_lesion.nii.gz", "brain_lesion_seg.nii.gz"))
    template = nibabel.as_closest_canonical(load_mni152_template(resolution=1))
    brain = nibabel.as_closest_canonical(load_mni152_brain_mask(resolution=1)).get_fdata() > 0
    for image in (normal, lesion, mask):
        np.testing.assert_array_equal(image.affine, template.affine)
    np.testing.assert_array_equal(normal.get_fdata(), np.where(brain, np.round(template.get_fdata() * 255), 0))
    added, lesion_mask = lesion.get_fdata() - normal.get_fdata(), mask.get_fdata() > 0
    assert set(np.unique(mask.get_fdata())) == {0, 1}
    np.testing.assert_array_equal(added > 0, lesion_mask)
    assert (added >= 0).all() and not (lesion_mask & ~brain).any()
    extents = [np.ptp(axis) + 1 for axis in np.nonzero(lesion_mask)]
    assert all(6 <= extent <= 14 for extent in extents), extents  # about 10 mm across at 1 mm
    assert 200 < lesion_mask.sum() < 1500
    _, _, kept = demo.template_slices()
    assert set(np.flatnonzero(lesion_mask.any(axis=(0, 1)))) <= set(kept)
    assert all((folder / name).stat().st_size < 3_000_000 for name in demo.VOLUME_NAMES)


def test_ensure_demo_writes_missing_volumes(tmp_path):
    """A demo set built before the volumes existed gets them from ensure_demo, the set untouched."""
    root = demo.build_demo(str(tmp_path), n_train=1, n_valid=(1, 1), n_test=(1, 1), image_size=32)
    stamp = (Path(root) / "demo.json").stat().st_mtime
    assert demo.ensure_demo(str(tmp_path)) == root
    assert [p.name for p in sorted((tmp_path / "volumes").iterdir())] == sorted(demo.VOLUME_NAMES)
    assert (Path(root) / "demo.json").stat().st_mtime == stamp


def test_demo_has_patients_without_lesions(demo_root):
    """In test/ (4 normal, 3 abnormal samples) the last two normal samples are patients of their
    own (n002, n003); their images are the samples their seeds give, as before."""
    test = demo_root / "Brain" / "test"
    good = sorted(p.name for p in (test / "good" / "img").iterdir())
    bad = sorted(p.name for p in (test / "Ungood" / "img").iterdir())
    assert [name.split("_")[0] for name in good] == ["000", "001", "n002", "n003"]
    patients: dict[str, set[int]] = {}
    for label, names in ((0, good), (1, bad)):
        for name in names:
            patients.setdefault(patient_of(str(test / name)), set()).add(label)
    assert patients == {"000": {0, 1}, "001": {0, 1}, "002": {1}, "n002": {0}, "n003": {0}}
    images, masks, indices = demo.template_slices()
    image, _, _, index = demo.make_sample(images, masks, False, np.random.default_rng([0, 2, 0, 3]))
    assert good[3] == f"n003_{indices[index]}.png"
    np.testing.assert_array_equal(cv2.imread(str(test / "good" / "img" / good[3]), cv2.IMREAD_UNCHANGED), image)


def test_training_framing_of_several_roots(tmp_path, caplog):
    """All roots record one framing: that one; they differ, or one records none: none, said once."""
    for name, framing in (("a", DEMO_FRAMING), ("b", DEMO_FRAMING), ("c", {**DEMO_FRAMING, "axis": 1})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "demo.json").write_text(json.dumps({"framing": framing}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "split.json").write_text(json.dumps({"counts": {}}))
    roots = [str(tmp_path / name) for name in "abcd"]
    assert training_framing(roots[:2]).to_dict() == DEMO_FRAMING
    with caplog.at_level(logging.WARNING, logger="medvmad"):
        assert training_framing(roots[:3]) is None and training_framing([roots[0], roots[3]]) is None
    assert len(caplog.records) == 2 and "record different framings" in caplog.records[0].getMessage()
    (tmp_path / "a" / "demo.json").write_text(json.dumps({"framing": {**DEMO_FRAMING, "margin": "x"}}))
    with pytest.raises(InputError, match="demo.json: framing.margin"):
        training_framing(roots[:2])


def test_test_py_says_when_the_data_is_framed_otherwise_than_the_training_slices(tmp_path):
    """A checkpoint tested on slices framed otherwise than its training slices (another view, a rebuilt
    demo set, a checkpoint from before framings were stored) gets one warning line naming the
    difference (in test_log.txt); none when the records agree, and none for data that records no framing."""
    import test as test_script

    root = demo.build_demo(str(tmp_path / "demo"), seed=0, n_train=2, n_valid=(1, 2), n_test=(2, 2), image_size=64)
    recorded = json.loads((Path(root) / "demo.json").read_text())["framing"]

    def framing_lines(name: str, checkpoint: str) -> list[str]:
        test_script.main(["--data_path", root, "--checkpoint_path", checkpoint, "--save_path", str(tmp_path / name),
                          "--metrics", "image-level", "--device", "cpu", "--num_workers", "0"])
        return [line for line in (tmp_path / name / "test_log.txt").read_text().splitlines() if "fram" in line]

    assert framing_lines("same", tiny_checkpoint(tmp_path / "same.pth", recorded)) == []
    brighter = tiny_checkpoint(tmp_path / "brighter.pth", {**recorded, "white_level": 1.0})
    [line] = framing_lines("brighter", brighter)
    assert "Brain: " in line and line.endswith("framed otherwise than the checkpoint's training slices: "
                                               "white_level 1 -> 0.65")
    [line] = framing_lines("old", tiny_checkpoint(tmp_path / "old.pth", None))
    assert "the checkpoint records no framing of its training slices" in line
    (Path(root) / "demo.json").unlink()  # data that records no framing (BMAD's own PNGs): nothing to compare
    assert framing_lines("unrecorded", brighter) == []
