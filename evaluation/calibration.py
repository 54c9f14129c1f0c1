"""Scores a reader can use: calibrated probabilities, operating points, and how good both are.

An image score ranks images; it is not a probability (few-shot scores are z values), and a
threshold on it means nothing by itself. Both are fitted here on labelled images that are never
the tested ones, those the run selects on: train.py's validation images (stored in its
checkpoint), and in test.py the target's valid split for the zero-training baseline and the
support set for few-shot.

- **Calibration**: a non-decreasing map from score to the probability of "abnormal". Rule:
  isotonic regression (scikit-learn's ``IsotonicRegression``) on at least ISOTONIC_MIN_IMAGES
  images, else Platt scaling (a sigmoid of the score, fitted by logistic regression to Platt's
  smoothed targets, as scikit-learn's ``CalibratedClassifierCV(method="sigmoid")``): isotonic
  regression overfits small sets (scikit-learn's guide: under about 1000 images). Stored as plain
  numbers that rebuild it exactly (isotonic: its thresholds ``X_thresholds_``/``y_thresholds_``,
  applied by linear interpolation, clipped at the ends, as its ``predict``; Platt: slope and
  intercept). A Platt fit that would decrease (the images rank the wrong way) is the constant
  base rate instead. Ranking metrics are computed on the scores and never change.
- **Operating point**: the decision threshold (abnormal when score >= threshold), chosen on the
  same images by a rule: ``f1`` (F1-max, evaluation/metrics.py), ``sensitivity=X`` (the highest threshold
  whose sensitivity reaches X), ``specificity=X`` (the lowest whose specificity reaches X) or
  ``youden`` (the largest sensitivity + specificity - 1; the highest threshold among ties).
- **Patients**: a patient's score is the maximum of its slices' scores (bootstrap.patient_level)
  and its probability that score mapped by a second calibration fitted on the same images'
  patients (a maximum of slice probabilities would grow with the number of slices); its
  decision is at a threshold chosen on those patients by the same rule.
- **Quality**: the Brier score (scikit-learn's ``brier_score_loss``) and the expected calibration
  error over ECE_BINS equal-width bins of probability ((b-1)/10, b/10], the first including 0,
  as scikit-learn's ``calibration_curve`` bins them): the sum over bins of (images in the bin /
  images) x |mean probability - observed frequency of abnormal|; a reliability diagram draws the
  bins with their counts. Sensitivity, specificity, PPV and NPV of the decisions at the operating
  point. Their bootstrap intervals resample patients (bootstrap.resample_counts) exactly: every
  figure is a ratio of per-patient sums.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_curve

from evaluation import bootstrap
from evaluation import metrics
from utils import InputError

ISOTONIC_MIN_IMAGES = 1000
ECE_BINS = 10
UNCALIBRATED = "uncalibrated"
# A rate reached up to float rounding counts as reached (19/20 against a target of 0.95).
TOLERANCE = 1e-12


@dataclass(frozen=True)
class OperatingPoint:
    """A rule that picks the decision threshold on labelled images."""
    rule: str                    # f1, youden, sensitivity or specificity
    target: float | None = None  # the sensitivity or specificity to reach

    def __str__(self) -> str:
        return self.rule if self.target is None else f"{self.rule}={self.target:g}"

    @property
    def name(self) -> str:
        """'sensitivity 0.95', 'F1-max', "Youden's J"."""
        return {"f1": "F1-max", "youden": "Youden's J"}.get(self.rule) or f"{self.rule} {self.target:g}"

    def describe(self, images: str = "validation") -> str:
        """'sensitivity 0.95 on validation', 'F1-max on validation', "Youden's J on validation"."""
        return f"{self.name} on {images}"


F1_MAX = OperatingPoint("f1")
USAGE = "f1, youden, sensitivity=X or specificity=X with X in (0, 1] (e.g. sensitivity=0.95)"


def operating_point_flag(text: str) -> str:
    """The --operating_point flag: a rule ``operating_point`` reads, written canonically
    ("sensitivity=0.95"), a plain string as the scripts' saved arguments must be."""
    return str(operating_point(text))


def operating_point(text: str) -> OperatingPoint:
    """The --operating_point flag's value: ``f1``, ``youden``, ``sensitivity=X`` or ``specificity=X``."""
    rule, equals, target = text.strip().partition("=")
    if rule in ("f1", "youden") and not equals:
        return OperatingPoint(rule)
    if rule in ("sensitivity", "specificity") and equals:
        try:
            value = float(target)
        except ValueError:
            value = math.nan
        if 0 < value <= 1:
            return OperatingPoint(rule, value)
    raise argparse.ArgumentTypeError(f"expected {USAGE}, got {text!r}")


def choose_threshold(labels: np.ndarray, scores: np.ndarray, point: OperatingPoint) -> float | None:
    """The threshold (abnormal: score >= it) that ``point`` picks on labels, scores [N]; None when
    the images are all of one class. A threshold above every score (nothing called abnormal) is
    the next float above the highest score."""
    labels, scores = np.asarray(labels).astype(np.int64), np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return None
    if point.rule == "f1":
        return float(metrics.image_metrics(labels, scores)["image_f1_threshold"])
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)  # thresholds descending
    if point.rule == "sensitivity":
        index = int(np.argmax(tpr >= point.target - TOLERANCE))
    elif point.rule == "specificity":
        index = int(np.flatnonzero(1 - fpr >= point.target - TOLERANCE)[-1])
    else:
        index = int(np.argmax(tpr - fpr))
    threshold = thresholds[index]
    return float(threshold if np.isfinite(threshold) else np.nextafter(scores.max(), np.inf))


# ----------------------------------------------------------------------------- calibration maps

def fit(scores: np.ndarray, labels: np.ndarray) -> dict | None:
    """A calibration of scores [N] for labels [N] by the module's rule, as JSON-able numbers
    (``{"method": "isotonic", "x": [...], "y": [...]}`` or ``{"method": "platt", "slope": a,
    "intercept": b}``, with ``n_images`` and ``n_abnormal``); None when the labels hold one class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
    n_abnormal = int(labels.sum())
    if n_abnormal in (0, len(labels)):
        return None
    counts = {"n_images": len(labels), "n_abnormal": n_abnormal}
    if len(labels) >= ISOTONIC_MIN_IMAGES:
        isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(scores, labels)
        return {"method": "isotonic", "x": isotonic.X_thresholds_.tolist(), "y": isotonic.y_thresholds_.tolist(),
                **counts}
    return {"method": "platt", **platt(scores, labels), **counts}


def platt(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Platt's sigmoid p = 1 / (1 + exp(-(slope * score + intercept))) for scores, labels [N]: the
    logistic regression of his targets (N+ + 1) / (N+ + 2) for abnormal images and 1 / (N- + 2)
    for normal ones (finite even when the classes separate), on standardised scores; the constant
    base rate when the fitted slope is negative."""
    n_abnormal = int(labels.sum())
    targets = np.where(labels == 1, (n_abnormal + 1) / (n_abnormal + 2), 1 / (len(labels) - n_abnormal + 2))
    centre, spread = scores.mean(), scores.std()
    constant = {"slope": 0.0, "intercept": float(logit(targets.mean()))}
    if spread == 0:
        return constant
    standard = ((scores - centre) / spread)[:, None]
    # each image once as abnormal, weighted by its target, and once as normal, by 1 - target
    model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(
        np.vstack([standard, standard]), np.r_[np.ones(len(scores)), np.zeros(len(scores))],
        sample_weight=np.r_[targets, 1 - targets])
    slope = float(model.coef_[0, 0])
    if slope < 0:
        return constant
    return {"slope": float(slope / spread), "intercept": float(model.intercept_[0] - slope * centre / spread)}


def probabilities(fitted: dict, scores: np.ndarray) -> np.ndarray:
    """P(abnormal) [N] of scores [N] (float64) under a ``fit``."""
    scores = np.asarray(scores, dtype=np.float64)
    if fitted["method"] == "isotonic":
        return np.interp(scores, fitted["x"], fitted["y"])
    return expit(fitted["slope"] * scores + fitted["intercept"])


def describe_fit(fitted: dict | None, images: str) -> str:
    """'platt, fitted on 16 validation images (8 abnormal)', or 'uncalibrated'."""
    if fitted is None:
        return UNCALIBRATED
    return f"{fitted['method']}, fitted on {fitted['n_images']} {images} ({fitted['n_abnormal']} abnormal)"


def checked_fit(value: object, where: str) -> dict | None:
    """A stored ``fit`` (or None) whose numbers rebuild a non-decreasing map into [0, 1]; a
    ``ValueError`` naming ``where`` and the field otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("method") not in ("isotonic", "platt"):
        raise ValueError(f"{where} is not an isotonic or platt calibration")
    for key in ("n_images", "n_abnormal"):
        if not isinstance(value.get(key), int) or value[key] < 0:
            raise ValueError(f"{where}.{key} is {value.get(key)!r}, not a count")
    numbers = {key: np.asarray(value.get(key), dtype=object).ravel()
               for key in (("x", "y") if value["method"] == "isotonic" else ("slope", "intercept"))}
    for key, array in numbers.items():
        if not len(array) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in array):
            raise ValueError(f"{where}.{key} holds no finite numbers")
    if value["method"] == "isotonic":
        x, y = (numbers[key].astype(np.float64) for key in ("x", "y"))
        if len(x) != len(y) or np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0) or y.min() < 0 or y.max() > 1:
            raise ValueError(f"{where}: x must increase and y (of the same length) must not decrease, in [0, 1]")
    elif value["slope"] < 0:
        raise ValueError(f"{where}.slope is negative: the probability would fall as the score rises")
    return value


# ----------------------------------------------------------------------------- the images a run calibrates on

@dataclass
class Calibration:
    """The labelled images a run is calibrated on (never tested ones) and what is fitted on them.
    Their scores are kept, so that any operating point can be chosen later without other data."""
    scores: np.ndarray       # float64 [N] image scores
    labels: np.ndarray       # int64 [N]
    patients: np.ndarray     # int64 [N] patient index of each image, 0..G-1
    images: str              # which images, in words: "validation images", "support images"
    image: dict | None       # ``fit`` of the image scores (None: one class only)
    patient: dict | None     # ``fit`` of the patient scores (max over each patient's images)

    @classmethod
    def fitted(cls, scores: np.ndarray, labels: np.ndarray, patient_names: list[str], images: str) -> Calibration:
        """Fit both maps on scores, labels [N] whose images belong to ``patient_names`` [N]."""
        scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
        patients = np.unique(np.asarray(patient_names), return_inverse=True)[1].reshape(-1)
        patient_labels, patient_scores = bootstrap.patient_level(labels, scores, patients, int(patients.max()) + 1)
        return cls(scores, labels, patients, images, fit(scores, labels), fit(patient_scores, patient_labels))

    def patient_level(self) -> tuple[np.ndarray, np.ndarray]:
        """Patient labels and scores [G] (abnormal if any image is; the maximum score)."""
        return bootstrap.patient_level(self.labels, self.scores, self.patients, int(self.patients.max()) + 1)

    def threshold(self, point: OperatingPoint, patients: bool = False) -> float | None:
        """The image (or, with ``patients``, patient) threshold ``point`` picks on these images."""
        return choose_threshold(*(self.patient_level() if patients else (self.labels, self.scores)), point)

    def to_dict(self) -> dict:
        """Plain lists and numbers (a checkpoint entry read with ``weights_only=True``)."""
        return {"images": self.images, "scores": self.scores.tolist(), "labels": self.labels.tolist(),
                "patients": self.patients.tolist(), "image": self.image, "patient": self.patient}

    @classmethod
    def from_dict(cls, stored: object, where: str) -> Calibration:
        """What ``to_dict`` wrote, checked; an ``InputError`` naming ``where`` and the field."""
        try:
            if not isinstance(stored, dict) or not isinstance(stored.get("images"), str):
                raise ValueError("is not a calibration entry")
            scores = np.asarray(stored.get("scores"), dtype=np.float64)
            labels, patients = (np.asarray(stored.get(key)) for key in ("labels", "patients"))
            if scores.ndim != 1 or not len(scores) or labels.shape != scores.shape or patients.shape != scores.shape:
                raise ValueError("scores, labels and patients must be lists of one length")
            if not np.isfinite(scores).all() or not np.isin(labels, (0, 1)).all() or patients.dtype.kind not in "iu":
                raise ValueError("holds non-finite scores, labels other than 0/1, or non-integer patients")
            return cls(scores, labels.astype(np.int64), np.unique(patients, return_inverse=True)[1].reshape(-1),
                       stored["images"], checked_fit(stored.get("image"), "image"),
                       checked_fit(stored.get("patient"), "patient"))
        except (TypeError, ValueError) as error:
            raise InputError(f"{where}: its calibration {error}") from None


@dataclass
class Decision:
    """How scores become what a reader is told: a probability (None: uncalibrated) and a decision
    at an operating point, for an image and for a patient (a volume) by its maximum slice score."""
    threshold: float | None          # an image is called abnormal when its score >= threshold
    patient_threshold: float | None  # a patient when its maximum score >= this
    rule: str                        # "sensitivity 0.95", "F1-max"; or how a threshold was given: "--threshold 0.3"
    image: dict | None = None        # ``fit``: image score -> P(abnormal)
    patient: dict | None = None      # ``fit``: a patient's maximum score -> P(abnormal)
    images: str = "validation images"  # what the fits and the rule's thresholds come from
    chosen: bool = True              # the thresholds were chosen by ``rule`` (not given, not a default)
    patients_chosen: bool = False    # the patient threshold was chosen on patients (else the images')

    @classmethod
    def chosen_by(cls, calibration: Calibration | None, point: OperatingPoint, stored: float | None = None
                  ) -> Decision:
        """What ``point`` picks on ``calibration``'s images (a threshold None when they hold one
        class; the patients' the images' when the patients do); without them (a checkpoint from
        before calibration was stored) uncalibrated, at the ``stored`` threshold for images and
        patients alike (a patient is abnormal when a slice is)."""
        if calibration is None:
            return cls(stored, stored, point.name)
        threshold, patient_threshold = calibration.threshold(point), calibration.threshold(point, patients=True)
        return cls(threshold, threshold if patient_threshold is None else patient_threshold, point.name,
                   calibration.image, calibration.patient, calibration.images, True, patient_threshold is not None)

    def operating_point(self, patient: bool = False) -> str:
        """In words: 'sensitivity 0.95 on validation images' (a patient's: '... on validation
        patients', or the images' applied to its highest slice); a given threshold: its rule."""
        if not self.chosen:
            return self.rule
        if patient and self.patients_chosen:
            return f"{self.rule} on {self.images.replace('images', 'patients')}"
        return f"{self.rule} on {self.images}" + (", applied to the highest slice" if patient else "")

    def probability(self, score: float, patient: bool = False) -> float | None:
        """P(abnormal) of an image score (of a patient's maximum score); None when uncalibrated."""
        fitted = self.patient if patient else self.image
        return None if fitted is None else float(probabilities(fitted, np.array([score]))[0])

    def calibration(self, patient: bool = False) -> str:
        """The image (patient) calibration in words: 'platt, fitted on ...', or 'uncalibrated'."""
        return describe_fit(self.patient if patient else self.image,
                            self.images.replace("images", "patients") if patient else self.images)


def checkpoint_decision(payload: dict, path: str, asked: str | None) -> Decision:
    """The decision a checkpoint stores (``calibration``, ``operating_point`` and ``threshold``
    entries), at the operating point ``asked`` (--operating_point; None: its own). A checkpoint
    from before calibration was stored is uncalibrated at its F1-max threshold, and cannot choose
    another point. Damaged entries are an ``InputError`` naming the checkpoint."""
    where = f"--checkpoint_path {path}"
    stored = payload.get("threshold")
    # in [0, 1]; with a calibration also just above the top score (a point that calls nothing abnormal)
    highest = np.nextafter(1.0, 2.0) if "calibration" in payload else 1.0
    if stored is not None and (isinstance(stored, bool) or not isinstance(stored, (int, float))
                               or not 0 <= stored <= highest):  # NaN fails too
        raise InputError(f"{where}: its threshold {stored!r} is not a number in [0, 1]; give --threshold")
    if "calibration" not in payload:
        if asked is not None and operating_point(asked) != F1_MAX:
            raise InputError(f"{where} was saved before calibration was stored: it knows only its F1-max "
                             f"threshold, not --operating_point {asked}; train it again, or give --threshold")
        return Decision.chosen_by(None, F1_MAX, stored)
    calibration = Calibration.from_dict(payload["calibration"], where)
    try:
        point = operating_point(asked or str(payload.get("operating_point")))
    except argparse.ArgumentTypeError as error:
        raise InputError(f"{where}: its operating point: {error}") from None
    return Decision.chosen_by(calibration, point)


# ----------------------------------------------------------------------------- how good it is

def rates(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP) and NPV TN/(TN+FN) of
    confusion counts (numbers or arrays [R]); nan where the denominator is 0."""
    def ratio(hit, miss):
        hit, total = np.asarray(hit, dtype=np.float64), np.asarray(hit, dtype=np.float64) + miss
        return np.divide(hit, total, out=np.full(total.shape, np.nan), where=total > 0)
    return {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}


def bin_of(probability: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin [N] of each probability [N]: ((b-1)/n, b/n], the first including 0, as
    scikit-learn's ``calibration_curve(strategy="uniform")``."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], probability)


def reliability(labels: np.ndarray, probability: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width bin: its edges, image count, mean probability and observed frequency of
    abnormal (None for an empty bin)."""
    bins = bin_of(probability, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    mean = np.bincount(bins, weights=probability, minlength=n_bins)
    observed = np.bincount(bins, weights=labels, minlength=n_bins)
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(), "count": count.tolist(),
            "mean_probability": [float(m / c) if c else None for m, c in zip(mean, count)],
            "observed": [float(o / c) if c else None for o, c in zip(observed, count)]}


def expected_calibration_error(labels: np.ndarray, probability: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of probability [N] for labels [N] over ``n_bins`` equal-width bins (``bin_of``)."""
    bins = bin_of(probability, n_bins)
    gaps = np.bincount(bins, weights=probability - labels, minlength=n_bins)  # per bin: sum p - sum y
    return float(np.abs(gaps).sum() / len(labels))


def _per_group(groups: np.ndarray, cells: np.ndarray, n_groups: int, n_cells: int,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Sums of ``weights`` (1 each by default) per group and cell, [G, n_cells]."""
    return np.bincount(groups * n_cells + cells, weights=weights,
                       minlength=n_groups * n_cells).reshape(n_groups, n_cells).astype(np.float64)


def assess(labels: np.ndarray, scores: np.ndarray, fitted: dict | None, threshold: float | None,
           groups: np.ndarray | None = None, counts: np.ndarray | None = None) -> tuple[dict, dict | None]:
    """Figures of labels, scores [N]: sensitivity, specificity, PPV and NPV of the decisions
    score >= ``threshold``,
    and the Brier score and ECE of the probabilities of ``fitted``, each with its 95% interval
    ``<key>_ci`` when ``groups`` [N] (patient of each image) and ``counts`` [R, G] (bootstrap
    draws of each patient) are given; and the reliability bins (None without a fit). A part whose
    fit or threshold is None is left out."""
    labels, scores = np.asarray(labels).astype(np.int64), np.asarray(scores, dtype=np.float64)
    values, replicates, bins = {}, {}, None
    weights = None if counts is None else counts.astype(np.float64)
    n_groups = 0 if counts is None else counts.shape[1]
    if threshold is not None:
        decided = (scores >= threshold).astype(np.int64)
        values.update({key: float(value) for key, value in
                       rates(*confusion_matrix(labels, decided, labels=[0, 1]).ravel()).items()})
        if weights is not None:  # cells: 0 tn, 1 fp, 2 fn, 3 tp
            replicates.update(rates(*(weights @ _per_group(groups, 2 * labels + decided, n_groups, 4)).T))
    if fitted is not None:
        probability = probabilities(fitted, scores)
        values.update(brier=float(brier_score_loss(labels, probability, labels=[0, 1])),
                      ece=expected_calibration_error(labels, probability))
        bins = reliability(labels, probability)
        if weights is not None:
            one_cell = np.zeros_like(labels)
            images = weights @ _per_group(groups, one_cell, n_groups, 1)[:, 0]
            squared = weights @ _per_group(groups, one_cell, n_groups, 1, (probability - labels) ** 2)[:, 0]
            gaps = weights @ _per_group(groups, bin_of(probability), n_groups, ECE_BINS, probability - labels)
            replicates.update(brier=squared / images, ece=np.abs(gaps).sum(axis=1) / images)
    values.update({f"{key}_ci": bootstrap.interval(samples) for key, samples in replicates.items()})
    return values, bins


def reliability_figure(panels: list[tuple[str, str, dict]]) -> Figure:
    """A reliability diagram per (title, what is counted, ``reliability`` bins) side by side: on
    top the mean predicted probability against the observed frequency of abnormal per bin (the
    diagonal is perfect calibration), below the count per bin."""
    figure = Figure(figsize=(4.2 * len(panels), 5.6), dpi=100, layout="constrained")
    axes = figure.subplots(2, len(panels), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for (title, unit, bins), top, bottom in zip(panels, axes[0], axes[1]):
        edges = np.asarray(bins["edges"])
        shown = [i for i, count in enumerate(bins["count"]) if count]
        top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
        top.plot([bins["mean_probability"][i] for i in shown], [bins["observed"][i] for i in shown],
                 marker="o", label="per bin")
        top.set(ylabel="observed frequency of abnormal", xlim=(0, 1), ylim=(-0.03, 1.03), title=title)
        top.legend(fontsize=8, loc="upper left")
        top.grid(alpha=0.3)
        bottom.bar(edges[:-1], bins["count"], width=np.diff(edges), align="edge", edgecolor="white")
        for i in shown:
            bottom.annotate(str(bins["count"][i]), ((edges[i] + edges[i + 1]) / 2, bins["count"][i]),
                            ha="center", va="bottom", fontsize=7)
        bottom.set(xlabel="predicted probability (bin)", ylabel=unit, ylim=(0, 1.25 * max(bins["count"]) + 0.5))
    return figure
