"""Detection metrics: equivalence with scikit-learn and hand-checked operating points."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ebm.anomaly.metrics import detection_metrics, fpr_threshold, precision_at_k, recall_at_fpr


def test_auroc_and_auprc_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=500) < 0.1).astype(int)
    scores = rng.normal(size=500) + 2 * labels
    report = detection_metrics(labels, scores)
    assert report.auroc == pytest.approx(roc_auc_score(labels, scores))
    assert report.auprc == pytest.approx(average_precision_score(labels, scores))


def test_recall_at_fpr_lets_a_share_fpr_of_normal_rows_above_the_threshold() -> None:
    normal = np.arange(100.0)  # 1 % of 100 rows: one normal row (99) may be flagged, so the threshold is 98
    labels = np.r_[np.zeros(100), np.ones(4)]
    scores = np.r_[normal, [98.0, 98.5, 150.0, 10.0]]
    assert recall_at_fpr(labels, scores, 0.01) == pytest.approx(2 / 4)  # 98 ties the threshold: missed
    assert recall_at_fpr(labels, scores, 0.0) == pytest.approx(1 / 4)  # threshold 99: only 150 is above
    assert recall_at_fpr(labels, scores, 0.9) == pytest.approx(4 / 4)  # threshold 9: 10 is above
    assert recall_at_fpr(labels, scores, 1.0) == pytest.approx(4 / 4)


def test_recall_at_fpr_counts_ties_against_the_detector() -> None:
    # 3 % of the normal rows tie at 1.0: flagging them would exceed 2 % FPR, so none of them may be flagged
    normal = np.r_[np.zeros(97), np.ones(3)]
    labels = np.r_[np.zeros(100), np.ones(2)]
    scores = np.r_[normal, [1.0, 2.0]]
    assert fpr_threshold(normal, 0.02) == 1.0
    assert recall_at_fpr(labels, scores, 0.02) == pytest.approx(1 / 2)
    assert recall_at_fpr(labels, scores, 0.03) == pytest.approx(2 / 2)  # now all three fit the budget


def brute_force_recall_at_fpr(normal: np.ndarray, anomalies: np.ndarray, fpr: float) -> float:
    """Largest recall over every threshold that matters (each score, and below all of them)."""
    best = 0.0
    for threshold in np.r_[-np.inf, normal, anomalies]:
        if (normal > threshold).mean() <= fpr:
            best = max(best, float((anomalies > threshold).mean()))
    return best


@pytest.mark.parametrize("n_normal", [1, 7, 100, 333, 1000])
@pytest.mark.parametrize("ties", [False, True])
def test_recall_at_fpr_is_the_best_recall_within_the_false_positive_budget(n_normal: int, ties: bool) -> None:
    rng = np.random.default_rng(n_normal)
    normal, anomalies = rng.normal(size=n_normal), rng.normal(1.5, 1.0, size=40)
    if ties:  # few distinct values: many rows tie with any threshold
        normal, anomalies = np.round(normal * 2) / 2, np.round(anomalies * 2) / 2
    labels = np.r_[np.zeros(n_normal), np.ones(anomalies.size)]
    scores = np.r_[normal, anomalies]
    for fpr in (0.0, 0.01, 0.05, 0.07, 0.1, 0.29, 0.5, 0.99, 1.0):
        threshold = fpr_threshold(normal, fpr)
        assert (normal > threshold).mean() <= fpr, fpr
        assert recall_at_fpr(labels, scores, fpr) == brute_force_recall_at_fpr(normal, anomalies, fpr), fpr


@pytest.mark.parametrize("n", [1, 10, 99, 100, 1000])
def test_fpr_threshold_flags_floor_fpr_n_distinct_rows_and_never_more_than_fpr(n: int) -> None:
    rng = np.random.default_rng(n)
    distinct, tied = rng.normal(size=n), rng.integers(0, 5, size=n).astype(float)
    for fpr in (0.0, 0.01, 0.05, 0.07, 0.1, 0.29, 0.5, 1.0):
        flagged = int((distinct > fpr_threshold(distinct, fpr)).sum())
        assert flagged == math.floor(round(fpr * n, 9)), (fpr, flagged)
        assert (tied > fpr_threshold(tied, fpr)).mean() <= fpr


@pytest.mark.parametrize("fpr", [-0.01, 1.01, float("nan")])
def test_fpr_threshold_refuses_rates_outside_zero_one_and_empty_scores(fpr: float) -> None:
    with pytest.raises(ValueError, match="fpr must lie in"):
        fpr_threshold([1.0, 2.0], fpr)
    with pytest.raises(ValueError, match="at least one"):
        fpr_threshold([], 0.1)


def test_precision_at_k_defaults_to_the_number_of_anomalies() -> None:
    labels = np.array([0, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.0])
    assert precision_at_k(labels, scores) == pytest.approx(0.5)  # top 2: rows 0 (normal) and 1 (anomaly)
    assert precision_at_k(labels, scores, k=4) == pytest.approx(0.5)


def test_precision_at_k_of_constant_scores_is_the_base_rate_in_any_row_order() -> None:
    labels = np.r_[np.ones(10), np.zeros(990)]
    scores = np.zeros(1000)
    assert precision_at_k(labels, scores) == pytest.approx(0.01)
    assert precision_at_k(labels[::-1], scores) == pytest.approx(0.01)
    assert precision_at_k(labels, scores, k=500) == pytest.approx(0.01)


def test_precision_at_k_without_ties_is_the_plain_top_k() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=300) < 0.2).astype(int)
    scores = rng.normal(size=300) + labels
    for k in (1, 10, int(labels.sum()), 300):
        assert precision_at_k(labels, scores, k=k) == pytest.approx(labels[np.argsort(-scores)[:k]].mean())


def test_precision_at_k_averages_over_every_order_of_the_tied_rows() -> None:
    rng = np.random.default_rng(2)
    labels, scores = np.array([0, 1, 1, 0, 1, 0, 0]), rng.integers(0, 3, size=7).astype(float)
    for k in range(1, 8):
        by_order = [
            labels[list(order)][np.argsort(-scores[list(order)], kind="stable")[:k]].mean()
            for order in itertools.permutations(range(7))
        ]
        assert precision_at_k(labels, scores, k=k) == pytest.approx(np.mean(by_order)), k


@pytest.mark.parametrize("k", [0, 7, 2.0, True])
def test_precision_at_k_refuses_a_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match="k must"):
        precision_at_k([0, 1, 0, 1, 0, 0], [0.9, 0.8, 0.1, 0.2, 0.3, 0.0], k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "labels", [[0.0, 0.7, 1.0, 1.0], [0, 1, 1, np.nan], [0, 1, -1, 1], [0, 1, 1, 1.0000001]]
)
def test_labels_other_than_zero_or_one_are_refused_before_any_cast(labels: list[float]) -> None:
    with pytest.raises(
        ValueError, match=r"exactly 0 \(normal\) or 1 \(anomaly\); 1 are not, the first at position"
    ):
        detection_metrics(labels, [0.1, 0.2, 0.3, 0.4])


def test_labels_may_be_booleans_or_whole_floats_but_not_text() -> None:
    scores = np.array([0.1, 0.9, 0.2, 0.8])
    expected = precision_at_k([0, 1, 0, 1], scores)
    assert precision_at_k([False, True, False, True], scores) == expected
    assert precision_at_k([0.0, 1.0, 0.0, 1.0], scores) == expected
    for text in (["0", "1", "0", "1"], np.array(["0", "1", "0", "1"], dtype=object)):
        with pytest.raises(ValueError, match="labels must be numbers or booleans"):
            precision_at_k(text, scores)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [1.0, 2.0, 3.0], "labels must hold both 0 .normal. and 1 .anomaly. rows"),
        (
            [0, 1, 2],
            [1.0, 2.0, 3.0],
            "labels must be exactly 0 .normal. or 1 .anomaly.; 1 are not, the first at position 2",
        ),
        ([0, 1], [1.0, np.nan], "scores hold NaN or infinite values"),
        ([0, 1], [1.0], "labels and scores differ in length: 2 vs 1"),
    ],
)
def test_bad_inputs_are_refused(labels: list[int], scores: list[float], message: str) -> None:
    """By the module's own checks, naming the problem: scikit-learn raises a ValueError for each of
    these too, so without ``match`` the test passed with the checks deleted."""
    with pytest.raises(ValueError, match=message):
        detection_metrics(labels, scores)


# --- curves ---------------------------------------------------------------------------------------


def _labels_and_scores(n: int, positive_rate: float, separation: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < positive_rate).astype(int)
    return labels, rng.normal(size=n) + separation * labels


@pytest.mark.parametrize(
    ("n", "positive_rate", "separation"),
    [(20_000, 0.15, 1.0), (50_000, 0.02, 2.0), (5_000, 0.5, 0.3), (100_000, 0.15, 0.5)],
)
def test_thinned_curves_keep_their_endpoints_their_order_and_their_area(
    n: int, positive_rate: float, separation: float
) -> None:
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    from ebm.evaluation.curves import MAX_CURVE_POINTS, detection_curves

    labels, scores = _labels_and_scores(n, positive_rate, separation, seed=n)
    curves = detection_curves(labels, scores)
    exact_fpr, exact_tpr, _ = roc_curve(labels, scores)
    exact_precision, exact_recall, _ = precision_recall_curve(labels, scores)
    assert len(exact_recall) > MAX_CURVE_POINTS  # there was something to thin
    assert len(curves.fpr) <= MAX_CURVE_POINTS and len(curves.recall) <= MAX_CURVE_POINTS
    assert (curves.fpr[0], curves.tpr[0], curves.fpr[-1], curves.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(curves.fpr) >= 0) and np.all(np.diff(curves.tpr) >= 0)
    assert (curves.recall[0], curves.precision[0]) == (0.0, 1.0)
    assert (curves.recall[-1], curves.precision[-1]) == (1.0, pytest.approx(labels.mean()))
    assert np.all(np.diff(curves.recall) >= 0)
    assert curves.auroc == pytest.approx(roc_auc_score(labels, scores))
    assert curves.auprc == pytest.approx(average_precision_score(labels, scores))
    assert curves.positive_rate == pytest.approx(labels.mean())
    assert abs(auc(curves.fpr, curves.tpr) - roc_auc_score(labels, scores)) < 1e-3
    assert abs(auc(curves.recall, curves.precision) - auc(exact_recall, exact_precision)) < 1e-3
    assert abs(auc(exact_fpr, exact_tpr) - curves.auroc) < 1e-12  # the reference itself is exact


def test_thinning_follows_the_curve_not_the_index() -> None:
    # 1,900 points crowd one corner of a staircase and 100 long steps make the rest: a point every k-th
    # index would keep the crowd and cut the corners of the steps, losing ~0.005 of area
    from sklearn.metrics import auc

    from ebm.evaluation.curves import thin_curve

    crowd = np.linspace(0.0, 0.01, 1900)
    steps = np.repeat(np.linspace(0.01, 1.0, 100), 2)
    x = np.r_[crowd, steps]
    y = np.r_[crowd, np.r_[steps[1:], 1.0]]  # up, then right: each step's corner is a point of its own
    thin_x, thin_y = thin_curve(x, y, max_points=400)
    assert len(thin_x) <= 400 and (thin_x[0], thin_x[-1]) == (x[0], x[-1])
    assert abs(auc(thin_x, thin_y) - auc(x, y)) < 1e-3


def test_thin_curve_leaves_short_curves_alone_and_refuses_bad_input() -> None:
    from ebm.evaluation.curves import thin_curve

    x, y = np.linspace(0, 1, 10), np.linspace(0, 1, 10) ** 2
    assert all(np.array_equal(a, b) for a, b in zip(thin_curve(x, y, 10), (x, y), strict=True))
    with pytest.raises(ValueError, match="one length"):
        thin_curve(x, y[:-1])
    with pytest.raises(ValueError, match="max_points"):
        thin_curve(x, y, 3)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "both classes"),
        ([0, 1, 1], [0.1, math.nan, 0.3], "1 of 3 scores are NaN"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 or 1"),
        ([0, 1], [0.1, 0.2, 0.3], "differ in length"),
    ],
)
def test_curves_refuse_inputs_they_cannot_draw(labels: list[int], scores: list[float], message: str) -> None:
    from ebm.evaluation.curves import detection_curves

    with pytest.raises(ValueError, match=message):
        detection_curves(labels, scores)


def test_a_curve_file_with_a_short_row_is_an_error_naming_the_file(tmp_path: Path) -> None:
    from ebm.evaluation.curves import read_curve_csv

    path = tmp_path / "ebm.csv"
    path.write_text("model,fpr,tpr\nebm,0.0,0.0\nebm,0.5\n")  # the last row lost its tpr
    with pytest.raises(ValueError, match=r"ebm\.csv: "):
        read_curve_csv(path, "fpr", "tpr")
