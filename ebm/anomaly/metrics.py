"""Detection metrics for anomaly scores (higher score = more anomalous, label 1 = anomaly).

AUROC and AUPRC are scikit-learn's (``roc_auc_score``, ``average_precision_score``); the two
operating-point metrics a fraud team reads are defined here:

- recall at a false-positive rate: the threshold is the ``(1 − fpr)`` quantile of the normal rows'
  scores (ties count against the detector), and the recall is the fraction of anomalies strictly
  above it;
- precision@k: the fraction of anomalies among the ``k`` highest scores, with ``k`` the number of
  anomalies by default (PyOD's "precision @ rank n", R-precision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score


@dataclass(frozen=True)
class DetectionMetrics:
    auroc: float
    auprc: float
    recall_at_1pct_fpr: float
    precision_at_k: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not set(np.unique(y)) <= {0, 1} or y.min() == y.max():
        raise ValueError("labels must be 0 (normal) and 1 (anomaly), with both present")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    return y, s


def recall_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float = 0.01) -> float:
    """Fraction of anomalies scored strictly above the ``(1 − fpr)`` quantile of normal scores."""
    y, s = _checked(labels, scores)
    threshold = np.quantile(s[y == 0], 1.0 - fpr, method="higher")
    return float((s[y == 1] > threshold).mean())


def precision_at_k(labels: ArrayLike, scores: ArrayLike, k: int | None = None) -> float:
    """Fraction of anomalies among the ``k`` top-scored rows (``k`` = number of anomalies if None)."""
    y, s = _checked(labels, scores)
    k = int(y.sum()) if k is None else k
    if not 1 <= k <= y.size:
        raise ValueError(f"k must lie in [1, {y.size}], got {k}")
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean())


def detection_metrics(labels: ArrayLike, scores: ArrayLike) -> DetectionMetrics:
    """AUROC, AUPRC, recall at 1 % FPR and precision@k for one set of scores."""
    y, s = _checked(labels, scores)
    return DetectionMetrics(
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        recall_at_1pct_fpr=recall_at_fpr(y, s, 0.01),
        precision_at_k=precision_at_k(y, s),
    )
