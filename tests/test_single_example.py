"""test_one_example.py and scans/files.py: every input format, outputs, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import matplotlib
import nibabel
import numpy as np
import pytest
import torch
from pydicom.uid import CTImageStorage

import test_one_example
import visualization
from CLIP.MedVMAD import MedVMAD
from CLIP.checkpoint import save_checkpoint
from scans.files import read_scan
from tests.helpers import ROOT, dicom_dataset, reference_scale, reference_score, tiny_config
from utils import InputError


def checkpointed_model() -> MedVMAD:
    """The model the ``checkpoint`` fixture saves, built afresh (a reference that skips load_model)."""
    torch.manual_seed(0)
    return MedVMAD(tiny_config()).eval()


@pytest.fixture
def checkpoint(tmp_path) -> str:
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, checkpointed_model(), threshold=0.55, epoch=1)
    return str(path)


def brain_like(height: int = 48, width: int = 40, centre: tuple[int, int] = (20, 18)) -> np.ndarray:
    """uint8 [H,W] with a bright blob."""
    yy, xx = np.mgrid[:height, :width]
    image = 60 + 120 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 60.0)
    image[0, 0], image[-1, -1] = 0, 255
    return image.astype(np.uint8)


def write_dicom(path: Path, raw: np.ndarray, photometric: str = "MONOCHROME2", window=(40, 400)) -> None:
    data = dicom_dataset(CTImageStorage)
    data.Modality = "CT"
    data.Rows, data.Columns = raw.shape
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 1
    data.SamplesPerPixel, data.PhotometricInterpretation = 1, photometric
    data.RescaleSlope, data.RescaleIntercept = 1, -1024
    if window is not None:
        data.WindowCenter, data.WindowWidth = window
    data.PixelData = raw.astype(np.int16).tobytes()
    data.save_as(path, enforce_file_format=True)


def run(tmp_path: Path, image_path: Path, *extra: str) -> list[dict]:
    return test_one_example.main(["--image_path", str(image_path), "--save_path", str(tmp_path / "out"),
                                  "--device", "cpu", *extra])


def test_png_outputs_overlay_map_and_json(tmp_path, checkpoint, monkeypatch):
    """Score and map equal the checkpointed model's on the image; the overlay PNG is the figure of
    image | map (fixed 0-1 scale) | blend, the score, its probability (a checkpoint without
    calibration: uncalibrated) and decision above it."""
    figures = []
    real = visualization.overlay_figure
    monkeypatch.setattr(visualization, "overlay_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    image_path = tmp_path / "scan.png"
    bgr = np.stack([brain_like(), brain_like(centre=(30, 25)), 255 - brain_like()], axis=2)  # channels differ
    cv2.imwrite(str(image_path), bgr)
    [record] = run(tmp_path, image_path, "--checkpoint_path", checkpoint)
    score, expected_heat = reference_score(checkpointed_model(), image_path)
    assert record["score"] == pytest.approx(score, abs=1e-6)
    assert record["threshold"] == 0.55 and record["threshold_from"] == "checkpoint"
    assert record["decision"] == ("anomalous" if record["score"] >= 0.55 else "normal")
    heat = np.load(tmp_path / "out" / "scan.npy")
    assert heat.shape == (48, 40) and heat.dtype == np.float16
    np.testing.assert_allclose(heat, expected_heat, atol=2e-3)  # float16 storage
    [figure] = figures
    image_panel, heat_panel, blend = (axis.images[0] for axis in figure.axes[:3])
    np.testing.assert_array_equal(image_panel.get_array(), bgr[..., ::-1])  # shown as RGB
    np.testing.assert_allclose(heat_panel.get_array(), expected_heat, atol=1e-5)
    assert heat_panel.get_clim() == (0.0, 1.0)  # fixed 0-1 scale
    colour = matplotlib.colormaps["inferno"](np.clip(expected_heat, 0, 1))[..., :3] * 255
    weight = 0.45 * np.clip(expected_heat, 0, 1)[..., None]
    assert np.abs(blend.get_array() - ((1 - weight) * bgr[..., ::-1] + weight * colour)).max() <= 1
    assert figure.get_suptitle() == f"score {record['score']:.3f} (uncalibrated) {record['decision']}"
    overlay = cv2.imread(str(tmp_path / "out" / "scan.png"))
    assert overlay.shape == visualization.rendered(figure).shape
    line = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["path"] == str(image_path) and line["score"] == record["score"]
    [override] = run(tmp_path, image_path, "--checkpoint_path", checkpoint, "--threshold", "0.0")
    assert override["decision"] == "anomalous" and override["threshold_from"] == "--threshold"


def test_16bit_png_reads_like_its_8bit_version(tmp_path, checkpoint):
    """16-bit PNGs are divided by 65535, so v*257 reads as the 8-bit v/255."""
    eight = brain_like()
    cv2.imwrite(str(tmp_path / "a8.png"), eight)
    cv2.imwrite(str(tmp_path / "a16.png"), eight.astype(np.uint16) * 257)
    np.testing.assert_allclose(read_scan(str(tmp_path / "a16.png")).slices[0],
                               read_scan(str(tmp_path / "a8.png")).slices[0], atol=1e-6)


def test_same_image_as_png_and_2d_nifti_gives_the_same_score(tmp_path, checkpoint):
    """A 2-D NIfTI is kept as stored (no transpose): it scores as the PNG of the same array."""
    image = brain_like()
    cv2.imwrite(str(tmp_path / "slice.png"), image)
    nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    [png] = run(tmp_path, tmp_path / "slice.png", "--checkpoint_path", checkpoint)
    [nifti] = run(tmp_path, tmp_path / "slice.nii.gz", "--checkpoint_path", checkpoint, "--window", "0", "255")
    assert nifti["score"] == pytest.approx(png["score"], abs=1e-6)


def test_dicom_modality_lut_and_windows(tmp_path):
    """DICOM: rescale to HU, then the file's window or --window, by hand; MONOCHROME1 is inverted."""
    raw = np.linspace(0, 2048, 48 * 40).reshape(48, 40).astype(np.int16)
    hu = raw.astype(np.float64) - 1024
    write_dicom(tmp_path / "ct.dcm", raw)
    own = read_scan(str(tmp_path / "ct.dcm")).slices[0][..., 0]        # file window: centre 40, width 400
    np.testing.assert_allclose(own, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)
    liver = read_scan(str(tmp_path / "ct.dcm"), window=(-200, 250)).slices[0][..., 0]
    np.testing.assert_allclose(liver, np.clip((hu + 200) / 450, 0, 1), atol=1e-6)
    write_dicom(tmp_path / "inv", raw, photometric="MONOCHROME1")       # no extension: found by preamble
    inverted = read_scan(str(tmp_path / "inv")).slices[0][..., 0]
    np.testing.assert_allclose(inverted, 1 - own, atol=1e-6)


def test_dicom_scores_with_the_baseline_and_a_preset(tmp_path):
    """The liver preset is the BMAD window [-200, 250] HU, applied to the baseline's DICOM input."""
    write_dicom(tmp_path / "ct.dcm", np.linspace(0, 2048, 64 * 64).reshape(64, 64), window=None)
    baseline = ["--model_name", "tiny", "--pretrained", "none", "--image_size", "64"]
    [liver] = run(tmp_path, tmp_path / "ct.dcm", *baseline, "--window_preset", "liver")
    [explicit] = run(tmp_path, tmp_path / "ct.dcm", *baseline, "--window", "-200", "250")
    assert liver["threshold_from"].startswith("default") and liver["threshold"] == 0.5
    assert liver["score"] == pytest.approx(explicit["score"], abs=1e-7)


def test_nifti_volume_slice_by_slice(tmp_path, checkpoint, strict_json_files):
    """An LPS-stored volume: slice z scores as the PNG of its percentile-scaled, RAS-displayed slice."""
    volume = np.stack([brain_like(centre=(8 + 6 * s, 10 + 3 * s)) * (1 + 0.1 * s) for s in range(6)],
                      axis=2).astype(np.float32)  # [X=48, Y=40, Z=6], the blob moves with z
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, lps), str(tmp_path / "vol.nii.gz"))
    [record] = run(tmp_path, tmp_path / "vol.nii.gz", "--checkpoint_path", checkpoint,
                   "--slices", "1", "4", "--top_k", "3")
    scores = record["slice_scores"]
    assert list(scores) == ["1", "2", "3", "4"]
    # LPS -> RAS flips X and Y; shown anterior up, right on the left flips both back: the stored slice, transposed
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for z in range(1, 5):
        cv2.imwrite(str(pngs / f"{z}.png"), reference_scale(volume)[:, :, z].T)
    model = checkpointed_model()
    expected = {str(z): reference_score(model, pngs / f"{z}.png")[0] for z in range(1, 5)}
    assert scores == pytest.approx(expected, abs=1e-5)
    assert record["score"] == max(scores.values())
    assert record["most_anomalous_slice"] == int(max(scores, key=scores.get))
    assert record["slices_over_threshold"] == [int(k) for k, v in scores.items() if v >= 0.55]
    maps = np.load(tmp_path / "out" / "vol.npy")
    assert maps.shape == (4, 40, 48)  # [X,Y] stored -> [Y,X] displayed
    np.testing.assert_allclose(maps[2], reference_score(model, pngs / "3.png")[1], atol=2e-3)
    panel = visualization.overlay_panel(np.zeros((40, 48, 3), np.uint8), np.zeros((40, 48)), 0, 1, text="slice")
    assert cv2.imread(str(tmp_path / "out" / "vol.png")).shape == (3 * panel.shape[0], panel.shape[1], 3)  # 3 slices
    assert strict_json_files(tmp_path / "out") == ["predictions.jsonl"]


def test_nifti_axis_picks_the_slicing_axis(tmp_path):
    """--axis 0/1/2 slice the RAS volume along that axis; each slice is shown transposed, both axes flipped."""
    volume = np.random.default_rng(1).uniform(1, 100, (6, 5, 4)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    scaled = reference_scale(volume) / 255
    by_axis = {0: lambda i: scaled[i, :, :], 1: lambda i: scaled[:, i, :], 2: lambda i: scaled[:, :, i]}
    for axis, take in by_axis.items():
        scan = read_scan(str(tmp_path / "v.nii.gz"), axis=axis)
        assert scan.slice_indices == list(range(volume.shape[axis]))
        for index, image in zip(scan.slice_indices, scan.slices):
            np.testing.assert_allclose(image[..., 0], take(index).T[::-1, ::-1], atol=1e-6)


def test_raw_volume_slice_scores_as_its_converted_png(tmp_path, checkpoint):
    """A BraTS volume scored slice by slice equals the converter's PNG of that slice, scored."""
    from generate_dataset.brats2021 import convert

    rng = np.random.default_rng(0)
    case = tmp_path / "raw" / "BraTS2021_00007"
    case.mkdir(parents=True)
    flair = np.zeros((40, 48, 8), np.float32)
    flair[5:35, 6:42] = rng.uniform(100, 900, size=(30, 36, 8))
    seg = np.zeros_like(flair, dtype=np.uint8)
    seg[10:20, 10:20, 3] = 2
    for name, data in (("flair", flair), ("seg", seg)):
        for other in ("t1", "t1ce", "t2"):
            nibabel.save(nibabel.Nifti1Image(flair, np.eye(4)), str(case / f"BraTS2021_00007_{other}.nii.gz"))
        nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(case / f"BraTS2021_00007_{name}.nii.gz"))
    convert(str(tmp_path / "raw"), str(tmp_path / "bmad"), slice_range=(3, 3), split=(0, 0, 1))
    [png] = run(tmp_path, tmp_path / "bmad" / "test" / "Ungood" / "img" / "00007_3.png",
                "--checkpoint_path", checkpoint)
    [volume] = run(tmp_path, case / "BraTS2021_00007_flair.nii.gz", "--checkpoint_path", checkpoint,
                   "--slices", "3", "3")
    assert volume["slice_scores"]["3"] == pytest.approx(png["score"], abs=1e-6)


def test_folder_with_a_corrupt_file_scores_the_rest(tmp_path, checkpoint, capsys):
    """In a folder, a corrupt file is reported and skipped, non-image files ignored."""
    folder = tmp_path / "scans"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), brain_like())
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("ignored: not an image")
    records = run(tmp_path, folder, "--checkpoint_path", checkpoint)
    assert [Path(r["path"]).name for r in records] == ["good.png"]
    error = capsys.readouterr().err
    assert "skipped:" in error and "broken.png" in error


@pytest.mark.parametrize("name, content, message", [
    ("empty.png", b"", "empty file"),
    ("scan.xyz", b"data", "unknown file type"),
    ("corrupt.nii.gz", b"garbage", "unreadable NIfTI"),
])
def test_bad_single_inputs_are_clear_errors(tmp_path, checkpoint, name, content, message):
    """Empty, unknown or corrupt single inputs raise InputError naming the problem."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        run(tmp_path, tmp_path / name, "--checkpoint_path", checkpoint)


def test_4d_volume_exits_with_one_line(tmp_path, checkpoint):
    """A 4-D NIfTI exits with status 2 and one 'error:' line."""
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), str(tmp_path / "v4.nii"))
    done = subprocess.run([sys.executable, "test_one_example.py", "--image_path", str(tmp_path / "v4.nii"),
                           "--checkpoint_path", checkpoint, "--save_path", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "4-D volume" in done.stderr
