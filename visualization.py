"""Heatmap overlays, montages and ROC/PRO curve plots."""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np
import torch


def to_display(image: torch.Tensor) -> np.ndarray:
    """Model input [3,H,W] RGB in [0,1] -> uint8 RGB [H,W,3]."""
    rgb = image.float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return (rgb * 255).round().astype(np.uint8)


def fit_within(image: np.ndarray, longest: int) -> np.ndarray:
    """``image`` shrunk, keeping its aspect, so that its longest side is at most ``longest`` pixels;
    unchanged when it already fits."""
    height, width = image.shape[:2]
    scale = longest / max(height, width)
    if scale >= 1:
        return image
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def colorize(heat: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Heat [H,W] -> RGB uint8 [H,W,3] with the jet colormap, scaled to [vmin, vmax]."""
    scaled = np.clip((heat.astype(np.float32) - vmin) / max(vmax - vmin, 1e-8), 0, 1)
    bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay_panel(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float,
                  mask: np.ndarray | None = None, text: str | None = None) -> np.ndarray:
    """image | heatmap | overlay [| mask] side by side, uint8 RGB [H, 3W or 4W, 3]; ``text`` drawn on top."""
    heatmap = colorize(heat, vmin, vmax)
    overlay = cv2.addWeighted(image, 0.55, heatmap, 0.45, 0)
    panels = [image, heatmap, overlay]
    if mask is not None:
        panels.append(np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2))
    panel = np.concatenate(panels, axis=1)
    if text:
        scale = max(image.shape[0] / 400, 0.35)
        cv2.putText(panel, text, (4, int(16 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(int(scale * 2), 1), cv2.LINE_AA)
    return panel


def montage(panels: Sequence[np.ndarray], columns: int = 1) -> np.ndarray:
    """Stack equally sized panels into a grid, ``columns`` wide."""
    blank = np.zeros_like(panels[0])
    rows = [list(panels[i:i + columns]) for i in range(0, len(panels), columns)]
    rows[-1] += [blank] * (columns - len(rows[-1]))
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def save_curve(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str,
               title: str, xlim: float = 1.0) -> None:
    """A single curve plot as PNG (ROC or PRO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4), dpi=100)
    axis.plot(x, y)
    axis.set_xlim(0, xlim)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
