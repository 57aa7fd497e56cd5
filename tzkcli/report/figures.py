"""The report's figures, drawn with matplotlib (Agg backend) and returned as PNG bytes.

matplotlib is imported inside each function, so importing this module stays cheap. Every
function takes plain numbers or uint8 arrays and returns the bytes of one PNG file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DPI = 100
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight",
                   metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def tile(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Lay out uint8 images ``[n, C, H, W]`` (C = 1 or 3) in a grid: ``[rows*H', columns*W']``
    (grey) or ``[..., 3]`` (colour), with ``pad`` pixels of mid grey between tiles."""
    n, channels, height, width = images.shape
    rows = max(1, -(-n // columns))
    cell_h, cell_w = height + pad, width + pad
    sheet = np.full((rows * cell_h + pad, columns * cell_w + pad, channels), 128, np.uint8)
    for i in range(n):
        top, left = pad + (i // columns) * cell_h, pad + (i % columns) * cell_w
        sheet[top:top + height, left:left + width] = images[i].transpose(1, 2, 0)
    return sheet[..., 0] if channels == 1 else sheet


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 2) -> bytes:
    """A grid of uint8 images ``[n, C, H, W]`` as a PNG, each pixel ``scale`` x ``scale``."""
    plt = _pyplot()
    sheet = tile(images, columns)
    sheet = np.repeat(np.repeat(sheet, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    plt.imsave(buffer, sheet, cmap="gray", vmin=0, vmax=255, format="png",
               metadata={"Software": None})
    return buffer.getvalue()


@dataclass
class Curve:
    """One line of a training plot: bpd at steps, with the training time of each step."""

    label: str
    steps: np.ndarray
    seconds: np.ndarray
    bpd: np.ndarray
    color: str
    style: str = "-"
    width: float = 1.5
    alpha: float = 1.0


def training_curves(curves: Sequence[Curve], title: str) -> bytes:
    """bpd against step (left) and against training time (right), one legend below."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for curve in curves:
        for axis, x in zip(axes, (curve.steps, curve.seconds / 60)):
            axis.plot(x, curve.bpd, curve.style, color=curve.color, linewidth=curve.width,
                      alpha=curve.alpha, label=curve.label, marker="." if len(x) < 30 else None)
    axes[0].set_xlabel("optimiser step")
    axes[1].set_xlabel("training time (minutes)")
    axes[0].set_ylabel("bits per dimension")
    for axis in axes:
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))),
                  bbox_to_anchor=(0.5, -0.02 - 0.05 * ((len(labels) - 1) // 4)), frameon=False)
    figure.tight_layout(rect=(0, 0.08 + 0.05 * ((len(labels) - 1) // 4), 1, 1))
    return _png(figure)


def confusion_matrix(matrix: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """A confusion matrix (rows: true value, columns: predicted), counts annotated, colours
    by the row-normalised fraction."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n = len(labels)
    side = min(10.0, 2.5 + 0.45 * n)
    figure, axis = plt.subplots(figsize=(side + 1.2, side))
    shown = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    short = [label.split("/", 1)[-1][-22:] for label in labels]
    tilted = n > 4
    axis.set_xticks(range(n), short, rotation=60 if tilted else 0,
                    ha="right" if tilted else "center")
    axis.set_yticks(range(n), short)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                colour = "white" if fractions[i, j] > 0.6 else "black"
                axis.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                          color=colour, fontsize=8)
    figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04, label="fraction of the row")
    return _png(figure)


def counts_chart(datasets: Sequence[str], splits: Sequence[str],
                 counts: np.ndarray) -> bytes:
    """Images per dataset (rows of ``counts``) and split (columns), as grouped bars."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(datasets) + 2), 3.2))
    width = 0.8 / max(1, len(splits))
    positions = np.arange(len(datasets))
    for j, split in enumerate(splits):
        bars = axis.bar(positions + (j - (len(splits) - 1) / 2) * width, counts[:, j], width,
                        label=split, color=PALETTE[j % len(PALETTE)])
        axis.bar_label(bars, fmt="{:,.0f}", fontsize=8, padding=2)
    axis.set_xticks(positions, datasets)
    axis.set_ylabel("images")
    axis.legend(frameon=False)
    axis.margins(y=0.15)
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return _png(figure)
