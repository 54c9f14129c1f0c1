"""Volumes in and out: every scalar volume 3D Slicer opens, read with SimpleITK (NIfTI with nibabel,
as ``medical_io`` does), sliced as the BMAD converters slice, and maps written back on the input's grid.

Formats: NIfTI (.nii, .nii.gz; read by ``medical_io``), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd),
a DICOM series (a folder, or a .zip of one: files sorted by position by GDCM, several series told
apart by SeriesInstanceUID), and multi-frame DICOM files.

Orientation: any volume is described by its voxel array in stored index order [i,j,k] and its RAS
affine (nibabel's convention; SimpleITK's LPS geometry is converted with diag(-1,-1,1)). The array is
turned to the closest RAS orientation with nibabel's own ``io_orientation``/``apply_orientation``
(what ``nibabel.as_closest_canonical`` does), then sliced with ``generate_dataset.common.display``,
so a NRRD or DICOM series of the same voxels gives the same slices as the NIfTI path. Writing goes the
other way with the inverse orientation, and the written map has the input's size, spacing, origin and
direction.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from generate_dataset.common import display
from medical_io import (DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, Scan, _is_dicom, _scale, _suffix, check_file,
                        list_inputs as list_image_inputs, percentile_window, read_scan)
from utils import InputError

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
ZIP_SUFFIXES = (".zip",)
VOLUME_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GAP_FACTOR = 1.5  # a step between slice positions over 1.5x the typical step is a gap

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

def canonical_slices(path: str, canonical: np.ndarray, window: tuple[float, float] | None, axis: int,
                     slice_range: tuple[int, int] | None) -> tuple[list[np.ndarray], list[int]]:
    """RGB [0,1] slices of a RAS volume along ``axis``, scaled and shown as the NIfTI path does."""
    if not 0 <= axis < 3:
        raise InputError(f"--axis {axis}: a 3-D volume has axes 0, 1, 2")
    scaled = _scale(canonical.astype(np.float32), window, path)
    count = scaled.shape[axis]
    first, last = slice_range if slice_range else (0, count - 1)
    if not 0 <= first <= last < count:
        raise InputError(f"--slices {first} {last}: the volume has slices 0..{count - 1} along axis {axis}")
    indices = list(range(first, last + 1))
    slices = [np.repeat(display(np.take(scaled, index, axis=axis))[..., None], 3, axis=2) for index in indices]
    return slices, indices


def _check_voxels(path: str, voxels: np.ndarray) -> None:
    if voxels.size == 0:
        raise InputError(f"{path}: empty volume")
    bad = int(np.size(voxels) - np.count_nonzero(np.isfinite(voxels)))
    if bad:
        raise InputError(f"{path}: {bad} of {voxels.size} voxels are NaN or infinite; fix or mask them first")


@dataclass
class DicomDisplay:
    """How a DICOM file asks to be shown: its own WindowCenter/Width (first value), as the
    single-file DICOM path uses, and whether it is MONOCHROME1 (the lowest value shown white)."""
    window: tuple[float, float] | None = None
    inverted: bool = False


def _dicom_display(path: str) -> DicomDisplay:
    import pydicom

    data = pydicom.dcmread(path, stop_before_pixels=True)
    window = None
    if "WindowCenter" in data and "WindowWidth" in data:
        center = float(np.atleast_1d(data.WindowCenter)[0])
        width = float(np.atleast_1d(data.WindowWidth)[0])
        window = (center - width / 2, center + width / 2)
    return DicomDisplay(window, data.get("PhotometricInterpretation") == "MONOCHROME1")


def _stored_values(files: list[str], like) -> object | None:
    """A SimpleITK image of the files' own modality values (pydicom: stored pixels through the
    rescale), on ``like``'s grid; None when pydicom cannot decode them (a compressed transfer
    syntax without its decoder). GDCM inverts MONOCHROME1 pixels as it reads them, which leaves
    values the file's window does not describe; pydicom never inverts."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    sitk = _quiet_sitk()
    pydicom_log = logging.getLogger("pydicom")  # it logs a decoder failure's traceback
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    frames = []
    try:
        for file in files:
            data = pydicom.dcmread(file)
            frames.append(np.asarray(apply_modality_lut(data.pixel_array, data), dtype=np.float32))
    except Exception:
        return None
    finally:
        pydicom_log.setLevel(level)
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


def slice_positions(files: list[str]) -> np.ndarray | None:
    """Each sorted file's position along the slice normal (mm); None without the position tags."""
    import pydicom

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if any("ImagePositionPatient" not in h or "ImageOrientationPatient" not in h for h in headers):
        return None
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return np.array([np.dot(np.array(h.ImagePositionPatient, dtype=float), normal) for h in headers])


def series_gaps(files: list[str], positions: np.ndarray | None) -> tuple[list[str], float]:
    """Gaps in a sorted series' slice positions, one sentence each, and the typical slice step."""
    if positions is None or len(positions) < 3:
        return [], 0.0
    steps = np.diff(positions)
    typical = float(np.median(np.abs(steps)))
    gaps = []
    for index in np.flatnonzero(np.abs(steps) > GAP_FACTOR * typical):
        missing = int(round(abs(steps[index]) / typical)) - 1
        gaps.append(f"{missing} missing slice(s) between position {positions[index]:.2f} mm "
                    f"({os.path.basename(files[index])}) and {positions[index + 1]:.2f} mm "
                    f"({os.path.basename(files[index + 1])}), filled with blank slices; "
                    f"the slice step is {typical:.2f} mm")
    return gaps, typical


def _fill_gaps(image, positions: np.ndarray, step: float, inverted: bool = False):
    """Put each slice of a gapped series at its own position on a uniform grid (blank slices between:
    the lowest value, the highest in a MONOCHROME1 series, where it shows black), so maps written
    back overlay the series exactly (ITK would stretch the spacing over the gap)."""
    import SimpleITK as sitk

    voxels = sitk.GetArrayFromImage(image)  # [k,j,i]
    places = np.round(np.abs(positions - positions[0]) / step).astype(int)
    blank = voxels.max() if inverted else voxels.min()
    filled = np.full((places[-1] + 1,) + voxels.shape[1:], blank, voxels.dtype)
    filled[places] = voxels
    result = sitk.GetImageFromArray(filled)
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    result.SetSpacing(image.GetSpacing()[:2] + (step,))
    return result


def _read_sitk(path: str, series_uid: str | None) -> tuple[object, list[str], DicomDisplay]:
    """A SimpleITK image of a file or DICOM series folder, with warnings and, for DICOM, how it asks
    to be shown (window, MONOCHROME1)."""
    sitk = _quiet_sitk()
    warnings: list[str] = []
    shown = DicomDisplay()
    try:
        if os.path.isdir(path):
            files = dicom_series(path, series_uid)
            positions = slice_positions(files)
            gaps, step = series_gaps(files, positions)
            warnings = [f"{path}: {gap}" for gap in gaps]
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
            shown = _dicom_display(files[0])
            if shown.inverted:
                image, shown, undecoded = _monochrome1_values(path, files, image, shown)
                warnings += undecoded
            if gaps:
                image = _fill_gaps(image, positions, step, shown.inverted)
        else:
            image = sitk.ReadImage(path)
            if _suffix(path) not in SITK_SUFFIXES + NIFTI_SUFFIXES and _is_dicom(path):
                shown = _dicom_display(path)
                if shown.inverted:
                    image, shown, undecoded = _monochrome1_values(path, [path], image, shown)
                    warnings += undecoded
    except InputError:
        raise
    except Exception as error:  # SimpleITK raises RuntimeError with a multi-line ITK report
        first = str(error).strip().splitlines()
        reason = next((line.strip() for line in first if "ERROR" in line or "rror" in line), type(error).__name__)
        reason = re.sub(r"\(0x[0-9a-f]+\)", "", reason)  # ITK prints object addresses
        raise InputError(f"{path}: unreadable volume ({reason[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel; "
                         f"scalar volumes only (save one channel)")
    if image.GetDimension() == 4 or (image.GetDimension() > 3):
        raise InputError(f"{path}: 4-D volume of size {image.GetSize()}; extract one 3-D volume first")
    return image, warnings, shown


def read_sitk_scan(path: str, window: tuple[float, float] | None = None, axis: int = 2,
                   slice_range: tuple[int, int] | None = None, series_uid: str | None = None) -> Scan:
    """Read a volume (or a 2-D image) with SimpleITK and slice it as the NIfTI path does."""
    image, warnings, shown = _read_sitk(path, series_uid)
    sitk = _quiet_sitk()
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)  # [k,j,i] (or [j,i] for 2-D)
    _check_voxels(path, voxels)
    window = window or shown.window
    if image.GetDimension() == 2:  # a 2-D image: rows and columns as stored
        scaled = _scale(voxels, window, path)
        return Scan(path, [np.repeat((1 - scaled if shown.inverted else scaled)[..., None], 3, axis=2)], None)
    stored, affine = voxels.transpose(2, 1, 0), sitk_affine(image)
    slices, indices = canonical_slices(path, to_canonical(stored, affine), window, axis, slice_range)
    if shown.inverted:  # MONOCHROME1: the lowest value is shown white
        slices = [1 - s for s in slices]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return VolumeScan(path, slices, indices, Geometry(stored.shape, affine, axis), warnings)


def _extract_zip(path: str, folder: str) -> str:
    """Unpack a zipped DICOM series safely; return the folder holding its files."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                target = os.path.realpath(os.path.join(folder, member.filename))
                if not target.startswith(os.path.realpath(folder) + os.sep):
                    raise InputError(f"{path}: unsafe path {member.filename!r} in the archive")
            archive.extractall(folder)
    except zipfile.BadZipFile as error:
        raise InputError(f"{path}: unreadable zip ({error})") from None
    holders = sorted({os.path.dirname(os.path.join(root, name)) for root, _, names in os.walk(folder)
                      for name in names if not name.startswith(".")})
    if len(holders) != 1:
        raise InputError(f"{path}: expected one folder of DICOM files in the zip, found {len(holders)}")
    return holders[0]


def is_multiframe_dicom(path: str) -> bool:
    import pydicom

    try:
        return int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) > 1
    except Exception:
        return False


def is_series_folder(path: str) -> bool:
    """A folder holding a DICOM series of two or more files (other files in it, such as a
    README, are ignored with a warning: the series is one volume, not separate images)."""
    if not os.path.isdir(path):
        return False
    files = [os.path.join(path, n) for n in os.listdir(path) if not n.startswith(".")]
    files = [f for f in files if os.path.isfile(f)]
    dicom = [f for f in files if _is_dicom(f)]
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


def read_input(path: str, window: tuple[float, float] | None = None, axis: int = 2,
               slice_range: tuple[int, int] | None = None, series_uid: str | None = None) -> Scan:
    """Read any supported input: images, DICOM (single, multi-frame, series folder or zip), NIfTI,
    NRRD, MetaImage. Volumes come back as a ``VolumeScan`` that knows its geometry."""
    if os.path.isdir(path):
        return read_sitk_scan(path, window, axis, slice_range, series_uid)
    check_file(path)
    suffix = _suffix(path)
    if suffix in ZIP_SUFFIXES:
        folder = tempfile.mkdtemp(prefix="medvmad_zip_")
        try:
            scan = read_sitk_scan(_extract_zip(path, folder), window, axis, slice_range, series_uid)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        scan.path = path
        scan.warnings = [w.replace(folder, path) for w in getattr(scan, "warnings", [])]
        return scan
    if suffix in SITK_SUFFIXES or (suffix not in IMAGE_SUFFIXES + NIFTI_SUFFIXES and _is_dicom(path)
                                   and is_multiframe_dicom(path)):
        return read_sitk_scan(path, window, axis, slice_range, series_uid)
    if suffix not in IMAGE_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES and not _is_dicom(path):
        raise InputError(f"{path}: unknown file type '{suffix or 'no extension'}' (expected "
                         f"PNG/JPG/TIFF, DICOM, NIfTI, NRRD, MetaImage, or a zipped DICOM series)")
    scan = read_scan(path, window, axis, slice_range)
    if suffix in NIFTI_SUFFIXES and scan.slice_indices is not None:
        return VolumeScan(scan.path, scan.slices, scan.slice_indices, _nifti_geometry(path, axis))
    return scan


def list_inputs(folder: str) -> list[str]:
    """Supported files directly in ``folder`` (images, DICOM, NIfTI, NRRD, MetaImage, zips), sorted."""
    found = set(list_image_inputs(folder))
    for name in os.listdir(folder):
        if _suffix(name) in SITK_SUFFIXES + ZIP_SUFFIXES and os.path.isfile(os.path.join(folder, name)):
            found.add(os.path.join(folder, name))
    return sorted(found)


# ----------------------------------------------------------------------------- writing

def map_volume(scan: VolumeScan, maps: list[np.ndarray]) -> np.ndarray:
    """The per-slice maps (each shown as its slice is) put back in the stored voxel grid [i,j,k];
    slices that were not scored are 0."""
    geometry = scan.geometry
    canonical = np.zeros(to_canonical(np.zeros(geometry.shape, np.uint8), geometry.affine).shape, np.float32)
    along = np.moveaxis(canonical, geometry.axis, 0)  # a view
    for index, heat in zip(scan.slice_indices, maps):
        along[index] = np.asarray(heat, np.float32)[::-1, ::-1].T  # the inverse of display()
    return from_canonical(canonical, geometry.affine)


def write_volume(path: str | os.PathLike, stored: np.ndarray, affine: np.ndarray) -> None:
    """Write stored [i,j,k] voxels with a RAS affine's geometry (format by extension)."""
    import SimpleITK as sitk

    tmp = f"{path}.tmp{VOLUME_FORMATS['nifti'] if str(path).endswith('.nii.gz') else Path(path).suffix}"
    sitk.WriteImage(to_sitk(stored, affine), tmp, True)
    os.replace(tmp, path)


def write_maps(scan: Scan, maps: list[np.ndarray], threshold: float, save_path: str | os.PathLike,
               stem: str, volume_format: str = "nifti") -> dict[str, str]:
    """Write the anomaly map and its mask at ``threshold`` on the input's own grid; return the paths.

    2-D input: <stem>_map.png (16-bit, 0-65535 = 0-1) and <stem>_mask.png (0/255), at the input's size.
    Volume: <stem>_map and <stem>_mask as NIfTI (.nii.gz) or NRRD, same size/spacing/origin/direction.
    """
    import cv2

    save_path = Path(save_path)
    if scan.slice_indices is None or getattr(scan, "geometry", None) is None:
        heat = np.clip(np.asarray(maps[0], np.float32), 0, 1)
        paths = {"map_png": str(save_path / f"{stem}_map.png"), "mask_png": str(save_path / f"{stem}_mask.png")}
        cv2.imwrite(paths["map_png"], (heat * 65535).round().astype(np.uint16))
        cv2.imwrite(paths["mask_png"], ((heat >= threshold) * 255).astype(np.uint8))
        return paths
    suffix = VOLUME_FORMATS[volume_format]
    stored = map_volume(scan, maps)
    paths = {"map_volume": str(save_path / f"{stem}_map{suffix}"),
             "mask_volume": str(save_path / f"{stem}_mask{suffix}")}
    write_volume(paths["map_volume"], stored, scan.geometry.affine)
    write_volume(paths["mask_volume"], (stored >= threshold).astype(np.uint8), scan.geometry.affine)
    return paths


__all__ = ["Geometry", "VolumeScan", "read_input", "list_inputs", "write_maps", "map_volume",
           "is_series_folder", "SITK_SUFFIXES"]
