"""What the tests share: the tiny config, the test.py module, data writers and slow reference
implementations. Test modules import from here (``from tests.helpers import ...``), never from
each other; pytest fixtures live in conftest.py."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import cv2
import nibabel as nib
import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator

import train
from CLIP.MedVMAD import MedVMAD, MedVMADConfig
from CLIP.backbone import BackboneConfig
from CLIP.checkpoint import save_checkpoint
from dataset import load_image, preprocess
from evaluation import calibration


# --- the tiny model

TINY_SIZE = 64  # 4x4 patches of 16 px: fast, and large enough to hold a lesion


def tiny_config(**overrides) -> MedVMADConfig:
    """A MedVMAD config on the random-weight ``tiny`` open_clip model."""
    values = dict(backbone=BackboneConfig("tiny", "none", TINY_SIZE), depth=2, n_ctx=4, t_n_ctx=2)
    values.update(overrides)
    return MedVMADConfig(**values)


@contextlib.contextmanager
def medvmad_logger_kept() -> Iterator[None]:
    """Scripts set up the "medvmad" logger (own handlers, no propagation); put it back as it was
    afterwards, so that later tests capture its records (caplog) whatever the test order."""
    logger = logging.getLogger("medvmad")
    state = (list(logger.handlers), logger.propagate, logger.level)
    try:
        yield
    finally:
        for handler in logger.handlers:
            if handler not in state[0]:
                handler.close()
        logger.handlers[:], logger.propagate = state[0], state[1]
        logger.setLevel(state[2])


def reference_scale(volume: np.ndarray) -> np.ndarray:
    """The documented BraTS/NIfTI rule written out: 0.5/99.5 percentiles of the voxels > 0 -> 0/255,
    clipped and rounded, background 0 (an independent reference for ``scans.framing.scale_intensity``)."""
    low, high = np.percentile(volume[volume > 0], [0.5, 99.5])
    scaled = np.round(np.clip((volume.astype(np.float64) - low) / (high - low), 0, 1) * 255)
    return np.where(volume > 0, scaled, 0).astype(np.uint8)


# --- running the scripts: train.py and test.py in process, their flags on the tiny model

ROOT = Path(__file__).resolve().parents[1]


TINY = ["--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE), "--n_ctx", "4",
        "--depth", "2", "--t_n_ctx", "2", "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
# the zero-training baseline (no checkpoint) on the tiny model: test.py's and test_one_example.py's flags
BASELINE = ["--model_name", "tiny", "--pretrained", "none", "--image_size", str(TINY_SIZE), "--device", "cpu"]


def load_test_script():
    """test.py by path: ``import test`` could find the standard library's test package."""
    spec = importlib.util.spec_from_file_location("medvmad_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_script = load_test_script()


def spy_predict(monkeypatch, module) -> list:
    """Record every Predictions that ``module.predict`` returns (scores and maps as test.py sees them)."""
    seen = []
    real = module.predict

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, "predict", spy)
    return seen


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest score threshold (predict abnormal when score >= it) with the largest F1, by a loop."""
    best, best_f1 = None, -1.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 > best_f1 + 1e-12:
            best, best_f1 = threshold, f1
    return best


def run_train(save_path: Path, root: str, *extra: str) -> dict:
    return train.main(["--train_data_path", root, "--save_path", str(save_path), "--epoch", "2",
                       "--learning_rate", "1e-3", *TINY, *extra])


# --- slow reference metrics (one pass per threshold, scipy regions)

def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Slow exact AUPRO, the standard one: PRO (mean per-region overlap, 8-connected regions by scipy
    label) against FPR at every distinct threshold, one full pass each; trapezoids up to ``fpr_limit``
    (interpolated there), divided by ``fpr_limit``."""
    maps = maps.astype(np.float64)
    regions = []  # (image index, region mask [H,W])
    for image, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == i) for i in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[image][region].mean() for image, region in regions]))
        if fprs[-1] > fpr_limit:  # the curve past the limit does not count
            break
    fprs, pros = np.array(fprs), np.array(pros)
    end = np.interp(fpr_limit, fprs, pros)  # repeated FPRs only add zero-width segments
    inside = fprs <= fpr_limit
    x, y = np.append(fprs[inside], fpr_limit), np.append(pros[inside], end)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def blob_data(seed: int, dtype: type, n: int = 3, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few discs per image (one image normal) and noisy maps brighter in lesions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for image in range(1, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, radius = rng.uniform(3, size - 3), rng.uniform(3, size - 3), rng.uniform(1, 5)
            masks[image] |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    smooth = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.5, 1.5))
    maps = smooth + 0.5 * masks * rng.random((n, size, size))
    return masks, np.round(maps, 2).astype(dtype)  # rounding makes ties


def brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    best = (0.0, math.inf)
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 > best[0]:
            best = (f1, float(threshold))
    return best


# --- reference calibration (scikit-learn's CalibratedClassifierCV)

class ScoreAsDecision(ClassifierMixin, BaseEstimator):
    """A fitted 'classifier' whose decision function is the score itself (column 0), for
    scikit-learn's CalibratedClassifierCV to calibrate."""

    def fit(self, scores, labels):
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, scores):
        return np.asarray(scores)[:, 0]

    def predict(self, scores):
        return (self.decision_function(scores) > 0).astype(int)


def sklearn_calibrated(scores: np.ndarray, labels: np.ndarray, method: str, queries: np.ndarray) -> np.ndarray:
    """P(abnormal) of ``queries`` under scikit-learn's calibration fitted on scores, labels."""
    frozen = FrozenEstimator(ScoreAsDecision().fit(scores[:, None], labels))
    # the frozen model's cross-validated scores are its scores: the folds (2, for k = 2) do not matter
    fitted = CalibratedClassifierCV(frozen, method=method, cv=2).fit(scores[:, None], labels)
    return fitted.predict_proba(queries[:, None])[:, 1]


def slow_rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    called = scores >= threshold
    return called[labels == 1].mean(), (~called[labels == 0]).mean()


def slow_ece(labels: np.ndarray, probability: np.ndarray) -> float:
    """ECE, bin by bin: bin b holds the probabilities in ((b-1)/10, b/10] (0 in the first)."""
    bins = np.clip(np.ceil(probability * 10) - 1, 0, 9)
    return sum(np.mean(bins == b) * abs(probability[bins == b].mean() - labels[bins == b].mean())
               for b in range(10) if np.any(bins == b))


# --- calibrated checkpoints

def save_calibrated(path: Path) -> dict:
    """A tiny checkpoint (seed 0) with a calibration entry as train.py stores one: 60 validation
    images of 20 patients (5 normal), at F1-max. Returns the entry."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    scores = np.r_[rng.uniform(0.40, 0.48, 30), rng.uniform(0.44, 0.52, 30)]
    names = [f"v{p}" for p in np.r_[np.repeat(np.arange(5), 3), np.arange(5, 20), np.repeat(np.arange(5, 20), 2)]]
    fitted = calibration.Calibration.fitted(scores, labels, names, "validation images")
    torch.manual_seed(0)
    save_checkpoint(path, MedVMAD(tiny_config()), epoch=1, threshold=fitted.threshold(calibration.F1_MAX),
                    operating_point="f1", calibration=fitted.to_dict())
    return fitted.to_dict()


# --- a single image scored by hand

@torch.no_grad()
def reference_score(model: MedVMAD, path: Path) -> tuple[float, np.ndarray]:
    """Score and map of one PNG by hand: model on the preprocessed image, map resized back (bilinear)."""
    image = load_image(str(path))
    output = model(preprocess(image, TINY_SIZE)[None])
    heat = cv2.resize(output.anomaly_map[0].numpy(), (image.shape[1], image.shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    return float(output.image_score[0]), heat


# --- raw data writers: NIfTI volumes, BraTS and Liver-CT cases

def save_nifti(path: Path, array: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


SHAPE = (24, 20, 12)


TUMOUR_CASES = {"00001": range(5, 8), "00003": range(2, 11), "00004": range(6, 7)}


def brats_case(raw: Path, case: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A head-like volume (values > 0 in an ellipsoid, 0 outside) and a seg with labels 1/2/4."""
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    brain = ((x - 12) / 10) ** 2 + ((y - 10) / 8) ** 2 + ((z - 6) / 9) ** 2 < 1
    volume = np.where(brain, rng.uniform(50, 500, SHAPE), 0).astype(np.float32)
    seg = np.zeros(SHAPE, np.uint8)
    for k, slice_z in enumerate(TUMOUR_CASES.get(case, [])):
        seg[10:13, 8 + k % 2:11, slice_z] = (1, 2, 4)[k % 3]
    name = f"BraTS2021_{case}"
    for modality in ("flair", "t1"):
        save_nifti(raw / name / f"{name}_{modality}.nii.gz", volume)
    save_nifti(raw / name / f"{name}_seg.nii.gz", seg)
    return volume, seg


CT_SHAPE = (16, 14, 8)


def liver_volumes(tmp_path) -> tuple[Path, Path, dict, dict]:
    """BTCV (img/imgNNNN, label/labelNNNN, liver 6) and LiTS (volume-N, segmentation-N) volumes."""
    rng = np.random.default_rng(0)
    hu_values = np.array([-1000, -200, 70, 250, 1000], np.int16)
    btcv, lits = {}, {}
    for number in ("0001", "0002"):
        ct = rng.choice(hu_values, CT_SHAPE).astype(np.int16)
        label = np.zeros(CT_SHAPE, np.uint8)
        label[3:12, 4:10, 2:6] = 6
        label[0:3, 0:3, :] = 1  # spleen: not liver
        save_nifti(tmp_path / "BTCV" / "img" / f"img{number}.nii.gz", ct)
        save_nifti(tmp_path / "BTCV" / "label" / f"label{number}.nii.gz", label)
        btcv[number] = (ct, label)
    for number in range(5):
        ct = rng.choice(hu_values, CT_SHAPE).astype(np.int16)
        label = np.zeros(CT_SHAPE, np.uint8)
        label[2:13, 3:11, 1:7] = 1
        if number % 2 == 0:
            label[5:8, 5:8, 3:5] = 2
        batch = "Training Batch 1" if number < 3 else "Training Batch 2"
        save_nifti(tmp_path / "LiTS" / batch / f"volume-{number}.nii", ct)
        save_nifti(tmp_path / "LiTS" / batch / f"segmentation-{number}.nii", label)
        lits[str(number)] = (ct, label)
    return tmp_path / "BTCV", tmp_path / "LiTS", btcv, lits


# --- DICOM series writers

PIXEL = (0.8, 0.7)        # DICOM PixelSpacing: row spacing (y), column spacing (x)


STEP, ORIGIN = 2.5, (-10.0, -20.0, 30.0)


def dicom_dataset(sop_class: str) -> Dataset:
    """A new DICOM dataset of ``sop_class`` with its file meta: a fresh instance UID, explicit VR
    little endian (the writers below add the image)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = Dataset()
    data.file_meta = meta
    data.SOPClassUID, data.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return data


def write_slice(path: Path, raw: np.ndarray, z: float, series: str, window=(40, 400),
                photometric: str = "MONOCHROME2") -> None:
    """One axial CT slice (HU = raw - 1024) of ``series`` at height ``z``."""
    data = dicom_dataset(CTImageStorage)
    data.Modality, data.StudyInstanceUID, data.SeriesInstanceUID = "CT", "1.2.826.0.1.3680043.1", series
    data.Rows, data.Columns = raw.shape
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 1
    data.SamplesPerPixel, data.PhotometricInterpretation = 1, photometric
    data.RescaleSlope, data.RescaleIntercept = 1, -1024
    data.WindowCenter, data.WindowWidth = window
    data.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], z]
    data.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    data.PixelSpacing, data.SliceThickness = list(PIXEL), STEP
    data.PixelData = raw.astype(np.int16).tobytes()
    data.save_as(path, enforce_file_format=True)


def write_series(folder: Path, frames: np.ndarray, skip: tuple[int, ...] = (), series: str | None = None,
                 photometric: str = "MONOCHROME2") -> str:
    """Frames [K,rows,cols], inferior to superior, named in reverse order (sorting by name is wrong)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    for k, frame in enumerate(frames):
        if k not in skip:
            write_slice(folder / f"{series[-4:]}_{len(frames) - k:03d}.dcm", frame, ORIGIN[2] + STEP * k, series,
                        photometric=photometric)
    return series


# --- the browser and the page's server

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or shutil.which("chromium-browser") or "")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

