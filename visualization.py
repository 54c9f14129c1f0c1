"""Heatmap overlays, montages and curve figures, drawn with matplotlib (the ROC and PRO figures of
results are evaluation/figures.py's).

An overlay figure has titled panels image | anomaly map | overlay [| ground truth] and a colour
bar labelled "anomaly score" over the heat scale [vmin, vmax] (0-1 for probabilities). The map is
drawn with the perceptual colormap ``HEAT_CMAP``; the overlay blends that colour over the image
with weight ``HEAT_ALPHA`` x the pixel's score on the scale, so a score at the bottom of the scale
leaves the image as it is and one at the top shows the colormap's top colour at ``HEAT_ALPHA``:
the anatomy stays readable wherever the model finds nothing.
"""
from __future__ import annotations

import io
from typing import Sequence

import cv2
import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

HEAT_CMAP = "inferno"  # perceptually uniform, lightness rising with the score, readable in grey print
HEAT_ALPHA = 0.45  # the overlay's opacity of the heat at the top of the scale
SCORE_LABEL = "anomaly score"
PANEL_TITLES = ("image", "anomaly map", "overlay", "ground truth")
MIN_PANEL, MAX_PANEL = 256, 1024  # longest side of a drawn panel, in pixels (titles need room; WebP stops at 16383)
DPI = 100


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


def heat_colours(heat: np.ndarray, vmin: float, vmax: float) -> tuple[np.ndarray, np.ndarray]:
    """The heat [H,W] on the scale [vmin, vmax] (clipped to [0, 1], float32 [H,W]) and its
    ``HEAT_CMAP`` colour (float RGB in [0, 1], [H,W,3])."""
    scaled = Normalize(vmin, max(vmax, vmin + 1e-8), clip=True)(heat.astype(np.float32)).filled(0)
    return scaled, matplotlib.colormaps[HEAT_CMAP](scaled)[..., :3]


def blend(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The overlay, uint8 RGB [H,W,3]: image [H,W,3] uint8 mixed with the heat's colour, weight
    ``HEAT_ALPHA`` x the heat's place on [vmin, vmax] (none at vmin, ``HEAT_ALPHA`` at vmax)."""
    scaled, colour = heat_colours(heat, vmin, vmax)
    weight = HEAT_ALPHA * scaled[..., None]
    return ((1 - weight) * image + weight * colour * 255).round().astype(np.uint8)


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) in pixels a panel of an image of that size is drawn at: its own size, its
    longest side brought into [MIN_PANEL, MAX_PANEL]."""
    longest = max(height, width)
    scale = min(max(longest, MIN_PANEL), MAX_PANEL) / longest
    return max(round(height * scale), 1), max(round(width * scale), 1)


def overlay_figure(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float,
                   mask: np.ndarray | None = None, title: str | None = None) -> Figure:
    """Panels image | anomaly map | overlay [| ground truth] (``PANEL_TITLES``) of image uint8 RGB
    [H,W,3], heat [H,W] and mask [H,W], with a colour bar over [vmin, vmax] labelled
    ``SCORE_LABEL`` (the figure's last axes) and ``title`` above. Its size in pixels depends on the
    image's size only, so panels of equally sized images stack (``montage``)."""
    panels = 3 if mask is None else 4
    height, width = panel_size(*image.shape[:2])
    figure = Figure(figsize=((panels * (width + 12) + 110) / DPI, (max(height, 160) + 50 + 24 * bool(title)) / DPI),
                    dpi=DPI, layout="constrained")
    axes = figure.subplots(1, panels)
    axes[0].imshow(image)
    drawn = axes[1].imshow(heat, cmap=HEAT_CMAP, vmin=vmin, vmax=max(vmax, vmin + 1e-8))
    axes[2].imshow(blend(image, heat, vmin, vmax))
    if mask is not None:
        axes[3].imshow(mask > 0, cmap="gray", vmin=0, vmax=1)
    for axis, name in zip(axes, PANEL_TITLES):
        axis.set_title(name, fontsize=10)
        axis.set_axis_off()
    figure.colorbar(drawn, ax=list(axes), label=SCORE_LABEL, fraction=0.05, pad=0.02)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def rendered(figure: Figure) -> np.ndarray:
    """The figure drawn, uint8 RGB [height, width, 3] (its size in inches x its dpi)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def overlay_panel(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float,
                  mask: np.ndarray | None = None, text: str | None = None) -> np.ndarray:
    """``overlay_figure`` drawn: uint8 RGB [h, w, 3], each panel at most MAX_PANEL pixels a side."""
    return rendered(overlay_figure(image, heat, vmin, vmax, mask, text))


def montage(panels: Sequence[np.ndarray], columns: int = 1) -> np.ndarray:
    """Stack equally sized panels into a grid, ``columns`` wide."""
    blank = np.zeros_like(panels[0])
    rows = [list(panels[i:i + columns]) for i in range(0, len(panels), columns)]
    rows[-1] += [blank] * (columns - len(rows[-1]))
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)


def figure_bytes(figure: Figure, file_format: str = "png") -> bytes:
    """The figure encoded as ``file_format`` (png, jpg, pdf, svg, ...: matplotlib's)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=file_format)
    return buffer.getvalue()


def curve_figure(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str, label: str,
                 xlim: float = 1.0, chance: bool = False) -> Figure:
    """One curve [K] with ``label`` in the legend; ``chance`` adds the diagonal of a random ranking."""
    figure = Figure(figsize=(4, 4), dpi=DPI, layout="constrained")
    axis = figure.subplots()
    axis.plot(x, y, label=label)
    if chance:
        axis.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance")
    axis.set(xlim=(0, xlim), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    return figure
