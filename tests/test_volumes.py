"""scans/volumes.py: NRRD, MetaImage, DICOM series (folder or zip) and multi-frame DICOM are sliced as the
NIfTI path slices, and maps are written back on the input's own grid.

References are independent of the code under test: nibabel's own reading of a NIfTI file, the raw
frames of a DICOM series (shown as DICOM shows them: patient's right on the left, anterior up, as
the converters write BMAD slices), affines written out by hand from the DICOM position tags, and
voxel indices chosen by hand.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom.uid import generate_uid

import test_one_example
from CLIP.checkpoint import save_checkpoint
from CLIP.MedVMAD import MedVMAD
from scans.files import read_scan
from scans.volumes import is_series_folder, read_input, read_sitk_scan, write_maps
from tests.helpers import ORIGIN, PIXEL, STEP, dicom_dataset, tiny_config, write_series
from utils import InputError

# A permuted, flipped, shifted affine: stored i -> superior, j -> left, k -> anterior.
OBLIQUE_AXES = np.array([[0, -2, 0, 10], [0, 0, 3, 20], [1.5, 0, 0, -5], [0, 0, 0, 1.]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.pth"
    save_checkpoint(path, MedVMAD(tiny_config()), threshold=0.5, epoch=1)
    return str(path)


def series_affine() -> np.ndarray:
    """RAS affine of ``write_series`` by hand: column index -> x (L in LPS, so -R), row index -> y (P, so -A)."""
    return np.array([[-PIXEL[1], 0, 0, -ORIGIN[0]], [0, -PIXEL[0], 0, -ORIGIN[1]], [0, 0, STEP, ORIGIN[2]],
                     [0, 0, 0, 1]])


def grey(values) -> np.ndarray:
    """[0,1] values as the 8-bit grey levels a framed volume slice holds (rounded, / 255)."""
    return np.rint(np.asarray(values, dtype=np.float64) * 255) / 255


def frames_window(frames: np.ndarray) -> np.ndarray:
    """The series' own window (centre 40, width 400) on HU, as 8-bit grey levels in [0,1]."""
    return grey(np.clip((frames.astype(np.float64) - 1024 + 160) / 400, 0, 1))


def random_volume(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 100, shape).astype(np.float32)


def assert_same_slices(a, b) -> None:
    assert a.slice_indices == b.slice_indices and len(a.slices) == len(b.slices)
    for x, y in zip(a.slices, b.slices):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nrrd_metaimage_and_nifti_through_simpleitk_slice_as_the_nibabel_path(tmp_path, axis):
    nibabel.save(nibabel.Nifti1Image(random_volume(), OBLIQUE_AXES), str(tmp_path / "v.nii.gz"))
    reference = read_scan(str(tmp_path / "v.nii.gz"), axis=axis)          # nibabel's as_closest_canonical
    assert len(reference.slices) == {0: 6, 1: 7, 2: 5}[axis]              # R<-j, A<-k, S<-i
    image = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    for name in ("v.nrrd", "v.mha", "v.nhdr"):
        sitk.WriteImage(image, str(tmp_path / name))
    for name in ("v.nii.gz", "v.nrrd", "v.mha", "v.nhdr"):
        assert_same_slices(read_sitk_scan(str(tmp_path / name), axis=axis), reference)


def test_dicom_series_sorted_by_position_shows_its_frames_and_matches_nifti(tmp_path):
    frames = np.random.default_rng(1).integers(900, 1300, (5, 12, 10))
    write_series(tmp_path / "series", frames)
    (tmp_path / "series" / "README.txt").write_text("exported by a PACS\n")  # not DICOM: ignored
    assert is_series_folder(str(tmp_path / "series"))
    scan = read_input(str(tmp_path / "series"))
    assert scan.slice_indices == [0, 1, 2, 3, 4]
    for k, frame in enumerate(frames):  # inferior to superior, each frame as DICOM shows it
        np.testing.assert_allclose(scan.slices[k][..., 0], frames_window(frame), atol=1e-6)
    # The same voxels as NIfTI with the hand-written affine give the same slices through nibabel.
    hu = frames.transpose(2, 1, 0).astype(np.float32) - 1024              # [i=col, j=row, k]
    nibabel.save(nibabel.Nifti1Image(hu, series_affine()), str(tmp_path / "same.nii.gz"))
    nifti = read_scan(str(tmp_path / "same.nii.gz"), window=(-160, 240))
    for x, y in zip(scan.slices, nifti.slices):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # Zipped, the series reads the same.
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        for path in sorted((tmp_path / "series").iterdir()):
            archive.write(path, f"case/{path.name}")
    zipped = read_input(str(tmp_path / "series.zip"))
    assert zipped.path == str(tmp_path / "series.zip")
    assert_same_slices(zipped, scan)


def test_monochrome1_series_is_shown_inverted_as_dicom_asks(tmp_path):
    """MONOCHROME1: the lowest value is white. Each slice is 1 - its frame through the header window
    (GDCM's own read would invert the stored pixels first), also with a --window in modality (HU)
    units; a slice missing from the series is filled blank, which shows black."""
    frames = np.random.default_rng(2).integers(900, 1300, (5, 8, 6))
    write_series(tmp_path / "series", frames, photometric="MONOCHROME1", skip=(2,))
    scan = read_input(str(tmp_path / "series"))
    assert len(scan.slices) == 5
    np.testing.assert_array_equal(scan.slices[2], 0)
    for k in (0, 1, 3, 4):
        np.testing.assert_allclose(scan.slices[k][..., 0], 1 - frames_window(frames[k]), atol=1e-6)
    own = read_sitk_scan(str(tmp_path / "series"), window=(-100, 100))
    for k in (0, 1, 3, 4):
        np.testing.assert_allclose(own.slices[k][..., 0], 1 - grey(np.clip((frames[k] - 1024.0 + 100) / 200, 0, 1)),
                                   atol=1e-6)


def test_monochrome1_pixels_pydicom_cannot_decode_fall_back_to_gdcm_with_a_warning(tmp_path, monkeypatch):
    """A compressed MONOCHROME1 series without pydicom's decoder: GDCM's (inverted) values, scaled
    by percentiles, still shown with low stored values bright, and a warning naming the series."""
    import pydicom

    frames = np.random.default_rng(3).integers(900, 1300, (4, 8, 6))
    write_series(tmp_path / "series", frames, photometric="MONOCHROME1")

    def no_decoder(self):
        raise RuntimeError("unable to decode the pixel data: no decoder for JPEG-LS")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    scan = read_input(str(tmp_path / "series"))
    [warning] = scan.warnings
    assert warning.startswith(f"{tmp_path / 'series'}: MONOCHROME1 pixel data pydicom cannot decode")
    shown = np.stack([s[..., 0] for s in scan.slices])
    assert np.corrcoef(shown.ravel(), frames.ravel())[0, 1] < -0.9


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_multiframe_dicom_is_a_volume(tmp_path, photometric):
    frames = np.random.default_rng(2).integers(10, 4000, (4, 12, 10)).astype(np.uint16)
    data = dicom_dataset("1.2.840.10008.5.1.4.1.1.7.3")  # multi-frame grayscale word SC
    data.Modality, data.SeriesInstanceUID, data.NumberOfFrames = "OT", generate_uid(), 4
    data.Rows, data.Columns = 12, 10
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 0
    data.SamplesPerPixel, data.PhotometricInterpretation = 1, photometric
    data.PixelData = frames.tobytes()
    data.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    scan = read_input(str(tmp_path / "mf.dcm"), window=(0, 4000))
    assert scan.slice_indices == [0, 1, 2, 3]
    for k, frame in enumerate(frames):
        shown = grey(frame / 4000)
        np.testing.assert_allclose(scan.slices[k][..., 0], 1 - shown if photometric == "MONOCHROME1" else shown,
                                   atol=1e-6)


def lesion_volume(shape, index) -> np.ndarray:
    volume = np.full(shape, 1000.0, np.float32)
    volume[index] = 1400.0
    return volume


@pytest.mark.parametrize("kind", ["nifti", "nrrd", "dicom"])
def test_lesion_voxel_comes_back_at_its_index(tmp_path, kind):
    """A map that is the image itself (a perfect model) written back peaks at the lesion's stored voxel."""
    shape, lesion = (10, 12, 5), (7, 2, 3)   # [i, j, k]: column 7, row 2, slice 3
    stored = lesion_volume(shape, lesion)
    if kind == "dicom":
        write_series(tmp_path / "in", stored.transpose(2, 1, 0) + 0)
        path, affine = tmp_path / "in", series_affine()
    else:
        affine = OBLIQUE_AXES
        nibabel.save(nibabel.Nifti1Image(stored, affine), str(tmp_path / "in.nii.gz"))
        path = tmp_path / "in.nii.gz"
        if kind == "nrrd":
            sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp_path / "in.nrrd"))
            path = tmp_path / "in.nrrd"
    scan = read_input(str(path), window=(1000 - 1024 * (kind == "dicom"), 1400 - 1024 * (kind == "dicom")))
    paths = write_maps(scan, [s[..., 0] for s in scan.slices], 0.5, tmp_path, "out")
    written = nibabel.load(paths["map_volume"])
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    data = written.get_fdata()
    assert data.shape == shape and written.get_data_dtype() == np.float32
    assert np.unravel_index(np.argmax(data), shape) == lesion and data[lesion] == 1.0
    assert np.count_nonzero(data) == 1
    mask = nibabel.load(paths["mask_volume"])
    assert mask.get_data_dtype() == np.uint8 and list(zip(*np.nonzero(mask.get_fdata()))) == [lesion]


@pytest.mark.parametrize("kind", ["nifti", "nrrd", "dicom"])
def test_scored_maps_keep_the_input_geometry(tmp_path, checkpoint, kind):
    stored = random_volume((10, 12, 4), seed=3) * 10 + 1000
    if kind == "dicom":
        write_series(tmp_path / "scan", stored.transpose(2, 1, 0))
        path, affine = tmp_path / "scan", series_affine()
    else:
        path, affine = tmp_path / "scan.nii.gz", OBLIQUE_AXES
        nibabel.save(nibabel.Nifti1Image(stored, affine), str(path))
        if kind == "nrrd":
            sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp_path / "scan.nrrd"))
            path = tmp_path / "scan.nrrd"
    [record] = test_one_example.main(["--image_path", str(path), "--checkpoint_path", checkpoint,
                                      "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    heat, mask = nibabel.load(record["map_volume"]), nibabel.load(record["mask_volume"])
    assert Path(record["map_volume"]).name == "scan_map.nii.gz"
    for written in (heat, mask):
        assert written.shape == stored.shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    values = heat.get_fdata()
    assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
    np.testing.assert_array_equal(mask.get_fdata() == 1, values >= 0.5)
    # The map volume holds the slice maps of the .npy (float16), each shown as its slice.
    shown = np.load(tmp_path / "out" / "scan.npy")
    assert shown.shape[0] == len(record["slice_scores"])
    assert values.max() == pytest.approx(float(shown.max()), abs=1e-3)


def test_nrrd_output_has_the_input_geometry(tmp_path, checkpoint):
    write_series(tmp_path / "scan", random_volume((4, 12, 10), seed=4) + 1000)
    [record] = test_one_example.main(["--image_path", str(tmp_path / "scan"), "--checkpoint_path", checkpoint,
                                      "--save_path", str(tmp_path / "out"), "--device", "cpu",
                                      "--volume_format", "nrrd"])
    assert record["map_volume"].endswith("scan_map.nrrd") and record["mask_volume"].endswith("scan_mask.nrrd")
    written = sitk.ReadImage(record["map_volume"])
    assert written.GetSize() == (10, 12, 4) and written.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(written.GetSpacing(), (PIXEL[1], PIXEL[0], STEP), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), np.eye(3).ravel(), atol=1e-5)


def test_2d_map_is_written_at_the_input_size(tmp_path, checkpoint):
    import cv2

    image = (np.random.default_rng(5).uniform(0, 255, (48, 40))).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "slice.png"), image)
    [record] = test_one_example.main(["--image_path", str(tmp_path / "slice.png"), "--checkpoint_path",
                                      checkpoint, "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    heat = cv2.imread(record["map_png"], cv2.IMREAD_UNCHANGED)
    assert heat.shape == (48, 40) and heat.dtype == np.uint16
    np.testing.assert_allclose(heat / 65535, np.load(tmp_path / "out" / "slice.npy"), atol=1e-3)
    mask = cv2.imread(record["mask_png"], cv2.IMREAD_UNCHANGED)
    clear = np.abs(heat / 65535 - 0.5) > 1e-4   # away from the threshold, where 16-bit rounding can't flip it
    np.testing.assert_array_equal((mask == 255)[clear], (heat / 65535 >= 0.5)[clear])


# ----------------------------------------------------------------------------- bad input

def test_series_with_a_gap_is_scored_with_a_warning_naming_it(tmp_path, checkpoint, capsys):
    frames = lesion_volume((6, 12, 10), (4, 2, 7)) + 0  # [k, row, col]: lesion on slice 4
    write_series(tmp_path / "gap", frames, skip=(2,))
    [record] = test_one_example.main(["--image_path", str(tmp_path / "gap"), "--checkpoint_path", checkpoint,
                                      "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert "1 missing slice(s) between position 32.50 mm" in warning and "37.50 mm" in warning
    assert record["warnings"] == [warning.removeprefix("warning: ")]
    written = nibabel.load(record["map_volume"])   # slices after the gap keep their own position
    assert written.shape == (10, 12, 6)
    np.testing.assert_allclose(written.affine, series_affine(), atol=1e-5)
    # The written map keeps the series' geometry: the slice after the gap stays at its own position.
    scan = read_input(str(tmp_path / "gap"))
    assert len(scan.slices) == 6                                       # a blank slice in the gap
    np.testing.assert_allclose(scan.slices[2][..., 0], frames_window(np.full((12, 10), 1000)), atol=1e-6)
    np.testing.assert_allclose(scan.slices[4][..., 0], frames_window(frames[4]), atol=1e-6)


def test_folder_with_two_series_lists_them_and_series_uid_picks_one(tmp_path, checkpoint):
    first = write_series(tmp_path / "mixed", np.full((3, 12, 10), 1000))
    second = write_series(tmp_path / "mixed", np.full((4, 12, 10), 1100))
    args = ["--image_path", str(tmp_path / "mixed"), "--checkpoint_path", checkpoint,
            "--save_path", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(InputError, match="2 DICOM series") as error:
        test_one_example.main(args)
    assert first in str(error.value) and second in str(error.value) and "--series_uid" in str(error.value)
    [record] = test_one_example.main(args + ["--series_uid", second])
    assert len(record["slice_scores"]) == 4


def write_nrrd(path: Path, voxels: np.ndarray, vector: bool = False) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(voxels, isVector=vector), str(path))


@pytest.mark.parametrize("name, make, message", [
    ("v4.nrrd", lambda p: write_nrrd(p, np.ones((2, 3, 4, 5), np.float32)), r"4-D volume of size \(5, 4, 3, 2\)"),
    ("nan.mha", lambda p: write_nrrd(p, np.where(np.eye(4, dtype=bool)[None], np.nan, 1).astype(np.float32)),
     "4 of 16 voxels are NaN or infinite"),
    ("rgb.nrrd", lambda p: write_nrrd(p, np.ones((2, 3, 4, 3), np.uint8), vector=True), "scalar volumes only"),
    ("broken.nrrd", lambda p: p.write_bytes(b"NRRD0004\ntype: float\ngarbage"),
     "names no data file and no blank line ends it"),
    ("notes.docx", lambda p: p.write_bytes(b"PK\x03\x04 not a scan"), "unknown file type '.docx'"),
    ("bad.zip", lambda p: p.write_bytes(b"not a zip"), "unreadable zip"),
])
def test_bad_volumes_are_one_clear_line(tmp_path, name, make, message):
    make(tmp_path / name)
    with pytest.raises(InputError, match=message) as error:
        read_input(str(tmp_path / name))
    assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)
