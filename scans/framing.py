"""The one framing rule that turns a volume into the slices a model sees (converters, the single-scan
path and the page use it; converters record it, checkpoints store it).

- Volumes are framed by a ``Framing`` (``frame_volume``): turned to RAS, scaled to uint8 (a window, or
  the BraTS converter's rule: 0.5-99.5 percentiles of the voxels > 0, background 0), sliced along
  an axis and shown as the converters write slices (anterior or superior up, patient's right on the
  left), the slices with enough foreground kept, optionally cropped to the volume's foreground,
  padded square and resized; so a raw volume's slice scores as its converted PNG does.
- A data root's framing is recorded by its converter (``FRAMING_RECORDS``); ``framing_mismatch``
  says when a checkpoint's training slices were framed otherwise.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from utils import InputError, one_line

# name -> (low, high) in the file's units (HU for CT)
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),        # CT brain, W80 L40
    "liver": (-200.0, 250.0),    # BMAD Liver-CT window
    "abdomen": (-160.0, 240.0),  # W400 L40
    "lung": (-1350.0, 150.0),    # W1500 L-600
    "bone": (-450.0, 1050.0),    # W1500 L300
}


FRAMING_RECORDS = ("demo.json", "split.json")  # the files in a data root where a converter records its framing
MAX_FRAMED_SIZE = 4096
logger = logging.getLogger("medvmad")


# ----------------------------------------------------------------------------- the framing rule

def display(slice_2d: np.ndarray) -> np.ndarray:
    """RAS slice [a,b] -> image [rows,cols] as the converters write slices: the second axis up
    (anterior for an axial slice), the first from right to left (patient's right on the left)."""
    return np.ascontiguousarray(slice_2d.T[::-1, ::-1])


def scale_intensity(volume: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                    white_level: float = 1.0) -> np.ndarray:
    """MRI volume -> uint8, the BraTS converter's rule: the brain voxels' (> 0) percentiles [low, high]
    go to grey levels [0, ``white_level``] (brighter voxels up to white, 255); background 0."""
    brain = volume > 0
    if not brain.any():
        raise InputError("volume holds no brain voxels (all <= 0)")
    low, high = np.percentile(volume[brain], [low_pct, high_pct])
    scaled = np.clip((volume - low) / max(high - low, 1e-6) * white_level, 0, 1) * 255
    return np.where(brain, np.rint(scaled), 0).astype(np.uint8)


def window_to_uint8(values: np.ndarray, low: float, high: float, white_level: float = 1.0) -> np.ndarray:
    """Values -> uint8: the window [low, high] goes to grey levels [0, ``white_level``] (brighter
    values up to white, 255), values below it to 0."""
    if high <= low:
        raise InputError(f"window [{low}, {high}] is empty: HIGH must exceed LOW")
    values = np.asarray(values, dtype=np.float32)
    scaled = np.clip((values - np.float32(low)) / np.float32(high - low) * np.float32(white_level), 0, 1)
    return np.rint(scaled * 255).astype(np.uint8)


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"framing.{key} {value!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


@dataclass(frozen=True)
class Framing:
    """How a volume becomes the 2-D slices a model sees (``frame_volume``), in this order:

    1. intensity to uint8: the ``window`` (low, high), or the percentile rule (``scale_intensity``)
       when None; the window's top or the 99.5th percentile becomes grey level ``white_level``
       (brighter voxels keep their contrast up to white);
    2. the volume, turned to RAS, is sliced along ``axis`` (2 axial, 1 coronal, 0 sagittal), each
       slice shown as ``display`` shows it;
    3. kept: the slices in ``slice_range`` (first, last along ``axis``, both included; None: all),
       without those holding no foreground (pixels > 0) when ``skip_empty``, and whose foreground
       covers at least ``min_area`` of the largest one's (0: every slice);
    4. ``size`` None: the whole slices as they are; else each kept slice is cropped to the
       foreground box of all kept slices, padded evenly to a square of side int(longer side x
       (1 + 2 ``margin``)) and resized to ``size`` x ``size`` (area interpolation).

    ``masked`` names a region the converter kept alone with the help of a label (``"liver"``: every
    voxel outside the liver zeroed), which a scan scored without its label cannot repeat.
    """
    axis: int = 2
    window: tuple[float, float] | None = None
    white_level: float = 1.0
    min_area: float = 0.0
    size: int | None = None
    margin: float = 0.06
    slice_range: tuple[int, int] | None = None
    skip_empty: bool = False
    masked: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the window as a list)."""
        values = asdict(self)
        values["window"] = None if self.window is None else [float(v) for v in self.window]
        values["slice_range"] = None if self.slice_range is None else [int(v) for v in self.slice_range]
        return values

    @classmethod
    def from_dict(cls, values: Any) -> Framing:
        """A framing read from a file (demo.json, split.json, a checkpoint); a ValueError names the
        first key that is unknown or holds a bad value."""
        if not isinstance(values, dict):
            raise ValueError(f"framing is {type(values).__name__}, not a dict")
        unknown = sorted(set(values) - {field.name for field in fields(cls)})
        if unknown:
            raise ValueError(f"unknown framing key(s) {unknown}")
        values = {**asdict(cls()), **values}
        axis, window, size = values["axis"], values["window"], values["size"]
        if type(axis) is not int or axis not in (0, 1, 2):
            raise ValueError(f"framing.axis {axis!r} is not 0, 1 or 2")
        if window is not None:
            if not isinstance(window, (list, tuple)) or len(window) != 2:
                raise ValueError(f"framing.window {window!r} is not [low, high]")
            window = tuple(_number(v, "window", -math.inf, math.inf) for v in window)
            if not all(map(math.isfinite, window)) or window[1] <= window[0]:
                raise ValueError(f"framing.window {list(window)} is not two finite numbers, low < high")
        if size is not None and (type(size) is not int or not 1 <= size <= MAX_FRAMED_SIZE):
            raise ValueError(f"framing.size {size!r} is not a whole number in [1, {MAX_FRAMED_SIZE}]")
        white_level = _number(values["white_level"], "white_level", 0, 1)
        if white_level == 0:
            raise ValueError("framing.white_level 0 would show every voxel black")
        slice_range, skip_empty, masked = values["slice_range"], values["skip_empty"], values["masked"]
        if slice_range is not None:
            if (not isinstance(slice_range, (list, tuple)) or len(slice_range) != 2
                    or any(type(v) is not int for v in slice_range) or not 0 <= slice_range[0] <= slice_range[1]):
                raise ValueError(f"framing.slice_range {slice_range!r} is not [first, last], 0 <= first <= last")
            slice_range = tuple(slice_range)
        if type(skip_empty) is not bool:
            raise ValueError(f"framing.skip_empty {skip_empty!r} is not true or false")
        if masked is not None and (not isinstance(masked, str) or not 0 < len(masked) <= 64):
            raise ValueError(f"framing.masked {masked!r} is not a region's name")
        return cls(axis, window, white_level, _number(values["min_area"], "min_area", 0, 1), size,
                   _number(values["margin"], "margin", 0, 1), slice_range, skip_empty, masked)

    def overridden(self, window: tuple[float, float] | None = None, axis: int | None = None) -> Framing:
        """This framing with a flag's window or axis, where given."""
        return replace(self, window=self.window if window is None else tuple(window),
                       axis=self.axis if axis is None else axis)

    def describe(self) -> str:
        """One phrase: what the rule does."""
        view = {0: "sagittal", 1: "coronal", 2: "axial"}[self.axis]
        grey = "" if self.white_level == 1 else f" at grey {self.white_level:g}"
        scale = (f"the window [{self.window[0]:g}, {self.window[1]:g}]{grey}" if self.window is not None
                 else f"the percentile rule{grey}")
        kept = (f", slices {self.slice_range[0]}-{self.slice_range[1]}" if self.slice_range else "") + \
            (" with some foreground" if self.skip_empty else "") + \
            (f", slices with >= {self.min_area:.0%} of the largest foreground" if self.min_area else "")
        kept = kept or ", every slice"
        crop = (f", cropped to the foreground (+{self.margin:.0%}) and resized to {self.size} px" if self.size
                else ", whole slices")
        alone = f", only the {self.masked} (zeroed around it with its label)" if self.masked else ""
        return f"{view} slices (axis {self.axis}), {scale}{kept}{crop}{alone}"

    def differences(self, other: Framing) -> list[str]:
        """Each field that ``other`` sets otherwise, as ``name self -> other`` ("window percentile ->
        [-160, 240]", "size 240 -> whole")."""
        def shown(key: str, value: Any) -> str:
            if value is None:
                defaults = {"window": "percentile", "size": "whole", "slice_range": "all", "masked": "none"}
                return defaults.get(key, "none")
            if isinstance(value, (list, tuple)):
                return f"[{value[0]:g}, {value[1]:g}]"
            return str(value).lower() if isinstance(value, (bool, str)) else f"{value:g}"

        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key} {shown(key, mine[key])} -> {shown(key, theirs[key])}"
                for key in mine if mine[key] != theirs[key]]


@dataclass(frozen=True)
class Placement:
    """Where framed slices [size,size] lie in the displayed slices [rows,cols] they were cut from:
    the foreground box [top:top+height, left:left+width], padded evenly to a square of ``side``."""
    shape: tuple[int, int]
    top: int
    left: int
    height: int
    width: int
    side: int
    size: int

    @property
    def pads(self) -> list[tuple[int, int]]:
        return [((self.side - n) // 2, self.side - n - (self.side - n) // 2) for n in (self.height, self.width)]

    def frame(self, shown: np.ndarray) -> np.ndarray:
        """A displayed slice [rows,cols] uint8 -> the framed slice [size,size] uint8."""
        box = shown[self.top:self.top + self.height, self.left:self.left + self.width]
        return cv2.resize(np.pad(box, self.pads), (self.size, self.size), interpolation=cv2.INTER_AREA)

    def unframe(self, heat: np.ndarray) -> np.ndarray:
        """A map of a framed slice [size,size] -> float32 [rows,cols] on the displayed slice's grid
        (bilinear; 0 outside the foreground box, which no kept slice reaches)."""
        square = cv2.resize(np.asarray(heat, np.float32), (self.side, self.side), interpolation=cv2.INTER_LINEAR)
        (pad_top, _), (pad_left, _) = self.pads
        shown = np.zeros(self.shape, np.float32)
        shown[self.top:self.top + self.height, self.left:self.left + self.width] = \
            square[pad_top:pad_top + self.height, pad_left:pad_left + self.width]
        return shown


def volume_to_uint8(values: np.ndarray, framing: Framing, path: str) -> np.ndarray:
    """A volume's intensities -> uint8 by ``framing``'s window or percentile rule."""
    if framing.window is not None:
        return window_to_uint8(values, *framing.window, framing.white_level)
    try:
        return scale_intensity(values, white_level=framing.white_level)
    except InputError:
        raise InputError(f"{path}: no voxel > 0 to scale; pass --window LOW HIGH "
                         f"(or --window_preset liver for CT)") from None


def index_ranges(indices: list[int]) -> list[list[int]]:
    """Sorted slice indices as [first, last] runs: [0, 1, 2, 7] -> [[0, 2], [7, 7]]."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return runs


def frame_volume(canonical: np.ndarray, framing: Framing, path: str,
                 slice_range: tuple[int, int] | None = None) -> tuple[list[np.ndarray], list[int], Placement | None]:
    """Frame a RAS volume [X,Y,Z] as ``framing`` says: the kept slices (uint8, each [size,size], or
    [rows,cols] for whole slices), their indices along ``framing.axis`` (only those in
    ``slice_range`` when given: the crop does not depend on it) and their placement (None for whole
    slices)."""
    if not 0 <= framing.axis < 3:
        raise InputError(f"--axis {framing.axis}: a 3-D volume has axes 0, 1, 2")
    along = np.moveaxis(volume_to_uint8(canonical, framing, path), framing.axis, 2)  # [a,b,slices]
    count = along.shape[2]
    first, last = slice_range if slice_range else (0, count - 1)
    if not 0 <= first <= last < count:
        raise InputError(f"--slices {first} {last}: the volume has slices 0..{count - 1} along axis {framing.axis}")
    kept = np.arange(count)
    if framing.slice_range is not None:
        kept = kept[(kept >= framing.slice_range[0]) & (kept <= framing.slice_range[1])]
        if not len(kept):
            raise InputError(f"{path}: the framing keeps slices {framing.slice_range[0]}-{framing.slice_range[1]} "
                             f"but the volume has slices 0..{count - 1} along axis {framing.axis}")
    placement = None
    if framing.min_area or framing.skip_empty or framing.size is not None:
        area = np.count_nonzero(along, axis=(0, 1))
        if not area[kept].any():
            raise InputError(f"{path}: every voxel is at the bottom of its intensity scale; nothing to frame")
        kept = kept[area[kept] > 0] if framing.skip_empty else kept
        kept = kept[area[kept] >= framing.min_area * area.max()]
    if framing.size is not None:
        footprint = display(along[:, :, kept].any(axis=2))
        rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
        height, width = int(rows[-1] + 1 - rows[0]), int(cols[-1] + 1 - cols[0])
        placement = Placement(footprint.shape, int(rows[0]), int(cols[0]), height, width,
                              int(max(height, width) * (1 + 2 * framing.margin)), framing.size)
    chosen = kept[(kept >= first) & (kept <= last)]
    if not len(chosen):
        raise InputError(f"--slices {first} {last}: the framing keeps none of them (it keeps slices "
                         f"{', '.join(f'{a}-{b}' for a, b in index_ranges([int(k) for k in kept]))})")
    slices = [display(along[:, :, k]) for k in chosen]
    return [placement.frame(s) for s in slices] if placement else slices, [int(k) for k in chosen], placement


def uint8_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H,W] -> float32 [H,W,3] in [0,1], exactly as ``dataset.load_image`` reads its PNG."""
    return np.repeat((image.astype(np.float32) / 255)[..., None], 3, axis=2)


def recorded_framing(root: str) -> Framing | None:
    """The framing a converter recorded for the slices of a data root (the "framing" of its
    ``demo.json`` or ``split.json``); None when it records none. A bad record is refused, naming it."""
    for name in FRAMING_RECORDS:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: unreadable ({one_line(str(error))})") from None
        if isinstance(record, dict) and record.get("framing") is not None:
            try:
                return Framing.from_dict(record["framing"])
            except ValueError as error:
                raise InputError(f"{path}: {error}") from None
    return None


def framing_mismatch(stored: dict | None, root: str) -> str | None:
    """A phrase when the slices of ``root`` are framed otherwise than a checkpoint's training slices
    (its stored framing record, None for a checkpoint from before framings were stored), else None:
    a cross-view test says so, and so does an old checkpoint tested on a rebuilt demo set."""
    recorded = recorded_framing(root)
    if recorded is None:
        return None
    if stored is None:
        return (f"{root} holds {recorded.describe()}; the checkpoint records no framing of its training slices "
                f"(trained before framings were stored, perhaps on an older demo build)")
    try:
        trained = Framing.from_dict(stored)
    except ValueError as error:
        return f"the checkpoint's framing record is unreadable ({error})"
    if trained == recorded:
        return None
    return (f"{root} holds slices framed otherwise than the checkpoint's training slices: "
            f"{', '.join(trained.differences(recorded))}")


def training_framing(roots: list[str]) -> Framing | None:
    """The framing all training roots record; None (with a warning when they disagree) otherwise."""
    framings = [recorded_framing(root) for root in roots]
    if any(framing != framings[0] for framing in framings):
        logger.warning("the training roots record different framings (%s); the checkpoint records none",
                       "; ".join(f"{root}: {f.describe() if f else 'none'}" for root, f in zip(roots, framings)))
        return None
    return framings[0]
