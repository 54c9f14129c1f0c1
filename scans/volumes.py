"""Volumes in and out: every scalar volume 3D Slicer opens, read with SimpleITK (NIfTI with nibabel,
as ``scans.files`` does), sliced as the BMAD converters slice, and maps written back on the input's grid.

Formats: NIfTI (.nii, .nii.gz; read by ``scans.files``), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd),
a DICOM series (a folder, or a .zip of one: files sorted by position by GDCM, several series told
apart by SeriesInstanceUID), and multi-frame DICOM files.

Orientation: any volume is described by its voxel array in stored index order [i,j,k] and its RAS
affine (nibabel's convention; SimpleITK's LPS geometry is converted with diag(-1,-1,1)). The array is
turned to the closest RAS orientation with nibabel's own ``io_orientation``/``apply_orientation``
(what ``nibabel.as_closest_canonical`` does), then framed by ``scans.framing.frame_volume`` (the rule the
converters use), so a NRRD or DICOM series of the same voxels gives the same slices as the NIfTI path.
Writing goes the other way: maps are un-framed onto the displayed slices, then put back with the
inverse orientation, and the written map has the input's size, spacing, origin and direction (NIfTI
maps carry the input's affine exactly, a sheared one too).

Limits, all checked before any voxel is read: a NRRD/MetaImage header may name a data file only in
its own folder (and none at all for the web page's single-file uploads), read from the header text
before SimpleITK opens anything; an input over ``max_voxels`` is refused from its header; a DICOM
series must lie on one uniform grid (no two slices at one position, gaps filled with at most as
many blank slices as real ones, no slice of it left out as unreadable); a multi-frame file must hold
the frames it declares; a zip is checked from its directory (paths, encryption, compression method,
members, unpacked size and ratio) before it is unpacked.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from scans.files import (DICOM_SUFFIXES, IMAGE_SUFFIXES, MAX_VOXELS, NIFTI_SUFFIXES, Scan, check_file, check_rescale,
                         check_voxel_count, dicom_window, is_dicom, percentile_window, quiet_pydicom, read_scan,
                         scale_to_unit, suffix_of)
from scans.files import list_inputs as list_image_inputs
from scans.framing import Framing, frame_volume, uint8_to_rgb
from utils import InputError, atomic_write_bytes, atomic_write_image, one_line

if TYPE_CHECKING:
    from pydicom import Dataset

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# The SimpleITK reader of each kind, named rather than guessed from the content (a ".mha" that is
# really a NRRD header must not be read as one); DICOM files are read by GDCMImageIO.
SITK_IO = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO",
           ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}
ZIP_SUFFIXES = (".zip",)
VOLUME_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOLERANCE_MM = 1e-3  # two DICOM slices closer than this along the normal share one position
GRID_TOLERANCE = 0.1  # a slice may lie this far (in steps) from its place on the series' uniform grid
MAX_HEADER_BYTES = 1 << 20  # a NRRD/MetaImage header must end within its first MiB
MAX_DATA_FILES = 100_000  # the most data files a header's file pattern may name
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
ZIP_BYTES_PER_VOXEL = 4  # a zipped series may unpack to 4 bytes per allowed voxel (1 GiB by default)
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_RATIO, ZIP_RATIO_FROM_BYTES = 100, 16 << 20  # over 16 MiB, more than 100:1 is a zip bomb

logger = logging.getLogger("medvmad")


@dataclass
class Geometry:
    """Where a volume's voxels are: its stored shape [i,j,k], RAS affine, and the slicing axis."""
    shape: tuple[int, int, int]
    affine: np.ndarray
    axis: int

    @property
    def ornt(self) -> np.ndarray:
        return io_orientation(self.affine)


@dataclass
class VolumeScan(Scan):
    geometry: Geometry | None = None
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- geometry

def sitk_affine(image) -> np.ndarray:
    """RAS affine (nibabel convention) of a 3-D SimpleITK image."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def to_canonical(stored: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Stored [i,j,k] voxels -> the closest RAS orientation, as ``nibabel.as_closest_canonical``."""
    return apply_orientation(stored, io_orientation(affine))


def from_canonical(canonical: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of ``to_canonical``: RAS-oriented voxels back to the stored index order."""
    return apply_orientation(canonical, ornt_transform(RAS, io_orientation(affine)))


def to_sitk(stored: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of stored [i,j,k] voxels with the geometry of a RAS ``affine``."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0)))
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    return image


# ----------------------------------------------------------------------------- reading

def _check_voxels(path: str, voxels: np.ndarray) -> None:
    if voxels.size == 0:
        raise InputError(f"{path}: empty volume")
    bad = int(np.size(voxels) - np.count_nonzero(np.isfinite(voxels)))
    if bad:
        raise InputError(f"{path}: {bad} of {voxels.size} voxels are NaN or infinite; fix or mask them first")


# ----------------------------------------------------------------------------- headers naming data files

def _pattern_names(value: str) -> list[str] | None:
    """The file names of a NRRD/MetaImage file pattern ``<printf format> <min> <max> <step>``;
    None when ``value`` is not one."""
    tokens = value.split()
    if len(tokens) < 4 or "%" not in tokens[0]:
        return None
    try:
        first, last, step = (int(token) for token in tokens[1:4])
    except ValueError:
        return None
    numbers = range(first, last + (1 if step > 0 else -1), step) if step else range(0)
    if not 0 < len(numbers) <= MAX_DATA_FILES:
        raise InputError(f"data file pattern {value!r} names {len(numbers)} files (1 to {MAX_DATA_FILES} allowed)")
    try:
        return [tokens[0] % number for number in numbers]
    except (TypeError, ValueError):
        raise InputError(f"data file pattern {value!r} cannot be expanded") from None


def _named_files(value: str, following: list[str], local: str | None) -> list[str]:
    """The data files one header field names: none for ``local`` (data in the same file), the lines
    after it for ``LIST``, a pattern's expansion, or the one file."""
    if local is not None and value.upper() == local:
        return []
    if value.split()[:1] == ["LIST"]:
        return [line.strip() for line in following if line.strip()]
    return _pattern_names(value) or [value]


HEADER_LINES = re.compile(r"\r\n|\r|\n")  # NRRD (teem) and MetaImage (MetaIO) accept any of these line ends
# "key = value", "key : value", "key := value": MetaIO accepts each; NRRD fields are "key: value"
HEADER_FIELD = re.compile(r"\s*([^:=]*?)\s*(?::=|=|:)\s*(.*)")


def header_data_files(path: str) -> list[str]:
    """The separate data files a NRRD (``data file:``) or MetaImage (``ElementDataFile``) header
    names, as written in it; empty only when the header shows its data follow in the same file
    (NRRD: the blank line that ends its header; MetaImage: ``ElementDataFile = LOCAL``). Read from
    the header text alone, before any image library opens the file; a header that shows neither
    within ``MAX_HEADER_BYTES`` is refused, since a reader would look further than this check."""
    with open(path, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES + 1)
    whole = len(head) <= MAX_HEADER_BYTES
    lines = HEADER_LINES.split(head.decode("latin-1"))
    fields = [(match.group(1).strip().lower().replace(" ", ""), match.group(2).strip()) if match else (None, "")
              for match in map(HEADER_FIELD.fullmatch, lines)]
    if suffix_of(path) in (".nrrd", ".nhdr"):
        end = next((number for number, line in enumerate(lines[1:], start=1) if not line.strip()), None)
        if end is None and not whole:
            raise InputError(f"no end of its NRRD header in the first {MAX_HEADER_BYTES:,} bytes")
        names: list[str] = []
        for number in range(1, end if end is not None else len(lines)):
            if fields[number][0] == "datafile":
                names += _named_files(fields[number][1], lines[number + 1:end], None)
        if end is None and not names:
            raise InputError("its NRRD header names no data file and no blank line ends it")
        return names
    for number, (key, value) in enumerate(fields):
        if key == "elementdatafile":  # the header's last field
            return _named_files(value, lines[number + 1:], "LOCAL")
    where = "its header" if whole else f"the first {MAX_HEADER_BYTES:,} bytes"
    raise InputError(f"no ElementDataFile field in {where}")


def check_data_files(path: str, single_file: bool) -> None:
    """Refuse a NRRD/MetaImage header that names data outside its own folder (``../secret``,
    ``/etc/passwd``, a link leading out) or, with ``single_file`` (the web page: an upload is one
    file), that names any separate data file at all."""
    try:
        names = header_data_files(path)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    if names and single_file:
        raise InputError(f"{path}: a detached header naming the data file {names[0]!r}; only a file that holds "
                         f"its own data can be read here (save it as .nrrd or .mha)")
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for name in names:
        if "\0" in name:  # C readers stop at it: what they would open is not what is checked here
            raise InputError(f"{path}: its data file name {name!r} holds a NUL byte")
        target = os.path.realpath(os.path.join(folder, name))
        if os.path.commonpath([folder, target]) != folder:
            raise InputError(f"{path}: its data file {name!r} lies outside the header's folder; keep the data "
                             f"file beside its header")


# ----------------------------------------------------------------------------- DICOM

@dataclass
class DicomDisplay:
    """How a DICOM file asks to be shown: its own WindowCenter/Width (first value), as the
    single-file DICOM path uses, and whether it is MONOCHROME1 (the lowest value shown white)."""
    window: tuple[float, float] | None = None
    inverted: bool = False


def _header(path: str) -> Dataset:
    """A DICOM file's header, without its pixel data."""
    import pydicom

    with quiet_pydicom():
        return pydicom.dcmread(path, stop_before_pixels=True)


def _dicom_header(path: str) -> Dataset:
    """A DICOM file's header (no pixel data), its rescale checked: one that is not a finite number is
    refused naming the file."""
    try:
        data = _header(path)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for a damaged or non-DICOM file
        raise InputError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from None
    check_rescale(data, path)
    return data


def _dicom_display(data: Dataset, path: str, window: tuple[float, float] | None) -> DicomDisplay:
    """How the file asks to be shown; its own window is read (and checked) only without ``window``."""
    return DicomDisplay(None if window else dicom_window(data, path),
                        data.get("PhotometricInterpretation") == "MONOCHROME1")


def check_frames(path: str) -> None:
    """Refuse a multi-frame DICOM file whose pixel data holds fewer frames than its NumberOfFrames
    (GDCM would fill the missing ones with blank slices)."""
    import pydicom
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import get_expected_length

    try:
        with quiet_pydicom():
            data = pydicom.dcmread(path)
        frames = int(data.get("NumberOfFrames", 1) or 1)
        if "PixelData" not in data:
            raise InputError(f"{path}: no pixel data")
        if data.file_meta.TransferSyntaxUID.is_encapsulated:
            held = sum(1 for _ in generate_frames(data.PixelData, number_of_frames=frames))
        else:
            held = len(data.PixelData) // max(get_expected_length(data) // frames, 1)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged pixel data
        raise InputError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from None
    if held < frames:
        raise InputError(f"{path}: NumberOfFrames is {frames} but its pixel data hold {held} frame(s) "
                         f"(truncated?); fix the file")


def _stored_values(files: list[str], like) -> object | None:
    """A SimpleITK image of the files' own modality values (pydicom: stored pixels through the
    rescale), on ``like``'s grid; None when pydicom cannot decode them (a compressed transfer
    syntax without its decoder). GDCM inverts MONOCHROME1 pixels as it reads them, which leaves
    values the file's window does not describe; pydicom never inverts."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    sitk = _quiet_sitk()
    frames = []
    try:
        with quiet_pydicom():
            for file in files:
                data = pydicom.dcmread(file)
                frames.append(np.asarray(apply_modality_lut(data.pixel_array, data), dtype=np.float32))
    except Exception:  # noqa: BLE001 - any unreadable frame: the SimpleITK reading stands
        return None
    voxels = np.concatenate([f if f.ndim == 3 else f[None] for f in frames])  # [k,j,i]
    image = sitk.GetImageFromArray(voxels.reshape(like.GetSize()[::-1]))  # a single frame keeps its 2-D shape
    image.CopyInformation(like)
    return image


def _monochrome1_values(path: str, files: list[str], image, shown: DicomDisplay,
                        ) -> tuple[object, DicomDisplay, list[str]]:
    """The modality values of a MONOCHROME1 series or file, shown inverted; when pydicom cannot
    decode them, GDCM's own values (already inverted, so bright-high, but off the file's window's
    scale) between their 0.5 and 99.5 percentiles, with a warning."""
    stored = _stored_values(files, image)
    if stored is not None:
        return stored, shown, []
    window = percentile_window(_quiet_sitk().GetArrayFromImage(image))
    return image, DicomDisplay(window, False), [
        f"{path}: MONOCHROME1 pixel data pydicom cannot decode (install pylibjpeg for compressed DICOM); "
        f"shown as GDCM inverts it, scaled by percentiles instead of the file's window"]


def _quiet_sitk():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # gaps etc. are reported by us, in one line
    return sitk


def dicom_series(folder: str, series_uid: str | None = None) -> list[str]:
    """The files of one DICOM series in ``folder``, sorted by position (GDCM); InputError if ambiguous."""
    sitk = _quiet_sitk()
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))
    if not uids:
        raise InputError(f"{folder}: no DICOM series in this folder")
    if series_uid is None and len(uids) > 1:
        listing = "; ".join(f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))} files)"
                            for uid in uids)
        raise InputError(f"{folder}: {len(uids)} DICOM series in one folder; pick one with --series_uid: {listing}")
    if series_uid is not None and series_uid not in uids:
        raise InputError(f"{folder}: no series {series_uid}; the folder holds {', '.join(uids)}")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid or uids[0]))


def check_series_complete(folder: str, files: list[str], uid: str) -> None:
    """Refuse a series folder holding a file of the same series that GDCM left out (a truncated or
    corrupt slice): the rest would be read as if nothing were missing there."""
    listed = {os.path.realpath(file) for file in files}
    for name in sorted(os.listdir(folder)):
        file = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(file) or os.path.realpath(file) in listed or not is_dicom(file):
            continue
        try:
            other = _header(file).get("SeriesInstanceUID")
        except Exception:  # noqa: BLE001 - a DICOM file whose header cannot be read may be one of its slices
            other = uid
        if other == uid:
            raise InputError(f"{file}: a DICOM file of the series that GDCM cannot read (truncated or corrupt?); "
                             f"replace or remove it")


def slice_positions(headers: list[Dataset]) -> np.ndarray | None:
    """Each sorted file's position along the slice normal (mm); None without the position tags."""
    if any("ImagePositionPatient" not in h or "ImageOrientationPatient" not in h for h in headers):
        return None
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return np.array([np.dot(np.array(h.ImagePositionPatient, dtype=float), normal) for h in headers])


@dataclass
class SeriesGrid:
    """Where a sorted series' slices go on one uniform grid: each file's slice number, the step (mm)
    and a sentence per gap."""
    places: np.ndarray
    step: float
    gaps: list[str]

    @property
    def count(self) -> int:
        return int(self.places[-1]) + 1


def series_grid(path: str, files: list[str], positions: np.ndarray) -> SeriesGrid:
    """Put a sorted series' slice positions on one uniform grid: each slice numbered from its
    neighbour by the smallest step (one place, or several across a gap; never by its distance from
    the first, which drifts over many rounded positions), the grid's step fitted to all positions
    (least squares, so positions rounded in the files still fit), and numbered again by that step.
    Refused, naming the folder: two files at one position (not one volume), positions off any
    uniform grid (read as one, the map would carry a wrong spacing), and gaps that would invent more
    blank slices than the series holds (a slice 100 m away would make 100,000 of them)."""
    steps = np.abs(np.diff(positions))
    shared = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    if shared.size:
        index = shared[0]
        raise InputError(f"{path}: {os.path.basename(files[index])} and {os.path.basename(files[index + 1])} lie "
                         f"at one position ({positions[index]:.2f} mm): not one volume (several acquisitions, "
                         f"echoes or times?); keep one per folder")
    distances = np.abs(positions - positions[0])
    step = float(steps.min())
    for _ in range(2):  # number each slice from its neighbour (no drift over many slices), refit the step
        places = np.concatenate([[0], np.cumsum(np.maximum(1, np.round(steps / step)))]).astype(np.int64)
        step = float(np.dot(distances, places) / np.dot(places, places))
    if np.abs(distances / step - places).max() > GRID_TOLERANCE:
        shown = ", ".join(f"{s:.2f}" for s in steps[:8]) + (" ..." if len(steps) > 8 else "")
        raise InputError(f"{path}: its slice positions are not evenly spaced (steps {shown} mm), so they do not "
                         f"form one grid; resample the series first")
    blank = int(places[-1]) + 1 - len(files)
    if blank > len(files):
        raise InputError(f"{path}: its {len(files)} slices span {int(places[-1]) + 1:,} positions of {step:.2f} mm; "
                         f"filling the gaps would invent {blank:,} blank slices (at most as many as real ones "
                         f"are filled); is a slice misplaced?")
    gaps = []
    for index in np.flatnonzero(np.diff(places) > 1):
        gaps.append(f"{int(places[index + 1] - places[index]) - 1} missing slice(s) between position "
                    f"{positions[index]:.2f} mm ({os.path.basename(files[index])}) and {positions[index + 1]:.2f} mm "
                    f"({os.path.basename(files[index + 1])}), filled with blank slices; "
                    f"the slice step is {step:.2f} mm")
    return SeriesGrid(places, step, gaps)


def _fill_gaps(image, grid: SeriesGrid, inverted: bool = False):
    """Put each slice of a gapped series at its own place on the uniform grid (blank slices between:
    the lowest value, the highest in a MONOCHROME1 series, where it shows black), so maps written
    back overlay the series exactly (ITK would stretch the spacing over the gap)."""
    import SimpleITK as sitk

    voxels = sitk.GetArrayFromImage(image)  # [k,j,i]
    blank = voxels.max() if inverted else voxels.min()
    filled = np.full((grid.count,) + voxels.shape[1:], blank, voxels.dtype)
    filled[grid.places] = voxels
    result = sitk.GetImageFromArray(filled)
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    result.SetSpacing(image.GetSpacing()[:2] + (grid.step,))
    return result


def _read_series(path: str, series_uid: str | None, window: tuple[float, float] | None,
                 max_voxels: int) -> tuple[object, list[str], DicomDisplay]:
    """A DICOM series folder as one SimpleITK image on a uniform grid, its warnings, and how it asks to
    be shown; every header and the grid's size are checked before any pixel is read."""
    sitk = _quiet_sitk()
    files = dicom_series(path, series_uid)
    headers = [_dicom_header(file) for file in files]
    check_series_complete(path, files, headers[0].get("SeriesInstanceUID"))
    positions = slice_positions(headers)
    grid = series_grid(path, files, positions) if positions is not None and len(files) > 1 else None
    count = grid.count if grid else sum(int(h.get("NumberOfFrames", 1) or 1) for h in headers)
    check_voxel_count(path, (count, int(headers[0].get("Rows", 0)), int(headers[0].get("Columns", 0))), max_voxels)
    shown = _dicom_display(headers[0], files[0], window)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
    warnings = [f"{path}: {gap}" for gap in grid.gaps] if grid else []
    if shown.inverted:
        image, shown, undecoded = _monochrome1_values(path, files, image, shown)
        warnings += undecoded
    if grid and grid.gaps:
        image = _fill_gaps(image, grid, shown.inverted)
    elif grid:
        image.SetSpacing(image.GetSpacing()[:2] + (grid.step,))
    return image, warnings, shown


def _read_file(path: str, window: tuple[float, float] | None, max_voxels: int,
               single_file: bool) -> tuple[object, list[str], DicomDisplay]:
    """A NRRD/MetaImage volume or multi-frame DICOM file as a SimpleITK image, read by the reader
    its kind names (never guessed from the content), after its header is checked: the data files it
    names, its size, its values per voxel and dimensions."""
    sitk = _quiet_sitk()
    warnings: list[str] = []
    shown = DicomDisplay()
    dicom = suffix_of(path) not in SITK_IO
    if dicom:
        header = _dicom_header(path)
        check_voxel_count(path, (int(header.get("NumberOfFrames", 1) or 1), int(header.get("Rows", 0)),
                                 int(header.get("Columns", 0))), max_voxels)
        shown = _dicom_display(header, path, window)
        check_frames(path)
    elif suffix_of(path) in SITK_SUFFIXES:
        check_data_files(path, single_file)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO" if dicom else SITK_IO[suffix_of(path)])
    reader.SetFileName(path)
    reader.ReadImageInformation()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: {reader.GetNumberOfComponents()} values per voxel; scalar volumes only "
                         f"(save one channel)")
    if reader.GetDimension() > 3:
        raise InputError(f"{path}: {reader.GetDimension()}-D volume of size {reader.GetSize()}; extract one 3-D "
                         f"volume first")
    check_voxel_count(path, reader.GetSize()[::-1], max_voxels)
    image = reader.Execute()
    if shown.inverted:
        image, shown, undecoded = _monochrome1_values(path, [path], image, shown)
        warnings += undecoded
    return image, warnings, shown


def _read_sitk(path: str, series_uid: str | None, window: tuple[float, float] | None, max_voxels: int,
               single_file: bool) -> tuple[object, list[str], DicomDisplay]:
    """A SimpleITK image of a file or DICOM series folder, with warnings and, for DICOM, how it asks
    to be shown (its own window unless ``window`` is given, MONOCHROME1)."""
    try:
        if os.path.isdir(path):
            image, warnings, shown = _read_series(path, series_uid, window, max_voxels)
        else:
            image, warnings, shown = _read_file(path, window, max_voxels, single_file)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - SimpleITK raises RuntimeError with a multi-line ITK report
        first = str(error).strip().splitlines()
        reason = next((line.strip() for line in first if "ERROR" in line or "rror" in line), type(error).__name__)
        reason = re.sub(r"\(0x[0-9a-f]+\)", "", reason)  # ITK prints object addresses
        raise InputError(f"{path}: unreadable volume ({reason[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel; "
                         f"scalar volumes only (save one channel)")
    if image.GetDimension() > 3:
        raise InputError(f"{path}: 4-D volume of size {image.GetSize()}; extract one 3-D volume first")
    return image, warnings, shown


def read_sitk_scan(path: str, window: tuple[float, float] | None = None, axis: int | None = None,
                   slice_range: tuple[int, int] | None = None, series_uid: str | None = None,
                   max_voxels: int = MAX_VOXELS, single_file: bool = False, framing: Framing | None = None) -> Scan:
    """Read a volume (or a 2-D image) with SimpleITK and frame it as the NIfTI path does (``framing``
    with ``window`` and ``axis`` where given; a DICOM's own window when neither sets one)."""
    framing = (framing or Framing()).overridden(window, axis)
    image, warnings, shown = _read_sitk(path, series_uid, framing.window, max_voxels, single_file)
    sitk = _quiet_sitk()
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)  # [k,j,i] (or [j,i] for 2-D)
    _check_voxels(path, voxels)
    framing = framing.overridden(shown.window)
    if image.GetDimension() == 2:  # a 2-D image: rows and columns as stored
        scaled = scale_to_unit(voxels, framing.window, path)
        return Scan(path, [np.repeat((1 - scaled if shown.inverted else scaled)[..., None], 3, axis=2)], None)
    stored, affine = voxels.transpose(2, 1, 0), sitk_affine(image)
    canonical = to_canonical(stored, affine)
    slices, indices, placement = frame_volume(canonical, framing, path, slice_range)
    if shown.inverted:  # MONOCHROME1: the lowest value is shown white
        slices = [255 - s for s in slices]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return VolumeScan(path, [uint8_to_rgb(s) for s in slices], indices, framing, placement,
                      canonical.shape[framing.axis], Geometry(stored.shape, affine, framing.axis), warnings)


# ----------------------------------------------------------------------------- zips

def _extract_zip(path: str, folder: str, max_bytes: int) -> str:
    """Unpack a zipped DICOM series safely; return the folder holding its files. Everything is
    checked from the archive's directory before one byte is unpacked: member paths, encryption,
    compression methods, the number of members, the unpacked size and the compression ratio."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [member for member in archive.infolist() if not member.is_dir()]
            for member in members:
                target = os.path.realpath(os.path.join(folder, member.filename))
                if not target.startswith(os.path.realpath(folder) + os.sep):
                    raise InputError(f"{path}: unsafe path {member.filename!r} in the archive")
                if member.flag_bits & 0x1:
                    raise InputError(f"{path}: {member.filename!r} is encrypted; zip the series without a password")
                if member.compress_type not in ZIP_METHODS:
                    raise InputError(f"{path}: {member.filename!r} uses compression method {member.compress_type}, "
                                     f"which cannot be read; zip it with the standard method (deflate)")
            unpacked, packed = sum(m.file_size for m in members), sum(m.compress_size for m in members)
            if len(members) > MAX_ZIP_MEMBERS:
                raise InputError(f"{path}: {len(members):,} files in the archive (at most {MAX_ZIP_MEMBERS:,})")
            if unpacked > max_bytes:
                raise InputError(f"{path}: unpacks to {unpacked:,} bytes, over the limit of {max_bytes:,}")
            if unpacked > ZIP_RATIO_FROM_BYTES and unpacked > MAX_ZIP_RATIO * packed:
                raise InputError(f"{path}: unpacks to {unpacked:,} bytes from {packed:,} (over {MAX_ZIP_RATIO}:1); "
                                 f"refused as a zip bomb")
            for member in members:
                archive.extract(member, folder)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise InputError(f"{path}: unreadable zip ({one_line(str(error))})") from None
    holders = sorted({os.path.dirname(os.path.join(root, name)) for root, _, names in os.walk(folder)
                      for name in names if not name.startswith(".")})
    if len(holders) != 1:
        raise InputError(f"{path}: expected one folder of DICOM files in the zip, found {len(holders)}")
    return holders[0]


def is_multiframe_dicom(path: str) -> bool:
    try:
        return int(_header(path).get("NumberOfFrames", 1) or 1) > 1
    except Exception:  # noqa: BLE001 - an unreadable header is not a multi-frame DICOM
        return False


def is_series_folder(path: str) -> bool:
    """A folder holding a DICOM series of two or more files (other files in it, such as a
    README, are ignored with a warning: the series is one volume, not separate images)."""
    if not os.path.isdir(path):
        return False
    files = [os.path.join(path, n) for n in os.listdir(path) if not n.startswith(".")]
    files = [f for f in files if os.path.isfile(f)]
    dicom = [f for f in files if is_dicom(f)]
    if not dicom:
        return False
    sitk = _quiet_sitk()
    series = any(len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, uid)) > 1
                 for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(path))
    if series and len(dicom) < len(files):
        logger.warning(f"{path}: a DICOM series; its {len(files) - len(dicom)} other file(s) are ignored")
    return series


def _nifti_geometry(path: str, axis: int) -> Geometry:
    import nibabel

    image = nibabel.load(path)
    return Geometry(tuple(image.shape[:3]), np.asarray(image.affine, dtype=float), axis)


def read_input(path: str, window: tuple[float, float] | None = None, axis: int | None = None,
               slice_range: tuple[int, int] | None = None, series_uid: str | None = None,
               max_voxels: int = MAX_VOXELS, single_file: bool = False, framing: Framing | None = None) -> Scan:
    """Read any supported input: images, DICOM (single, multi-frame, series folder or zip), NIfTI,
    NRRD, MetaImage. Volumes are framed by ``framing`` (default: whole slices, the percentile rule)
    with ``window`` and ``axis`` where given, and come back as a ``VolumeScan`` that knows its
    geometry.

    Limits: an input over ``max_voxels`` voxels is refused from its header, before its data are
    read (a zip: from its directory, before it is unpacked); a NRRD/MetaImage header may name a data
    file in its own folder only, and none at all with ``single_file`` (the web page's uploads)."""
    framing = (framing or Framing()).overridden(window, axis)
    if os.path.isdir(path):
        return read_sitk_scan(path, slice_range=slice_range, series_uid=series_uid, max_voxels=max_voxels,
                              framing=framing)
    check_file(path)
    suffix = suffix_of(path)
    if suffix in ZIP_SUFFIXES:
        folder = tempfile.mkdtemp(prefix="medvmad_zip_")
        try:
            scan = read_sitk_scan(_extract_zip(path, folder, ZIP_BYTES_PER_VOXEL * max_voxels),
                                  slice_range=slice_range, series_uid=series_uid, max_voxels=max_voxels,
                                  framing=framing)
        except InputError as error:  # name the zip, not the temporary folder it was unpacked into
            raise InputError(str(error).replace(folder, path)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        scan.path = path
        scan.warnings = [w.replace(folder, path) for w in getattr(scan, "warnings", [])]
        return scan
    if suffix in SITK_SUFFIXES or (suffix not in IMAGE_SUFFIXES + NIFTI_SUFFIXES and is_dicom(path)
                                   and is_multiframe_dicom(path)):
        return read_sitk_scan(path, slice_range=slice_range, series_uid=series_uid, max_voxels=max_voxels,
                              single_file=single_file, framing=framing)
    if suffix not in IMAGE_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES and not is_dicom(path):
        raise InputError(f"{path}: unknown file type '{suffix or 'no extension'}' (expected "
                         f"PNG/JPG/TIFF, DICOM, NIfTI, NRRD, MetaImage, or a zipped DICOM series)")
    scan = read_scan(path, slice_range=slice_range, max_voxels=max_voxels, framing=framing)
    if suffix in NIFTI_SUFFIXES and scan.slice_indices is not None:
        return VolumeScan(**vars(scan), geometry=_nifti_geometry(path, framing.axis))
    return scan


def list_inputs(folder: str) -> list[str]:
    """Supported files directly in ``folder`` (images, DICOM, NIfTI, NRRD, MetaImage, zips), sorted."""
    found = set(list_image_inputs(folder))
    for name in os.listdir(folder):
        if suffix_of(name) in SITK_SUFFIXES + ZIP_SUFFIXES and os.path.isfile(os.path.join(folder, name)):
            found.add(os.path.join(folder, name))
    return sorted(found)


# ----------------------------------------------------------------------------- writing

def map_volume(scan: VolumeScan, maps: list[np.ndarray]) -> np.ndarray:
    """The per-slice maps (each on its displayed slice's grid: ``Scan.unframe``) put back in the
    stored voxel grid [i,j,k]; slices that were not scored are 0."""
    geometry = scan.geometry
    canonical = np.zeros(to_canonical(np.zeros(geometry.shape, np.uint8), geometry.affine).shape, np.float32)
    along = np.moveaxis(canonical, geometry.axis, 0)  # a view
    for index, heat in zip(scan.slice_indices, maps):
        along[index] = np.asarray(heat, np.float32)[::-1, ::-1].T  # the inverse of display()
    return from_canonical(canonical, geometry.affine)


def write_volume(path: str | os.PathLike, stored: np.ndarray, affine: np.ndarray) -> None:
    """Write stored [i,j,k] voxels with a RAS affine's geometry (format by extension). NIfTI is
    written with nibabel, which keeps any affine exactly, a sheared one too (ITK's writer would make
    its axes orthogonal, and the map would no longer overlay its scan)."""
    import nibabel
    import SimpleITK as sitk

    if str(path).endswith(VOLUME_FORMATS["nifti"]):
        image = nibabel.Nifti1Image(stored, affine)
        image.set_qform(affine, code=1)  # scanner coordinates, as ITK writes them; the closest orthogonal
        image.set_sform(affine, code=1)  # form in the qform, the affine itself in the sform
        atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
        return
    tmp = f"{path}.tmp{Path(path).suffix}"
    sitk.WriteImage(to_sitk(stored, affine), tmp, True)
    os.replace(tmp, path)


def write_maps(scan: Scan, maps: list[np.ndarray], threshold: float, save_path: str | os.PathLike,
               stem: str, volume_format: str = "nifti") -> dict[str, str]:
    """Write the anomaly map and its mask at ``threshold`` on the input's own grid; return the paths.

    2-D input: <stem>_map.png (16-bit, 0-65535 = 0-1) and <stem>_mask.png (0/255), at the input's size.
    Volume: <stem>_map and <stem>_mask as NIfTI (.nii.gz) or NRRD, same size/spacing/origin/direction.
    """
    save_path = Path(save_path)
    if scan.slice_indices is None or getattr(scan, "geometry", None) is None:
        heat = np.clip(np.asarray(maps[0], np.float32), 0, 1)
        paths = {"map_png": str(save_path / f"{stem}_map.png"), "mask_png": str(save_path / f"{stem}_mask.png")}
        atomic_write_image(paths["map_png"], (heat * 65535).round().astype(np.uint16))
        atomic_write_image(paths["mask_png"], ((heat >= threshold) * 255).astype(np.uint8))
        return paths
    suffix = VOLUME_FORMATS[volume_format]
    stored = map_volume(scan, maps)
    paths = {"map_volume": str(save_path / f"{stem}_map{suffix}"),
             "mask_volume": str(save_path / f"{stem}_mask{suffix}")}
    write_volume(paths["map_volume"], stored, scan.geometry.affine)
    write_volume(paths["mask_volume"], (stored >= threshold).astype(np.uint8), scan.geometry.affine)
    return paths
