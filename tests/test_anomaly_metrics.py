"""Detection metrics: equivalence with scikit-learn and hand-checked operating points."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ebm.anomaly.metrics import detection_metrics, precision_at_k, recall_at_fpr


def test_auroc_and_auprc_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=500) < 0.1).astype(int)
    scores = rng.normal(size=500) + 2 * labels
    report = detection_metrics(labels, scores)
    assert report.auroc == pytest.approx(roc_auc_score(labels, scores))
    assert report.auprc == pytest.approx(average_precision_score(labels, scores))


def test_recall_at_fpr_uses_the_normal_rows_quantile_and_counts_ties_against_the_detector() -> None:
    normal = np.arange(100.0)  # the 99th-percentile threshold ("higher") is 99
    labels = np.r_[np.zeros(100), np.ones(4)]
    scores = np.r_[normal, [99.0, 99.5, 150.0, 10.0]]
    assert recall_at_fpr(labels, scores, 0.01) == pytest.approx(2 / 4)


def test_precision_at_k_defaults_to_the_number_of_anomalies() -> None:
    labels = np.array([0, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.0])
    assert precision_at_k(labels, scores) == pytest.approx(0.5)  # top 2: rows 0 (normal) and 1 (anomaly)
    assert precision_at_k(labels, scores, k=4) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("labels", "scores"),
    [([0, 0, 0], [1.0, 2.0, 3.0]), ([0, 1, 2], [1.0, 2.0, 3.0]), ([0, 1], [1.0, np.nan]), ([0, 1], [1.0])],
)
def test_bad_inputs_are_refused(labels: list[int], scores: list[float]) -> None:
    with pytest.raises(ValueError):
        detection_metrics(labels, scores)
