"""Read what users score, one file at a time: PNG/JPG/TIFF images, DICOM files and NIfTI volumes, as
[0,1] RGB slices (``read_scan`` -> ``Scan``); series folders and other volume formats are
scans/volumes.py's.

Intensity rules (documented in the README):
- PNG/JPG/TIFF: 8-bit / 255, 16-bit / 65535 (as ``dataset.load_image``, i.e. as in training).
- DICOM: the modality LUT (rescale slope/intercept, so CT is in HU), then a window: ``--window LOW
  HIGH``, a preset, or the file's own WindowCenter/Width; without any, the 0.5-99.5 percentiles.
  MONOCHROME1 is inverted so that dense tissue is bright.
- Any NaN or infinite value (float TIFF/DICOM/NIfTI) refuses the file, naming it.
- Volumes are framed by scans/framing.py's rule. A 2-D NIfTI is kept as stored.
- Size: an image or volume over ``max_voxels`` (default ``MAX_VOXELS``) is refused from its header,
  before its data is read.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from dataset import IMAGE_SUFFIXES, load_image
from scans.framing import Framing, Placement, frame_volume, scale_intensity, uint8_to_rgb
from utils import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
MAX_VOXELS = 2**28  # 512 x 512 x 1024, 1 GiB as float32: the most voxels (pixels) one input may hold


@dataclass
class Scan:
    path: str
    slices: list[np.ndarray]            # each float32 [H,W,3] in [0,1]
    slice_indices: list[int] | None     # volume slice numbers; None for a 2-D image
    framing: Framing | None = None      # a volume's: how its slices were framed
    placement: Placement | None = None  # where its framed slices lie in the displayed slices (None: whole)
    slice_count: int | None = None      # a volume's slices along the framing's axis, scored or not

    def unframe(self, heat: np.ndarray) -> np.ndarray:
        """The map of one of ``slices`` on its displayed slice's grid (as it is for whole slices)."""
        return heat if self.placement is None else self.placement.unframe(heat)


def suffix_of(path: str) -> str:
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def is_dicom(path: str) -> bool:
    if suffix_of(path) in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def is_supported(path: str) -> bool:
    """A file this module can read (by extension, or the DICOM preamble for extension-less files)."""
    suffix = suffix_of(path)
    return suffix in IMAGE_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES or (suffix == "" and is_dicom(path))


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


def check_voxel_count(path: str, shape: tuple[int, ...], max_voxels: int) -> None:
    """Refuse an input whose header says it holds more than ``max_voxels`` voxels (or pixels),
    before any of its data is read."""
    count = math.prod(int(size) for size in shape)
    if count > max_voxels:
        raise InputError(f"{path}: {' x '.join(str(int(s)) for s in shape)} = {count:,} voxels, over the limit of "
                         f"{max_voxels:,}; crop or downsample it (or raise --max_voxels)")


def check_affine(path: str, affine: np.ndarray) -> None:
    """Refuse a volume whose voxel-to-world matrix is not finite or is singular (a zero or repeated
    axis): it has no orientation to slice it by."""
    if not np.isfinite(affine).all():
        raise InputError(f"{path}: its affine (voxel-to-world matrix) holds NaN or infinite values; fix its header")
    if np.linalg.matrix_rank(np.asarray(affine, dtype=float)[:3, :3]) < 3:
        raise InputError(f"{path}: its affine (voxel-to-world matrix) is singular (a zero or repeated axis); "
                         f"fix its header")


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2)


def _dicom_number(data: Dataset, keyword: str, path: str) -> float | None:
    """The first value of a numeric DICOM attribute; None when absent; a value that is not a finite
    number is refused, naming the file and the attribute."""
    if keyword not in data:
        return None
    stored = data[keyword].value
    try:
        value = float(np.atleast_1d(stored)[0])
    except (TypeError, ValueError, IndexError):
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"{path}: its {keyword} {stored!r} is not a finite number; fix the file"
                         + (" or give --window LOW HIGH" if keyword.startswith("Window") else ""))
    return value


def dicom_window(data: Dataset, path: str) -> tuple[float, float] | None:
    """The window a DICOM file asks for (its first WindowCenter/WindowWidth) as (low, high); None
    without one. A value that is not a finite number, or a width <= 0, is refused naming the file."""
    center, width = _dicom_number(data, "WindowCenter", path), _dicom_number(data, "WindowWidth", path)
    if center is None or width is None:
        return None
    if width <= 0:
        raise InputError(f"{path}: its WindowWidth {width:g} is not > 0; fix the file or give --window LOW HIGH")
    return center - width / 2, center + width / 2


def check_rescale(data: Dataset, path: str) -> None:
    """Refuse a DICOM file whose RescaleSlope/RescaleIntercept is not a finite number, or whose
    slope is 0 (every pixel would be one value: a blank image scored as normal)."""
    slope = _dicom_number(data, "RescaleSlope", path)
    _dicom_number(data, "RescaleIntercept", path)
    if slope == 0:
        raise InputError(f"{path}: its RescaleSlope is 0 (every pixel would be one value); fix the file")


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's logger: it logs a decoder failure's traceback, and we report one line."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        pydicom_log.setLevel(level)


def _read_dicom(path: str, window: tuple[float, float] | None, max_voxels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    with quiet_pydicom():
        try:
            data = pydicom.dcmread(path, defer_size=1 << 20)  # the pixel data is read when it is used
            size = (int(data.get("NumberOfFrames", 1) or 1), int(data.get("Rows", 0)), int(data.get("Columns", 0)))
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for a damaged or non-DICOM file
            raise InputError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from None
        check_voxel_count(path, size, max_voxels)
        check_rescale(data, path)
        window = window or dicom_window(data, path)
        try:
            pixels = data.pixel_array
        except Exception as error:  # noqa: BLE001 - pydicom's pixel decoders raise many types
            raise InputError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from None
    _check_finite(pixels, path)
    if pixels.ndim == 3 and data.get("SamplesPerPixel", 1) == 3:
        if not np.issubdtype(pixels.dtype, np.integer):
            raise InputError(f"{path}: RGB pixel data of type {pixels.dtype}; only 8- or 16-bit integer RGB is read")
        return (pixels.astype(np.float32) / np.iinfo(pixels.dtype).max).clip(0, 1)
    if pixels.ndim != 2:
        raise InputError(f"{path}: multi-frame DICOM with shape {pixels.shape}; export one frame per file")
    values = _check_finite(apply_modality_lut(pixels, data).astype(np.float32), path)
    image = apply_window(values, *(window or percentile_window(values)))
    if data.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 1.0 - image
    return _gray_to_rgb(image)


def _read_nifti(path: str, framing: Framing, slice_range: tuple[int, int] | None, max_voxels: int) -> Scan:
    import nibabel
    from nibabel.orientations import apply_orientation, io_orientation

    try:
        image = nibabel.load(path)  # the header only: the voxels are read below, once the size is known
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a damaged header
        raise InputError(f"{path}: unreadable NIfTI ({type(error).__name__}: {error})") from None
    shape = tuple(int(size) for size in image.shape)
    while len(shape) > 2 and shape[-1] == 1:  # [X,Y,1] is a 2-D image, [X,Y,Z,1] a volume
        shape = shape[:-1]
    if math.prod(shape) == 0:
        raise InputError(f"{path}: empty volume")
    if len(shape) < 2:
        raise InputError(f"{path}: a 1-D NIfTI of {shape[0]} values; an image has 2 or 3 dimensions")
    if len(shape) > 3:
        raise InputError(f"{path}: {len(shape)}-D volume {shape}; extract one 3-D volume first")
    check_voxel_count(path, shape, max_voxels)
    if len(shape) == 3:
        check_affine(path, image.affine)
    try:
        volume = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:  # noqa: BLE001 - nibabel and gzip raise many types for damaged voxel data
        raise InputError(f"{path}: unreadable NIfTI ({type(error).__name__}: {error})") from None
    _check_finite(volume, path)
    if volume.ndim == 2:  # a 2-D image: kept as stored, like a PNG of the same array
        return Scan(path, [_gray_to_rgb(scale_to_unit(volume, framing.window, path))], None)
    # As the converters write BMAD slices: RAS orientation (nibabel's as_closest_canonical), framed.
    canonical = apply_orientation(volume, io_orientation(image.affine))
    slices, indices, placement = frame_volume(canonical, framing, path, slice_range)
    return Scan(path, [uint8_to_rgb(s) for s in slices], indices, framing, placement, canonical.shape[framing.axis])


def scale_to_unit(values: np.ndarray, window: tuple[float, float] | None, path: str) -> np.ndarray:
    """A 2-D image's intensities -> [0,1]: the window when given, else the BraTS converter's rule
    (0.5-99.5 percentiles of pixels > 0 to 0-255, background 0)."""
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


def check_image_size(path: str, max_voxels: int) -> None:
    """Refuse a PNG/JPG/TIFF whose header says it holds more than ``max_voxels`` pixels, before
    decoding it (Pillow reads only the header; its own decompression-bomb limit also refuses)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as error:
        raise InputError(f"{path}: {error}") from None
    except Exception:  # noqa: BLE001 - not readable by Pillow: the image reader reports it
        return
    check_voxel_count(path, (height, width), max_voxels)


def read_scan(path: str, window: tuple[float, float] | None = None, axis: int | None = None,
              slice_range: tuple[int, int] | None = None, max_voxels: int = MAX_VOXELS,
              framing: Framing | None = None) -> Scan:
    """Read one image, DICOM file or NIfTI volume; bad input raises ``InputError`` naming the path,
    and one over ``max_voxels`` is refused before its data is read. A volume is framed by
    ``framing`` (default: whole slices, the percentile rule) with ``window`` and ``axis`` where
    given; DICOM and 2-D NIfTI files take its window too."""
    check_file(path)
    framing = (framing or Framing()).overridden(window, axis)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, framing, slice_range, max_voxels)
    if suffix in IMAGE_SUFFIXES:
        check_image_size(path, max_voxels)
        return Scan(path, [load_image(path)], None)
    if is_dicom(path):
        return Scan(path, [_read_dicom(path, framing.window, max_voxels)], None)
    raise InputError(f"{path}: unknown file type '{suffix or 'no extension'}' "
                     f"(PNG/JPG/TIFF, DICOM or NIfTI expected)")
