"""Why a row scored high: attributions of the anomaly energy to the raw columns, and a score histogram.

The score is ``S(x) = Σ_j e_j(x_j) + R(x)`` with ``R(x) = scale · max(0, f̄(x) − f̄₀)`` (see
:class:`~ebm.anomaly.energy.AnomalyEnergy`). Attributions are taken against the *median row* (``x = 0`` after
robust scaling), column by column:

- the marginal part is additive, so its share is exact: ``e_j(x_j) − e_j(0)``;
- the residual part is attributed by gradient × input, ``x_j · ∂R/∂x_j(x)`` (one backward pass), or by
  integrated gradients, ``x_j · ∫₀¹ ∂R/∂x_j(αx) dα`` (Sundararajan et al. 2017,
  https://arxiv.org/abs/1703.01365; ``n_steps`` midpoint evaluations), whose sum over columns is
  ``R(x) − R(0)`` up to the quadrature error.

With integrated gradients the attributions therefore add up to ``S(x) − S(median row)``. Indicator
columns of a category are summed back into their raw column.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ebm.anomaly.energy import AnomalyEnergy

Method = Literal["gradient_x_input", "integrated_gradients"]


def residual_part(energy: AnomalyEnergy, x: Tensor) -> Tensor:
    """``R(x) = scale · max(0, f̄(x) − f̄₀)``, shape (B,)."""
    return energy.scale * torch.relu(energy.residual(x) - energy.offset)


def attribute(
    energy: AnomalyEnergy, x: Tensor, *, method: Method = "gradient_x_input", n_steps: int = 16
) -> Tensor:
    """Per-row attributions to the energy's input columns, shape (B, C), against the median row."""
    if method not in ("gradient_x_input", "integrated_gradients"):
        raise ValueError(f"method must be 'gradient_x_input' or 'integrated_gradients', got {method!r}")
    x = x.detach()
    with torch.no_grad():
        marginal = energy.marginal.per_feature(x) - energy.marginal.per_feature(torch.zeros_like(x[:1]))
    if not len(energy.members) or energy.scale == 0:
        return marginal
    alphas = [1.0] if method == "gradient_x_input" else [(k + 0.5) / n_steps for k in range(n_steps)]
    gradient = torch.zeros_like(x)
    with torch.enable_grad():
        for alpha in alphas:
            point = (alpha * x).requires_grad_(True)
            (grad,) = torch.autograd.grad(residual_part(energy, point).sum(), point)
            gradient += grad
    return marginal + x * gradient / len(alphas)


def score_and_attribute(energy: AnomalyEnergy, x: Tensor) -> tuple[Tensor, Tensor]:
    """Scores (B,) and gradient × input attributions (B, C) from one forward and one backward pass."""
    x = x.detach()
    with torch.no_grad():
        per_feature = energy.marginal.per_feature(x)
        baseline = energy.marginal.per_feature(torch.zeros_like(x[:1]))
    if not len(energy.members) or energy.scale == 0:
        return per_feature.sum(1), per_feature - baseline
    with torch.enable_grad():
        point = x.clone().requires_grad_(True)
        residual = residual_part(energy, point)
        (gradient,) = torch.autograd.grad(residual.sum(), point)
    return per_feature.sum(1) + residual.detach(), per_feature - baseline + x * gradient


def to_raw_columns(attributions: Tensor, sources: Sequence[int], n_columns: int) -> Tensor:
    """Sum encoded-column attributions (B, C) into raw columns (B, n_columns) by ``sources``."""
    index = torch.as_tensor(list(sources), dtype=torch.long, device=attributions.device)
    out = attributions.new_zeros(attributions.shape[0], n_columns)
    return out.index_add_(1, index, attributions)


def top_attributions(
    attributions: Tensor, names: Sequence[str], k: int = 3
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each row, the ``k`` columns pushing the score up most: (names per rank, values per rank)."""
    k = min(k, attributions.shape[1])
    values, index = attributions.topk(k, dim=1)
    labels = np.asarray(list(names), dtype=object)
    return [labels[index[:, r].numpy()] for r in range(k)], [values[:, r].numpy() for r in range(k)]


def plot_score_histogram(
    scores: np.ndarray,
    flagged: np.ndarray,
    threshold: float,
    path: str | os.PathLike[str],
    *,
    labels: np.ndarray | None = None,
    title: str = "Anomaly energy",
) -> Path:
    """Histogram of scores of normal vs flagged rows (and of true anomalies when ``labels`` is given), PNG."""
    from matplotlib.figure import Figure

    from ebm.plots import save_figure

    scores = np.asarray(scores, dtype=np.float64)
    flagged = np.asarray(flagged).astype(bool)
    low, high = np.quantile(scores, [0.001, 1.0])
    bins = np.linspace(low, high, 80).tolist()
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    axis.hist(
        np.clip(scores[~flagged], low, high), bins=bins, alpha=0.6, label=f"normal ({(~flagged).sum():,})"
    )
    axis.hist(np.clip(scores[flagged], low, high), bins=bins, alpha=0.6, label=f"flagged ({flagged.sum():,})")
    if labels is not None:
        truth = np.asarray(labels).astype(bool)
        axis.hist(
            np.clip(scores[truth], low, high),
            bins=bins,
            histtype="step",
            color="black",
            label=f"labelled anomalies ({truth.sum():,})",
        )
    axis.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    axis.set_yscale("log")
    axis.set_xlabel("anomaly energy (higher = more anomalous)")
    axis.set_ylabel("rows")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path)
