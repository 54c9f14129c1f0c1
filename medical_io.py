"""Read what users score: PNG/JPG/TIFF images, DICOM files and NIfTI volumes, as [0,1] RGB slices.

Intensity rules (documented in the README):
- PNG/JPG/TIFF: 8-bit / 255, 16-bit / 65535 (as ``dataset.load_image``, i.e. as in training).
- DICOM: the modality LUT (rescale slope/intercept, so CT is in HU), then a window: ``--window LOW
  HIGH``, a preset, or the file's own WindowCenter/Width; without any, the 0.5-99.5 percentiles.
  MONOCHROME1 is inverted so that dense tissue is bright.
- Any NaN or infinite value (float TIFF/DICOM/NIfTI) refuses the file, naming it.
- NIfTI: ``--window`` or a preset when given; otherwise the BraTS converter's rule (0.5-99.5
  percentiles of the voxels > 0, background 0), so every slice shares one scale. Volumes are turned
  to RAS and their slices shown as the converters write them (anterior or superior up, patient's
  right on the left), so a raw volume's slice scores as its converted PNG does; a 2-D NIfTI is kept
  as stored.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from dataset import load_image
from generate_dataset.common import display, scale_intensity
from utils import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")

# name -> (low, high) in the file's units (HU for CT)
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),        # CT brain, W80 L40
    "liver": (-200.0, 250.0),    # BMAD Liver-CT window
    "abdomen": (-160.0, 240.0),  # W400 L40
    "lung": (-1350.0, 150.0),    # W1500 L-600
    "bone": (-450.0, 1050.0),    # W1500 L300
}


@dataclass
class Scan:
    path: str
    slices: list[np.ndarray]            # each float32 [H,W,3] in [0,1]
    slice_indices: list[int] | None     # volume slice numbers; None for a 2-D image


def _suffix(path: str) -> str:
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def _is_dicom(path: str) -> bool:
    if _suffix(path) in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def is_supported(path: str) -> bool:
    """A file this module can read (by extension, or the DICOM preamble for extension-less files)."""
    suffix = _suffix(path)
    return suffix in IMAGE_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES or (suffix == "" and _is_dicom(path))


def list_inputs(folder: str) -> list[str]:
    """Supported files directly in ``folder``, sorted."""
    files = [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    return [path for path in files if os.path.isfile(path) and is_supported(path)]


def apply_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to [0, 1] (float32)."""
    if high <= low:
        raise InputError(f"window [{low}, {high}] is empty: HIGH must exceed LOW")
    return ((np.clip(values.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of ``values``."""
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def _check_finite(values: np.ndarray, path: str) -> np.ndarray:
    """``values`` unchanged; a NaN or infinite value is refused, naming the file (a window or the
    percentiles would otherwise turn the whole scan black and call it normal)."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(f"{path}: holds {bad} NaN or infinite value(s) of {values.size}; fix or remove the file")
    return values


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2)


def _read_dicom(path: str, window: tuple[float, float] | None) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    pydicom_log = logging.getLogger("pydicom")  # it logs a decoder failure's traceback; we report one line
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    try:
        data = pydicom.dcmread(path)
        pixels = data.pixel_array
    except Exception as error:
        raise InputError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from None
    finally:
        pydicom_log.setLevel(level)
    _check_finite(pixels, path)
    if pixels.ndim == 3 and data.get("SamplesPerPixel", 1) == 3:
        return (pixels.astype(np.float32) / np.iinfo(pixels.dtype).max).clip(0, 1)
    if pixels.ndim != 2:
        raise InputError(f"{path}: multi-frame DICOM with shape {pixels.shape}; export one frame per file")
    values = _check_finite(apply_modality_lut(pixels, data).astype(np.float32), path)
    if window is None and "WindowCenter" in data and "WindowWidth" in data:
        center = float(np.atleast_1d(data.WindowCenter)[0])
        width = float(np.atleast_1d(data.WindowWidth)[0])
        window = (center - width / 2, center + width / 2)
    image = apply_window(values, *(window or percentile_window(values)))
    if data.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 1.0 - image
    return _gray_to_rgb(image)


def _read_nifti(path: str, window: tuple[float, float] | None, axis: int,
                slice_range: tuple[int, int] | None) -> Scan:
    import nibabel

    try:
        image = nibabel.load(path)
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise InputError(f"{path}: unreadable NIfTI ({type(error).__name__}: {error})") from None
    _check_finite(volume, path)
    while volume.ndim > 2 and volume.shape[-1] == 1:  # [X,Y,1] is a 2-D image, [X,Y,Z,1] a volume
        volume = volume[..., 0]
    if volume.size == 0:
        raise InputError(f"{path}: empty volume")
    if volume.ndim == 4:
        raise InputError(f"{path}: 4-D volume {volume.shape}; extract one 3-D volume first")
    if volume.ndim == 2:  # a 2-D image: kept as stored, like a PNG of the same array
        return Scan(path, [_gray_to_rgb(_scale(volume, window, path))], None)
    if not 0 <= axis < 3:
        raise InputError(f"--axis {axis}: a 3-D volume has axes 0, 1, 2")
    # As the converters write BMAD slices: RAS orientation, shown anterior/superior up.
    canonical = np.asarray(nibabel.as_closest_canonical(image).dataobj, dtype=np.float32)
    scaled = _scale(canonical.reshape(canonical.shape[:3]), window, path)  # drops a trailing 1
    count = scaled.shape[axis]
    first, last = slice_range if slice_range else (0, count - 1)
    if not 0 <= first <= last < count:
        raise InputError(f"--slices {first} {last}: the volume has slices 0..{count - 1} along axis {axis}")
    indices = list(range(first, last + 1))
    slices = [_gray_to_rgb(display(np.take(scaled, index, axis=axis))) for index in indices]
    return Scan(path, slices, indices)


def _scale(values: np.ndarray, window: tuple[float, float] | None, path: str) -> np.ndarray:
    """NIfTI intensities -> [0,1]: the window when given, else the BraTS converter's rule (0.5-99.5
    percentiles of voxels > 0 to 0-255, background 0), so slices look as in training."""
    if window is not None:
        return apply_window(values, *window)
    try:
        return scale_intensity(values).astype(np.float32) / 255
    except InputError:
        raise InputError(f"{path}: no voxel > 0 to scale; pass --window LOW HIGH "
                         f"(or --window_preset liver for CT)") from None


def check_file(path: str) -> None:
    """An ``InputError`` naming ``path`` unless it is a non-empty file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")


def read_scan(path: str, window: tuple[float, float] | None = None, axis: int = 2,
              slice_range: tuple[int, int] | None = None) -> Scan:
    """Read one image, DICOM file or NIfTI volume; bad input raises ``InputError`` naming the path."""
    check_file(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, window, axis, slice_range)
    if suffix in IMAGE_SUFFIXES:
        return Scan(path, [load_image(path)], None)
    if _is_dicom(path):
        return Scan(path, [_read_dicom(path, window)], None)
    raise InputError(f"{path}: unknown file type '{suffix or 'no extension'}' "
                     f"(PNG/JPG/TIFF, DICOM or NIfTI expected)")
