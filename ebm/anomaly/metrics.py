"""Detection metrics for anomaly scores (higher score = more anomalous, label 1 = anomaly).

AUROC and AUPRC are scikit-learn's (``roc_auc_score``, ``average_precision_score``); the two
operating-point metrics a fraud team reads are defined here:

- recall at a false-positive rate: the best recall over thresholds ``t`` (a row is flagged when its
  score is strictly above ``t``) that flag at most a share ``fpr`` of the normal rows. With ``n0`` normal
  rows at most ``k = ⌊fpr · n0⌋`` of them may be flagged, so ``t`` is the ``(k + 1)``-th highest normal
  score (:func:`fpr_threshold`); ties count against the detector: rows tied with ``t`` are not flagged,
  so tied normal rows never push the false-positive rate above ``fpr`` and tied anomalies are missed;
- precision@k: the fraction of anomalies among the ``k`` highest scores, with ``k`` the number of
  anomalies by default (PyOD's "precision @ rank n", R-precision). Rows tied with the ``k``-th highest
  score are taken in a random order, and the value is the expectation over those orders (a constant
  detector gets the base rate, whatever the row order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score

_FLOOR_SLACK = 1e-12
"""Relative slack in ``⌊fpr · n⌋`` so that decimal rates land on their integer (0.29 · 100 = 28.999…96)."""


@dataclass(frozen=True)
class DetectionMetrics:
    auroc: float
    auprc: float
    recall_at_1pct_fpr: float
    precision_at_k: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _checked_labels(labels: ArrayLike) -> np.ndarray:
    raw = np.asarray(labels).ravel()
    if raw.dtype.kind not in "biufO" or (
        raw.dtype.kind == "O" and any(isinstance(value, (str, bytes)) for value in raw)
    ):
        raise ValueError(f"labels must be numbers or booleans equal to 0 or 1, got dtype {raw.dtype}")
    try:
        values = raw.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"labels must be numbers or booleans equal to 0 or 1: {error}") from None
    bad = ~((values == 0.0) | (values == 1.0))  # NaN is neither
    if bad.any():
        raise ValueError(
            f"labels must be exactly 0 (normal) or 1 (anomaly); {int(bad.sum())} are not, "
            f"the first at position {int(np.argmax(bad))}: {float(values[bad][0])!r}"
        )
    return values.astype(np.int64)


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _checked_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0 or y.min() == y.max():
        raise ValueError("labels must hold both 0 (normal) and 1 (anomaly) rows")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    return y, s


def fpr_threshold(normal_scores: ArrayLike, fpr: float) -> float:
    """Lowest threshold ``t`` with at most a share ``fpr`` of ``normal_scores`` strictly above it.

    With ``n`` scores, at most ``k = ⌊fpr · n⌋`` may exceed ``t``, so ``t`` is the ``(k + 1)``-th highest
    score (``-inf`` when ``k = n``). Scores tied with ``t`` are not above it, so with ties fewer than ``k``
    rows may exceed it: the share flagged by ``score > t`` is never above ``fpr``, and it equals
    ``⌊fpr · n⌋ / n`` when the scores are distinct. Any lower threshold would flag more than ``k`` rows.
    """
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("fpr_threshold needs at least one normal score")
    if not np.isfinite(s).all():
        raise ValueError("normal scores hold NaN or infinite values")
    if not 0.0 <= fpr <= 1.0:  # also refuses NaN
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    allowed = min(math.floor(fpr * s.size * (1.0 + _FLOOR_SLACK)), s.size)
    if allowed == s.size:
        return -math.inf
    return float(np.partition(s, s.size - 1 - allowed)[s.size - 1 - allowed])


def recall_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float = 0.01) -> float:
    """Best recall (flag = score strictly above a threshold) that flags at most a share ``fpr`` of normals.

    The threshold is :func:`fpr_threshold` of the normal rows' scores; anomalies tied with it are missed.
    """
    y, s = _checked(labels, scores)
    threshold = fpr_threshold(s[y == 0], fpr)
    return float((s[y == 1] > threshold).mean())


def precision_at_k(labels: ArrayLike, scores: ArrayLike, k: int | None = None) -> float:
    """Fraction of anomalies among the ``k`` top-scored rows (``k`` = number of anomalies if None).

    Rows tied with the ``k``-th highest score ``t`` fill the remaining places in a random order; the value
    is the expectation over those orders, ``(anomalies above t + places left · anomaly share at t) / k``.
    """
    y, s = _checked(labels, scores)
    k = int(y.sum()) if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= y.size:
        raise ValueError(f"k must lie in [1, {y.size}], got {k}")
    kth = np.partition(s, y.size - k)[y.size - k]
    above, tied = s > kth, s == kth
    places_left = k - int(above.sum())
    return float((y[above].sum() + places_left * y[tied].mean()) / k)


def detection_metrics(labels: ArrayLike, scores: ArrayLike) -> DetectionMetrics:
    """AUROC, AUPRC, recall at 1 % FPR and precision@k for one set of scores."""
    y, s = _checked(labels, scores)
    return DetectionMetrics(
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        recall_at_1pct_fpr=recall_at_fpr(y, s, 0.01),
        precision_at_k=precision_at_k(y, s),
    )
