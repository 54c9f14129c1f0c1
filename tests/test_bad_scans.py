"""Bad scans and uploads, class by class (issue #25, items 2, 3, 6, 7, 9 and the page's flags of 8):
headers that point at server files, inputs sized to hang or fill the disk, volumes and DICOM files
that are not what they claim, and converters that would drop or blacken NaN voxels. Every crafted
file is built here; each case ends in one clear line naming the file or flag, or in the right
result checked against an independent reference."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import struct
import time
import zipfile
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.uid import generate_uid

import app
import test_one_example
from generate_dataset import brats2021, folder, liverct
from scans.volumes import read_input, series_grid
from tests.helpers import (BASELINE, STEP, brats_case, dicom_dataset, liver_volumes, save_nifti, write_series,
                           write_slice)
from utils import InputError, run_cli

SECRET = b"root:x:0:0:secret server file\n" * 64


@pytest.fixture(scope="module")
def baseline() -> tuple:
    """The zero-training tiny model with its threshold, its source and the page's flags."""
    torch.manual_seed(0)
    args = test_one_example.parse_args(["--image_path", "(uploads)", *BASELINE])
    return (*test_one_example.build(args, torch.device("cpu")), args)


@pytest.fixture
def scorer(baseline) -> app.Scorer:
    """The page's scorer, as app.py builds it (its own workspace per test)."""
    model, threshold, source, args = baseline
    return app.Scorer(model, threshold, source, args, torch.device("cpu"))


def page_run(scorer: app.Scorer):
    """The function the page runs on an upload (a generator: its output, then the clean-up)."""
    return next(f.fn for f in app.build_app(scorer).fns.values() if f.fn.__name__ == "run")


def one_line_error(capsys, main) -> str:
    """Run ``main`` as a script does; the exit code is 2 and stderr one ``error:`` line, returned."""
    with pytest.raises(SystemExit) as caught:
        run_cli(main)
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------- item 2: headers naming server files

def metaimage_header(path: Path, data_file: str, size=(4, 5, 3)) -> Path:
    path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, size))}\n"
                    f"ElementType = MET_UCHAR\nElementDataFile = {data_file}\n")
    return path


def nrrd_header(path: Path, data_file: str, size=(4, 5, 3)) -> Path:
    path.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, size))}\nencoding: raw\n"
                    f"data file: {data_file}\n")
    return path


HEADERS = {"scan.mhd": metaimage_header, "scan.mha": metaimage_header, "scan.nhdr": nrrd_header,
           "scan.nrrd": nrrd_header}


@pytest.fixture
def secret(tmp_path) -> Path:
    """A server file outside the upload's folder."""
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "passwd").write_bytes(SECRET)
    return tmp_path / "server" / "passwd"


@pytest.mark.parametrize("name", sorted(HEADERS))
@pytest.mark.parametrize("how", ["absolute", "relative", "link beside it", "NUL byte"])
def test_a_header_naming_a_file_outside_its_folder_is_refused_before_simpleitk_opens_it(tmp_path, secret, name,
                                                                                       how, monkeypatch):
    upload = tmp_path / "upload"
    upload.mkdir()
    target = {"absolute": str(secret), "relative": "../server/passwd", "link beside it": "data.raw",
              "NUL byte": f"{secret}\0.raw"}[how]  # a C reader stops at the NUL
    if how == "link beside it":
        (upload / "data.raw").symlink_to(secret)
    header = HEADERS[name](upload / name, target)
    message = ("holds a NUL byte" if how == "NUL byte" else "lies outside the header's folder")

    class Forbidden:
        def __init__(self, *args):
            raise AssertionError("SimpleITK opened the file before its header was checked")

    monkeypatch.setattr(sitk, "ImageFileReader", Forbidden)
    monkeypatch.setattr(sitk, "ReadImage", Forbidden)
    with pytest.raises(InputError, match=rf"^{header}: its data file (name )?{re.escape(repr(target))} {message}"):
        read_input(str(header))


@pytest.mark.parametrize("name, text", [
    ("colon.mha", "ObjectType = Image\nNDims = 2\nDimSize = 8 8\nElementType = MET_UCHAR\nElementDataFile : {}\n"),
    ("assign.mha", "ObjectType = Image\nNDims = 2\nDimSize = 8 8\nElementType = MET_UCHAR\nElementDataFile := {}\n"),
    ("spaced.mhd", "NDims = 2\r\nDimSize = 8 8\r\nElementType = MET_UCHAR\r\n  elementdatafile\t=  {}\r\n"),
    ("cr.mha", "ObjectType = Image\rNDims = 2\rDimSize = 8 8\rElementType = MET_UCHAR\rElementDataFile = {}\r"),
    ("cr.nhdr", "NRRD0004\rtype: uint8\rdimension: 2\rsizes: 8 8\rencoding: raw\rdata file: {}\r\r"),
    ("crlf.nrrd", "NRRD0004\r\ntype: uint8\r\ndimension: 2\r\nsizes: 8 8\r\nencoding: raw\r\ndatafile: {}\r\n"),
])
def test_every_spelling_readers_accept_is_checked(tmp_path, secret, name, text, monkeypatch):
    """MetaIO takes "=", ":" and ":=" and any case; teem and MetaIO take CR, LF and CRLF line ends:
    a header spelt any of these ways is read by the check as the library would read it."""
    monkeypatch.setattr(sitk, "ImageFileReader", None)
    monkeypatch.setattr(sitk, "ReadImage", None)
    header = tmp_path / "upload" / name
    header.parent.mkdir()
    header.write_bytes(text.format(secret).encode())
    for single_file, message in ((False, "lies outside the header's folder"), (True, "a detached header")):
        with pytest.raises(InputError, match=message):
            read_input(str(header), window=(0, 255), single_file=single_file)


@pytest.mark.parametrize("name, text", [
    ("far.mha", "NDims = 2\nDimSize = 8 8\nElementType = MET_UCHAR\n" + "\n" * (1 << 21) + "ElementDataFile = {}\n"),
    ("far.nrrd", "NRRD0004\ntype: uint8\n" + "# comment\n" * (1 << 18) + "data file: {}\n\n"),
])
def test_a_header_too_long_to_check_is_refused(tmp_path, secret, name, text):
    """A field a reader would find past what the check reads: refused, not let through."""
    header = tmp_path / name
    header.write_bytes(text.format(secret).encode())
    with pytest.raises(InputError, match=r"(no ElementDataFile field|no end of its NRRD header) in the first"):
        read_input(str(header), window=(0, 255))


def test_the_command_line_says_so_in_one_line(tmp_path, secret, capsys):
    (tmp_path / "scans").mkdir()
    header = metaimage_header(tmp_path / "scans" / "scan.mhd", str(secret))
    err = one_line_error(capsys, lambda: test_one_example.main(
        ["--image_path", str(header), "--save_path", str(tmp_path / "out"), *BASELINE]))
    assert f"{header}: its data file '{secret}' lies outside the header's folder" in err
    assert not (tmp_path / "out" / "scan.png").exists()


def test_a_data_file_beside_its_header_is_read_on_the_command_line_but_not_in_the_page(tmp_path, scorer):
    voxels = np.random.default_rng(0).integers(1, 255, (3, 5, 4), dtype=np.uint8)  # [k, j, i]
    (tmp_path / "data.raw").write_bytes(voxels.tobytes())
    header = metaimage_header(tmp_path / "scan.mhd", "data.raw")
    scan = read_input(str(header), window=(0, 255))
    assert scan.slice_indices == [0, 1, 2]
    assert scan.geometry.shape == (4, 5, 3)
    shown = np.stack([s[..., 0] for s in scan.slices])
    np.testing.assert_allclose(np.sort(shown.ravel()), np.sort(voxels.ravel() / 255), atol=1e-6)  # its voxels
    with pytest.raises(InputError, match=rf"^{header}: a detached header naming the data file 'data.raw'"):
        scorer(str(header))


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_no_byte_of_a_server_file_reaches_the_page(tmp_path, secret, scorer, name):
    header = HEADERS[name](tmp_path / name, str(secret))
    outputs = list(page_run(scorer)(str(header)))
    assert len(outputs) == 1
    status, score, _, _, overlay, *_, downloads, view = outputs[0]
    assert "Could not score this file." in status.value and "detached header" in status.value
    assert str(tmp_path) not in status.value  # the server's folders are not shown either
    assert (score, overlay, downloads, view) == ("", None, None, None)


# ----------------------------------------------------------------------------- item 3: hangs, disk, drawing

def test_a_series_with_a_slice_100_m_away_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    frames = np.full((5, 12, 10), 1000)
    series = write_series(tmp_path / "far", frames[:4])
    write_slice(tmp_path / "far" / "far.dcm", frames[4], 30.0 + 100_000, series)

    def forbidden(self):
        raise AssertionError("the series was read")

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", forbidden)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'far'}: its 5 slices span 40,001 positions of 2.50 mm; "
                                         r"filling the gaps would invent 39,996 blank slices"):
        read_input(str(tmp_path / "far"))


def header_only_nifti(path: Path, shape) -> Path:
    """A NIfTI header claiming ``shape`` (float32) with no voxels behind it."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header["magic"], header["vox_offset"] = b"n+1", 352
    path.write_bytes(header.binaryblock + bytes(4 + 64))
    return path


def short_dicom(path: Path, frames: int, rows: int, columns: int, held: int) -> Path:
    """A multi-frame DICOM file saying it has ``frames`` frames, whose pixel data hold ``held``."""
    data = dicom_dataset("1.2.840.10008.5.1.4.1.1.7.3")
    data.Modality, data.SeriesInstanceUID, data.NumberOfFrames = "OT", generate_uid(), frames
    data.Rows, data.Columns = rows, columns
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 0
    data.SamplesPerPixel, data.PhotometricInterpretation = 1, "MONOCHROME2"
    data.PixelData = np.arange(held * rows * columns, dtype=np.uint16).tobytes()
    data.save_as(path, enforce_file_format=True)
    return path


BIG = (300, 1200, 1200)  # [slices, rows, columns]: 432,000,000 voxels, 1.7 GB as float32


@pytest.mark.parametrize("name, make", [
    ("big.nii", lambda p: header_only_nifti(p, BIG[::-1])),
    ("big.mha", lambda p: metaimage_header(p, "LOCAL", BIG[::-1])),
    ("big.nrrd", lambda p: p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 1200 1200 300\n"
                                        "endian: little\nencoding: raw\n\n")),
    ("big.dcm", lambda p: short_dicom(p, *BIG, held=0)),
])
def test_a_volume_over_the_voxel_cap_is_refused_from_its_header(tmp_path, name, make):
    make(tmp_path / name)
    assert (tmp_path / name).stat().st_size < 2_000_000  # nothing behind the header: only it can have been read
    with pytest.raises(InputError, match=rf"^{tmp_path / name}: [\d x]+ = 432,000,000 voxels, over the "
                                         r"limit of 268,435,456; crop or downsample it \(or raise --max_voxels\)"):
        read_input(str(tmp_path / name))


def test_max_voxels_caps_images_series_and_zips_too(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "slice.png"), np.zeros((40, 30), np.uint8))
    write_series(tmp_path / "series", np.full((3, 12, 10), 1000))
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        for path in sorted((tmp_path / "series").iterdir()):
            archive.write(path, f"case/{path.name}")
    for path, size in [("slice.png", "40 x 30 = 1,200"), ("series", "3 x 12 x 10 = 360"),
                       ("series.zip", "unpacks to")]:
        with pytest.raises(InputError, match=rf"^{tmp_path / path}: {size}"):
            read_input(str(tmp_path / path), max_voxels=300)
        assert read_input(str(tmp_path / path), max_voxels=100_000).slices  # under the cap: read
    err = one_line_error(capsys, lambda: test_one_example.main(
        ["--image_path", str(tmp_path / "slice.png"), "--save_path", str(tmp_path / "out"), "--max_voxels", "1000",
         *BASELINE]))
    assert "slice.png: 40 x 30 = 1,200 voxels, over the limit of 1,000" in err


def test_a_wide_image_is_drawn_within_webp_limits_and_its_folder_removed_once_sent(tmp_path, scorer):
    """6000 px wide: the overlay (3 panels) would be 18000 px, past WebP's 16383 limit, and fail in
    gradio with a bare "Error". Each panel drawn at most DISPLAY_SIDE a side, gradio's WebP encoding works."""
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "wide.png"), rng.integers(0, 255, (64, 6000), dtype=np.uint8))
    run = page_run(scorer)(str(tmp_path / "wide.png"))
    status, score, probability, decision, overlay, *_, downloads, view = next(run)
    assert status.value == "" and float(score) >= 0 and decision and probability == "uncalibrated"
    assert 3 * app.DISPLAY_SIDE <= overlay.shape[1] <= 3 * app.DISPLAY_SIDE + 200  # three panels 1024 wide, a bar
    Image.fromarray(overlay).save(io.BytesIO(), "WEBP")  # what gradio does with it
    with pytest.raises(ValueError, match="WebP"):  # the full-size panel could not have been
        Image.fromarray(np.zeros((2, 18000, 3), np.uint8)).save(io.BytesIO(), "WEBP")
    folder = Path(downloads[0]).parent
    assert all(Path(p).is_file() for p in downloads) and Path(scorer.workspace.name) in folder.parents
    with pytest.raises(StopIteration):  # gradio resumes the generator once it has sent (copied) the outputs
        next(run)
    assert not folder.exists() and not os.listdir(scorer.workspace.name)


def test_a_failure_while_drawing_is_a_message_in_the_page_and_leaves_no_folder(tmp_path, scorer, monkeypatch):
    cv2.imwrite(str(tmp_path / "scan.png"), np.full((32, 32), 128, np.uint8))

    def broken(*args, **kwargs):
        raise MemoryError("cannot allocate the panel")

    monkeypatch.setattr(app, "overlay_panel", broken)
    [(status, score, *_)] = list(page_run(scorer)(str(tmp_path / "scan.png")))
    assert status.value == "**Could not score this file.** MemoryError: cannot allocate the panel" and score == ""
    assert not os.listdir(scorer.workspace.name)


def test_a_slice_that_cannot_be_shown_is_a_message_in_the_page(tmp_path, scorer):
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).uniform(1, 9, (16, 16, 3)).astype(np.float32),
                                     np.eye(4)), str(tmp_path / "vol.nii.gz"))
    page = app.build_app(scorer)
    run, show_slice = (next(f.fn for f in page.fns.values() if f.fn.__name__ == name) for name in ("run", "show_slice"))
    *_, view = list(run(str(tmp_path / "vol.nii.gz")))[0]
    status, overlay, _ = show_slice(view, 1)
    assert status.value is None
    np.testing.assert_array_equal(overlay, app.slice_panel(view, scorer.threshold, 1))
    status, *_ = show_slice(view, 7)  # not a slice of this volume
    assert status.value.startswith("**Could not show slice 7.** 7 is not in list")


# ----------------------------------------------------------------------------- item 6: one clear line naming the file

def nifti_with_sform(path: Path, shape, sform: np.ndarray) -> Path:
    """A NIfTI whose sform (code 1, no qform) is ``sform``, written into the header as it is."""
    header = nibabel.Nifti1Header()
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = sform[row]
    header["sform_code"] = 1
    volume = np.random.default_rng(0).uniform(1, 9, shape).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, None, header), str(path))
    return path


def dicom_with(path: Path, keyword: str, stored: str) -> Path:
    """A CT slice whose ``keyword`` (a DS attribute) holds ``stored`` as written in the file, which
    pydicom would refuse to set (``abc``) or reads as a number (``nan``)."""
    write_slice(path, np.full((12, 10), 1000), 30.0, generate_uid())
    data = pydicom.dcmread(path)
    value = stored.encode() + b" " * (len(stored) % 2)
    data[keyword] = RawDataElement(data[keyword].tag, "DS", len(value), value, 0, False, True)
    data.save_as(path)
    return path


def series_with(folder: Path, keyword: str, stored: str) -> Path:
    """A 3-slice series whose every file holds ``stored`` in ``keyword``."""
    write_series(folder, np.full((3, 12, 10), 1000))
    for path in folder.iterdir():
        data = pydicom.dcmread(path)
        value = stored.encode() + b" " * (len(stored) % 2)
        data[keyword] = RawDataElement(data[keyword].tag, "DS", len(value), value, 0, False, True)
        data.save_as(path)
    return folder


def float_rgb_dicom(path: Path) -> Path:
    data = dicom_dataset("1.2.840.10008.5.1.4.1.1.7")
    data.Rows, data.Columns = 8, 8
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 32, 32, 31, 0
    data.SamplesPerPixel, data.PhotometricInterpretation, data.PlanarConfiguration = 3, "RGB", 0
    data.FloatPixelData = np.random.default_rng(0).uniform(0, 1, (8, 8, 3)).astype(np.float32).tobytes()
    data.save_as(path, enforce_file_format=True)
    return path


def patched_zip(path: Path, encrypted: bool = False, method: int | None = None) -> Path:
    """A zip of one DICOM-named file whose directory says it is encrypted or uses ``method``
    (zipfile writes neither; both headers, local and central, are patched)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("case/a.dcm", b"x" * 100)
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    if encrypted:
        data[local + 6] |= 1
        data[central + 8] |= 1
    if method is not None:
        struct.pack_into("<H", data, local + 8, method)
        struct.pack_into("<H", data, central + 10, method)
    path.write_bytes(bytes(data))
    return path


SHEAR = np.array([[1.0, 0.5, 0, 3], [0, 1, 0, 4], [0, 0, 2, 5], [0, 0, 0, 1]])


@pytest.mark.parametrize("name, make, message", [
    ("v5.nii.gz", lambda p: save_nifti(p, np.ones((3, 3, 3, 2, 2), np.float32)), r"5-D volume \(3, 3, 3, 2, 2\)"),
    ("v1.nii.gz", lambda p: save_nifti(p, np.ones(10, np.float32)), "a 1-D NIfTI of 10 values"),
    ("zero.nii.gz", lambda p: nifti_with_sform(p, (4, 5, 3), np.zeros((4, 4))), "its affine .* is singular"),
    ("singular.nii.gz", lambda p: nifti_with_sform(p, (4, 5, 3), np.array(
        [[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), "its affine .* is singular"),
    ("nan.nii.gz", lambda p: nifti_with_sform(p, (4, 5, 3), np.where(np.eye(4) == 1, np.nan, 0)),
     "its affine .* holds NaN or infinite values"),
    ("center.dcm", lambda p: dicom_with(p, "WindowCenter", "abc"), "its WindowCenter 'abc' is not a finite number"),
    ("slope.dcm", lambda p: dicom_with(p, "RescaleSlope", "abc"), "its RescaleSlope 'abc' is not a finite number"),
    ("zero_slope.dcm", lambda p: dicom_with(p, "RescaleSlope", "0"), "its RescaleSlope is 0"),
    ("width.dcm", lambda p: dicom_with(p, "WindowWidth", "-5"), "its WindowWidth -5 is not > 0"),
    ("series", lambda p: series_with(p, "RescaleSlope", "abc"), r"\w+_\d+.dcm: its RescaleSlope 'abc' is not a"),
    ("series", lambda p: series_with(p, "WindowCenter", "nan"), r"\w+_\d+.dcm: its WindowCenter 'nan' is not a"),
    ("rgb.dcm", float_rgb_dicom, "RGB pixel data of type float32; only 8- or 16-bit integer RGB is read"),
    ("locked.zip", lambda p: patched_zip(p, encrypted=True), "'case/a.dcm' is encrypted"),
    ("zstd.zip", lambda p: patched_zip(p, method=93), "'case/a.dcm' uses compression method 93, which cannot be read"),
])
def test_bad_scans_end_in_one_line_naming_the_file(tmp_path, name, make, message):
    make(tmp_path / name)
    with pytest.raises(InputError, match=rf"^{tmp_path / name}[:/] ?{message}") as error:
        read_input(str(tmp_path / name))
    assert "\n" not in str(error.value)


def test_a_nan_window_center_names_the_dicom_not_the_checkpoint(tmp_path):
    path = dicom_with(tmp_path / "scan.dcm", "WindowCenter", "nan")
    with pytest.raises(InputError, match=rf"^{path}: its WindowCenter 'nan' is not a finite number; fix the file or "
                                         r"give --window LOW HIGH"):
        test_one_example.main(["--image_path", str(path), "--save_path", str(tmp_path / "out"), *BASELINE])
    [record] = test_one_example.main(["--image_path", str(path), "--save_path", str(tmp_path / "out"),
                                      "--window", "-160", "240", *BASELINE])  # a window given: its own unused
    assert 0 <= record["score"] <= 1


def test_a_zip_bomb_is_refused_before_one_byte_is_unpacked(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("case/a.dcm", bytes(20 << 20))  # 20 MiB of zeros in about 20 KB

    def forbidden(*args, **kwargs):
        raise AssertionError("unpacked before the checks")

    monkeypatch.setattr(zipfile.ZipFile, "extract", forbidden)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", forbidden)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'bomb.zip'}: unpacks to 20,971,520 bytes from [\d,]+ "
                                         r"\(over 100:1\); refused as a zip bomb"):
        read_input(str(tmp_path / "bomb.zip"))


# ----------------------------------------------------------------------------- item 7: silently wrong

@pytest.mark.parametrize("volume_format", ["nifti", "nrrd"])
def test_a_sheared_volume_keeps_its_affine_exactly_on_the_map(tmp_path, volume_format):
    path = tmp_path / "shear.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).uniform(1, 99, (8, 9, 5)).astype(np.float32), SHEAR),
                 str(path))
    [record] = test_one_example.main(["--image_path", str(path), "--save_path", str(tmp_path / "out"),
                                      "--volume_format", volume_format, *BASELINE])
    for written in (record["map_volume"], record["mask_volume"]):
        if volume_format == "nifti":
            assert np.array_equal(nibabel.load(written).affine, nibabel.load(path).affine)  # bit for bit
        else:
            image = sitk.ReadImage(written)  # NRRD keeps the sheared axes: its space directions, by hand
            directions = np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
            np.testing.assert_allclose(np.diag([-1, -1, 1]) @ directions, SHEAR[:3, :3], atol=1e-6)
            np.testing.assert_allclose(np.diag([-1, -1, 1]) @ image.GetOrigin(), SHEAR[:3, 3], atol=1e-6)


def test_a_multiframe_file_missing_frames_is_refused(tmp_path):
    path = short_dicom(tmp_path / "short.dcm", 4, 12, 10, held=1)
    with pytest.raises(InputError, match=rf"^{path}: NumberOfFrames is 4 but its pixel data hold 1 frame\(s\)"):
        read_input(str(path))


def test_slices_sharing_one_position_are_not_stacked_with_an_invented_spacing(tmp_path):
    series = generate_uid()
    for k in range(4):
        write_slice(tmp_path / "echoes" / f"{k}.dcm" if (tmp_path / "echoes").mkdir(exist_ok=True) is None else None,
                    np.full((12, 10), 1000 + k), 30.0, series)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'echoes'}: \d.dcm and \d.dcm lie at one position "
                                         r"\(30.00 mm\): not one volume"):
        read_input(str(tmp_path / "echoes"))


def test_a_truncated_slice_is_named_not_dropped(tmp_path):
    write_series(tmp_path / "cut", np.random.default_rng(1).integers(900, 1300, (5, 12, 10)))
    victim = sorted((tmp_path / "cut").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-100])  # GDCM leaves it out of the series
    with pytest.raises(InputError, match=rf"^{victim}: a DICOM file of the series that GDCM cannot read"):
        read_input(str(tmp_path / "cut"))


def test_a_short_series_with_a_missing_slice_keeps_each_slice_at_its_position(tmp_path):
    """Slices at 30, 35 and 37.5 mm (32.5 missing): ITK alone reads them as a grid of 5 mm steps, putting
    the last slice at 40 mm. Each slice must stay at its own position, the gap filled and named."""
    frames = np.stack([np.full((12, 10), 1000 + 50 * k) for k in range(4)])
    write_series(tmp_path / "short", frames, skip=(1,))
    scan = read_input(str(tmp_path / "short"))
    assert scan.geometry.shape == (10, 12, 4) and scan.geometry.affine[2, 2] == STEP
    levels = [round(float(s[0, 0, 0]) * 255) for s in scan.slices]  # 8-bit grey levels of the window [-160, 240] HU
    assert levels == [round((value - 1024 + 160) / 400 * 255) for value in (1000, 1000, 1100, 1150)]
    [warning] = scan.warnings
    assert "1 missing slice(s) between position 30.00 mm" in warning and "35.00 mm" in warning


def test_positions_off_any_uniform_grid_are_refused_but_rounded_ones_fit(tmp_path):
    series = generate_uid()
    (tmp_path / "uneven").mkdir()
    for k, z in enumerate((30.0, 32.5, 36.1, 38.6)):
        write_slice(tmp_path / "uneven" / f"{k}.dcm", np.full((12, 10), 1000), z, series)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'uneven'}: its slice positions are not evenly spaced "
                                         r"\(steps 2.50, 3.60, 2.50 mm\)"):
        read_input(str(tmp_path / "uneven"))
    (tmp_path / "rounded").mkdir()  # 0.625 mm slices whose positions the scanner wrote to 0.1 mm
    for k, z in enumerate((30.0, 30.6, 31.3, 31.9, 32.5)):
        write_slice(tmp_path / "rounded" / f"{k}.dcm", np.full((12, 10), 1000), z, series)
    scan = read_input(str(tmp_path / "rounded"))
    assert scan.geometry.shape[2] == 5 and not scan.warnings
    assert scan.geometry.affine[2, 2] == pytest.approx(18.9 / 30)  # least squares: sum(d * k) / sum(k * k)


@pytest.mark.parametrize("step, decimals, count, missing", [
    (0.625, 2, 120, ()), (1.25, 1, 200, ()), (1.25, 1, 100, (40, 41, 70)), (3.0, None, 60, ()), (1.0, None, 300, (5,))])
def test_long_series_with_rounded_or_jittered_positions_form_their_grid(step, decimals, count, missing):
    """Positions as scanners write them, rounded to 0.01 or 0.1 mm (or jittered by up to 5% of a step),
    over hundreds of slices: read as the one grid they are, gaps placed where they are, not refused
    for rounding that adds up when slices are numbered by their distance from the first."""
    places = np.delete(np.arange(count), missing)
    positions = 30 + step * places
    positions = np.round(positions, decimals) if decimals is not None else \
        positions + np.random.default_rng(0).uniform(-0.05, 0.05, len(places)) * step
    grid = series_grid("S", [f"{k}.dcm" for k in places], positions)
    assert np.array_equal(grid.places, places) and grid.step == pytest.approx(step, rel=1e-3)
    assert len(grid.gaps) == len([k for k in missing if k - 1 not in missing])


# ----------------------------------------------------------------------------- items 8, 9: converters, page flags

def test_brats_nan_slices_are_refused_not_dropped(tmp_path):
    volume, _ = brats_case(tmp_path / "raw", "00001", seed=0)
    volume[:, :, 4] = np.nan  # a whole slice: it would count as empty and vanish
    volume[3, 3, 7] = np.inf
    save_nifti(tmp_path / "raw" / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz", volume)
    flair = tmp_path / "raw" / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz"
    with pytest.raises(InputError, match=rf"^{flair}: 481 NaN or infinite voxel\(s\) in axial slice\(s\) 4, 7; "
                                         r"fix or mask them first"):
        brats2021.convert(str(tmp_path / "raw"), str(tmp_path / "out"), slice_range=(0, 11), split=(1, 0, 0))


def test_brats_on_a_2d_flair_is_one_line(tmp_path):
    brats_case(tmp_path / "raw", "00001", seed=0)
    flair = tmp_path / "raw" / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz"
    save_nifti(flair, np.ones((24, 20), np.float32))
    with pytest.raises(InputError, match=rf"^{flair}: a 2-D volume of shape \(24, 20\); a 3-D volume is expected"):
        brats2021.convert(str(tmp_path / "raw"), str(tmp_path / "out"), split=(1, 0, 0))


@pytest.mark.parametrize("inside", [True, False])
def test_liver_nan_hu_inside_the_liver_is_refused_outside_it_ignored(tmp_path, inside):
    btcv_path, lits_path, _, lits = liver_volumes(tmp_path)
    ct, label = lits["2"]
    ct = ct.astype(np.float32)
    ct[(5, 5, 3) if inside else (15, 0, 0)] = np.nan  # a liver voxel of slice 3, or one outside any organ
    volume = lits_path / "Training Batch 1" / "volume-2.nii"
    save_nifti(volume, ct)
    convert = lambda: liverct.convert(str(btcv_path), str(lits_path), str(tmp_path / "out"))  # noqa: E731
    if inside:
        with pytest.raises(InputError, match=rf"^{volume}: 1 NaN or infinite voxel\(s\) in the liver in axial "
                                             r"slice\(s\) 3; fix or mask them first"):
            convert()
    else:
        assert sum(convert()["counts"].values()) > 0


def test_folder_index_over_a_meta_json_that_is_a_list_or_too_deep(tmp_path):
    (tmp_path / "normal").mkdir()
    cv2.imwrite(str(tmp_path / "normal" / "a.png"), np.zeros((8, 8), np.uint8))
    meta = tmp_path / "meta.json"
    for content, message in [("[1, 2]", "holds a JSON list, not an object of splits"),
                             ("[" * 50_000 + "]" * 50_000, "is nested too deeply to be a meta.json")]:
        meta.write_text(content)
        with pytest.raises(InputError, match=rf"^existing index {meta} {message}"):
            folder.build_index(str(meta), str(tmp_path / "normal"), None)
        assert meta.read_text() == content  # left as it was
    meta.write_text(json.dumps({"train": {"brain": []}}))
    assert set(folder.build_index(str(meta), str(tmp_path / "normal"), None)) == {"train", "test"}


@pytest.fixture
def no_launch(monkeypatch):
    """app.main must stop before it loads a checkpoint or launches anything."""
    def forbidden(*args, **kwargs):
        raise AssertionError("got past the address checks")

    monkeypatch.setattr(app, "load_scorer", forbidden)


def test_page_port_out_of_range_busy_or_host_unresolvable_is_one_line(no_launch, capsys):
    err = one_line_error(capsys, lambda: app.main(["--port", "99999"]))
    assert err == "error: argument --port: must be a port number in 1..65535, got 99999"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(capsys, lambda: app.main(["--host", "127.0.0.1", "--port", str(port)]))
    assert err == f"error: --port {port}: already in use on 127.0.0.1; choose another --port"
    err = one_line_error(capsys, lambda: app.main(["--host", "no-such-host.invalid"]))
    assert err.startswith("error: --host no-such-host.invalid: cannot be resolved (")


def test_a_host_that_is_not_this_machine_is_one_line(no_launch, capsys, monkeypatch):
    def refuse(self, address):
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))

    monkeypatch.setattr(socket.socket, "bind", refuse)
    err = one_line_error(capsys, lambda: app.main(["--host", "127.0.0.1", "--port", "7861"]))
    assert err == f"error: --host 127.0.0.1 --port 7861: cannot serve there ({os.strerror(errno.EADDRNOTAVAIL)})"


# ----------------------------------------------------------------------------- the page in a browser

def test_the_page_draws_a_wide_upload_serves_its_files_after_the_folder_is_gone_and_refuses_a_detached_header(
        tmp_path, secret):
    from playwright.sync_api import expect, sync_playwright

    from CLIP.checkpoint import save_checkpoint
    from CLIP.MedVMAD import MedVMAD
    from tests.helpers import CHROMIUM, free_port, tiny_config

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pth", MedVMAD(tiny_config()), threshold=0.5, epoch=1)
    scorer, _ = app.load_scorer(app.parse_args(["--checkpoint_path", str(tmp_path / "tiny.pth"),
                                                "--device", "cpu"])[1])
    cv2.imwrite(str(tmp_path / "wide.png"), np.random.default_rng(0).integers(0, 255, (64, 6000), dtype=np.uint8))
    (tmp_path / "upload").mkdir()
    header = metaimage_header(tmp_path / "upload" / "scan.mhd", str(secret))
    page_app = app.build_app(scorer)
    port = free_port()
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, footer_links=[])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "wide.png"))
            expect(page.locator("#score textarea, #score input").first).not_to_have_value("", timeout=30_000)
            expect(page.locator("#overlay img")).to_be_visible()
            links = page.locator("#downloads a[download]")
            expect(links).to_have_count(3)  # overlay, map, mask
            shapes = {}
            for link in links.all():
                served = page.request.get(link.get_attribute("href"))
                assert served.ok
                shapes[link.get_attribute("download")] = cv2.imdecode(np.frombuffer(served.body(), np.uint8), -1).shape
            assert shapes["wide_map.png"] == shapes["wide_mask.png"] == (64, 6000)  # the map at the input's size
            assert shapes["wide.png"][1] <= 3 * app.DISPLAY_SIDE + 200  # the overlay figure: panels at most 1024 px
            deadline = time.monotonic() + 10  # the folder goes when gradio resumes the run after sending
            while os.listdir(scorer.workspace.name) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not os.listdir(scorer.workspace.name)  # removed once sent, yet downloadable

            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#upload input[type=file]").set_input_files(str(header))
            expect(page.locator("#status")).to_contain_text("scan.mhd: a detached header naming the data file",
                                                            timeout=30_000)
            assert "secret server file" not in page.content()
            browser.close()
    finally:
        page_app.close()
