"""Figures of the Boltzmann-machine and structured-prediction results (PNG, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ebm.boltzmann.structured import InferenceRow
from ebm.plots import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_inference_table(rows: Sequence[InferenceRow], *, title: str = "") -> Figure:
    """Gibbs vs Langevin side by side: per-pixel accuracy, IoU, energy reached and wall time per method."""
    figure = new_figure(13.0, 0.45 * len(rows) + 1.6)
    panels = figure.subplots(1, 4, sharey=True)
    names = [row.method for row in rows]
    positions = list(range(len(rows)))
    columns = (
        ("per-pixel accuracy", [row.accuracy for row in rows], "{:.3f}"),
        ("foreground IoU", [row.iou for row in rows], "{:.3f}"),
        ("mean energy E(x, ŷ) (lower: better optimum)", [row.energy for row in rows], "{:.0f}"),
        ("wall time, s", [row.seconds for row in rows], "{:.2f}"),
    )
    for axis, (label, values, fmt) in zip(panels, columns, strict=True):
        colours = ["tab:grey" if row.steps == 0 else "tab:blue" for row in rows]
        colours = [
            "tab:orange" if "Langevin" in name else colour
            for name, colour in zip(names, colours, strict=True)
        ]
        axis.barh(positions, values, color=colours)
        for position, value in zip(positions, values, strict=True):
            axis.annotate(
                fmt.format(value),
                (value, position),
                fontsize=7,
                va="center",
                xytext=(2, 0),
                textcoords="offset points",
            )
        axis.set_title(label, fontsize=9)
        axis.tick_params(labelsize=8)
    if panels[0].get_xlim()[0] >= 0:
        low = min(row.accuracy for row in rows)
        panels[0].set_xlim(max(0.0, low - 0.05), 1.02)
    panels[0].set_yticks(positions, names)
    panels[0].invert_yaxis()
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def structured_examples(states: Tensor, labels: Mapping[str, Tensor], n_images: int = 8) -> Tensor:
    """Image rows for a grid: noisy input (clipped to [0, 1]), true mask, then each method's labels.

    Returns:
        ``((2 + len(labels)) · n, 1, H, W)``, one row of ``n`` images per panel.
    """
    x, y = states[:n_images, :1].cpu(), states[:n_images, 1:].cpu()
    rows = [x.clamp(0.0, 1.0), y, *(predicted[:n_images].cpu() for predicted in labels.values())]
    return torch.cat(rows)
