"""Why a row scored high: attributions of the anomaly energy to the raw columns, and a score histogram.

The score is ``S(x) = Σ_j e_j(x_j) + C(z(x)) + R(x)``: the marginal energies, the Gaussian copula
term over the columns' normal scores ``z`` and the residual part ``R(x) = scale · max(0, f̄(x) − f̄₀)``
(see :class:`~ebm.anomaly.energy.AnomalyEnergy`). Attributions say how much each column raises the
energy *relative to a typical row* ``x₀``, column by column:

- the marginal part is additive, so its share is exact: ``e_j(x_j) − e_j(x₀_j)``;
- the copula part is a clipped quadratic form in ``z``, so its shares are exact too, in closed form
  (:meth:`~ebm.anomaly.energy.GaussianCopula.attribute`): they add up to ``C(z(x)) − C(z(x₀))``;
- the residual part is attributed by gradient × input, ``(x_j − x₀_j) · ∂R/∂x_j(x)`` (one backward
  pass), or by integrated gradients, ``(x_j − x₀_j) · ∫₀¹ ∂R/∂x_j(x₀ + α(x − x₀)) dα`` (Sundararajan et
  al. 2017, https://arxiv.org/abs/1703.01365; ``n_steps`` midpoint evaluations), whose sum over columns
  is ``R(x) − R(x₀)`` up to the quadrature error.

With integrated gradients the attributions therefore add up to ``S(x) − S(x₀)``. Indicator columns of a
category are summed back into their raw column.

The typical row ``x₀`` (:func:`reference_row`) holds each column's central value: for a numeric column
its training median, which robust scaling maps to 0; for a categorical column the one-hot vector of its
*modal* level, the level the fitted marginal energy finds most likely. The all-zero ``x`` is no
reference for a category: there it stands for the per-indicator medians, usually "no level at all",
which no real row has, so every row's category would be credited ``≈ log((1 − p)/p) > 0`` for its
level's frequency ``p``, the most common level included. Against the modal level, a row of that level
gets 0 from its category's marginal part, any other level ``≥ 0``, large only for a rare level.
Without a ``reference`` the functions measure against ``x = 0``, which is the typical row only for
purely numeric data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from ebm.anomaly.energy import AnomalyEnergy

if TYPE_CHECKING:
    from ebm.anomaly.preprocessing import TabularPreprocessor

Method = Literal["gradient_x_input", "integrated_gradients"]


def reference_row(preprocessor: TabularPreprocessor, energy: AnomalyEnergy) -> Tensor:
    """The typical row ``x₀`` that attributions are measured against, shape (C,), in the energy's input.

    Numeric columns: 0, their training median after robust scaling. Each categorical column: the scaled
    one-hot vector (as :meth:`~ebm.anomaly.preprocessing.TabularPreprocessor.transform` writes it) of
    the level whose indicator block has the lowest marginal energy, i.e. the level the fitted model
    finds most likely: the modal level (``other`` when the pooled rare labels outnumber every kept
    label; among nearly equally frequent levels, whichever the energy ranks lowest). The category's
    marginal part is then 0 for a row of that level and ``≥ 0`` for every other level. Derived from the
    stored preprocessor and energy only, so it works for loaded detectors; compute it once per detector.
    """
    if not preprocessor.is_fitted:
        raise RuntimeError("the preprocessor is not fitted; call fit() first")
    if preprocessor.n_features != energy.marginal.table.shape[1]:
        raise ValueError(
            f"the preprocessor writes {preprocessor.n_features} columns, the energy reads "
            f"{energy.marginal.table.shape[1]}"
        )
    center, scale = preprocessor.center, preprocessor.scale
    reference = torch.zeros(preprocessor.n_features, dtype=torch.float64)
    sources = torch.as_tensor(preprocessor.encoded_source, dtype=torch.long)
    for column in preprocessor.categorical:
        block = torch.nonzero(sources == preprocessor.columns.index(column)).flatten()  # (L,) columns
        one_hot = torch.eye(len(block), dtype=torch.float64)  # (L, L): row l is level l's indicators
        levels = (one_hot - center[block]) / scale[block]  # (L, L) scaled, as transform() writes them
        candidates = torch.zeros(len(block), preprocessor.n_features, dtype=energy.marginal.table.dtype)
        candidates[:, block] = levels.to(candidates.dtype)
        with torch.no_grad():
            block_energy = energy.marginal.per_feature(candidates)[:, block].sum(1)  # (L,)
        reference[block] = levels[int(block_energy.argmin())]
    return reference


def _baseline(x: Tensor, reference: Tensor | None) -> Tensor:
    """The reference row as (1, C) in ``x``'s dtype and device; zeros when ``reference`` is None."""
    if reference is None:
        return torch.zeros_like(x[:1])
    baseline = reference.detach().to(dtype=x.dtype, device=x.device).reshape(1, -1)
    if baseline.shape[1] != x.shape[1]:
        raise ValueError(f"reference has {baseline.shape[1]} columns, x has {x.shape[1]}")
    return baseline


def attribute(
    energy: AnomalyEnergy,
    x: Tensor,
    *,
    method: Method = "gradient_x_input",
    n_steps: int = 16,
    reference: Tensor | None = None,
) -> Tensor:
    """Per-row attributions to the energy's input columns, shape (B, C), against a typical row.

    Args:
        method: ``"gradient_x_input"`` (one backward pass) or ``"integrated_gradients"``.
        n_steps: points on the path from the reference row to ``x`` for integrated gradients (midpoint
            rule), an int ≥ 1; checked whatever the method, unused by gradient × input.
        reference: the typical row ``x₀`` (C,), normally :func:`reference_row`; ``None``: ``x = 0``
            (the median row, typical only when no column is categorical).

    Raises:
        ValueError: for an unknown ``method``, or an ``n_steps`` that is not an int ≥ 1 (bools and
            floats included: with 0 or fewer steps no gradient is averaged and every attribution is NaN).
    """
    if method not in ("gradient_x_input", "integrated_gradients"):
        raise ValueError(f"method must be 'gradient_x_input' or 'integrated_gradients', got {method!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 1:
        raise ValueError(f"n_steps must be an int ≥ 1, got {n_steps!r} ({type(n_steps).__name__})")
    n_steps = int(n_steps)
    x = x.detach()
    baseline = _baseline(x, reference)
    with torch.no_grad():
        _, marginal = _exact_parts(energy, x, baseline)
    if not len(energy.members) or energy.scale == 0:
        return marginal
    delta = x - baseline
    alphas = [1.0] if method == "gradient_x_input" else [(k + 0.5) / n_steps for k in range(n_steps)]
    gradient = torch.zeros_like(x)
    with torch.enable_grad():
        for alpha in alphas:
            point = x.clone() if alpha == 1.0 else baseline + alpha * delta
            point.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy.residual_part(point).sum(), point)
            gradient += grad
    return marginal + delta * gradient / len(alphas)


def score_and_attribute(
    energy: AnomalyEnergy, x: Tensor, *, reference: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scores (B,) and gradient × input attributions (B, C) from one forward and one backward pass.

    Args:
        reference: the typical row ``x₀`` (C,) the attributions are measured against, normally
            :func:`reference_row`; ``None``: ``x = 0`` (typical only when no column is categorical).
    """
    x = x.detach()
    baseline = _baseline(x, reference)
    with torch.no_grad():
        score, exact = _exact_parts(energy, x, baseline)
    if not len(energy.members) or energy.scale == 0:
        return score, exact
    with torch.enable_grad():
        point = x.clone().requires_grad_(True)
        residual = energy.residual_part(point)
        (gradient,) = torch.autograd.grad(residual.sum(), point)
    return score + residual.detach(), exact + (x - baseline) * gradient


def _exact_parts(energy: AnomalyEnergy, x: Tensor, baseline: Tensor) -> tuple[Tensor, Tensor]:
    """The marginal and copula parts of the score (B,) and their exact attributions (B, C)."""
    if energy.copula is None:
        per_feature = energy.marginal.per_feature(x)
        return per_feature.sum(1), per_feature - energy.marginal.per_feature(baseline)
    # one look-up of the grid positions gives both tables, for the rows and for the reference
    per_feature, z = energy.marginal.per_feature_and_normal_scores(x)
    baseline_energy, baseline_z = energy.marginal.per_feature_and_normal_scores(baseline)
    score = per_feature.sum(1) + energy.copula(z)
    return score, per_feature - baseline_energy + energy.copula.attribute(z, baseline_z)


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
