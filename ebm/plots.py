"""Figures of 2D energies (energy and density heatmaps, dataset grids, decision energies) and of detectors
(ROC and precision–recall curves).

Every function builds a :class:`matplotlib.figure.Figure` with its own Agg canvas, so nothing here
selects a global backend or keeps figures alive in pyplot's registry; :func:`save_figure` writes one
to PNG atomically. Energies are evaluated on a grid in batches under inference mode
(:func:`ebm.evaluation.density2d.energy_on_grid`); the density shown is ``exp(−E)/Z`` with Z from
that same grid, so each density heatmap integrates to 1 over the plotted box.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ebm.checkpoint import atomic_write
from ebm.energies import EnergyFn
from ebm.evaluation.curves import DetectionCurves
from ebm.evaluation.density2d import (
    LogProbFn,
    energy_on_grid,
    evaluate_batched,
    grid_centres,
    grid_points,
    log_partition_from_grid,
    module_placement,
    raise_if_rows_not_finite,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

JointEnergyFn = Callable[[Tensor, Tensor], Tensor]

DATA_STYLE: dict[str, Any] = {"s": 3, "c": "white", "alpha": 0.35, "linewidths": 0, "label": "data"}
SAMPLE_STYLE: dict[str, Any] = {
    "s": 6,
    "c": "tab:red",
    "marker": "x",
    "alpha": 0.6,
    "linewidths": 0.6,
    "label": "samples",
}
MAX_POINTS = 2000


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on an Agg canvas, outside pyplot's figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and durably (:func:`ebm.checkpoint.atomic_write`).

    The file has mode 0644; if ``savefig`` fails, the previous file at ``path`` is kept and the temporary
    file removed.
    """
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), suffix=".tmp.png")


def plot_energy_and_density(
    energy: EnergyFn,
    bounds: tuple[float, float],
    *,
    data: Tensor | None = None,
    samples: Tensor | None = None,
    title: str | None = None,
    resolution: int = 200,
) -> Figure:
    """Two panels: the learned energy E(x) and the learned density exp(−E)/Z, with data and samples.

    Raises:
        ValueError: if ``data`` or ``samples`` is not of shape ``(N, 2)``, or an energy is not finite.
    """
    data, samples = _points_or_none(data, "data"), _points_or_none(samples, "samples")
    energies = energy_on_grid(energy, bounds, resolution)
    fig = new_figure(11, 4.8)
    energy_ax, density_ax = fig.subplots(1, 2)
    _heatmap(energy_ax, energies, bounds, kind="energy", title="learned energy E(x)")
    _heatmap(
        density_ax, _density(energies, bounds), bounds, kind="density", title="learned density exp(−E)/Z"
    )
    for ax in (energy_ax, density_ax):
        _overlay(ax, data, samples)
    if data is not None or samples is not None:
        density_ax.legend(loc="upper right", fontsize="small", markerscale=3, framealpha=0.8)
    if title is not None:
        fig.suptitle(title)
    return fig


@dataclass(frozen=True)
class DensityPanel:
    """One row of :func:`plot_density_grid`: a dataset, the energy learned on it and its metrics."""

    name: str
    energy: EnergyFn
    bounds: tuple[float, float]
    true_log_prob: LogProbFn | None = None
    data: Tensor | None = None
    samples: Tensor | None = None
    nll: float | None = None
    gap: float | None = None


SAMPLES_TITLE = "data and samples over p(x)"


def plot_density_grid(panels: Sequence[DensityPanel], *, resolution: int = 150) -> Figure:
    """One row per dataset: true density, learned density, learned energy, data and samples overlaid.

    The true and learned densities of a row share one colour scale (the colour bar on the learned
    one). A missing true density or missing samples leave their panel blank with a note.

    Raises:
        ValueError: if ``panels`` is empty or a panel's points are not of shape ``(N, 2)``.
    """
    if not panels:
        raise ValueError("plot_density_grid needs at least one panel")
    fig = new_figure(16, 3.6 * len(panels))
    axes = fig.subplots(len(panels), 4, squeeze=False)
    for row, panel in zip(axes, panels, strict=True):
        _density_row(row, panel, resolution)
    return fig


def _density_row(row: Sequence[Axes], panel: DensityPanel, resolution: int) -> None:
    true_ax, density_ax, energy_ax, samples_ax = row
    data = _points_or_none(panel.data, f"{panel.name} data")
    samples = _points_or_none(panel.samples, f"{panel.name} samples")
    energies = energy_on_grid(panel.energy, panel.bounds, resolution)
    density = _density(energies, panel.bounds)
    vmax = float(density.max())
    if panel.true_log_prob is not None:
        true_log_prob = evaluate_batched(panel.true_log_prob, grid_points(panel.bounds, resolution))
        true_density = true_log_prob.exp().reshape(resolution, resolution)
        vmax = max(vmax, float(true_density.max()))
        _heatmap(
            true_ax,
            true_density,
            panel.bounds,
            kind="density",
            title=f"{panel.name}: true density",
            vmax=vmax,
            colorbar=False,
        )
    else:
        _blank(true_ax, f"{panel.name}: no true density")
    _heatmap(density_ax, density, panel.bounds, kind="density", title=_metrics_title(panel), vmax=vmax)
    _heatmap(energy_ax, energies, panel.bounds, kind="energy", title="learned energy E(x)")
    if samples is None:
        _blank(samples_ax, "no samples")
        return
    # the learned density again, in light grey under the points (its peak at mid-grey, so the points stay
    # legible on a flat density): where the samples fall against where the model puts its mass, and the
    # data (blue) beside them
    samples_ax.imshow(
        density.numpy(),
        origin="lower",
        extent=(*panel.bounds, *panel.bounds),
        cmap="Greys",
        vmin=0.0,
        vmax=2 * vmax,
        interpolation="nearest",
    )
    _overlay(samples_ax, data, samples, data_style={"c": "tab:blue", "alpha": 0.3})
    samples_ax.set(xlim=panel.bounds, ylim=panel.bounds, title=SAMPLES_TITLE, xlabel="x₁", ylabel="x₂")
    samples_ax.set_aspect("equal")
    samples_ax.legend(loc="upper right", fontsize="small", markerscale=3, framealpha=0.8)


def plot_decision_energy(
    joint_energy: JointEnergyFn,
    bounds: tuple[float, float],
    *,
    x: Tensor,
    y: Tensor,
    resolution: int = 200,
) -> Figure:
    """Heatmap of E(x, 1) − E(x, 0) for a binary classifier E(x, y), its zero contour and the points.

    Where the difference is positive class 0 has the lower energy (blue, like the y = 0 points), where
    negative class 1 (red); the zero contour is the decision boundary.

    Args:
        joint_energy: maps ``x (B, 2)`` and integer labels ``y (B,)`` to energies ``(B,)``.
        x, y: labelled points ``(N, 2)`` and labels ``(N,)`` in {0, 1}.

    Raises:
        ValueError: on points not of shape ``(N, 2)``, labels not of shape ``(N,)`` or not in {0, 1}.
    """
    points = _points(x, "x")
    labels = _binary_labels(y, len(points))
    # The wrapper below hides the classifier's module from evaluate_batched, so place the batches here.
    device, dtype = module_placement(joint_energy)

    def energy_given(label: int) -> EnergyFn:
        def energy(batch: Tensor) -> Tensor:
            batch = batch.to(device=device, dtype=dtype)
            return joint_energy(batch, torch.full((len(batch),), label, device=device))

        return energy

    difference = energy_on_grid(energy_given(1), bounds, resolution, device=device) - energy_on_grid(
        energy_given(0), bounds, resolution, device=device
    )
    fig = new_figure(6.4, 5.2)
    ax = fig.subplots()
    limit = float(difference.abs().max()) or 1.0
    image = ax.imshow(
        difference.numpy(),
        origin="lower",
        extent=(*bounds, *bounds),
        cmap="RdBu",
        vmin=-limit,
        vmax=limit,
        interpolation="nearest",
    )
    fig.colorbar(image, ax=ax, label="E(x, 1) − E(x, 0)   (> 0: class 0 more likely)")
    if difference.min() < 0 < difference.max():
        centres = grid_centres(bounds, resolution)
        ax.contour(
            centres.numpy(), centres.numpy(), difference.numpy(), levels=[0.0], colors="black", linewidths=1.5
        )
    shown, shown_labels = _thin(points), _thin(labels)
    for label, colour in ((0, "tab:blue"), (1, "tab:red")):
        selected = shown[shown_labels == label]
        ax.scatter(
            selected[:, 0],
            selected[:, 1],
            s=8,
            c=colour,
            edgecolors="white",
            linewidths=0.3,
            label=f"y = {label}",
        )
    ax.plot([], [], color="black", label="decision boundary")
    ax.set(xlim=bounds, ylim=bounds, xlabel="x₁", ylabel="x₂", title="decision energy E(x, 1) − E(x, 0)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
    return fig


def plot_detection_curves(curves: Mapping[str, DetectionCurves], *, title: str | None = None) -> Figure:
    """Two panels: ROC curves with the diagonal, precision–recall curves with the no-skill line.

    The legends give each model's AUROC and AUPRC (computed from its scores, not the thinned points);
    the no-skill precision is the positive rate of the first model's labels.

    Raises:
        ValueError: ``curves`` is empty.
    """
    if not curves:
        raise ValueError("plot_detection_curves needs at least one model's curves")
    fig = new_figure(11, 4.8)
    roc_ax, pr_ax = fig.subplots(1, 2)
    _roc_panel(roc_ax, {f"{name} (AUROC {c.auroc:.4f})": (c.fpr, c.tpr) for name, c in curves.items()})
    positive_rate = next(iter(curves.values())).positive_rate
    for name, c in curves.items():
        pr_ax.plot(c.recall, c.precision, linewidth=1.5, label=f"{name} (AUPRC {c.auprc:.4f})")
    pr_ax.axhline(
        positive_rate, color="tab:gray", linestyle="--", linewidth=1, label=f"no skill ({positive_rate:.3f})"
    )
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="precision–recall")
    pr_ax.legend(loc="lower left", fontsize="small", framealpha=0.8)
    if title is not None:
        fig.suptitle(title)
    return fig


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    aurocs: Mapping[str, float] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """One panel of ROC curves ``{name: (fpr, tpr)}`` with the diagonal; ``aurocs`` label the legend.

    Raises:
        ValueError: ``curves`` is empty.
    """
    if not curves:
        raise ValueError("plot_roc_curves needs at least one curve")
    aurocs = aurocs or {}
    fig = new_figure(6.4, 5.4)
    ax = fig.subplots()
    _roc_panel(
        ax,
        {f"{name} (AUROC {aurocs[name]:.4f})" if name in aurocs else name: c for name, c in curves.items()},
    )
    if title is not None:
        ax.set_title(title)
    return fig


# --- helpers --------------------------------------------------------------------------------------


def _roc_panel(ax: Axes, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, linewidth=1.5, label=label)
    ax.plot([0, 1], [0, 1], color="tab:gray", linestyle="--", linewidth=1, label="chance")
    ax.set(
        xlim=(0, 1), ylim=(0, 1.02), xlabel="false-positive rate", ylabel="true-positive rate", title="ROC"
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="small", framealpha=0.8)


def _density(energies: Tensor, bounds: tuple[float, float]) -> Tensor:
    return (-energies - log_partition_from_grid(energies, bounds)).exp()


def _heatmap(
    ax: Axes,
    values: Tensor,
    bounds: tuple[float, float],
    *,
    kind: str,
    title: str,
    vmax: float | None = None,
    colorbar: bool = True,
) -> AxesImage:
    """Show ``values (R, R)`` over ``[lo, hi]²``; energies are clipped at their 95th percentile so the
    low-energy region, not the far tails, gets the colour range."""
    if kind == "energy":
        low, high = float(values.min()), float(values.flatten().quantile(0.95))
        image = ax.imshow(
            values.numpy(),
            origin="lower",
            extent=(*bounds, *bounds),
            cmap="magma",
            vmin=low,
            vmax=high if high > low else None,
            interpolation="nearest",
        )
        label, extend = "E(x)", "max"
    else:
        image = ax.imshow(
            values.numpy(),
            origin="lower",
            extent=(*bounds, *bounds),
            cmap="viridis",
            vmin=0.0,
            vmax=vmax,
            interpolation="nearest",
        )
        label, extend = "density", "neither"
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label, extend=extend, shrink=0.85)
    ax.set(xlim=bounds, ylim=bounds, title=title, xlabel="x₁", ylabel="x₂")
    ax.set_aspect("equal")
    return image


def _overlay(
    ax: Axes, data: Tensor | None, samples: Tensor | None, *, data_style: dict[str, Any] | None = None
) -> None:
    if data is not None:
        shown = _thin(data)
        ax.scatter(shown[:, 0], shown[:, 1], **{**DATA_STYLE, **(data_style or {})})
    if samples is not None:
        shown = _thin(samples)
        ax.scatter(shown[:, 0], shown[:, 1], **SAMPLE_STYLE)


def _blank(ax: Axes, note: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="tab:gray")


def _metrics_title(panel: DensityPanel) -> str:
    metrics = [
        f"{name} {value:.3f}" for name, value in (("NLL", panel.nll), ("gap", panel.gap)) if value is not None
    ]
    return f"learned density ({', '.join(metrics)} nats)" if metrics else "learned density"


def _points(x: Tensor, what: str) -> Tensor:
    points = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{what} must have shape (N, 2), got {tuple(points.shape)}")
    raise_if_rows_not_finite(points, what)  # matplotlib would leave them out of the scatter without a word
    return points


def _binary_labels(y: Tensor, n_points: int) -> Tensor:
    labels = torch.as_tensor(y).detach().cpu()
    if labels.shape != (n_points,):
        raise ValueError(f"y must have shape ({n_points},) to match x, got {tuple(labels.shape)}")
    if not ((labels == 0) | (labels == 1)).all():  # any dtype: isin refuses bool labels such as x[:, 0] < 0
        raise ValueError(f"y must hold binary labels 0/1, got values {labels.unique().tolist()}")
    return labels.long()


def _points_or_none(x: Tensor | None, what: str) -> Tensor | None:
    return None if x is None else _points(x, what)


def _thin(rows: Tensor) -> Tensor:
    """At most ``MAX_POINTS`` rows, evenly strided (deterministic, no RNG)."""
    return rows[:: max(1, math.ceil(len(rows) / MAX_POINTS))]
