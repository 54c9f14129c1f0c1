"""Training curves drawn from the run itself: metrics.csv and curves.png, rewritten every epoch.

``log_epoch`` is called once per epoch by train.py with the epoch's average loss terms and its
selection metrics (means and ``<source>/<metric>``). metrics.csv has one row per epoch, columns
``epoch``, ``train/<loss term>`` and every selection metric; a resumed run replaces the rows of
the epochs it redoes. curves.png shows the loss terms (left) and every selection AUROC/AUPRO
(right) against the epoch. Both files are written atomically. ``--tensorboard`` adds the same
scalars to TensorBoard when the ``tensorboard`` package is installed (it is optional).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path

from utils import InputError, atomic_write_bytes, atomic_write_text

CSV_NAME, PNG_NAME = "metrics.csv", "curves.png"


def read_rows(path: str | os.PathLike) -> list[dict[str, float]]:
    """metrics.csv as a list of {column: value} (empty cells left out); an ``InputError`` when the
    file is damaged (a cell that is no number, a row without its epoch, a row longer than the header)."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [{key: float(value) for key, value in row.items() if value not in ("", None)}
                    for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as error:
        raise InputError(f"{path} is damaged ({type(error).__name__}: {error})") from None
    if any("epoch" not in row or not float(row["epoch"]).is_integer() for row in rows):
        raise InputError(f"{path} is damaged (a row without a whole epoch number)")
    return rows


def epoch_row(epoch: int, losses: dict[str, float], selection: dict[str, float]) -> dict[str, float]:
    """The metrics.csv row of an epoch: its loss terms as ``train/<term>`` and its selection metrics."""
    return {"epoch": float(epoch), **{f"train/{key}": float(value) for key, value in losses.items()},
            **{key: float(value) for key, value in selection.items()}}


def write_rows(path: str | os.PathLike, rows: list[dict[str, float]]) -> None:
    columns = ["epoch"] + sorted({key for row in rows for key in row if key.startswith("train/")}) + sorted(
        {key for row in rows for key in row if key != "epoch" and not key.startswith("train/")})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (int(value) if key == "epoch" else f"{value:.6g}") for key, value in row.items()})
    atomic_write_text(path, text.getvalue())


def plotted_metrics(rows: list[dict[str, float]]) -> list[str]:
    """Selection AUROC/AUPRO columns (means first, then per source)."""
    keys = {key for row in rows for key in row if key.endswith(("auroc", "aupro"))}
    return sorted(keys, key=lambda key: ("/" in key, key))


def draw(path: str | os.PathLike, rows: list[dict[str, float]]) -> None:
    """curves.png: loss terms and selection AUROC/AUPRO against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for key in sorted({key for row in rows for key in row if key.startswith("train/")}):
        points = [(row["epoch"], row[key]) for row in rows if key in row and math.isfinite(row[key])]
        losses.plot(*zip(*points), marker="o", markersize=3, label=key.removeprefix("train/"),
                    linewidth=2.2 if key == "train/loss" else 1.4)
    losses.set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    for key in plotted_metrics(rows):
        points = [(row["epoch"], row[key]) for row in rows if key in row and math.isfinite(row[key])]
        if points:
            metrics.plot(*zip(*points), marker="o", markersize=3, label=key,
                         linestyle="-" if "/" not in key else "--", linewidth=2.2 if "/" not in key else 1.2)
    metrics.set(title="model selection (held-out / valid)", xlabel="epoch", ylabel="AUROC / AUPRO", ylim=(0, 1.02))
    for axis in (losses, metrics):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def tensorboard_writer(save_path: str | os.PathLike, logger: logging.Logger):
    """A TensorBoard SummaryWriter in ``save_path/tensorboard``, or None (logged) when not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                       "metrics.csv and curves.png are written anyway")
        return None
    return SummaryWriter(log_dir=str(Path(save_path) / "tensorboard"))


def log_epoch(save_path: str | os.PathLike, epoch: int, losses: dict[str, float], selection: dict[str, float],
              writer=None) -> dict[str, float]:
    """Add (or replace) this epoch's row in metrics.csv, redraw curves.png, log to TensorBoard."""
    save_path = Path(save_path)
    row = epoch_row(epoch, losses, selection)
    rows = [old for old in read_rows(save_path / CSV_NAME) if old["epoch"] < epoch] + [row]
    write_rows(save_path / CSV_NAME, rows)
    draw(save_path / PNG_NAME, rows)
    if writer is not None:
        for key, value in row.items():
            if key != "epoch" and math.isfinite(value):
                writer.add_scalar(key if "/" in key else f"selection/{key}", value, epoch)
        writer.flush()
    return row
